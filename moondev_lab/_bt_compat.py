"""The one place that touches backtesting.py's private API (checked against backtesting 0.6.6).

Keep additions here small and additive; every other module imports these names
instead of reaching into ``backtesting._plotting`` or ``backtesting._stats``.
"""
from __future__ import annotations

import contextlib
import threading

import pandas as pd

_plot_lock = threading.Lock()


def drawdown_duration(drawdown: pd.Series) -> pd.Series:
    """backtesting.py's ``DrawdownDuration`` column of ``_equity_curve`` for a drawdown series."""
    from backtesting._stats import compute_drawdown_duration_peaks

    duration, _peaks = compute_drawdown_duration_peaks(drawdown)
    return duration


@contextlib.contextmanager
def _silent_plotting():
    """backtesting.py's plotting with its show, global reset and remote tracking hook switched off.

    ``backtesting._plotting.plot`` always resets bokeh's global output state, shows
    the figure (CDN resources, or a file named after the strategy) and adds a
    document hook that loads a tracking iframe from the internet. Those three
    module-level hooks become no-ops, under a lock, for the duration of one call;
    the caller decides how to render (inline resources).
    """
    import backtesting._plotting as plotting

    names = ("show", "_bokeh_reset", "_add_popcon")
    with _plot_lock:
        saved = {n: getattr(plotting, n) for n in names}
        for n in names:
            setattr(plotting, n, lambda *a, **k: None)
        try:
            yield plotting
        finally:
            for n, f in saved.items():
                setattr(plotting, n, f)


def build_plot(results: pd.Series, df: pd.DataFrame, **kwargs):
    """backtesting.py's interactive figure for ``results`` on ``df``, *without* showing or saving it."""
    with _silent_plotting() as plotting:
        return plotting.plot(results=results, df=df, indicators=[], open_browser=False, **kwargs)


def build_heatmaps(heatmap: pd.Series, agg: str = "max", ncols: int = 3, plot_width: int = 1200):
    """backtesting.py's ``plot_heatmaps`` figure, without showing it."""
    with _silent_plotting() as plotting:
        return plotting.plot_heatmaps(heatmap, agg, ncols, plot_width=plot_width, open_browser=False)


def quiet_notebook_detection() -> None:
    """backtesting warns "Jupyter Notebook detected" on import in a kernel, and loads BokehJS from a CDN.

    We render every plot ourselves with inline resources, so the detection only
    adds a warning and a remote script: import the plotting module with the
    detection switched off, then leave it off.
    """
    import os
    import sys
    import warnings

    if "backtesting._plotting" in sys.modules:  # too late to keep the warning away; switch it off
        sys.modules["backtesting._plotting"].set_bokeh_output(notebook=False)
        return
    saved = os.environ.pop("JPY_PARENT_PID", None), os.environ.get("MPLBACKEND")
    if saved[1] and "inline" in saved[1]:
        os.environ.pop("MPLBACKEND")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Jupyter Notebook detected")
            import backtesting._plotting as plotting
    finally:
        if saved[0] is not None:
            os.environ["JPY_PARENT_PID"] = saved[0]
        if saved[1] is not None:
            os.environ["MPLBACKEND"] = saved[1]
    plotting.set_bokeh_output(notebook=False)

