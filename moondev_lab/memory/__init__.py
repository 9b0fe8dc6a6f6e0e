"""Memory toolkit: exact per-cell peaks, leak checks, GC stats, a monitor.

Library first; the IPython magics (``%load_ext moondev_lab``) sit on top.

>>> from moondev_lab import memory
>>> with memory.PeakMeter() as m:
...     buf = bytearray(50 * 2**20); del buf
>>> m.reading.peak_above_start > 40 * 2**20, m.reading.exact
(True, True)

Modules: :mod:`._peak` (exact peak, sampling fallback, cgroup limits),
:mod:`.monitor` (thresholds, alerts, pressure actions), :mod:`.leaks`
(tracemalloc diffs, growth fits, type counts, variable sizes),
:mod:`.gc_tools`, :mod:`.health`, :mod:`.dashboard`, :mod:`.cell_ledger`,
:mod:`.cell_vars` (which variables a cell touched) and :mod:`.watch` (the
per-cell ledger behind ``%memwatch``).

Note: resetting the peak also resets ``getrusage().ru_maxrss`` for the
whole process (it reads the same kernel high-water mark).
"""
from __future__ import annotations

from ._peak import (CgroupMemory, PeakMeter, PeakReading, cgroup_memory, exact_peak_supported,
                    format_bytes, measure_peak, parse_size)
from .cell_ledger import LEDGER_MIME, CellLedger, CellRecord, LedgerReport, ledger_report, read_ledger
from .cell_vars import CellNames, CellVariables
from .dashboard import Dashboard, dashboard
from .gc_tools import GCStats, GCWatcher, freeze_after_imports, gc_stats, gc_watcher, set_thresholds
from .health import HealthReport, health_check
from .leaks import (LeakReport, VariableTracker, deep_size, diff_object_counts, grown_variables,
                    leak_check, namespace_sizes, object_counts, snapshot_diff, take_snapshot, top_types)
from .monitor import ActionResult, Alert, Monitor, MonitorReport, Threshold, default_thresholds
from .watch import MemWatch

__all__ = [
    "ActionResult", "Alert", "CellLedger", "CellNames", "CellRecord", "CellVariables", "LedgerReport",
    "ledger_report", "CgroupMemory", "Dashboard", "GCStats",
    "GCWatcher", "HealthReport", "LEDGER_MIME", "LeakReport", "MemWatch", "Monitor", "MonitorReport",
    "PeakMeter", "PeakReading", "Threshold", "VariableTracker", "cgroup_memory", "dashboard",
    "deep_size", "default_thresholds", "diff_object_counts", "exact_peak_supported", "format_bytes",
    "freeze_after_imports", "gc_stats", "gc_watcher", "grown_variables", "health_check", "leak_check",
    "measure_peak", "namespace_sizes", "object_counts", "parse_size", "read_ledger", "set_thresholds",
    "snapshot_diff", "take_snapshot", "top_types",
]
