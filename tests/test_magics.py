"""The IPython extension, in-process: %memwatch, %%memwatch, %%leakcheck and friends."""
from __future__ import annotations

import ctypes
import gc
import importlib.util
import time

import numpy as np
import pytest
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output

from moondev_lab import _registry
from moondev_lab.magics import get_memwatch
from moondev_lab.memory import LEDGER_MIME, CellRecord, LeakReport, exact_peak_supported

MIB = 2**20
RUNAWAY_CAP = 3 * 1024  # MiB: where the runaway cells stop if no interrupt comes
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
    from moondev_lab.memory.monitor import evict_caches

    evict_caches()  # what earlier tests left in the data pools: the action below then frees only this cache
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
    # Capped at 3 GiB: a missed interrupt fails the test instead of taking the machine down.
    res, cap = run(ip, f"runaway = []\nwhile len(runaway) < {RUNAWAY_CAP}:\n    runaway.append(b'x' * 2**20)")
    assert time.monotonic() - t0 < 30
    assert isinstance(res.error_in_exec, KeyboardInterrupt)
    assert len(ip.user_ns["runaway"]) < RUNAWAY_CAP
    (rec,) = ledger_records(cap)
    assert rec["limit_exceeded"] and "soft limit" in cap.outputs[-1].data["text/plain"]
    # the session lives on; a cell that starts above the limit can still free memory
    res, _ = run(ip, "del runaway\n40 + 2")
    assert res.success and res.result == 42
    run(ip, "%memwatch --limit off")
    assert w.limit is None


@needs_exact
def test_limit_interrupt_fires_again_when_the_cell_swallows_it(ip):
    # A broad ``except`` in user or library code eats the first interrupt; the
    # watchdog interrupts again at every further 10% of the limit.
    run(ip, "%memwatch on")
    w = get_memwatch(ip)
    w.set_limit(w.meter.rss() + 200 * MIB, interrupt=True)
    cell = (
        "runaway, swallowed = [], 0\n"
        f"while len(runaway) < {RUNAWAY_CAP}:\n"
        "    try:\n"
        f"        while len(runaway) < {RUNAWAY_CAP}:\n"
        "            runaway.append(b'x' * 2**20)\n"
        "    except KeyboardInterrupt:\n"
        "        swallowed += 1\n"
        "        if swallowed == 2:\n"
        "            raise\n"
    )
    res, cap = run(ip, cell)
    assert isinstance(res.error_in_exec, KeyboardInterrupt)
    assert ip.user_ns["swallowed"] >= 1 and len(ip.user_ns["runaway"]) < RUNAWAY_CAP
    (rec,) = ledger_records(cap)
    assert rec["limit_exceeded"]
    run(ip, "del runaway")
    run(ip, "%memwatch --limit off")


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


# ------------------------------------------------------------ notebook scale (issue 14)
@pytest.fixture
def many_globals(ip):
    """5,000 unrelated globals (half of them small arrays), removed afterwards."""
    names = [f"unrelated_{i}" for i in range(5_000)]
    ip.user_ns.update({n: (np.zeros(4) if i % 2 else i) for i, n in enumerate(names)})
    yield names
    for n in names:
        ip.user_ns.pop(n, None)


def _grew(cap) -> dict:
    (rec,) = ledger_records(cap)
    return dict(map(tuple, rec["grown"]))


def _freed(cap) -> dict:
    (rec,) = ledger_records(cap)
    return dict(map(tuple, rec["freed"]))


def test_grown_variables_are_reported_for_every_kind_of_change_among_5000_globals(ip, many_globals):
    run(ip, "import pandas as pd\nhistory = []\ndf = pd.DataFrame({'a': np.zeros(10_000)})\n"
            "total = np.zeros(10)\nold = np.zeros(50_000)\ndef add_row():\n    history.append(np.zeros(1_000))")
    run(ip, "%memwatch on")
    try:
        assert _grew(run(ip, "big = np.zeros(100_000)")[1]) == {"big": 800_000}          # assignment
        assert _grew(run(ip, "history.append(np.zeros(2_000))")[1])["history"] >= 16_000 # method call
        assert _grew(run(ip, "df['c'] = df['a'] * 2")[1]) == {"df": 80_000}              # item assignment
        assert _grew(run(ip, "total = np.concatenate([total, np.zeros(990)])")[1]) == {"total": 7_920}
        assert _grew(run(ip, "big += 1")[1]) == {}  # augmented, in place: same size, nothing grew
        assert _grew(run(ip, "history += [np.zeros(3_000)]")[1])["history"] >= 24_000    # augmented, grows
        _, cap = run(ip, "del old")                                                          # del
        assert _freed(cap) == {"old": -400_000} and _grew(cap) == {}
        assert "freed old -390.6 KiB" in cap.outputs[-1].data["text/plain"]
        # a notebook function the cell calls, mutating a global the cell never names
        assert _grew(run(ip, "add_row()")[1])["history"] >= 8_000
        # inside a magic's argument, where the code is a string
        assert _grew(run(ip, "%time wide = np.zeros(20_000)")[1]) == {"wide": 160_000}
    finally:
        for n in ("history", "df", "total", "old", "big", "add_row", "wide", "pd"):
            ip.user_ns.pop(n, None)


def test_work_per_cell_stays_flat_as_the_namespace_grows(ip, monkeypatch):
    """Correctness, not timing: namespace reads and size measurements per cell, counted."""
    from moondev_lab.memory import cell_vars

    sized = []
    real = cell_vars.sizeof_value
    monkeypatch.setattr(cell_vars, "sizeof_value", lambda obj, *a: sized.append(obj) or real(obj, *a))
    cells = ["x = 1", "lst.append(1)", "y = x + 1", "d['k'] = len(lst)", "del y"]
    ip.user_ns.update(lst=[], d={'k': 0}, x=1)
    per_size = {}
    try:
        for n_globals in (10, 1_000, 5_000, 20_000):
            ip.user_ns.update({f"filler_{i}": np.zeros(2) if i % 2 else i for i in range(n_globals)})
            run(ip, "%memwatch on")
            w = get_memwatch(ip)
            looked, n_sized = w.vars.looked_up, len(sized)
            for _ in range(10):
                for cell in cells:
                    run(ip, cell)
            per_size[n_globals] = (w.vars.looked_up - looked, len(sized) - n_sized)
            run(ip, "%memwatch off")
    finally:
        for k in [k for k in ip.user_ns if k.startswith("filler_")] + ["lst", "d", "x"]:
            ip.user_ns.pop(k, None)
    assert per_size[10] == per_size[1_000] == per_size[5_000] == per_size[20_000], per_size
    assert per_size[10][0] <= 50 * 4  # a few names per cell


def test_a_10000_cell_session_keeps_a_small_ledger_and_a_correct_report(ip):
    from moondev_lab.memory import deep_size

    ip.user_ns["x"] = 1
    run(ip, "%memwatch on --no-actions")
    w = get_memwatch(ip)
    # Plain cells only: an alert (the RSS, GC rate or cache size a long test process may have reached)
    # keeps its text beside the cell's row, which is what this test must not count.
    w.monitor.thresholds.clear()
    published = []
    for chunk in range(10):
        with capture_output() as cap:
            for i in range(1_000):
                n = chunk * 1_000 + i
                if n == 4_321:
                    ip.run_cell("spike = np.ones(40 * 2**20 // 8); del spike", store_history=True)
                elif n % 1_000 == 999:
                    ip.run_cell(f"keep_{chunk} = np.zeros(1_000)", store_history=True)
                else:
                    ip.run_cell("x = 1", store_history=True)
        recs = ledger_records(cap)
        assert len(recs) == 1_000
        published.append(max(len(repr(r)) for r in recs))
    try:
        assert w.ledger.total == len(w.ledger) == 10_000
        assert max(published) <= published[0] + 64  # a published record does not grow with the session
        ledger_bytes = deep_size(w.ledger, max_objects=10**6)
        assert ledger_bytes < 10_000 * 200, ledger_bytes  # ~120 B a cell (a list of records: ~1.5 KiB a cell)
        res, cap = run(ip, "%memwatch report -o")
        df = res.result
        assert len(df) == 10_000 and df["kind"].eq("cell").all()
        assert df["grown"].map(len).sum() == 10
        first = df["execution_count"].iloc[0]
        assert list(df["execution_count"]) == list(range(first, first + 10_000))
        spike = df.loc[df["peak_above_start"].idxmax()]
        assert spike["execution_count"] == first + 4_321
        if w.meter.exact:
            assert spike["peak_above_start"] > 39 * MIB
        text = cap.outputs[0].data["text/plain"]
        assert text.startswith("memwatch: 10,000 cells") and f"in cell {first + 4_321}" in text
        assert "the 10 highest peaks before the last 10 cells" in text and "the last 10 cells" in text
        assert f"keep_9 +7.8 KiB" in text
        assert any(o.data["text/plain"].startswith("<Figure") for o in cap.outputs)  # the timeline
        ax = w.ledger.plot()
        assert all(len(line.get_xdata()) <= 500 for line in ax.lines)  # downsampled...
        # ...keeping the highest peak (of the ledger as plotted: the report's own cell is in it now)
        assert max(ax.lines[1].get_ydata()) == w.ledger.to_frame()["peak_rss"].max() / MIB
        __import__("matplotlib.pyplot").pyplot.close(ax.figure)
    finally:
        for k in [k for k in ip.user_ns if k.startswith("keep_")]:
            ip.user_ns.pop(k)


def test_report_shows_readable_sizes_and_gc_counts(ip):
    run(ip, "%memwatch on")
    run(ip, "prices = np.zeros(1_000_000)")
    run(ip, "import gc\nfor _ in range(2): gc.collect()")
    _, cap = run(ip, "%memwatch report")
    text = cap.outputs[0].data["text/plain"]
    html = cap.outputs[0].data["text/html"]
    assert "prices +7.6 MiB" in text and "prices +7.6 MiB" in html
    assert "[[" not in text and "8000000" not in text
    assert "gc (gen 0/1/2)" in text and "/2 in " in text  # two full collections, as gen0/gen1/gen2
    ip.user_ns.pop("prices")


def test_profile_cell_line_carries_its_own_execution_count(ip):
    res, cap = run(ip, "%%memwatch --trace\nrows = [bytearray(100) for _ in range(100)]")
    (rec,) = ledger_records(cap)
    assert rec["execution_count"] == res.execution_count
    assert cap.outputs[0].data["text/plain"].startswith(f"[memwatch {res.execution_count}]")


def test_scan_and_deep_catch_names_bound_indirectly(ip):
    run(ip, "def bind(name, n):\n    globals()[name] = np.zeros(n)\ny = 0")
    run(ip, "%memwatch on")
    try:
        # the cell names only `bind`, whose bytecode uses globals(): every variable is checked
        assert _grew(run(ip, "bind('hidden', 10_000)")[1]) == {"hidden": 80_000}
        assert _grew(run(ip, "globals()['direct'] = np.zeros(1_000)")[1]) == {"direct": 8_000}
        # bound behind the cells' back (a library or thread writing the namespace): only a scan sees it
        ip.user_ns["behind"] = np.zeros(2_000)
        assert _grew(run(ip, "y = 0")[1]) == {}
        res, cap = run(ip, "%memwatch scan -o")
        assert "grew behind +15.6 KiB" in cap.stdout
        assert res.result.set_index("name").loc["behind", "change"] == 16_000
        run(ip, "%memwatch on --deep")
        assert "deep variable scan" in run(ip, "%memwatch status")[1].stdout
        ip.user_ns["behind2"] = np.zeros(3_000)
        assert _grew(run(ip, "y = 0")[1]) == {"behind2": 24_000}
    finally:
        for n in ("bind", "hidden", "direct", "behind", "behind2", "y"):
            ip.user_ns.pop(n, None)


@pytest.mark.parametrize("magic, cell", [
    ("%gcstats", None), ("%objcount 3", None), ("%memwatch status", None), ("%memwatch report", None),
    ("%memwatch scan", None), ("%%memwatch", "z = 1"), ("%%leakcheck -n 3", "z = 1"), ("%datapool", None),
])
def test_every_magic_prints_unless_q_and_returns_its_result_with_o(ip, magic, cell):
    if magic == "%datapool" and importlib.util.find_spec("moondev_lab.data") is None:
        pytest.skip("moondev_lab.data is not written yet")
    if "report" in magic:
        run(ip, "%memwatch on")
        run(ip, "x = 1")
        run(ip, "%memwatch off")

    name, _, line = magic.lstrip("%").partition(" ")

    def call(flags: str):
        """The magic alone (run_cell would show a returned value as Out[] itself)."""
        with capture_output() as cap:
            if cell is None:
                result = ip.run_line_magic(name, f"{line} {flags}")
            else:
                result = ip.run_cell_magic(name, f"{line} {flags}", cell)
        return result, bool(cap.stdout.strip() or cap.outputs)

    assert call("") == (None, True)
    result, shown = call("-o")
    assert result is not None and shown  # printed AND returned, as %timeit -o
    result, shown = call("-q -o")
    assert result is not None and not shown
    assert call("-q") == (None, False)
    ip.user_ns.pop("z", None)
