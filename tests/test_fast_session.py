"""The RBI loop's fast runs, confirmed by backtesting.py in one batched sandbox task per idea.

Batches against separate sandbox runs, the known-settlement shortcut, the whole loop against
today's (grid_engine="pool"), and an injected divergence: reported, the backtesting.py results kept.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path

import numpy as np
import pytest

from moondev_lab.fast import FastGrid, plan_of
from moondev_lab.ledger import Ledger
from moondev_lab.models.offline import OfflineModel
from moondev_lab.rbi import RBI, RBIConfig
from moondev_lab.sandbox import DataRef, SandboxPool
from moondev_lab.sandbox.settings import BacktestSettings

pytestmark = [pytest.mark.filterwarnings("ignore"), pytest.mark.timeout(600)]

IDEA = "Buy when the 10/30 SMA cross up, sell on the cross down, 2% stop"
CODE = OfflineModel().write_code(IDEA).code
TRAIN = DataRef(start="2023-03-01", end="2023-03-20")
TEST = DataRef(start="2023-03-20", end="2023-03-31")
BROKEN = "from backtesting import Strategy\nclass Bad(Strategy):\n    def init(self):\n        raise KeyError('x')\n" \
         "    def next(self):\n        pass\n"


@pytest.fixture(scope="module")
def sandbox():
    with SandboxPool(2) as pool:
        yield pool


def _fast_log_and_settlement(ref: DataRef, params: dict):
    from moondev_lab.broker import settle
    from moondev_lab.data import default_pool

    data = default_pool().get(ref.symbol, ref.timeframe, start=ref.start, end=ref.end)
    fg = FastGrid(plan_of(CODE), data)
    log = fg.order_log(params)
    return log, settle(log, data, BacktestSettings())


def test_a_batch_is_one_task_and_equals_separate_runs(sandbox):
    runs = [(CODE, TRAIN, None), (CODE, TEST, {"fast_n": 5}), (BROKEN, TRAIN, None), (CODE, TRAIN, {"slow_n": 40})]
    singles = [sandbox.run(code, ref, params=params) for code, ref, params in runs]
    before = sandbox.stats().tasks
    batch = sandbox.run_batch(runs, timeout=60)
    assert sandbox.stats().tasks == before + 1  # one dispatch for the four runs
    for one, many in zip(singles, batch):
        assert one.ok == many.ok
        if one.ok:
            assert one.stats == many.stats and one.trades == many.trades and one.equity == many.equity
    assert batch[2].error.kind.value == "strategy_error" and "KeyError" in batch[2].error.type  # only that one
    assert sandbox.run_batch([]) == []
    with pytest.raises(ValueError, match="one series"):
        sandbox.run_batch([(CODE, TRAIN, None), (CODE, DataRef("ETH/USD", "15m"), None)])


def test_known_settlement_is_used_only_for_the_same_decisions(sandbox):
    params = {"fast_n": 10, "slow_n": 30}
    log, settlement = _fast_log_and_settlement(TRAIN, params)
    other_log, other = _fast_log_and_settlement(TRAIN, {"fast_n": 5, "slow_n": 30})
    same, different = sandbox.run_batch([(CODE, TRAIN, None), (CODE, TRAIN, None)],
                                        known=[(log, settlement), (other_log, other)])
    assert same.ok and same.settled is settlement  # no second settlement of the same decisions
    assert different.ok and different.settled is not other  # settled from the sandbox's own log
    assert different.stats == same.stats and different.trades == same.trades


def test_session_repeats_a_run_once_and_holds_ledger_writes(tmp_path):
    from moondev_lab._fast_session import FastSession

    led = Ledger(tmp_path / "l.sqlite")
    s = FastSession(None, led, timeout=60, settings=BacktestSettings())
    a = s.run(CODE, TRAIN)
    b = s.run(CODE, TRAIN, {"fast_n": plan_of(CODE).defaults["fast_n"]})  # the same run, spelled otherwise
    assert a is b and s.fast_runs == 1 and s.repeats == 1 and len(s.pending) == 1
    assert a.ok and a.settled is not None and a.stats["_strategy"]["fast_n"] == 10
    s.add_code(1, "initial", 0, CODE, stats=a.stats)
    assert s._writes and led.code_versions(1) == []  # nothing unconfirmed reaches the ledger
    s.confirm(kept=[])  # not kept: dropped, nothing to confirm (no sandbox needed)
    assert s.unconfirmed == 1 and not s.pending


def _loop(sandbox, tmp_path, engine: str, name: str, **kw):
    conf = RBIConfig(start="2023-03-01", end="2023-04-10", max_optimize=kw.pop("max_optimize", 1), grid=True,
                     max_grid=9, quarters=True, timeout=60, grid_engine=engine, runs_dir=tmp_path / f"runs-{name}",
                     **kw)
    led = Ledger(tmp_path / f"{name}.sqlite")
    with RBI("offline", conf, led, sandbox) as rbi:
        before = sandbox.stats().tasks
        res = rbi.run_one(IDEA)
        tasks = sandbox.stats().tasks - before
    return res, led, tasks


def _same_results(a, b) -> None:
    assert a.status == b.status == "ok", (a.error, b.error)
    assert a.params == b.params and a.grid == b.grid
    for x, y in ((a.in_sample, b.in_sample), (a.out_of_sample, b.out_of_sample)):
        assert x.keys() == y.keys()
        assert all(x[k] == y[k] or (isinstance(x[k], float) and math.isnan(x[k]) and math.isnan(y[k])) for k in x)
    assert [d["dataset"] for d in a.datasets] == [d["dataset"] for d in b.datasets]
    assert a.backtests["out_of_sample"].trade_records == b.backtests["out_of_sample"].trade_records


@pytest.mark.parametrize("confirm", ["kept", "all"])
def test_rbi_fast_runs_equal_todays_loop_in_one_sandbox_task(sandbox, tmp_path, confirm):
    fast, fast_led, fast_tasks = _loop(sandbox, tmp_path, "auto", f"auto-{confirm}", confirm=confirm)
    slow, slow_led, slow_tasks = _loop(sandbox, tmp_path, "pool", f"pool-{confirm}")
    _same_results(fast, slow)
    assert fast.grid_engine == "fast" and slow.grid_engine == "pool"
    assert fast_tasks == 1 < slow_tasks  # every run of the idea confirmed in ONE sandbox task
    stages = lambda led, r: [(c["stage"], c["iteration"], (c["stats"] or {}).get("Return [%]"))  # noqa: E731
                             for c in led.code_versions(r.run_id) if c["stage"] != "overfitting"]
    assert stages(fast_led, fast) == stages(slow_led, slow)  # the same ledger rows, written after the confirmation
    assert not any("mismatch" in f for f in fast.findings)
    # the chart drawn while the sandbox confirmed is the out-of-sample run's
    page = (Path(fast.run_dir) / "plot.html").read_text()
    assert "Bokeh" in page and f"run {fast.run_id} (out-of-sample" in page


def _diverging_log(real):
    """``FastGrid.order_log`` without its last decision: an injected fast-path bug (the log still settles)."""
    from moondev_lab.broker import _COLUMNS

    def order_log(self, combo):
        log = real(self, combo)
        return dataclasses.replace(log, **{c: getattr(log, c)[:-1] for c in _COLUMNS})

    return order_log


def test_a_mismatch_is_reported_and_the_backtesting_results_are_kept(sandbox, tmp_path, monkeypatch, caplog):
    slow, slow_led, _ = _loop(sandbox, tmp_path, "pool", "pool", max_optimize=0)
    monkeypatch.setattr(FastGrid, "order_log", _diverging_log(FastGrid.order_log))
    with caplog.at_level(logging.ERROR):
        fast, led, _ = _loop(sandbox, tmp_path, "auto", "auto", max_optimize=0)
    rows = lambda led, r: [(c["stage"], (c["stats"] or {}).get("Return [%]"))  # noqa: E731
                           for c in led.code_versions(r.run_id) if c["stage"] != "overfitting"]
    assert rows(led, fast) == rows(slow_led, slow)  # the discarded fast attempt wrote nothing
    assert "fast path MISMATCH" in caplog.text and "backtesting.py trades" in caplog.text
    assert any(f.startswith("fast path mismatch, backtesting.py results kept") for f in fast.findings)
    _same_results(fast, slow)  # what is kept is the sandbox's (backtesting.py's)
    assert fast.grid_engine == "pool"  # the grid's own confirmation caught it too: the pool grid decided
    assert np.isfinite(fast.out_of_sample["Return [%]"])


def test_rbi_uses_the_pool_it_is_given_before_its_first_task(tmp_path):
    with SandboxPool(1) as pool:
        assert len(pool) == 0  # no worker yet: a SandboxPool is falsy here
        with RBI("offline", RBIConfig(start="2023-03-01", end="2023-03-31"), Ledger(tmp_path / "l.sqlite"),
                 pool) as rbi:
            assert rbi.sandbox is pool


FORGER = '''import sys
from backtesting import Strategy
_h = sys.modules["moondev_lab.sandbox.harness"]
_h.execute = lambda task, frame: {"ok": True, "stats": {"Return [%]": 1e6}, "order_log": None}

class Forger(Strategy):
    def init(self):
        pass

    def next(self):
        pass
'''


def test_a_run_that_forges_the_later_runs_of_its_batch_claims_nothing(sandbox):
    """Runs of a batch share one process: a run can patch the harness, but each later run is still settled."""
    first, forged = sandbox.run_batch([(FORGER, TRAIN, None), (CODE, TRAIN, None)])
    assert first.ok
    assert not forged.ok and forged.error.kind.value == "result_mismatch" and "no order log" in forged.error.message
    assert forged.stats.get("Return [%]") != 1e6
