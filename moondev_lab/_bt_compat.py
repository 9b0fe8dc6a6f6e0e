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


@contextlib.contextmanager
def _notebook_detection_off():
    import os
    import warnings

    saved = {k: os.environ.pop(k) for k in ("JPY_PARENT_PID",) if k in os.environ}
    if "inline" in os.environ.get("MPLBACKEND", ""):
        saved["MPLBACKEND"] = os.environ.pop("MPLBACKEND")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Jupyter Notebook detected")
            yield
    finally:
        os.environ.update(saved)


class _QuietPlottingFinder:
    """Import hook: ``backtesting._plotting`` is executed with its notebook detection off, once."""

    name = "backtesting._plotting"

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        import importlib.machinery
        import sys

        sys.meta_path[:] = [f for f in sys.meta_path if f is not self]
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        real = spec.loader.exec_module

        def exec_module(module):
            with _notebook_detection_off():
                real(module)
            module.set_bokeh_output(notebook=False)

        spec.loader.exec_module = exec_module
        return spec


def quiet_notebook_detection() -> None:
    """Keep backtesting's import-time "Jupyter Notebook detected" warning and CDN BokehJS load away.

    In a kernel, ``import backtesting`` warns and calls ``output_notebook()``, which
    loads BokehJS from a CDN (offline: "Loading BokehJS ..." forever). We render every
    plot ourselves with inline resources, so that detection is switched off: now if
    backtesting is already imported, else by a one-shot import hook, so that
    ``%load_ext moondev_lab`` does not pay for importing backtesting and bokeh.
    """
    import sys

    if "backtesting._plotting" in sys.modules:  # too late to keep the warning away; switch it off
        sys.modules["backtesting._plotting"].set_bokeh_output(notebook=False)
    elif not any(isinstance(f, _QuietPlottingFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietPlottingFinder())
