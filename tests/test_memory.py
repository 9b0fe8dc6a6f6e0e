"""The memory library: exact peaks, fallback, cgroups, monitor, leaks, GC, health."""
from __future__ import annotations

import ctypes
import gc
import logging
import mmap
import resource
import time

import numpy as np
import pandas as pd
import pytest

from moondev_lab import _registry
from moondev_lab.memory import (GCWatcher, Monitor, PeakMeter, VariableTracker, cgroup_memory, deep_size,
                                diff_object_counts, exact_peak_supported, format_bytes, gc_stats,
                                gc_watcher, health_check, leak_check, object_counts, parse_size,
                                snapshot_diff, take_snapshot)
from moondev_lab.memory import _peak

MIB = 2**20
needs_exact = pytest.mark.skipif(not exact_peak_supported(), reason="/proc/self/clear_refs not writable here")


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("MOONDEV_LAB_HOME", str(tmp_path / "home"))
    # RSS counts resident pages: heap memory freed by earlier tests but kept by
    # glibc would be reused without raising RSS. Hand it back to the OS first.
    gc.collect()
    ctypes.CDLL(None).malloc_trim(0)


def _transient(mib: int, hold_s: float) -> None:
    # An anonymous mapping of its own, so that freeing it always returns the pages:
    # malloc may otherwise serve (and keep) a large array from a free heap chunk
    # left by earlier tests, and RSS would not move.
    buf = mmap.mmap(-1, mib * MIB)
    a = np.frombuffer(buf, dtype=np.uint8)
    a[:] = 1  # touch every page: it is resident
    time.sleep(hold_s)
    del a
    buf.close()


# ------------------------------------------------------------ exact peaks
@needs_exact
def test_exact_peak_catches_a_27ms_transient_within_2_percent():
    meter = PeakMeter()
    errors = []
    for _ in range(5):
        meter.start()
        _transient(100, 0.027)
        r = meter.stop()
        assert r.exact and r.method == "clear_refs"
        errors.append(abs(r.peak_above_start - 100 * MIB) / (100 * MIB))
        assert abs(r.delta) < 5 * MIB  # freed again
    meter.close()
    assert max(errors) < 0.02, errors


@needs_exact
def test_nested_meters_keep_the_outer_peak():
    outer, inner = PeakMeter(), PeakMeter()
    outer.start()
    _transient(60, 0)
    inner.start()  # resets the process-wide mark; the outer meter must not lose its 60 MiB
    _transient(20, 0)
    r_in, r_out = inner.stop(), outer.stop()
    assert r_in.peak_above_start < 40 * MIB
    assert r_out.peak_above_start > 58 * MIB


@needs_exact
def test_reset_also_resets_ru_maxrss_as_documented():
    _transient(150, 0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    meter = PeakMeter()
    start = meter.start()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    meter.close()
    assert before - after > 100 * MIB
    assert after < start + 8 * MIB


@needs_exact
def test_stop_with_reset_reads_end_rss_and_peak_without_proc():
    """The per-cell fast path: getrusage + reset, no /proc read, same numbers as /proc."""
    meter = PeakMeter()
    backend = meter._backend
    reads = []
    real_read = backend._statm.read
    backend._statm.read = lambda: reads.append(1) or real_read()
    try:
        for _ in range(3):
            start = meter.start()
            keep = mmap.mmap(-1, 20 * MIB)  # stays: RSS ends ~20 MiB higher
            np.frombuffer(keep, dtype=np.uint8)[:] = 1
            _transient(60, 0)
            reads.clear()
            s, end, peak = meter.stop_values(reset=True)
            assert s == start and not reads  # no /proc read on the way out
            truth = backend.rss()
            assert abs(end - truth) < 2 * MIB
            assert abs((end - start) - 20 * MIB) < 2 * MIB
            assert abs((peak - start) - 80 * MIB) / (80 * MIB) < 0.02
            # the mark is reset: ru_maxrss is the end RSS now, not the cell's peak
            assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 < peak - 40 * MIB
            keep.close()
    finally:
        backend._statm.read = real_read
        meter.close()


@needs_exact
def test_stop_with_reset_checks_proc_when_the_exec_floor_could_hide_rss():
    meter = PeakMeter()
    backend = meter._backend
    meter.start()
    backend._checked_at = 1 << 50  # pretend the floor was last checked far above us
    _, end, _ = meter.stop_values(reset=True)
    assert abs(end - backend.rss()) < 2 * MIB
    backend._fast = False  # the floor is above RSS: /proc/self/status decides
    meter.start()
    _transient(30, 0)
    s, end, peak = meter.stop_values(reset=True)
    meter.close()
    assert abs((peak - s) - 30 * MIB) / (30 * MIB) < 0.02 and abs(end - s) < 5 * MIB


@needs_exact
def test_a_reset_at_stop_hands_the_peak_to_meters_still_running():
    outer, inner = PeakMeter(), PeakMeter()
    outer.start()
    inner.start()
    _transient(60, 0)
    inner.stop_values(reset=True)  # resets the process-wide mark
    _transient(10, 0)
    r_out = outer.stop()
    outer.close(), inner.close()
    assert r_out.peak_above_start > 58 * MIB


@needs_exact
def test_new_meters_and_rss_reads_inside_a_measured_block_keep_its_peak():
    """A PeakMeter's first write to clear_refs resets the process-wide mark, e.g. a Monitor
    or dashboard made inside a %memwatch'ed cell: the running meter must keep its peak."""
    outer = PeakMeter()
    outer.start()
    _transient(60, 0)
    PeakMeter().close()  # constructing one resets the mark
    Monitor().sample(objects=False)
    _transient(10, 0)
    r_out = outer.stop()
    outer.close()
    assert r_out.peak_above_start > 58 * MIB


@needs_exact
def test_proc_files_are_read_through_libc_not_the_os_fallback(monkeypatch):
    """The GIL-holding libc path must really work (a bad argument would make it fail
    silently and fall back to os.pread, which releases the GIL)."""
    meter = PeakMeter()
    backend = meter._backend
    expected = backend.rss()

    def no_fallback(*args):
        raise AssertionError("os.pread fallback used")

    monkeypatch.setattr(_peak.os, "pread", no_fallback)
    assert abs(backend.rss() - expected) < 8 * MIB
    assert b"VmHWM:" in backend._status.read()
    meter.start()
    assert meter.stop().exact
    meter.close()


@needs_exact
def test_another_thread_reads_proc_files_with_pread_and_leaves_the_owner_on_libc(monkeypatch):
    """Only the opening thread uses the shared libc buffer (no lock, so no lock an interrupt could
    leave held); the memwatch watchdog's thread reads the same file through os.pread."""
    import threading

    meter = PeakMeter()
    backend = meter._backend
    preads = []
    real_pread = _peak.os.pread
    monkeypatch.setattr(_peak.os, "pread", lambda *a: preads.append(a) or real_pread(*a))
    got = {}
    reader = threading.Thread(target=lambda: got.update(rss=backend.rss(), status=backend._status.read()))
    reader.start()
    reader.join()
    assert len(preads) == 2 and b"VmHWM:" in got["status"]
    assert abs(got["rss"] - backend.rss()) < 8 * MIB
    assert len(preads) == 2  # the owner's read took the libc path
    meter.close()


def test_forced_sampling_fallback_is_labelled_approximate():
    meter = PeakMeter("sampling")
    meter.start()
    _transient(100, 0.25)  # long enough for a 2 ms sampler to see it
    r = meter.stop()
    meter.close()
    assert r.exact is False and r.method == "sampling"
    assert "approximate" in repr(r)
    assert r.peak_above_start > 90 * MIB


def test_auto_falls_back_when_clear_refs_is_unavailable(monkeypatch):
    monkeypatch.setattr(_peak, "_CLEAR_REFS", "/nonexistent/clear_refs")
    meter = PeakMeter()
    assert meter.method == "sampling" and not meter.exact
    with pytest.raises(OSError):
        PeakMeter("clear_refs")
    monkeypatch.setenv("MOONDEV_LAB_PEAK", "sampling")
    monkeypatch.setattr(_peak, "_CLEAR_REFS", "/proc/self/clear_refs")
    assert PeakMeter().method == "sampling"


# ------------------------------------------------------------ cgroups
def _fake_cgroup(tmp_path, version: int, limit: str, usage: str):
    mnt = tmp_path / ("cg2" if version == 2 else "cg1mem")
    d = mnt / "kernels" / "k1"
    d.mkdir(parents=True)
    if version == 2:
        (d / "memory.max").write_text(limit + "\n")
        (d / "memory.current").write_text(usage + "\n")
        (mnt / "kernels" / "memory.max").write_text("max\n")
        mountinfo = f"41 23 0:38 / {mnt} rw,relatime - cgroup2 cgroup2 rw\n"
        proc = "0::/kernels/k1\n"
    else:
        (d / "memory.limit_in_bytes").write_text(limit + "\n")
        (d / "memory.usage_in_bytes").write_text(usage + "\n")
        (mnt / "kernels" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
        mountinfo = f"35 31 0:32 / {mnt} rw,relatime - cgroup cgroup rw,memory\n"
        proc = "4:memory:/kernels/k1\n1:cpu:/\n"
    return proc, mountinfo


@pytest.mark.parametrize("version", [1, 2])
def test_cgroup_limit_v1_and_v2(tmp_path, version):
    proc, mountinfo = _fake_cgroup(tmp_path, version, str(4 * 2**30), str(2**30))
    cg = cgroup_memory(proc, mountinfo)
    assert (cg.version, cg.limit, cg.usage) == (version, 4 * 2**30, 2**30)
    assert cg.headroom == 3 * 2**30


def test_cgroup_unlimited_and_real_system(tmp_path):
    proc, mountinfo = _fake_cgroup(tmp_path, 2, "max", "12345")
    cg = cgroup_memory(proc, mountinfo)
    assert cg.limit is None and cg.usage == 12345
    real = cgroup_memory()  # this VM: cgroup v1, no limit
    assert real.limit is None or real.limit > 0


def test_sizes_round_trip():
    assert parse_size("4GB") == 4 * 2**30 and parse_size("512 MiB") == 512 * MIB
    assert parse_size("1.5g") == int(1.5 * 2**30)
    with pytest.raises(ValueError, match="not a size"):
        parse_size("lots")
    assert format_bytes(3 * MIB) == "3.0 MiB" and format_bytes(-2048, signed=True) == "-2.0 KiB"


# ------------------------------------------------------------ monitor
class _BytesCache:
    """A real little cache implementing the registry protocol."""

    def __init__(self, n: int) -> None:
        self.data = {i: bytearray(100_000) for i in range(n)}

    def __len__(self) -> int:
        return len(self.data)

    def evict_unused(self) -> int:
        freed = sum(len(v) for v in self.data.values())
        self.data.clear()
        return freed


class _WorkerPool:
    def __init__(self, n: int) -> None:
        self.workers = list(range(n))

    def __len__(self) -> int:
        return len(self.workers)

    def shrink(self) -> int:
        n = len(self.workers) - 1
        del self.workers[1:]
        return n


def test_thresholds_fire_pressure_actions_and_log_them(caplog):
    cache, pool = _BytesCache(20), _WorkerPool(4)
    _registry.register_cache(cache)
    _registry.register_pool(pool)
    m = Monitor(cooldown_s=60)
    m.set_threshold("rss", normal="1KB", alert="2KB")
    for metric in ("gc_per_minute", "gc_pause_ms"):  # other tests' collections count too
        m.set_threshold(metric, normal=10**6, alert=10**7)
    with caplog.at_level(logging.WARNING, logger="moondev_lab.memory"):
        report = m.check(objects=False)
    assert [a.metric for a in report.alerts] == ["rss"]
    names = [a.name for a in report.actions]
    assert names == ["evict caches", "gc.collect", "shrink pools"]
    evicted = report.actions[0]
    assert evicted.freed >= 20 * 100_000 and evicted.unit == "bytes"
    assert report.actions[2].freed >= 3 and len(pool) == 1
    assert len(cache) == 0
    assert any("evict caches: freed" in r.getMessage() for r in caplog.records)
    # within the cooldown the actions do not run again
    assert m.check(objects=False).actions == []
    assert len(m.action_log) == 3


def test_cache_entries_metric_and_gc_alerts_do_not_trigger_actions():
    cache = _BytesCache(12)
    _registry.register_cache(cache)
    m = Monitor(cooldown_s=0)
    m.set_threshold("cache_entries", normal=5, alert=10)
    m.set_threshold("gc_per_minute", normal=0, alert=-1)  # any rate alerts
    levels, alerts = m.evaluate(m.sample(objects=False))
    assert levels["cache_entries"] == "alert" and {a.metric for a in alerts} >= {"cache_entries", "gc_per_minute"}
    gc_only = [a for a in alerts if a.metric == "gc_per_minute"]
    assert m.maybe_relieve(gc_only) == []
    assert [r.name for r in m.maybe_relieve(alerts)][0] == "evict caches"
    assert len(cache) == 0


def test_objects_metric_counts_unfrozen_objects():
    m = Monitor()
    m.set_threshold("objects", normal=1, alert=2)
    report = m.check(objects=True, run_actions=False)
    assert report.metrics["objects"] > 2 and report.levels["objects"] == "alert"
    assert "objects" in str(report)


def test_gc_watcher_counts_full_collections_and_pauses():
    w = gc_watcher()
    w.window()
    junk = [[i] for i in range(20_000)]
    for _ in range(3):
        gc.collect()
    win = w.window()
    del junk
    assert win["collections"][2] >= 3 and win["pause_ms"] > 0
    assert w.full_per_minute() >= 3
    stats = gc_stats()
    assert stats.thresholds == gc.get_threshold() and "pause total" in str(stats)


def test_gc_window_values_and_full_per_minute_above_match_the_slow_forms():
    w = GCWatcher().install()
    try:
        w.window_values()
        assert w.window_values() == ([0, 0, 0], 0.0, 0.0, 0)  # nothing ran in between
        for _ in range(3):
            gc.collect()
        cols, pause_ms, max_pause_ms, _ = w.window_values()
        assert cols[2] == 3 and pause_ms >= max_pause_ms > 0
        assert w.window()["collections"] == [0, 0, 0]
    finally:
        w.uninstall()
    w.full_times.clear()
    w.full_times.extend([0.0, 10.0, 50.0, 55.0, 59.0])
    for now in (59.0, 65.0, 112.0, 200.0):
        for limit in (0, 1, 2.5, 3, 4, 10, float("inf"), float("nan")):  # inf: a threshold set to never alert
            assert w.full_per_minute_above(limit, now) == (w.full_per_minute(now) > limit), (now, limit)
    assert w.full_per_minute(65.0) == 4.0


# ------------------------------------------------------------ leaks
def test_leak_check_tells_a_leak_from_a_stable_function_and_from_warm_up():
    store: list = []
    leaking = leak_check(lambda: store.append(bytearray(200_000)), n=5)
    assert leaking.leaking and 190_000 < leaking.growth_per_iter < 215_000
    assert any("store.append" in g.where for g in leaking.top_lines)

    cache: dict = {}

    def warm_up_then_stable():
        cache.setdefault("table", bytearray(3_000_000))  # allocated once
        return sum(range(100))

    warm = leak_check(warm_up_then_stable, n=5)
    assert not warm.leaking and "warm-up" in warm.verdict
    assert warm.increments[0] > 2_900_000
    assert not leak_check(lambda: [0] * 1000, n=4).leaking
    with pytest.raises(ValueError):
        leak_check(lambda: None, n=2)


def test_snapshot_diff_and_object_counts():
    import tracemalloc

    tracemalloc.start()
    try:
        before = take_snapshot()
        keep = [bytearray(80_000) for _ in range(3)]  # noqa: F841
        growth = snapshot_diff(before, take_snapshot())
    finally:
        tracemalloc.stop()
    assert growth[0].size_diff >= 240_000 and "bytearray(80_000)" in growth[0].where

    c0 = object_counts()
    keep2 = [[i] for i in range(3000)]  # noqa: F841  (lists are gc-tracked; {"k": 1} is not)
    diff = dict(diff_object_counts(c0, object_counts()))
    assert diff["list"] >= 3000


def test_variable_tracker_uses_nbytes_and_bounded_deep_size():
    t = VariableTracker()
    ns = {"small": 1}
    t.update(ns)
    ns["arr"] = np.zeros(1_000_000)
    ns["df"] = pd.DataFrame({"a": np.zeros(100_000), "b": np.ones(100_000)})
    grown = {g.name: g.delta for g in t.update(ns, source="arr = ...; df = ...")}
    assert grown["arr"] == 8_000_000
    assert 1_600_000 <= grown["df"] <= 1_700_000
    ns["lst"] = [bytearray(10_000) for _ in range(10)]
    assert t.update(ns, source="lst = ...")[0].name == "lst"
    ns["lst"].append(bytearray(50_000))  # same object, new length: re-measured
    assert t.update(ns, source="print()")[0].delta > 50_000
    assert deep_size(list(range(100_000)), max_objects=100) < deep_size(list(range(100_000)))


def test_variable_tracker_fast_path_keeps_its_rules():
    import math

    t = VariableTracker()
    ns = {"keep": [0] * 10, "n": 1}
    t.update(ns)
    assert t.update(ns, source="n = 1") == []  # same objects, same lengths: nothing to report
    ns["keep"].extend([0] * 100_000)  # a known variable the cell does not mention
    assert [g.name for g in t.update(ns, source="grow()")] == ["keep"]
    ns["keep"] = math  # rebound to a module: skipped, not measured
    ns["_hidden"] = np.zeros(100_000)
    assert t.update(ns, source="keep = math; _hidden = np.zeros(100_000)") == []
    del ns["keep"]
    t.update(ns, source="del keep")
    ns["keep"] = np.zeros(10_000)  # a new object under a forgotten name is new growth
    assert t.update(ns, source="keep = np.zeros(10_000)")[0].delta == 80_000


# ------------------------------------------------------------ per-cell variables (issue 14)
def _names(src: str):
    import ast

    from moondev_lab.memory import CellNames

    return CellNames().collect(ast.parse(src))


def test_cell_names_cover_stores_loads_deletes_and_magic_arguments():
    got = _names("a = 1\nhistory.append(x)\ndf['c'] = df['a'] * 2\ndel old\ntotal += step\n"
                 "import numpy as np\nfrom os import path\ndef f():\n    global counter\n"
                 "get_ipython().run_line_magic('time', 'hidden = make()')\n"
                 "get_ipython().run_cell_magic('capture', 'out', 'rows = [1]')")
    assert {"a", "history", "x", "df", "old", "total", "step", "np", "path", "f", "counter",
            "hidden", "make", "out", "rows"} <= got.names
    assert not got.indirect and got.seen
    for src in ("globals()['z'] = 1", "exec('z = 1')", "from os import *", "vars()",
                "get_ipython().run_line_magic('run', 'script.py')"):
        assert _names(src).indirect, src
    assert not _names("vars(obj)").indirect  # vars() of an object binds nothing


class _CountingNamespace(dict):
    """A namespace that counts every read of it: the hook behind the flat-cost test."""

    reads = 0


def _counting(method: str, whole: bool):
    def read(self, *args):
        _CountingNamespace.reads += len(self) if whole else 1  # a walk reads every entry
        return getattr(dict, method)(self, *args)
    return read


for _method, _whole in (("get", False), ("__getitem__", False), ("__contains__", False), ("__iter__", True),
                        ("keys", True), ("items", True), ("values", True)):
    setattr(_CountingNamespace, _method, _counting(_method, _whole))


def test_cell_variables_work_per_cell_does_not_grow_with_the_namespace():
    from moondev_lab.memory import CellVariables

    cells = [{"x"}, {"history", "x"}, {"df"}, {"total"}, {"f"}]
    per_size = {}
    for n_globals in (10, 5_000, 20_000):
        ns = _CountingNamespace({f"g{i}": np.zeros(3) if i % 2 else i for i in range(n_globals)})
        ns.update(history=[], df=pd.DataFrame({"a": [1.0]}), total=0)
        exec("def f():\n    history.append(1)", ns)  # a notebook function reaching a global
        t = CellVariables()
        t.baseline(ns)
        _CountingNamespace.reads = 0
        looked, measured = t.looked_up, t.measured
        for _ in range(20):
            for names in cells:
                ns["x"] = 1
                t.update(ns, names)
        per_size[n_globals] = (_CountingNamespace.reads, t.looked_up - looked, t.measured - measured)
    assert per_size[10] == per_size[5_000] == per_size[20_000], per_size
    assert per_size[10][0] < 20 * 5 * 10  # a handful of reads per cell, whatever the size


def test_cell_variables_report_growth_and_frees_for_every_kind_of_change():
    from moondev_lab.memory import CellVariables

    ns = {f"unrelated{i}": [i] for i in range(5_000)}
    ns.update(np=np, history=[], df=pd.DataFrame({"a": np.zeros(10_000)}), total=np.zeros(10),
              old=np.zeros(50_000))
    t = CellVariables()
    t.baseline(ns)

    def change(src: str, names: set[str]):
        exec(src, ns)
        grown, freed = t.update(ns, names)
        return {g.name: g.delta for g in grown}, {g.name: g.delta for g in freed}

    assert change("new = np.zeros(100_000)", {"new", "np"})[0] == {"new": 800_000}
    assert change("history.append(np.zeros(1_000))", {"history", "np"})[0]["history"] > 8_000
    assert change("df['c'] = df['a'] * 2", {"df"})[0] == {"df": 80_000}
    assert change("total = np.concatenate([total, np.zeros(990)])", {"total", "np"})[0] == {"total": 7_920}
    assert change("total += 1", {"total"}) == ({}, {})  # in place, same size: nothing to report
    assert change("del old", {"old"})[1] == {"old": -400_000}
    assert "old" not in t.known
    assert change("old = np.zeros(10)", {"old", "np"})[0] == {"old": 80}  # a name reborn is new growth
    # a change that keeps identity and fingerprint (a column's dtype narrowed): only a re-measure sees it
    assert change("df['a'] = df['a'].astype('float32')", {"df"}) == ({}, {})
    assert t.scan(ns) == ([], [])
    assert {g.name: g.delta for g in t.scan(ns, remeasure=True)[1]} == {"df": -40_000}


def test_cell_ledger_ring_stays_bounded_and_keeps_the_newest_cells():
    import tracemalloc

    from moondev_lab.memory import CellLedger, CellRecord

    led = CellLedger(capacity=2_000)

    def rec(i: int) -> CellRecord:
        return CellRecord(i, f"id-{i}", 100 * MIB, 100 * MIB + i, 101 * MIB + i, True, 0.001, [i % 3, 0, 0],
                          0.1, 0.1, grown=[("v", i)] if i % 10 == 0 else [])

    tracemalloc.start()
    try:
        for i in range(4_000):
            led.append(rec(i))
        at_4000 = tracemalloc.get_traced_memory()[0]
        for i in range(4_000, 10_000):
            led.append(rec(i))
        at_10000 = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert at_10000 - at_4000 < 32 * 1024, (at_4000, at_10000)  # full ring: flat
    assert len(led) == 2_000 and led.total == 10_000 and led.dropped == 8_000
    assert led[0].execution_count == 8_000 and led[-1].execution_count == 9_999
    assert led[-10].grown == [("v", 9_990)] and led[0].cell_id == "id-8000"
    assert len(led._extra) == 200  # side lists evicted with their rows
    df = led.to_frame()
    assert list(df["execution_count"][:2]) == [8_000, 8_001] and df["end_rss"].iloc[-1] == 100 * MIB + 9_999
    assert df["grown"].iloc[-10] == [["v", 9_990]] and df["gc_collections"].iloc[1] == [8_001 % 3, 0, 0]
    rep = led.report()
    assert rep.summary.startswith("memwatch: 2,000 cells (the 8,000 oldest dropped")
    assert "in cell 9999" in rep.summary


# ------------------------------------------------------------ health
def test_health_check_reports_every_area(tmp_path):
    report = health_check()
    d = report.to_dict()
    assert set(d["checks"]) == {"memory", "cgroup limit", "cpu", "disk", "store", "peak memory"}
    assert d["ok"] == report.ok and isinstance(report.ok, bool)
    assert str(tmp_path / "home" / "store") == report["store"].value
    assert "will be created" in report["store"].detail
    (tmp_path / "home" / "store").mkdir(parents=True)
    assert health_check()["store"].detail == "readable and writable"
    assert "<table>" in report._repr_html_() and "store" in str(report)
    assert not health_check(min_free_memory=1 << 60).ok


def test_closing_a_sampling_meter_ends_its_thread():
    import threading

    meter = PeakMeter("sampling")
    meter.start()
    meter.stop()
    assert any(t.name == "moondev-peak-sampler" for t in threading.enumerate())
    meter.close()
    assert not any(t.name == "moondev-peak-sampler" for t in threading.enumerate())


def test_one_off_jump_is_not_a_leak():
    # Another thread (a progress-bar monitor, a logger) may allocate once during the runs.
    kept, calls = [], [0]

    def fn():
        calls[0] += 1
        if calls[0] == 3:
            kept.append(bytearray(80_000))

    report = leak_check(fn, n=4)
    assert not report.leaking, report.verdict
    leaky = []
    assert leak_check(lambda: leaky.append(bytearray(20_000)), n=4).leaking


def test_widget_dashboard_refreshes_while_work_runs():
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.utils.capture import capture_output

    from moondev_lab.memory import dashboard

    InteractiveShell.instance()  # a kernel-like shell, so display() publishes rich outputs
    with capture_output() as cap:
        d = dashboard(interval=0.02, mode="widget")
    try:
        assert "application/vnd.jupyter.widget-view+json" in cap.outputs[0].data
        assert cap.outputs[0].data["text/plain"].startswith("RSS ")  # text fallback for other frontends
        first = d._widget.value
        buf = mmap.mmap(-1, 64 * MIB)
        np.frombuffer(buf, dtype=np.uint8)[:] = 1  # RSS grows by 64 MiB while the panel is live
        deadline = time.time() + 5
        while d._widget.value == first and time.time() < deadline:
            time.sleep(0.02)
        assert d._widget.value != first and "RSS" in d._widget.value
        buf.close()
    finally:
        d.stop()
