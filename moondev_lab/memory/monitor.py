"""Memory metrics against thresholds, alerts, and pressure actions.

The default thresholds are the table users asked for (sizes are binary:
"2 GB" means 2 GiB, as RSS tools show it):

============================  ===========  ===========
metric                        normal       alert
============================  ===========  ===========
``rss``                       < 2 GB       > 2.5 GB
``traced_heap`` (tracemalloc) < 1 GB       > 1.2 GB
``gc_per_minute`` (full)      < 10         > 15
``gc_pause_ms``               < 100        > 200
``objects`` (live tracked)    < 10,000     > 15,000
``cache_entries``             < 5,000      > 7,000
============================  ===========  ===========

Between *normal* and *alert* a metric is ``"warn"``. Two choices to know:

* ``gc_per_minute`` counts **full (generation-2)** collections. Young
  collections run hundreds of times a second in ordinary pandas code, so
  counting them would alert all the time.
* ``objects`` is ``len(gc.get_objects())``, which skips frozen objects: call
  :func:`~moondev_lab.memory.gc_tools.freeze_after_imports` after your
  imports and the count means "objects your code made". It costs 6-60 ms,
  so the per-cell ledger skips it; :meth:`Monitor.check` includes it.

When a *memory* metric (rss, traced_heap, objects, cache_entries) alerts,
the pressure actions run (at most once per ``cooldown_s``): evict unused
cache entries, ``gc.collect()``, shrink worker pools. Each is logged to the
``moondev_lab.memory`` logger with what it freed, and kept in
``monitor.action_log``.

>>> m = Monitor()
>>> m.set_threshold("rss", normal="1KB", alert="2KB")
>>> report = m.check(objects=False, run_actions=False)
>>> report.alerts[0].metric
'rss'
"""
from __future__ import annotations

import gc
import logging
import time
import tracemalloc
from dataclasses import asdict, dataclass, field
from typing import Callable

from .. import _registry
from ._peak import current_rss, format_bytes, parse_size
from .gc_tools import GCWatcher, gc_watcher

log = logging.getLogger("moondev_lab.memory")

SIZE_METRICS = ("rss", "traced_heap")
#: Alerts on these free memory when acted on; GC alerts would only get worse.
MEMORY_METRICS = ("rss", "traced_heap", "objects", "cache_entries")


@dataclass
class Threshold:
    """``value < normal`` is normal, ``value > alert`` is an alert."""

    metric: str
    normal: float
    alert: float
    unit: str = ""

    def level(self, value: float | None) -> str:
        if value is None:
            return "n/a"
        if value > self.alert:
            return "alert"
        return "normal" if value < self.normal else "warn"

    def show(self, value: float) -> str:
        return format_bytes(value) if self.unit == "bytes" else f"{value:,.4g}{self.unit}"


def default_thresholds() -> dict[str, Threshold]:
    """A fresh copy of the default table (see the module docstring)."""
    g = 1024**3
    return {
        "rss": Threshold("rss", 2 * g, 2.5 * g, "bytes"),
        "traced_heap": Threshold("traced_heap", 1 * g, 1.2 * g, "bytes"),
        "gc_per_minute": Threshold("gc_per_minute", 10, 15, "/min"),
        "gc_pause_ms": Threshold("gc_pause_ms", 100, 200, " ms"),
        "objects": Threshold("objects", 10_000, 15_000),
        "cache_entries": Threshold("cache_entries", 5_000, 7_000),
    }


@dataclass
class Alert:
    metric: str
    level: str
    value: float
    threshold: float
    text: str

    def __str__(self) -> str:
        return self.text


@dataclass
class ActionResult:
    """What one pressure action did: ``freed`` is in ``unit``."""

    name: str
    freed: float
    unit: str
    rss_before: int
    rss_after: int
    seconds: float
    reason: str = ""
    error: str | None = None

    def __str__(self) -> str:
        freed = format_bytes(self.freed) if self.unit == "bytes" else f"{self.freed:,.0f} {self.unit}"
        rss = format_bytes(self.rss_after - self.rss_before, signed=True)
        err = f" (failed: {self.error})" if self.error else ""
        return f"{self.name}: freed {freed}, rss {rss} in {self.seconds * 1e3:.1f} ms{err}"


def evict_caches() -> tuple[int, str]:
    """Pressure action: drop unused entries of every registered cache."""
    return sum(int(c.evict_unused() or 0) for c in _registry.caches()), "bytes"


def collect_garbage() -> tuple[int, str]:
    """Pressure action: a full ``gc.collect()``."""
    return gc.collect(), "objects"


def shrink_pools() -> tuple[int, str]:
    """Pressure action: stop idle workers of every registered pool."""
    return sum(int(p.shrink() or 0) for p in _registry.pools()), "workers"


def cache_entries() -> int:
    """Entries held by all registered caches (the DataPool and friends)."""
    total = 0
    for c in _registry.caches():
        try:
            total += len(c)
        except Exception:  # a cache being torn down must not break monitoring
            pass
    return total


@dataclass
class MonitorReport:
    metrics: dict
    levels: dict
    alerts: list[Alert]
    actions: list[ActionResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.alerts

    def to_dict(self) -> dict:
        return {"metrics": self.metrics, "levels": self.levels,
                "alerts": [asdict(a) for a in self.alerts], "actions": [asdict(a) for a in self.actions]}

    def __str__(self) -> str:
        lines = [f"{k:<14} {self._show(k, v):>12}  {self.levels.get(k, '')}" for k, v in self.metrics.items()]
        lines += [f"ALERT {a}" for a in self.alerts]
        lines += [f"action {a}" for a in self.actions]
        return "\n".join(lines)

    __repr__ = __str__

    @staticmethod
    def _show(k: str, v) -> str:
        if v is None:
            return "n/a"
        return format_bytes(v) if k in SIZE_METRICS else f"{v:,.4g}"


class Monitor:
    """Sample memory metrics, compare them to thresholds, act on alerts.

    >>> m = Monitor()
    >>> sorted(m.thresholds)[:2]
    ['cache_entries', 'gc_pause_ms']
    """

    def __init__(self, thresholds: dict[str, Threshold] | None = None, cooldown_s: float = 30.0,
                 watcher: GCWatcher | None = None, default_actions: bool = True) -> None:
        self.thresholds = thresholds or default_thresholds()
        self.cooldown_s = cooldown_s
        self.watcher = watcher
        self.actions: list[tuple[str, Callable[[], tuple[float, str] | float]]] = []
        if default_actions:
            self.actions = [("evict caches", evict_caches), ("gc.collect", collect_garbage),
                            ("shrink pools", shrink_pools)]
        self.action_log: list[ActionResult] = []
        self._last_action = float("-inf")

    def set_threshold(self, metric: str, normal=None, alert=None) -> None:
        """Change one threshold; sizes accept strings like ``"3GB"``."""
        if metric not in self.thresholds:
            raise KeyError(f"unknown metric {metric!r}; known: {', '.join(self.thresholds)}")
        t = self.thresholds[metric]
        conv = parse_size if t.unit == "bytes" else float
        if normal is not None:
            t.normal = conv(normal)
        if alert is not None:
            t.alert = conv(alert)

    def register_action(self, name: str, fn: Callable[[], tuple[float, str] | float]) -> None:
        """Add a pressure action; ``fn()`` returns ``(freed, unit)`` or bytes freed."""
        self.actions.append((name, fn))

    # ------------------------------------------------------------ measuring
    def sample(self, objects: bool = True) -> dict:
        """Current values of every metric (``objects`` costs 6-60 ms)."""
        w = self.watcher or gc_watcher()
        return {
            "rss": current_rss(),
            "traced_heap": tracemalloc.get_traced_memory()[0] if tracemalloc.is_tracing() else None,
            "gc_per_minute": w.full_per_minute(),
            "gc_pause_ms": w.max_pause_ns / 1e6,
            "objects": len(gc.get_objects()) if objects else None,
            "cache_entries": cache_entries(),
        }

    def evaluate(self, metrics: dict) -> tuple[dict, list[Alert]]:
        """Levels per metric and the alerts (``value > alert``)."""
        levels, alerts = {}, []
        for name, value in metrics.items():
            t = self.thresholds.get(name)
            if t is None:
                continue
            levels[name] = lvl = t.level(value)
            if lvl == "alert":
                alerts.append(Alert(name, lvl, value, t.alert,
                                    f"{name} {t.show(value)} > alert {t.show(t.alert)}"))
        return levels, alerts

    def check(self, objects: bool = True, run_actions: bool = True) -> MonitorReport:
        """Sample, evaluate, and run pressure actions on memory alerts."""
        metrics = self.sample(objects=objects)
        levels, alerts = self.evaluate(metrics)
        actions = self.maybe_relieve(alerts) if run_actions else []
        return MonitorReport(metrics, levels, alerts, actions)

    # ------------------------------------------------------------ acting
    def maybe_relieve(self, alerts: list[Alert]) -> list[ActionResult]:
        """Run the pressure actions if a memory metric alerts (respecting the cooldown)."""
        mem = [a for a in alerts if a.metric in MEMORY_METRICS]
        if not mem or time.monotonic() - self._last_action < self.cooldown_s:
            return []
        return self.relieve_pressure(reason="; ".join(a.text for a in mem))

    def relieve_pressure(self, reason: str = "manual") -> list[ActionResult]:
        """Run every pressure action now; log and return what each freed."""
        self._last_action = time.monotonic()
        results = []
        for name, fn in self.actions:
            before, t0, err = current_rss(), time.perf_counter(), None
            try:
                out = fn()
                freed, unit = out if isinstance(out, tuple) else (out, "bytes")
            except Exception as exc:  # one failing action must not stop the others
                freed, unit, err = 0, "", f"{type(exc).__name__}: {exc}"
            res = ActionResult(name, freed, unit, before, current_rss(), time.perf_counter() - t0, reason, err)
            (log.error if err else log.warning)("memory pressure (%s): %s", reason, res)
            results.append(res)
        self.action_log.extend(results)
        return results
