"""SandboxPool: warm workers, structured results, concurrency, recycling, grids."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import psutil
import pytest
from backtesting import Backtest

from moondev_lab import _registry
from moondev_lab.data import DataPool
from moondev_lab.sandbox import BacktestSettings, DataRef, ErrorKind, SandboxPool, run_file
from moondev_lab.sandbox.harness import silence_progress, stats_to_dict
from strategies import sma_cross

SMA_CROSS = sma_cross()
IDLE = "from backtesting import Strategy\nclass Idle(Strategy):\n    def init(self): pass\n    def next(self): pass\n"


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("home") / "store"
    DataPool(root).get("BTC/USD", "15m")  # imports the bundled sample
    return str(root)


@pytest.fixture(scope="module")
def pool():
    with SandboxPool(2, max_tasks_per_worker=4) as p:
        yield p


def ref(store: str, days: int = 7) -> DataRef:
    return DataRef("BTC/USD", "15m", start="2023-03-01", end=f"2023-03-{1 + days:02d}", root=store)


def test_run_returns_structured_result(pool, store):
    res = pool.run(SMA_CROSS, ref(store), params={"n1": 5})
    assert res.ok, res.error
    assert res.strategy == "SmaCross"
    assert res.stats["_strategy"] == {"n1": 5, "n2": 30}
    assert res.stats["Start"] == "2023-03-01T00:00:00+00:00"
    assert isinstance(res.stats["Return [%]"], float)
    assert res.stats["# Trades"] == len(res.trades) > 0
    assert {"EntryTime", "ExitTime", "PnL", "Size"} <= set(res.trades[0])
    assert 0 < len(res.equity) <= 2000
    assert res.worker_pid in pool.pids()


def test_nan_stats_survive_the_pipe(pool, store):
    res = pool.run(IDLE, ref(store, 1))
    assert res.ok and res.stats["# Trades"] == 0
    assert math.isnan(res.stats["Sharpe Ratio"]) and math.isnan(res.stats["Win Rate [%]"])


def test_concurrent_submit_and_map(pool, store):
    futures = [pool.submit(SMA_CROSS, ref(store, 2), params={"n1": n}) for n in (4, 6, 8)]
    results = [f.result() for f in futures] + list(pool.map([IDLE, SMA_CROSS], ref(store, 2)))
    assert all(r.ok for r in results)
    assert [r.stats["_strategy"]["n1"] for r in results[:3]] == [4, 6, 8]


def test_workers_are_recycled_after_max_tasks(store):
    with SandboxPool(1, max_tasks_per_worker=2) as p:
        pids = [p.run(IDLE, ref(store, 1)).worker_pid for _ in range(5)]
        assert len(set(pids)) == 3              # 2 + 2 + 1 tasks
        assert p.stats().recycles == 2
    with SandboxPool(1, max_rss_mb=1) as p:    # every worker is over 1 MiB: recycled each time
        pids = [p.run(IDLE, ref(store, 1)).worker_pid for _ in range(2)]
        assert pids[0] != pids[1]


def test_optimize_matches_backtest_optimize(pool, store, tmp_path):
    grid = {"n1": [5, 10, 15], "n2": [20, 40]}
    ours = pool.optimize(SMA_CROSS, grid, ref(store, 14), maximize="Return [%]",
                         constraint=lambda p: p.n1 < p.n2)
    assert ours.result.ok and not ours.errors
    # backtesting.py's own optimizer needs an importable strategy class
    path = tmp_path / "sma_cross_mod.py"
    path.write_text(SMA_CROSS)
    spec = importlib.util.spec_from_file_location("sma_cross_mod", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["sma_cross_mod"] = mod
    spec.loader.exec_module(mod)
    silence_progress()
    frame = DataPool(store).get("BTC/USD", "15m", start="2023-03-01", end="2023-03-15")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = Backtest(frame, mod.SmaCross, **BacktestSettings().kwargs()).optimize(
            **grid, maximize="Return [%]", constraint=lambda p: p.n1 < p.n2)
    expected = stats_to_dict(theirs)
    assert ours.best_params == expected["_strategy"]
    assert ours.stats.keys() == expected.keys()
    for key, value in expected.items():
        got = ours.stats[key]
        assert got == value or (isinstance(value, float) and math.isnan(value) and math.isnan(got)), key
    assert len(ours.heatmap) == 6
    # The best run comes from its grid chunk (no extra run): it equals a fresh run there.
    fresh = pool.run(SMA_CROSS, ref(store, 14), ours.best_params)
    assert json.dumps(fresh.stats, sort_keys=True) == json.dumps(ours.stats, sort_keys=True)
    assert fresh.trades == ours.result.trades and fresh.equity == ours.result.equity


def test_pool_is_registered_and_shrinks(store):
    with SandboxPool(2) as p:
        assert p in _registry.pools()
        list(p.map([IDLE, IDLE], ref(store, 1)))
        assert len(p) == 2
        assert p.shrink() == 2 and len(p) == 0
        assert p.run(IDLE, ref(store, 1)).ok       # workers restart on demand


def test_close_leaves_no_processes(store):
    p = SandboxPool(2)
    list(p.map([IDLE, IDLE], ref(store, 1)))
    pids = p.pids()
    assert len(pids) == 3
    p.close()
    p.close()
    alive = [pid for pid in pids if psutil.pid_exists(pid)
             and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert alive == []


def test_data_error_and_run_file(pool, store, tmp_path):
    bad = pool.run(IDLE, DataRef("NOPE/USD", "15m", root=store))
    assert not bad.ok and bad.error.kind == ErrorKind.DATA_ERROR
    reply = tmp_path / "reply.md"
    reply.write_text("Here you go:\n```python\n" + SMA_CROSS + "```\n")
    res = run_file(reply, ref(store, 2), pool=pool)
    assert res.ok and res.strategy == "SmaCross"


def test_run_file_uses_the_given_pool_even_before_its_first_worker(store, tmp_path):
    """A pool has len 0 until a worker starts: it is still a pool (truthy), and run_file uses it."""
    import moondev_lab.sandbox as sandbox

    path = tmp_path / "s.py"
    path.write_text(SMA_CROSS)
    default_before = sandbox._default
    with SandboxPool(1) as fresh:
        assert len(fresh) == 0 and bool(fresh)  # so `pool or default_pool()` anywhere keeps this pool
        res = run_file(path, ref(store, 2), pool=fresh)
        assert res.ok, res.error
        assert res.worker_pid in fresh.pids()
    assert sandbox._default is default_before  # no second, default pool was started


def test_plot_html_comes_back_only_when_asked(pool, store):
    plain = pool.run(SMA_CROSS, ref(store))
    assert plain.ok and plain.plot_html is None
    res = pool.run(SMA_CROSS, ref(store), plot=True)
    assert res.ok and res.plot_error is None
    assert res.plot_html.lstrip().startswith("<!DOCTYPE html>") and "Bokeh" in res.plot_html
    assert res.stats == plain.stats  # plotting does not change the run


def test_prewarmed_standby_runs_the_task_at_normal_priority(pool, store):
    # The next task child warms up under SCHED_IDLE while idle; the task itself must not.
    code = SMA_CROSS + "\nimport os\nprint('policy', os.sched_getscheduler(0))\n"
    assert pool.prewarm
    for _ in range(2):
        res = pool.run(code, ref(store, 1))
        assert res.ok, res.error
        assert f"policy {os.SCHED_OTHER}" in res.stdout
        time.sleep(0.3)  # idle time: the worker's next standby warms up


def test_sequential_tasks_alternate_between_two_workers(store):
    # One caller, one task at a time: two workers still take turns, so each one's standby
    # child can pre-warm while the other runs.
    with SandboxPool(2) as p:
        pids = [p.run(IDLE, ref(store, 1)).worker_pid for _ in range(4)]
    assert len(set(pids)) == 2 and pids[0] != pids[1] and pids[0] == pids[2]


def test_optimize_without_any_trade_falls_back_to_the_first_combination(pool, store):
    """Like Backtest.optimize: when no run trades, the result is the first combination's run."""
    never = sma_cross(buy="pass")
    ours = pool.optimize(never, {"n1": [5, 10, 15], "n2": [20, 40]}, ref(store, 3), maximize="Return [%]")
    assert ours.best_params == {"n1": 5, "n2": 20}
    assert ours.result.ok and ours.stats["# Trades"] == 0
    assert all(score is None for _, score in ours.heatmap)
    fresh = pool.run(never, ref(store, 3), {"n1": 5, "n2": 20})
    assert json.dumps(fresh.stats, sort_keys=True) == json.dumps(ours.stats, sort_keys=True)


PYARROW_PROBE = IDLE.replace("def init(self): pass", """def init(self):
        import sys
        loaded = 'pyarrow' in sys.modules
        import pyarrow
        assert not loaded and pyarrow.__version__, 'pyarrow was preloaded'""")


def test_sandbox_keeps_pyarrow_out_but_strategies_may_import_it(pool, store):
    res = pool.run(PYARROW_PROBE, ref(store, 1))
    assert res.ok, res.error


def test_damaged_data_file_is_a_data_error(tmp_path):
    root = tmp_path / "store"
    pool_ = DataPool(root)
    m = pool_.manifest("BTC/USD", "15m")
    path = pool_.store.series_dir(m.source, m.symbol, m.timeframe) / m.file
    path.write_bytes(path.read_bytes()[:4096])  # the manifest is fine; the data file was cut short
    with SandboxPool(1) as p:
        res = p.run(IDLE, DataRef("BTC/USD", "15m", root=str(root)))
    assert not res.ok and res.error.kind == ErrorKind.DATA_ERROR
    assert "too short" in res.error.message


def test_a_malformed_result_is_classified_not_raised():
    from moondev_lab.sandbox._wire import decode_reply

    ok = decode_reply(b'{"error": null, "stdout": ""}\n{"ok": true, "stats": {"x": NaN}}')
    assert ok["error"] is None and math.isnan(ok["payload"]["stats"]["x"])
    bad = decode_reply(b'{"error": null}\n{"ok": tru')
    assert bad["payload"] is None and bad["error"]["kind"] == ErrorKind.RESULT_INVALID.value
    failed = decode_reply(b'{"error": null}\n{"ok": false, "error": {"kind": "strategy_error", "message": "x"}}')
    assert failed["error"]["kind"] == "strategy_error"
    worker_error = decode_reply(b'{"error": {"kind": "timeout", "message": "t"}}\n')
    assert worker_error["error"]["kind"] == "timeout" and worker_error["payload"] is None


_DEAD_PID = 4_194_303  # above any pid this machine hands out (pid_max is at most 2**22)


def test_leftover_cgroups_of_dead_workers_are_removed_in_both_lane_forms(tmp_path):
    from moondev_lab.sandbox._worker import _remove_leftovers

    dead = _DEAD_PID
    assert not os.path.exists(f"/proc/{dead}")
    base = tmp_path / "moondev_lab"
    names = [str(dead), f"{dead}.1", str(os.getpid()), f"{os.getpid()}.1", "not-a-worker"]
    for name in names:
        (base / name).mkdir(parents=True)
    _remove_leftovers((base,))
    assert sorted(p.name for p in base.iterdir()) == sorted(names[2:])


def test_temp_dirs_of_dead_processes_are_removed_and_live_ones_kept():
    from moondev_lab._tempdirs import owned_tempdir

    dead = _DEAD_PID
    root = Path(tempfile.gettempdir())
    stale, live = root / f"moondev_test-kind_{dead}_x", root / f"moondev_test-kind_{os.getpid()}_y"
    for d in (stale, live):
        (d / "sub").mkdir(parents=True, exist_ok=True)
    try:
        fresh = owned_tempdir("test-kind")
        assert not stale.exists() and live.exists() and fresh.name.startswith(f"moondev_test-kind_{os.getpid()}_")
    finally:
        for d in (stale, live, *root.glob(f"moondev_test-kind_{os.getpid()}_*")):
            shutil.rmtree(d, ignore_errors=True)


_KERNELS = '''
import numpy as np
from backtesting import Strategy
rng = np.random.default_rng(7)
a, b = rng.normal(size=(2, 3000)) * 1e-3
raise ValueError(repr((float(np.dot(a, b)), float(np.cov(a, b)[0, 1]))))
class Never(Strategy):
    def init(self): pass
    def next(self): pass
'''


def test_the_task_child_runs_the_parents_numeric_kernels(store, monkeypatch):
    """The trusted side compares claimed stats bit for bit, so BLAS must pick the same kernels in the child.

    Machines here set OPENBLAS_CORETYPE=Haswell; dropped by the scrubbed environment, it let
    OpenBLAS pick SkylakeX kernels in the child, and every run's Beta differed in its last bit.
    """
    import numpy as np

    from moondev_lab.sandbox._limits import scrubbed_env

    loaded_with = os.environ.get("OPENBLAS_CORETYPE")  # what this process's OpenBLAS was loaded with
    monkeypatch.setenv("OPENBLAS_CORETYPE", loaded_with or "Haswell")
    monkeypatch.setenv("OPENBLAS_SECRET_KEY", "sk-never-copied")
    env = scrubbed_env()
    assert env["OPENBLAS_CORETYPE"] == os.environ["OPENBLAS_CORETYPE"] and "OPENBLAS_SECRET_KEY" not in env
    with SandboxPool(1) as p:
        res = p.run(_KERNELS, ref(store, 1))
    assert res.error is not None and res.error.type == "ValueError", res.error
    rng = np.random.default_rng(7)
    a, b = rng.normal(size=(2, 3000)) * 1e-3
    if loaded_with:  # the kernels this process runs: the child's floats must be the same, bit for bit
        expected = (float(np.dot(a, b)), float(np.cov(a, b)[0, 1]))
        assert res.error.message.endswith(repr(expected)), res.error.message
