"""The engine behind ``%memwatch``: an always-on, near-free per-cell ledger.

It hooks IPython's ``pre_run_cell``/``post_run_cell`` events, so the cell
source is never touched. Before a cell: reset the kernel's peak RSS. After:
read it, reset it again (which gives the end RSS without reading ``/proc``),
read the GC window, see which variables changed, compare to the monitor's
thresholds, and publish one display output carrying both a readable line and
the machine-readable record (see :mod:`.cell_ledger`). So between cells,
``getrusage().ru_maxrss`` shows the last cell's end RSS, not its peak.

The variables checked after a cell are the ones the cell names (see
:mod:`.cell_vars`): the per-cell cost does not grow with the namespace.
``deep=True`` (``%memwatch on --deep``) scans every variable after every
cell instead; :meth:`MemWatch.scan` does it once.

>>> from IPython.core.interactiveshell import InteractiveShell   # doctest: +SKIP
>>> w = MemWatch(InteractiveShell.instance()).on()               # doctest: +SKIP
>>> w.ledger.to_frame()                                          # doctest: +SKIP
"""
from __future__ import annotations

import _thread
import math
import threading
import time
import tracemalloc

from ._peak import PeakMeter, cgroup_memory, format_bytes
from .cell_ledger import CellLedger, CellRecord
from .cell_vars import CellNames, CellVariables, source_names
from .gc_tools import gc_watcher
from .leaks import VariableGrowth, take_snapshot, top_allocations
from .monitor import Monitor, cache_entries

_clock = time.perf_counter


class _Watchdog:
    """Polls RSS while a cell runs; flags (and optionally interrupts) at the limit.

    A cell that starts above the limit is stopped only if it grows by
    another 10% of the limit (``step``), so the user can still free memory.
    ``_thread.interrupt_main()`` raises ``KeyboardInterrupt`` in the main
    thread at its next bytecode, exactly like the Jupyter stop button, so the
    kernel survives. A cell stuck inside one long C call is interrupted when
    that call returns. An interrupt sent just as a cell ends lands in the
    post-cell hook instead, as a late stop-button press does: IPython reports
    it there and the kernel lives on.

    An interrupt can be lost: a cell (or a library it calls) may catch it in
    a broad ``except``, and Python drops any exception raised inside a
    ``gc`` callback or a ``__del__``. So while the cell keeps growing, the
    watchdog interrupts again at every further ``step``.

    The main thread only assigns attributes under a C lock and wakes the
    idle thread by releasing another bare C lock, never through a
    ``threading.Event``: an interrupt that lands inside ``Event.set()`` can
    leave the event's Python-level condition locked for good, and the
    watchdog would then wait on it forever, unnoticed.
    """

    def __init__(self, rss, limit: int, interrupt: bool, interval: float = 0.01) -> None:
        self.rss, self.limit, self.interrupt, self.interval = rss, limit, interrupt, interval
        self.step = max(limit // 10, 1)
        self.fired = False
        self.trigger: int | None = None  # the RSS that fires, while a cell is armed
        self._lock = threading.Lock()
        self._wake = threading.Lock()  # held while no cell is armed; arm() and close() release it
        self._wake.acquire()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="moondev-memwatch-watchdog", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            if self.trigger is None:  # between cells: sleep until the next one is armed
                self._wake.acquire(timeout=0.5)
                continue
            time.sleep(self.interval)
            # Read and fire under the lock: once disarm() or close() returns, the
            # thread neither interrupts nor reads the (maybe closed) meter.
            with self._lock:
                if self.trigger is None:
                    continue
                rss = self.rss()
                if rss <= self.trigger:
                    continue
                self.fired = True
                # Flag-only watchdogs are done with this cell; interrupting
                # ones fire again if the cell grows another step.
                self.trigger = rss + self.step if self.interrupt else None
                if self.interrupt:
                    _thread.interrupt_main()

    def arm(self, start: int | None = None) -> None:
        """Watch the next cell; ``start`` is its starting RSS (read now if not given)."""
        # A cell that starts above the limit (say, right after an interrupted
        # one) may still run ``del x``: it is stopped only if it grows by
        # another step.
        if start is None:
            start = self.rss()
        with self._lock:
            self.fired = False
            self.trigger = self.limit if start < self.limit else start + self.step
        self._wake_up()

    def disarm(self) -> bool:
        """Stop watching; whether the cell crossed the limit."""
        with self._lock:
            self.trigger = None
            return self.fired

    def close(self) -> None:
        with self._lock:
            self._stop = True
            self.trigger = None
        self._wake_up()

    def _wake_up(self) -> None:
        try:
            self._wake.release()
        except RuntimeError:  # already released, and the thread has not taken it back yet
            pass


class MemWatch:
    """Per-cell memory ledger for an IPython shell.

    Options (attributes): ``limit`` (bytes, soft budget), ``interrupt``
    (stop a cell that crosses ``limit``), ``autotrace`` (turn tracemalloc on
    for the next cell after a threshold alert), ``actions`` (run the
    monitor's pressure actions on memory alerts), ``publish`` (emit the
    display output; the ledger is kept either way), ``deep`` (scan every
    variable after every cell, not only those the cell names).
    """

    def __init__(self, shell, monitor: Monitor | None = None, method: str = "auto") -> None:
        self.shell = shell
        self.meter = PeakMeter(method)
        self.gc = gc_watcher(install=False)
        self.monitor = monitor or Monitor(watcher=self.gc)
        self.ledger = CellLedger()
        self.vars = CellVariables()
        self.names = CellNames()
        self.deep = False
        self.limit: int | None = None
        self.interrupt = False
        self.autotrace = False
        self.actions = True
        self.publish = True
        self.active = False
        self._watchdog: _Watchdog | None = None
        self._depth = 0
        self._t0 = 0.0
        self._cell_id = None
        self._source: str | None = None
        self._trace_next = False
        self._tracing = False
        self._cache_n, self._cache_t = 0, float("-inf")
        limit = cgroup_memory().limit
        self.cgroup_limit = limit

    # ------------------------------------------------------------ switching
    def on(self) -> "MemWatch":
        if not self.active:
            self.gc.install()
            self.vars.baseline(self.shell.user_ns)  # once: don't report old variables
            if self.names not in self.shell.ast_transformers:
                self.shell.ast_transformers.append(self.names)
            self.shell.events.register("pre_run_cell", self.pre_cell)
            self.shell.events.register("post_run_cell", self.post_cell)
            self.active = True
        return self

    def off(self) -> None:
        if self.active:
            for name, cb in (("pre_run_cell", self.pre_cell), ("post_run_cell", self.post_cell)):
                try:
                    self.shell.events.unregister(name, cb)
                except ValueError:
                    pass
            if self.names in self.shell.ast_transformers:
                self.shell.ast_transformers.remove(self.names)
            self.gc.uninstall()
            self.active = False
        if self._tracing:  # autotrace armed for a cell that will never come
            tracemalloc.stop()
            self._tracing = False
        self._trace_next = False
        self.set_limit(None)
        self._depth = 0

    def set_limit(self, limit: int | None, interrupt: bool = False) -> None:
        """Soft RSS budget in bytes (``None`` removes it)."""
        if self._watchdog is not None:
            self._watchdog.close()
            self._watchdog = None
        self.limit, self.interrupt = limit, bool(interrupt and limit)
        if limit:
            self._watchdog = _Watchdog(self.meter.rss, limit, self.interrupt)

    # ------------------------------------------------------------ events
    # These two run around every cell; the goal is <= 0.1 ms for both plus
    # publishing. So: plain tuples instead of reading objects, thresholds
    # compared as numbers (the monitor builds its Alert objects only when one
    # is crossed), one clock read per side, and the display message handed
    # straight to the shell's display publisher.
    def pre_cell(self, info=None) -> None:
        self._depth += 1
        if self._depth > 1:  # a nested run_cell (e.g. %%memwatch): the outer cell measures
            return
        self._cell_id = getattr(info, "cell_id", None)
        self._source = getattr(info, "raw_cell", None)
        self.names.clear()
        self.gc.window_values()
        if self._trace_next and not tracemalloc.is_tracing():
            tracemalloc.start()
            self._tracing = True
        start = self.meter.start()
        if self._watchdog is not None:
            self._watchdog.arm(start)
        self._t0 = _clock()

    def post_cell(self, result=None) -> None:
        wall = _clock() - self._t0
        if self._depth == 0:  # switched on inside this cell: nothing to close
            return
        self._depth -= 1
        if self._depth > 0:
            return
        start_rss, end_rss, peak_rss = self.meter.stop_values(reset=True)
        exceeded = self._watchdog.disarm() if self._watchdog is not None else False
        gc_cols, gc_pause_ms, gc_max_pause_ms, _ = self.gc.window_values()
        grown, freed = self._changed_variables()
        now = time.monotonic()
        if now - self._cache_t > 1.0:  # cache sizes change slowly; the registry walk is not free
            self._cache_n, self._cache_t = cache_entries(), now
        alerts, actions, traced_peak, top_sites = self._check(peak_rss, gc_max_pause_ms, now)
        if self.limit and peak_rss > self.limit:
            exceeded = True
        self._trace_next = self.autotrace and bool(alerts or exceeded)
        rec = CellRecord(
            getattr(result, "execution_count", None), self._cell_id, start_rss, end_rss, peak_rss,
            self.meter.exact, wall, gc_cols, gc_pause_ms, gc_max_pause_ms,
            [(g.name, g.delta) for g in grown] if grown else [], alerts, actions, self.limit, exceeded,
            self.cgroup_limit, top_sites, traced_peak, "cell", [(g.name, g.delta) for g in freed] if freed else [])
        if self._trace_next:
            rec.alerts.append("autotrace: tracemalloc is on for the next cell")
        self.ledger.append(rec)
        if self.publish:
            self._publish(rec)

    def _changed_variables(self) -> tuple[list[VariableGrowth], list[VariableGrowth]]:
        ns = self.shell.user_ns
        if self.deep or self.names.indirect:  # globals(), exec, %run, import *: any name may have changed
            grown, freed = self.vars.scan(ns)
            return grown[:self.vars.top], freed[:self.vars.top]
        # Not parsed by IPython (a syntax error, or our transformer was removed): the cell's text.
        names = self.names.names if self.names.seen else source_names(self._source or "")
        return self.vars.update(ns, names)

    def scan(self) -> tuple[list[VariableGrowth], list[VariableGrowth]]:
        """Measure every user variable again now (``%memwatch scan``): ``(grown, freed)`` since last seen.

        The first scan of a session that never had ``%memwatch on`` only
        measures (nothing to compare with), and reports no changes.
        """
        if not self.vars.scanned:
            self.vars.baseline(self.shell.user_ns)
            return [], []
        return self.vars.scan(self.shell.user_ns, remeasure=True)

    def _check(self, peak_rss: int, gc_max_pause_ms: float, now: float) -> tuple[list, list, int | None, list]:
        """Threshold alerts and pressure actions for one cell, and the autotrace result."""
        traced_peak, top_sites, traced_heap = None, [], None
        if tracemalloc.is_tracing():
            traced_heap, traced_peak = tracemalloc.get_traced_memory()
            if self._tracing:
                top_sites = [str(g) for g in top_allocations(take_snapshot(), top=5)]
                tracemalloc.stop()
                self._tracing = False
        th = self.monitor.thresholds
        t_rss, t_pause, t_cache, t_gc = (th.get("rss"), th.get("gc_pause_ms"), th.get("cache_entries"),
                                         th.get("gc_per_minute"))
        crossed = ((t_rss is not None and peak_rss > t_rss.alert)
                   or (t_pause is not None and gc_max_pause_ms > t_pause.alert)
                   or (t_cache is not None and self._cache_n > t_cache.alert)
                   or (t_gc is not None and self.gc.full_per_minute_above(t_gc.alert, now))
                   or (traced_heap is not None and traced_heap > getattr(th.get("traced_heap"), "alert", math.inf)))
        if not crossed:  # the common case: no Alert objects, no metrics dict
            return [], [], traced_peak, top_sites
        metrics = {"rss": peak_rss, "gc_per_minute": self.gc.full_per_minute(now),
                   "gc_pause_ms": gc_max_pause_ms, "cache_entries": self._cache_n}
        if traced_heap is not None:
            metrics["traced_heap"] = traced_heap
        _, alerts = self.monitor.evaluate(metrics)
        actions = self.monitor.maybe_relieve(alerts) if (alerts and self.actions) else []
        return [a.text for a in alerts], [str(a) for a in actions], traced_peak, top_sites

    def _publish(self, rec: CellRecord) -> None:
        # Straight to the shell's publisher: publish_display_data() would look
        # the shell up again (InteractiveShell.instance()) for every cell.
        # Under capture_output() the shell's publisher is the capturing one,
        # so looking it up here (not at on()) keeps captures working.
        self.shell.display_pub.publish(data=rec.mimebundle(), metadata={})

    # ------------------------------------------------------------ one cell
    def profile_cell(self, cell: str, trace: bool = False, top: int = 10) -> CellRecord:
        """Run ``cell`` in the shell (source untouched) and measure it alone."""
        started_tracing = trace and not tracemalloc.is_tracing()
        if started_tracing:
            tracemalloc.start()
        if trace:
            tracemalloc.reset_peak()
        meter = PeakMeter()
        gc0 = (list(self.gc.collections), self.gc.pause_ns)
        installed = self.gc.installed
        self.gc.install()
        try:
            t0 = _clock()
            meter.start()
            # The nested run_cell replaces the displayhook's result; keep the
            # outer one so `%%memwatch -o` can still return its value.
            outer = self.shell.displayhook.exec_result
            names = source_names(cell)
            self.vars.remember(self.shell.user_ns, names)  # so unchanged old variables are not "new"
            try:
                result = self.shell.run_cell(cell, store_history=False)
            finally:
                self.shell.displayhook.exec_result = outer
            reading = meter.stop()
            wall = _clock() - t0
            traced_peak, sites = None, []
            if trace:
                traced_peak = tracemalloc.get_traced_memory()[1]
                sites = [str(g) for g in top_allocations(take_snapshot(), top=top)]
        finally:
            meter.close()
            if started_tracing:
                tracemalloc.stop()
            if not installed:
                self.gc.uninstall()
        cols = [a - b for a, b in zip(self.gc.collections, gc0[0])]
        pause = (self.gc.pause_ns - gc0[1]) / 1e6
        grown, freed = self.vars.update(self.shell.user_ns, names)
        # The nested run_cell does not store history, so its count is the *next* cell's: use the outer one.
        count = getattr(outer, "execution_count", None)
        return CellRecord(
            execution_count=count if count is not None else getattr(result, "execution_count", None),
            cell_id=None,
            start_rss=reading.start_rss, end_rss=reading.end_rss, peak_rss=reading.peak_rss,
            exact=reading.exact, wall_s=wall, gc_collections=cols, gc_pause_ms=pause,
            gc_max_pause_ms=0.0, grown=[(g.name, g.delta) for g in grown], freed=[(g.name, g.delta) for g in freed],
            cgroup_limit=self.cgroup_limit, top_allocations=sites, traced_peak=traced_peak, kind="profile")

    def status(self) -> str:
        state = "on" if self.active else "off"
        limit = (f", soft limit {format_bytes(self.limit)}" + (" (interrupts)" if self.interrupt else "")
                 if self.limit else "")
        method = "exact (clear_refs)" if self.meter.exact else "approximate (sampling)"
        deep = ", deep variable scan" if self.deep else ""
        return f"memwatch {state}: {self.ledger.total:,} cells recorded, peak {method}{limit}{deep}"
