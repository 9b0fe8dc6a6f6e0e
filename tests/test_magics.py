"""The IPython extension, in-process: %memwatch, %%memwatch, %%leakcheck and friends."""
from __future__ import annotations

import ctypes
import gc
import importlib.util
import time

import pytest
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output

from moondev_lab import _registry
from moondev_lab.magics import get_memwatch
from moondev_lab.memory import LEDGER_MIME, CellRecord, LeakReport, exact_peak_supported

MIB = 2**20
needs_exact = pytest.mark.skipif(not exact_peak_supported(), reason="/proc/self/clear_refs not writable here")
MULTILINE = 's = """first\n    indented four\n\ttab\n  two spaces\n"""'
EXPECTED = "first\n    indented four\n\ttab\n  two spaces\n"


def _give_back_free_heap() -> None:
    """RSS counts resident pages: memory freed into glibc's heap but not returned
    to the OS is reused without raising RSS. Return it, so each test starts clean."""
    gc.collect()
    ctypes.CDLL(None).malloc_trim(0)


@pytest.fixture
def ip(tmp_path, monkeypatch):
    monkeypatch.setenv("MOONDEV_LAB_HOME", str(tmp_path / "home"))
    _give_back_free_heap()
    shell = InteractiveShell.instance()
    shell.run_cell("%load_ext moondev_lab")
    shell.run_cell("import numpy as np, time")
    yield shell
    shell.run_cell("%unload_ext moondev_lab")
    for name in ("s", "a", "L", "W", "big", "runaway", "rows", "keep", "y"):
        shell.user_ns.pop(name, None)
    _give_back_free_heap()


def run(ip, cell: str):
    """Run a cell as a user would (history on), capturing its outputs."""
    with capture_output() as cap:
        result = ip.run_cell(cell, store_history=True)
    return result, cap


def ledger_records(cap) -> list[dict]:
    return [o.data[LEDGER_MIME] for o in cap.outputs if LEDGER_MIME in o.data]


@needs_exact
def test_memwatch_on_catches_transients_exactly_and_publishes_the_ledger(ip):
    run(ip, "%memwatch on")
    for _ in range(3):
        _, cap = run(ip, "a = np.ones(100 * 2**20 // 8)\ntime.sleep(0.027)\ndel a")
        (rec,) = ledger_records(cap)
        assert rec["exact"] is True
        assert abs(rec["peak_above_start"] - 100 * MIB) / (100 * MIB) < 0.02
        assert abs(rec["delta"]) < 5 * MIB
        line = cap.outputs[-1].data["text/plain"]
        assert line.startswith("[memwatch") and "peak +" in line
    _, cap = run(ip, "big = np.zeros(2_000_000)")
    (rec,) = ledger_records(cap)
    assert rec["grown"][0] == ["big", 16_000_000]
    df = ip.run_line_magic("memwatch", "report -o")
    assert len(df) >= 4 and (df["peak_above_start_mib"] > 99).sum() >= 3
    run(ip, "%memwatch off")
    _, cap = run(ip, "x = 1")
    assert ledger_records(cap) == []


def test_cell_source_is_untouched_by_every_magic(ip):
    run(ip, "%memwatch on")
    run(ip, MULTILINE)
    assert ip.user_ns["s"] == EXPECTED
    ip.user_ns.pop("s")
    run(ip, "%%memwatch --trace\n" + MULTILINE)
    assert ip.user_ns["s"] == EXPECTED
    ip.user_ns.pop("s")
    run(ip, "%%leakcheck -n 3\n" + MULTILINE)
    assert ip.user_ns["s"] == EXPECTED


def test_cell_profile_with_trace_returns_a_record(ip):
    res, cap = run(ip, "%%memwatch --trace -o\nrows = [bytearray(1000) for _ in range(2000)]")
    rec = res.result
    assert isinstance(rec, CellRecord) and rec.kind == "profile"
    assert rec.traced_peak >= 2_000_000
    assert "rows = [bytearray(1000)" in rec.top_allocations[0]
    assert ledger_records(cap)[0]["kind"] == "profile"


def test_leakcheck_tells_leaking_from_warm_up(ip):
    res, _ = run(ip, "%%leakcheck -n 5 -o\nL = globals().setdefault('L', [])\nL.append(bytearray(100_000))")
    leak = res.result
    assert isinstance(leak, LeakReport) and leak.leaking
    assert "L.append(bytearray(100_000))" in leak.top_lines[0].where
    res, _ = run(ip, "%%leakcheck -n 5 -o\nW = globals().get('W') or [bytearray(2_000_000)]")
    assert not res.result.leaking and "warm-up" in res.result.verdict


class _Cache:
    def __init__(self) -> None:
        self.items = {i: bytes(10_000) for i in range(10)}

    def __len__(self) -> int:
        return len(self.items)

    def evict_unused(self) -> int:
        n = sum(map(len, self.items.values()))
        self.items.clear()
        return n


def test_cell_threshold_alert_runs_pressure_actions_and_autotrace(ip):
    cache = _Cache()
    _registry.register_cache(cache)
    run(ip, "%memwatch on --autotrace")
    w = get_memwatch(ip)
    w.monitor.set_threshold("rss", normal="1KB", alert="2KB")
    w.monitor.cooldown_s = 0
    _, cap = run(ip, "x = 1")
    (rec,) = ledger_records(cap)
    assert any(a.startswith("rss ") for a in rec["alerts"])
    assert rec["actions"][0].startswith("evict caches: freed 97.7 KiB")
    assert len(cache) == 0
    # autotrace: the next cell is traced and reports its allocation sites
    _, cap = run(ip, "y = [bytearray(5000) for _ in range(200)]")
    (rec,) = ledger_records(cap)
    assert rec["traced_peak"] and "y = [bytearray(5000)" in rec["top_allocations"][0]


def test_thresholds_changed_after_on_are_honoured_for_every_metric(ip):
    run(ip, "%memwatch on --no-actions")
    w = get_memwatch(ip)
    w.monitor.set_threshold("gc_per_minute", normal=1e6, alert=2e6)  # the tests collect a lot
    _, cap = run(ip, "x = 1")
    assert ledger_records(cap)[0]["alerts"] == []
    w.monitor.set_threshold("gc_per_minute", normal=1, alert=2)
    w.monitor.set_threshold("gc_pause_ms", normal=-2, alert=-1)  # any pause alerts
    _, cap = run(ip, "import gc\nfor _ in range(3): gc.collect()")
    (rec,) = ledger_records(cap)
    assert rec["gc_collections"][2] >= 3
    assert any(a.startswith("gc_per_minute ") for a in rec["alerts"])
    assert any(a.startswith("gc_pause_ms ") for a in rec["alerts"])
    assert rec["actions"] == []  # GC alerts never run pressure actions
    assert "⚠ gc_per_minute" in cap.outputs[-1].data["text/plain"]


@needs_exact
def test_limit_interrupt_stops_a_runaway_cell_in_process(ip):
    run(ip, "%memwatch on --limit 300MB --interrupt")
    w = get_memwatch(ip)
    w.set_limit(w.meter.rss() + 200 * MIB, interrupt=True)
    t0 = time.monotonic()
    res, cap = run(ip, "runaway = []\nwhile True:\n    runaway.append(b'x' * 2**20)")
    assert time.monotonic() - t0 < 30
    assert isinstance(res.error_in_exec, KeyboardInterrupt)
    (rec,) = ledger_records(cap)
    assert rec["limit_exceeded"] and "soft limit" in cap.outputs[-1].data["text/plain"]
    # the session lives on; a cell that starts above the limit can still free memory
    res, _ = run(ip, "del runaway\n40 + 2")
    assert res.success and res.result == 42
    run(ip, "%memwatch --limit off")
    assert w.limit is None


def test_fallback_ledger_is_marked_approximate(ip):
    from moondev_lab.memory import MemWatch

    w = MemWatch(ip, method="sampling").on()
    try:
        _, cap = run(ip, "a = np.ones(50 * 2**20 // 8); time.sleep(0.2); del a")
    finally:
        w.off()
        w.meter.close()
    (rec,) = ledger_records(cap)
    assert rec["exact"] is False and "(approx.)" in cap.outputs[-1].data["text/plain"]
    assert rec["peak_above_start"] > 45 * MIB


def test_gcstats_and_objcount(ip):
    res, _ = run(ip, "%gcstats -o")
    assert res.result.thresholds == __import__("gc").get_threshold()
    run(ip, "%objcount 5")
    run(ip, "keep = [[i] for i in range(5000)]")
    res, cap = run(ip, "%objcount 5 -o")
    df = res.result
    assert len(df) == 5 and list(df.columns) == ["type", "count", "change"]
    assert df.set_index("type").loc["list", "change"] >= 5000
    assert "gc-tracked objects" in cap.stdout


def test_datapool_magic(ip):
    if importlib.util.find_spec("moondev_lab.data") is None:
        pytest.skip("moondev_lab.data is not written yet")
    try:
        from moondev_lab.data import default_pool  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"moondev_lab.data not importable: {exc}")
    res, _ = run(ip, "%datapool -o")
    assert res.success and "PoolStats" in repr(res.result) and hasattr(res.result, "_repr_html_")


def test_memwatch_widget_and_status(ip):
    res, cap = run(ip, "%memwatch status")
    assert "memwatch off" in cap.stdout
    res, cap = run(ip, "%memwatch --widget")
    # a plain InteractiveShell has no widget frontend: one text snapshot
    assert "RSS" in cap.stdout
    magics = __import__("moondev_lab.magics", fromlist=["_loaded"])._loaded[id(ip)]
    assert magics.dashboard is not None and magics.dashboard.mode == "print"
