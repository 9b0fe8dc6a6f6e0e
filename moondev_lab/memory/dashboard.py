"""A live memory panel: RSS, peak, GC and pool stats, refreshed while cells run.

In a Jupyter kernel with ipywidgets it is an ``HTML`` widget updated by a
background thread; its display carries a ``text/plain`` snapshot, so
frontends without widget support (and saved notebooks) still show numbers.
Without widgets it updates a plain display in place; in a terminal it
prints one snapshot.

>>> d = dashboard(mode="text", start=False)
>>> "RSS" in d.text()
True
"""
from __future__ import annotations

import threading
from html import escape

from .. import _registry
from ._peak import PeakMeter, cgroup_memory, format_bytes
from .gc_tools import gc_watcher
from .monitor import cache_entries


class Dashboard:
    """See :func:`dashboard`."""

    def __init__(self, interval: float = 1.0, mode: str = "auto") -> None:
        self.interval = interval
        self.mode = _pick_mode(mode)
        self.gc = gc_watcher()
        self._meter = PeakMeter()
        self._cg = cgroup_memory()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._widget = None
        self._handle = None

    # ------------------------------------------------------------ content
    def stats(self) -> dict:
        r = self._meter.peek()  # read only: resetting is memwatch's job
        rss, peak = r.end_rss, (r.peak_rss if r.exact else r.end_rss)  # no sampler runs for the panel
        pools = _registry.pools()
        return {"rss": rss, "peak": peak, "cgroup_limit": self._cg.limit,
                "gc": self.gc.totals(), "gc_full_per_min": self.gc.full_per_minute(),
                "cache_entries": cache_entries(), "caches": len(_registry.caches()),
                "pools": len(pools), "workers": sum(_safe_len(p) for p in pools)}

    def text(self, s: dict | None = None) -> str:
        s = s or self.stats()
        limit = f" / limit {format_bytes(s['cgroup_limit'])}" if s["cgroup_limit"] else ""
        g = s["gc"]
        return (f"RSS {format_bytes(s['rss'])}{limit} · peak since reset {format_bytes(s['peak'])} · "
                f"GC {'/'.join(map(str, g['collections']))} ({g['pause_ms']:.0f} ms, "
                f"max {g['max_pause_ms']:.1f} ms, {s['gc_full_per_min']:.0f} full/min) · "
                f"caches {s['caches']} ({s['cache_entries']:,} entries) · "
                f"pools {s['pools']} ({s['workers']} workers)")

    def html(self, s: dict | None = None) -> str:
        s = s or self.stats()
        pct = ""
        if s["cgroup_limit"]:
            frac = min(1.0, s["rss"] / s["cgroup_limit"])
            pct = (f"<div style='background:#eee;width:240px;height:8px'><div style='background:"
                   f"{'#b00' if frac > 0.8 else '#2a7'};width:{frac * 240:.0f}px;height:8px'></div></div>")
        return f"<div style='font-family:monospace'>{escape(self.text(s))}{pct}</div>"

    # ------------------------------------------------------------ showing
    def show(self) -> "Dashboard":
        from IPython.display import display

        if self.mode == "widget":
            import ipywidgets

            self._widget = ipywidgets.HTML(value=self.html())
            bundle = self._widget._repr_mimebundle_() or {}
            bundle["text/plain"] = self.text()
            display(bundle, raw=True)
        elif self.mode == "text":
            self._handle = display({"text/plain": self.text(), "text/html": self.html()},
                                   raw=True, display_id=True)
        else:  # terminal: one snapshot, nothing to refresh
            print(self.text())
        return self

    def refresh(self) -> None:
        s = self.stats()  # once: the text and the HTML show the same numbers
        if self._widget is not None:
            self._widget.value = self.html(s)
        elif self._handle is not None:
            self._handle.update({"text/plain": self.text(s), "text/html": self.html(s)}, raw=True)

    def start(self) -> "Dashboard":
        if self.mode in ("widget", "text") and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="moondev-mem-dashboard", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.refresh()
            except Exception:  # a closed frontend must not kill the kernel thread noisily
                break

    def stop(self) -> None:
        self._stop.set()
        self._meter.close()

    def __repr__(self) -> str:
        return f"Dashboard({self.mode}) {self.text()}"


def _safe_len(obj) -> int:
    try:
        return len(obj)
    except Exception:
        return 0


def _pick_mode(mode: str) -> str:
    if mode != "auto":
        return mode
    try:
        from IPython import get_ipython

        ip = get_ipython()
    except ImportError:
        return "print"
    if ip is None or type(ip).__name__ != "ZMQInteractiveShell":
        return "print"
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        return "text"
    return "widget"


def dashboard(interval: float = 1.0, mode: str = "auto", start: bool = True) -> Dashboard:
    """Show a live memory panel (``mode``: auto, widget, text or print)."""
    d = Dashboard(interval, mode)
    if start:
        d.show().start()
    return d
