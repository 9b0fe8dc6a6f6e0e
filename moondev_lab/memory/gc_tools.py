"""Garbage-collector helpers: thresholds, freezing, stats and pause timing.

:class:`GCWatcher` times every collection through ``gc.callbacks``; the
callback does two clock reads and a few integer updates, so leaving it on
costs well under a microsecond per collection.

>>> w = GCWatcher().install()
>>> _ = gc.collect()
>>> w.totals()["collections"][2] >= 1
True
>>> w.uninstall()
"""
from __future__ import annotations

import gc
import math
import time
from bisect import bisect_left
from collections import deque
from dataclasses import dataclass, field

_clock = time.perf_counter_ns


class GCWatcher:
    """Count collections per generation and time their pauses.

    ``window()`` returns what happened since the previous ``window()`` call
    (the memwatch magic calls it once per cell); ``totals()`` everything
    since install. Full (generation-2) collection times are kept for the
    last ten minutes to give a per-minute rate.
    """

    def __init__(self) -> None:
        self._t0 = 0
        self.collections = [0, 0, 0]
        self.collected = 0
        self.uncollectable = 0
        self.pause_ns = 0
        self.max_pause_ns = 0
        self._mark = ([0, 0, 0], 0, 0)
        self._window_max_ns = 0
        self.full_times: deque[float] = deque(maxlen=4096)
        self.installed = False

    # The callback runs inside every collection: keep it tiny.
    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t0 = _clock()
            return
        dt = _clock() - self._t0
        gen = info["generation"]
        self.collections[gen] += 1
        self.pause_ns += dt
        if dt > self._window_max_ns:
            self._window_max_ns = dt
            if dt > self.max_pause_ns:
                self.max_pause_ns = dt
        if gen == 2:
            self.full_times.append(time.monotonic())
        self.collected += info["collected"]
        self.uncollectable += info["uncollectable"]

    def install(self) -> "GCWatcher":
        if not self.installed:
            gc.callbacks.append(self._callback)
            self.installed = True
        return self

    def uninstall(self) -> None:
        if self.installed:
            try:
                gc.callbacks.remove(self._callback)
            except ValueError:
                pass
            self.installed = False

    def window(self) -> dict:
        """Collections per generation, total and max pause (ms) since the last call."""
        cols, pause_ms, max_pause_ms, collected = self.window_values()
        return {"collections": cols, "pause_ms": pause_ms, "max_pause_ms": max_pause_ms,
                "collected": collected}

    def window_values(self) -> tuple[list[int], float, float, int]:
        """:meth:`window` as a tuple ``(collections, pause_ms, max_pause_ms, collected)``.

        The per-cell ledger calls this twice per cell, so it avoids building
        a dict, and nothing is subtracted when no collection ran.
        """
        c = self.collections
        mark = self._mark
        if c == mark[0] and self._window_max_ns == 0:  # the common case for a short cell
            return [0, 0, 0], 0.0, 0.0, 0
        cols, pause, collected = mark
        out = ([c[0] - cols[0], c[1] - cols[1], c[2] - cols[2]], (self.pause_ns - pause) / 1e6,
               self._window_max_ns / 1e6, self.collected - collected)
        self._mark = (list(c), self.pause_ns, self.collected)
        self._window_max_ns = 0
        return out

    def full_per_minute(self, now: float | None = None) -> float:
        """Full (gen-2) collections in the last 60 s."""
        now = time.monotonic() if now is None else now
        # A copy made in C: iterating the deque itself could trigger a collection
        # whose callback appends to it ("deque mutated during iteration").
        times = list(self.full_times)
        return float(len(times) - bisect_left(times, now - 60.0))

    def full_per_minute_above(self, limit: float, now: float) -> bool:
        """``full_per_minute(now) > limit`` in O(1): is the k-th latest full collection recent?"""
        times = self.full_times
        # inf (a threshold set never to alert) or nan: int() would raise, so the slow form decides
        k = int(limit) + 1 if math.isfinite(limit) and limit >= 0 else 0
        if k <= 0:
            return self.full_per_minute(now) > limit
        # Times are appended in order: if the k-th latest is within 60 s, so are the k-1 after it.
        return len(times) >= k and now - times[-k] <= 60.0

    def totals(self) -> dict:
        return {"collections": list(self.collections), "pause_ms": self.pause_ns / 1e6,
                "max_pause_ms": self.max_pause_ns / 1e6, "collected": self.collected,
                "uncollectable": self.uncollectable}


#: One process-wide watcher, shared by the monitor, magics and dashboard.
_watcher: GCWatcher | None = None


def gc_watcher(install: bool = True) -> GCWatcher:
    """The process-wide :class:`GCWatcher` (installed unless ``install=False``)."""
    global _watcher
    if _watcher is None:
        _watcher = GCWatcher()
    return _watcher.install() if install else _watcher


def set_thresholds(gen0: int = 700, gen1: int = 10, gen2: int = 10) -> tuple[int, int, int]:
    """Set ``gc`` thresholds; return the previous ones.

    Raising ``gen0`` (e.g. to 50_000) makes pandas-heavy code collect less
    often, at the cost of holding cyclic garbage a little longer.

    >>> old = set_thresholds(*gc.get_threshold()); len(old)
    3
    """
    old = gc.get_threshold()
    gc.set_threshold(gen0, gen1, gen2)
    return old


def freeze_after_imports() -> int:
    """Collect once, then move every tracked object to the permanent generation.

    Call it after heavy imports (pandas, numpy, backtesting): later full
    collections skip those objects, and forked workers share their pages
    copy-on-write. Returns how many objects are frozen.

    >>> freeze_after_imports() >= 0
    True
    >>> gc.unfreeze()  # (the example's process goes on as before)
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


@dataclass
class GCStats:
    """A snapshot of the collector's state; shown by ``%gcstats``."""

    enabled: bool
    thresholds: tuple[int, int, int]
    counts: tuple[int, int, int]
    frozen: int
    garbage: int
    per_generation: list[dict]
    watcher: dict | None = field(default=None)

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    def __str__(self) -> str:
        lines = [f"gc enabled={self.enabled} thresholds={self.thresholds} counts={self.counts} "
                 f"frozen={self.frozen:,} gc.garbage={self.garbage}"]
        lines.append(f"{'gen':>3} {'collections':>12} {'collected':>12} {'uncollectable':>14}")
        for i, g in enumerate(self.per_generation):
            lines.append(f"{i:>3} {g['collections']:>12,} {g['collected']:>12,} {g['uncollectable']:>14,}")
        if self.watcher:
            w = self.watcher
            lines.append(f"timed since watch started: collections {w['collections']}, "
                         f"pause total {w['pause_ms']:.1f} ms, max {w['max_pause_ms']:.2f} ms")
        return "\n".join(lines)

    __repr__ = __str__

    def _repr_html_(self) -> str:
        rows = "".join(f"<tr><td>{i}</td><td>{g['collections']:,}</td><td>{g['collected']:,}</td>"
                       f"<td>{g['uncollectable']:,}</td></tr>" for i, g in enumerate(self.per_generation))
        extra = ""
        if self.watcher:
            w = self.watcher
            extra = (f"<p>Timed: pause total {w['pause_ms']:.1f} ms, max {w['max_pause_ms']:.2f} ms, "
                     f"collections {w['collections']}</p>")
        return (f"<p>gc enabled={self.enabled}, thresholds={self.thresholds}, counts={self.counts}, "
                f"frozen={self.frozen:,}, gc.garbage={self.garbage}</p>"
                "<table><tr><th>gen</th><th>collections</th><th>collected</th><th>uncollectable</th></tr>"
                f"{rows}</table>{extra}")


def gc_stats() -> GCStats:
    """Collector state plus pause timings if a :class:`GCWatcher` is running.

    >>> gc_stats().thresholds == gc.get_threshold()
    True
    """
    return GCStats(
        enabled=gc.isenabled(),
        thresholds=gc.get_threshold(),
        counts=gc.get_count(),
        frozen=gc.get_freeze_count(),
        garbage=len(gc.garbage),
        per_generation=gc.get_stats(),
        watcher=_watcher.totals() if _watcher is not None and _watcher.installed else None,
    )
