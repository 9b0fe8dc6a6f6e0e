"""Plots that work offline: backtesting.py's interactive chart, heatmaps and equity overlays.

Every plot is a :class:`Plot`: displayed inline in a notebook (BokehJS inline,
loaded once per kernel, never from a CDN) and saved as a self-contained HTML
file whose title names the strategy and the run.

>>> from moondev_lab.plotting import Plot
>>> p = result.plot()                          # doctest: +SKIP
>>> p                                          # in a notebook: the interactive chart  # doctest: +SKIP
>>> p.save("plot.html")                        # one file, no remote scripts           # doctest: +SKIP
"""
from __future__ import annotations

import contextlib
import html
import os
import threading
import warnings
from pathlib import Path
from typing import Any

import pandas as pd

_loaded_lock = threading.Lock()
_loaded_in_kernel = False


def _resources():
    from bokeh.resources import INLINE

    return INLINE


def _ensure_bokehjs() -> None:
    """Publish BokehJS (inline, no network) into this kernel's notebook once."""
    global _loaded_in_kernel
    with _loaded_lock:
        if _loaded_in_kernel:
            return
        from bokeh.io import output_notebook

        output_notebook(resources=_resources(), hide_banner=True)
        _loaded_in_kernel = True


def _in_kernel() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    ip = get_ipython()
    return ip is not None and getattr(ip, "kernel", None) is not None


class Plot:
    """A bokeh figure with a title: shows inline in notebooks, saves to one offline HTML file."""

    def __init__(self, figure: Any, title: str):
        self.figure = figure
        self.title = title

    def __repr__(self) -> str:
        return f"<Plot {self.title!r}>"

    def to_html(self) -> str:
        """A complete HTML page, BokehJS inline: opens without any network."""
        from bokeh.embed import file_html

        return file_html(self.figure, _resources(), title=self.title)

    def save(self, path: str | Path) -> Path:
        """Write :meth:`to_html` to ``path`` (atomically: a reader never sees half a file)."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(self.to_html(), encoding="utf-8")
        os.replace(tmp, path)
        return path

    def _repr_mimebundle_(self, include=None, exclude=None) -> dict:
        """In a kernel: bokeh's own notebook embedding, after BokehJS was published inline."""
        from bokeh.embed.notebook import notebook_content

        if _in_kernel():
            _ensure_bokehjs()
        script, div, _doc = notebook_content(self.figure)
        body = (f"<div class='moondev-plot' title='{html.escape(self.title, quote=True)}'>{div}</div>"
                f"<script type='text/javascript'>{script}</script>")
        return {"text/html": body, "text/plain": repr(self)}

    def show(self) -> None:
        """Display in a notebook, or write a temp HTML file and say where (scripts, terminals)."""
        if _in_kernel():
            from IPython.display import display

            display(self)
            return
        import tempfile

        fd, name = tempfile.mkstemp(suffix=".html", prefix="moondev-plot-")
        os.close(fd)
        print(f"plot written to {self.save(name)}")


def backtest_plot(stats: pd.Series, data: pd.DataFrame, title: str, indicators=(), **kwargs) -> Plot:
    """backtesting.py's chart (candles, equity, P/L, trades, volume, indicators) for ``stats`` on ``data``.

    ``indicators``: the run's claimed ``Strategy.I`` values (:func:`~moondev_lab.sandbox._wire.decode_indicators`
    dicts), possibly downsampled; drawn as ``Backtest.plot()`` draws them, for display only.
    """
    from ._bt_compat import build_plot

    stats, data = _naive_utc(stats, data)
    shown = [x for x in (_full_length(spec, len(data)) for spec in indicators) if x is not None]
    with warnings.catch_warnings():
        # The chart resamples 31k bars to ~10k candles for the browser, and says so; that is by design here.
        warnings.filterwarnings("ignore", message="Data contains too many candlesticks")
        fig = build_plot(stats, data, indicators=shown, **kwargs)
    _set_title(fig, title)
    return Plot(fig, title)


def _full_length(spec: dict, n_bars: int) -> dict | None:
    """An indicator's rows on every bar: a downsampled row holds each sampled value until the next sample.

    The chart shows at most ~10k candles, so at its resolution that is the indicator itself.
    None for rows that do not fit these bars (data changed since the run).
    """
    import numpy as np

    from .sandbox._wire import sample_index

    values = np.atleast_2d(np.asarray(spec["values"], dtype=np.float64))
    k = values.shape[1]
    if k == n_bars:
        return {**spec, "values": values}
    if not 0 < k < n_bars:
        return None
    held = np.searchsorted(sample_index(n_bars, k), np.arange(n_bars), side="right") - 1
    return {**spec, "values": values[:, held]}


def _naive_utc(stats: pd.Series, data: pd.DataFrame) -> tuple[pd.Series, pd.DataFrame]:
    """Bars, equity and trade times in UTC *without* a timezone, for bokeh.

    Tz-aware times reach bokeh as object arrays, and numpy warns on each conversion
    ("no explicit representation of timezones"); the axis shows UTC either way.
    """
    if getattr(data.index, "tz", None) is None:
        return stats, data
    data = data.copy(deep=False)
    data.index = data.index.tz_convert(None)
    equity = stats["_equity_curve"].copy(deep=False)
    equity.index = data.index
    trades = stats["_trades"].copy(deep=False)
    for col in ("EntryTime", "ExitTime"):
        # (no trades: the column is an empty object column, with no .dt accessor)
        if col in trades and isinstance(trades[col].dtype, pd.DatetimeTZDtype):
            trades[col] = trades[col].dt.tz_convert(None)
    stats = stats.copy()
    stats["_equity_curve"], stats["_trades"] = equity, trades
    return stats, data


def _set_title(fig, title: str) -> None:
    from bokeh.models import Title

    first = fig.children[0] if hasattr(fig, "children") and fig.children else None
    target = first[0] if isinstance(first, tuple) else first
    if target is not None and hasattr(target, "title"):
        target.title = Title(text=title)


def heatmap_plot(heatmap: pd.Series, title: str, agg: str = "max") -> Plot:
    """backtesting.py's heatmaps of every pair of parameters (or a bar chart for one parameter)."""
    from bokeh.plotting import figure

    if heatmap.index.nlevels >= 2:
        from ._bt_compat import build_heatmaps

        fig = build_heatmaps(heatmap, agg=agg, ncols=min(3, heatmap.index.nlevels), plot_width=900)
        _set_title(fig, title)
        return Plot(fig, title)
    x = [str(v) for v in heatmap.index]
    fig = figure(x_range=x, title=title, height=300, width=700, tools="hover,save,reset",
                 y_axis_label=str(heatmap.name), x_axis_label=str(heatmap.index.name))
    fig.vbar(x=x, top=heatmap.fillna(0).to_numpy(), width=0.8)
    return Plot(fig, title)


def equity_overlay(curves: dict[str, pd.Series], title: str) -> Plot:
    """Several equity curves, each relative to its own start (1.0 = starting cash), on one time axis."""
    from bokeh.palettes import Category10
    from bokeh.plotting import figure

    fig = figure(title=title, x_axis_type="datetime", height=350, sizing_mode="stretch_width",
                 tools="xpan,xwheel_zoom,box_zoom,reset,save", y_axis_label="equity / starting equity")
    colors = Category10[10]
    for k, (name, curve) in enumerate(curves.items()):
        if curve is None or not len(curve):
            continue
        rel = curve / float(curve.iloc[0])
        idx = curve.index.tz_convert(None) if getattr(curve.index, "tz", None) is not None else curve.index
        fig.line(idx, rel.to_numpy(), legend_label=name[:60], color=colors[k % 10], line_width=1.5)
    if fig.legend:
        fig.legend.location = "top_left"
        fig.legend.click_policy = "hide"
    return Plot(fig, title)


# ------------------------------------------------------------------ backtesting's notebook detection
# It lives here, not in _bt_compat: it must not import backtesting (``%load_ext`` stays cheap), and it
# touches only backtesting's public ``set_bokeh_output``.
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
