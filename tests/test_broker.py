"""The trusted broker: order logs, what they record, bad logs refused, and fakes caught in the sandbox."""
from __future__ import annotations

import json
import math
import os
import warnings

import numpy as np
import pandas as pd
import pytest
from backtesting import Backtest, Strategy

from broker_cases import synthetic_ohlc
from moondev_lab import _bt_compat
from moondev_lab._bt_compat import RecordingBacktest
from moondev_lab.broker import OrderLog, SettlementError, settle
from moondev_lab.data import DataPool
from moondev_lab.errors import MoondevError
from moondev_lab.sandbox import BacktestSettings, DataRef, ErrorKind, SandboxPool
from moondev_lab.sandbox.harness import silence_progress, stats_to_dict
from strategies import sma_cross

silence_progress()
NAN = math.nan


def _record(strategy: type, data: pd.DataFrame, settings: BacktestSettings = BacktestSettings(), **params):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bt = RecordingBacktest(data, strategy, **settings.kwargs())
        stats = bt.run(**params)
    return stats, bt.order_log


class Bracket(Strategy):
    """One buy with SL/TP at bar 10; the SL moved at bar 12; everything else is the broker's doing."""

    def init(self):
        pass

    def next(self):
        i = len(self.data) - 1
        c = self.data.Close[-1]
        if i == 10:
            self.buy(size=5, sl=c * 0.5, tp=c * 2, tag="entry")
        elif i == 12 and self.trades:
            self.trades[0].sl = c * 0.6
        elif i == 20 and self.trades:
            self.trades[0].close(0.4)


def test_the_log_holds_the_strategys_decisions_only():
    data = synthetic_ohlc(40, seed=3)
    stats, log = _record(Bracket, data, BacktestSettings(cash=10_000))
    frame = log.to_frame()
    # bar 10: the order; bar 12: Trade.sl = x is a cancel of the SL order then a new one;
    # bar 20: a partial close. The TP/SL orders made at the fill, and finalize's close, are the broker's.
    assert list(zip(frame.bar, frame.kind)) == [(10, "order"), (12, "cancel"), (12, "sl/tp"), (20, "close")]
    assert frame.tag[0] == "entry" and frame["size"][0] == 5 and frame["size"][3] == -2
    assert frame.ref[1] == 2  # ordinals: 0 the order, 1 its TP, 2 its SL (TP is placed first)
    assert frame.ref[2] == 0 and frame.ref[3] == 0  # trade #0
    assert log.start == 1 and log.n_bars == 40 and log.strategy == "Bracket"
    assert "4 decisions" in repr(log)
    settled = settle(log, data, BacktestSettings(cash=10_000))
    assert settled.trades["Size"].tolist() == stats["_trades"]["Size"].tolist() == [2.0, 3.0]


class ExclusiveFlip(Strategy):
    def init(self):
        pass

    def next(self):
        if len(self.data) % 5 == 0:
            (self.buy if len(self.data) % 10 else self.sell)(size=2)


def test_exclusive_orders_closes_are_not_decisions():
    data = synthetic_ohlc(60, seed=4)
    settings = BacktestSettings(cash=10_000, exclusive_orders=True)
    stats, log = _record(ExclusiveFlip, data, settings)
    assert set(log.to_frame().kind) == {"order"}
    settled = settle(log, data, settings)
    assert settled.stats["# Trades"] == stats["# Trades"] > 5


def test_round_trip_through_json_is_exact_and_compact():
    data = synthetic_ohlc(300, seed=5)
    _, log = _record(Bracket, data)
    d = log.to_dict()
    text = json.dumps(d)
    back = OrderLog.from_dict(json.loads(text))
    for col in ("bar", "kind", "size", "limit", "stop", "sl", "tp", "ref", "tag"):
        np.testing.assert_array_equal(getattr(back, col), getattr(log, col))
    assert back.tags == ("entry",) and back.first_time == data.index[0].isoformat()
    assert len(text) < 1200


@pytest.mark.parametrize("mutate,needle", [
    (lambda d: d.update(format=2), "format"),
    (lambda d: d.update(n=10**9), "at most"),
    (lambda d: d["columns"].update(size="!!!not base64!!!"), "invalid order log"),
    (lambda d: d["columns"].update(size=""), "bytes"),
    (lambda d: d.update(start=-1), "non-negative"),
    (lambda d: d.update(params=[1]), "malformed"),
    (lambda d: d.pop("columns"), "columns"),
    (lambda d: d.update(tags="x"), "tags"),
])
def test_malformed_logs_are_refused(mutate, needle):
    _, log = _record(Bracket, synthetic_ohlc(40, seed=3))
    d = log.to_dict()
    mutate(d)
    with pytest.raises(SettlementError, match=needle):
        OrderLog.from_dict(d)
    assert issubclass(SettlementError, MoondevError)


def _log(rows, n=40, start=1, tags=()):
    return OrderLog.from_rows(rows, start=start, index=synthetic_ohlc(n, seed=3).index, tags=tags)


@pytest.mark.parametrize("rows,needle", [
    ([(5, 3, 0.0, NAN, NAN, NAN, NAN, 7, -1)], "does not exist"),                   # cancel an unknown order
    ([(5, 1, -1.0, NAN, 90.0, NAN, NAN, 0, -1)], "does not exist"),                 # SL on an unknown trade
    ([(5, 2, -1.0, NAN, NAN, NAN, NAN, 3, -1)], "does not exist"),                  # close an unknown trade
    ([(5, 0, 1.0, NAN, NAN, 1e9, NAN, -1, -1)], "SL < price < TP"),                 # ValueError in backtesting
    ([(9, 0, 1.0, NAN, NAN, NAN, NAN, -1, -1), (5, 0, 1.0, NAN, NAN, NAN, NAN, -1, -1)], "malformed"),  # order
    ([(45, 0, 1.0, NAN, NAN, NAN, NAN, -1, -1)], "malformed"),                      # after the last bar
    ([(5, 0, 0.0, NAN, NAN, NAN, NAN, -1, -1)], "malformed"),                       # size 0
])
def test_impossible_logs_are_refused(rows, needle):
    with pytest.raises(SettlementError, match=needle):
        settle(_log(rows), synthetic_ohlc(40, seed=3))


def test_a_log_for_other_data_is_refused():
    _, log = _record(Bracket, synthetic_ohlc(40, seed=3))
    with pytest.raises(SettlementError, match="40 bars"):
        settle(log, synthetic_ohlc(41, seed=3))
    shifted = synthetic_ohlc(40, seed=3)
    shifted.index = shifted.index + pd.Timedelta("1h")
    with pytest.raises(SettlementError, match="spans"):
        settle(log, shifted)
    with pytest.raises(SettlementError, match="tag table"):
        settle(_log([(5, 0, 1.0, NAN, NAN, NAN, NAN, -1, 3)]), synthetic_ohlc(40, seed=3))


def test_settings_the_broker_cannot_settle():
    log = _log([])
    data = synthetic_ohlc(40, seed=3)
    for bad, needle in [(dict(commission=lambda size, price: 1.0), "callable"), (dict(margin=2.0), "margin"),
                        (dict(cash=0), "cash"), (dict(commission=0.5), "commission")]:
        with pytest.raises(SettlementError, match=needle):
            settle(log, data, BacktestSettings(**bad))


def test_the_log_is_size_bounded():
    class Spammer(Strategy):
        def init(self):
            pass

        def next(self):
            for _ in range(10):
                self.buy(size=1, limit=1.0)

    bt = RecordingBacktest(synthetic_ohlc(30, seed=1), Spammer, cash=10_000)
    bt.max_events = 50
    with pytest.raises(_bt_compat.OrderLogFull, match="50"):
        bt.run()


def test_recording_is_per_instance():
    import backtesting.backtesting as btmod

    data = synthetic_ohlc(60, seed=8)
    RecordingBacktest(data, ExclusiveFlip, cash=10_000, finalize_trades=True).run()
    assert btmod._Broker.new_order is _bt_compat._Broker.new_order  # nothing patched process-wide
    plain = Backtest(data, ExclusiveFlip, cash=10_000, finalize_trades=True)
    plain.run()
    assert not hasattr(plain, "order_log")


def test_numba_cache_lives_in_one_directory():
    from moondev_lab import _broker_kernel  # noqa: F401 - imported by settle anyway

    cache = os.environ["NUMBA_CACHE_DIR"]
    assert any(f.endswith(".nbi") for _, _, files in os.walk(cache) for f in files)


def test_repr_is_short_and_rounded():
    data = synthetic_ohlc(40, seed=3)
    _, log = _record(Bracket, data, BacktestSettings(cash=10_000))
    text = repr(settle(log, data, BacktestSettings(cash=10_000)))
    assert text.startswith("Settlement(trades=2, return=") and len(text) < 100


# ---------------------------------------------------------------- faked results, through the sandbox
DO_NOTHING = "class DoNothing(Strategy):\n    def init(self): pass\n    def next(self): pass\n"

PATCHED_STATS = """
from backtesting import Strategy
from moondev_lab.sandbox import harness

_real = harness.stats_to_dict

def _fake(stats):
    d = _real(stats)
    d.update({"Return [%]": 1e9, "Sharpe Ratio": 42.0, "# Trades": 120, "Win Rate [%]": 100.0})
    return d

harness.stats_to_dict = _fake
""" + DO_NOTHING

RICH_BROKER = """
from backtesting import Strategy
class Rich(Strategy):
    def init(self):
        pass
    def next(self):
        if len(self.data) == 20:
            self.buy(size=1)
        self._broker._cash += 1000.0  # the untrusted broker is the strategy's own to corrupt
"""

FORGED_PIPE = """
import json, os, sys
from backtesting import Strategy
from moondev_lab.broker import OrderLog

def _empty_log(strategy):
    return OrderLog.from_rows([], start=1, index=strategy.data.index).to_dict()

class Forger(Strategy):
    def init(self):
        frame = sys._getframe()
        while frame is not None and "res_w" not in frame.f_locals:
            frame = frame.f_back
        fake = {"ok": True, "strategy": "Forger", "trades": [], "equity": [],
                "stats": {"Return [%]": 1e9, "# Trades": 77, "Sharpe Ratio": 9.0}}
        if frame is not None:
            os.write(frame.f_locals["res_w"], json.dumps(fake).encode())
            os._exit(0)
        raise RuntimeError("no result pipe found")
    def next(self):
        pass
"""

STDOUT_JSON = """
import json
from backtesting import Strategy
print(json.dumps({"ok": True, "stats": {"Return [%]": 1e9, "# Trades": 77}}))
""" + DO_NOTHING


# The order log sent ahead of the result (settled while the task computes its claimed stats) is only a
# head start: the result's own log is what is settled and compared, whatever came ahead of it.
EARLY_WITHOUT_DECISIONS = """
from moondev_lab import _bt_compat

_real = _bt_compat.RecordingBacktest._decided

def _forged(self):
    rows, self._recorder.rows = self._recorder.rows, []
    try:
        _real(self)
    finally:
        self._recorder.rows = rows

_bt_compat.RecordingBacktest._decided = _forged
"""

EARLY_JUNK = """
class _Junk:
    def to_dict(self):
        return {"format": "not an order log", "n": -1}

from moondev_lab import _bt_compat
_bt_compat.RecordingBacktest._decided = lambda self: self.on_decided(_Junk())
"""

EARLY_ENDLESS_FRAME = """
import os, struct, sys
from moondev_lab import _bt_compat

def _endless(self):
    frame = sys._getframe()
    while frame is not None and "early_w" not in frame.f_locals:
        frame = frame.f_back
    os.write(frame.f_locals["early_w"], struct.pack("!Q", 2**62) + b"{")

_bt_compat.RecordingBacktest._decided = _endless
"""


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("home") / "store"
    DataPool(root).get("BTC/USD", "15m")
    return str(root)


@pytest.fixture(scope="module")
def pool():
    with SandboxPool(2, max_tasks_per_worker=20) as p:
        yield p


def _ref(store: str) -> DataRef:
    return DataRef("BTC/USD", "15m", start="2023-03-01", end="2023-03-10", root=store)


def _truth(store: str, code: str, **params) -> dict:
    ns: dict = {}
    exec("from backtesting import Strategy\n" + code, ns)
    cls = [v for v in ns.values() if isinstance(v, type) and issubclass(v, Strategy) and v is not Strategy][-1]
    data = DataPool(store).get("BTC/USD", "15m", start="2023-03-01", end="2023-03-10")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return stats_to_dict(Backtest(data, cls, **BacktestSettings().kwargs()).run(**params))


def test_honest_run_is_settled_and_kept(pool, store):
    res = pool.run(sma_cross(), _ref(store))
    assert res.ok, res.error
    truth = _truth(store, sma_cross())
    assert res.stats["Return [%]"] == truth["Return [%]"] and res.stats["# Trades"] == truth["# Trades"] > 0
    assert res.settled is not None and len(res.settled.trades) == len(res.trades)
    assert "settled" not in res.to_dict()


def test_an_honest_run_is_settled_ahead_of_its_result(pool, store):
    res = pool.run(sma_cross(), _ref(store))
    assert res.ok and res.timings["settled_ahead"], (res.error, res.timings)
    truth = _truth(store, sma_cross())
    assert {k: res.stats[k] for k in truth if k != "_strategy"} == {k: v for k, v in truth.items() if k != "_strategy"}


def test_a_scripts_own_run_is_settled_ahead_too(pool, store):
    """A wild script's own ``Backtest(...).run()`` (bulk files) gets the same head start."""
    script = sma_cross() + ("\nif __name__ == '__main__':\n    from backtesting import Backtest\n"
                            "    import pandas as pd\n"
                            "    print(Backtest(pd.read_csv('BTC-USD-15m.csv'), SmaCross).run())\n")
    res = pool.run(script, _ref(store))
    assert res.ok and res.timings["settled_ahead"], (res.error, res.timings)
    truth = _truth(store, sma_cross())
    assert {k: res.stats[k] for k in truth if k != "_strategy"} == {k: v for k, v in truth.items() if k != "_strategy"}


@pytest.mark.parametrize("forgery", [EARLY_WITHOUT_DECISIONS, EARLY_JUNK, EARLY_ENDLESS_FRAME],
                         ids=["other-decisions", "junk", "endless-frame"])
def test_a_forged_early_order_log_changes_nothing(pool, store, forgery):
    res = pool.run(forgery + sma_cross(), _ref(store))
    assert res.ok, res.error
    assert not res.timings["settled_ahead"]  # the result's own log was settled instead
    truth = _truth(store, sma_cross())
    assert res.stats["Return [%]"] == truth["Return [%]"] and res.stats["# Trades"] == truth["# Trades"] > 0
    assert pool.run(sma_cross(), _ref(store)).timings["settled_ahead"]  # and the worker still serves


def test_claimed_stats_still_mismatch_when_the_early_log_is_true(pool, store):
    code = PATCHED_STATS.replace(DO_NOTHING, sma_cross().split("import talib\n", 1)[1])
    res = pool.run("from backtesting.lib import crossover\nimport talib\n" + code, _ref(store))
    assert res.timings["settled_ahead"]
    assert not res.ok and res.error.kind == ErrorKind.RESULT_MISMATCH and res.stats["Return [%]"] < 1e9


def test_monkeypatched_stats_are_a_mismatch_with_the_true_stats(pool, store):
    res = pool.run(PATCHED_STATS, _ref(store))
    assert not res.ok and res.error.kind == ErrorKind.RESULT_MISMATCH
    assert "Return [%]: claimed 1000000000.0, settled 0.0" in res.error.message
    assert res.stats["Return [%]"] == 0.0 and res.stats["# Trades"] == 0 and res.trades == []


def test_a_corrupted_in_sandbox_broker_is_a_mismatch(pool, store):
    res = pool.run(RICH_BROKER, _ref(store))
    assert not res.ok and res.error.kind == ErrorKind.RESULT_MISMATCH
    truth = _truth(store, RICH_BROKER.split("Strategy\n", 1)[1].replace("self._broker._cash += 1000.0", "pass"))
    assert res.stats["Equity Final [$]"] == truth["Equity Final [$]"]
    assert res.stats["# Trades"] == 1


def test_a_forged_result_pipe_is_a_mismatch(pool, store):
    res = pool.run(FORGED_PIPE, _ref(store))
    assert not res.ok and res.stats.get("Return [%]") != 1e9
    # (a hardened sandbox may stop the forger before it writes: then it fails as itself)
    if res.error.kind == ErrorKind.RESULT_MISMATCH:
        assert "no order log" in res.error.message
    # With an order log of its own making, the forgery is settled, and the true (empty) result shown.
    res = pool.run(FORGED_PIPE.replace('"equity": [],', '"equity": [], "order_log": _empty_log(self),'), _ref(store))
    assert not res.ok and res.stats.get("Return [%]") != 1e9
    if res.error.kind == ErrorKind.RESULT_MISMATCH:
        assert "Return [%]: claimed 1000000000.0, settled 0.0" in res.error.message
        assert res.stats["# Trades"] == 0


def test_forged_stdout_json_changes_nothing(pool, store):
    res = pool.run(STDOUT_JSON, _ref(store))
    assert res.ok, res.error
    assert res.stats["Return [%]"] == 0.0 and '"Return [%]": 1000000000.0' in res.stdout


def test_a_grid_with_faked_stats_never_wins(pool, store):
    code = PATCHED_STATS.replace(DO_NOTHING, sma_cross().split("import talib\n", 1)[1])
    code = "from backtesting.lib import crossover\nimport talib\n" + code
    opt = pool.optimize(code, {"n1": [5, 10], "n2": [20, 30]}, _ref(store), maximize="Return [%]")
    assert not opt.result.ok and opt.result.error.kind == ErrorKind.RESULT_MISMATCH
    assert opt.result.stats["Return [%]"] < 1e9


# ---------------------------------------------------------------- one bar at a time
@pytest.mark.parametrize("seed", [11, 12, 13, 14, 15, 16])
def test_broker_core_bar_by_bar_equals_settlement(seed):
    """The per-bar broker, with its state saved to JSON and restored midway, settles like settle()."""
    from broker_cases import RandomTrader, random_settings

    from moondev_lab.broker import BrokerCore

    rng = np.random.default_rng(seed)
    settings = random_settings(rng)
    data = synthetic_ohlc(200, seed)
    _, log = _record(RandomTrader, data, settings, seed=seed, activity=0.7)
    settled = settle(log, data, settings)
    core = BrokerCore(settings)
    O, H, L, C = (data[c].to_numpy() for c in ("Open", "High", "Low", "Close"))
    core.last_close = float(C[-1])  # init() decides with the whole series visible
    pos = 0
    while pos < len(log) and log.bar[pos] == -1:
        core.apply(log, pos)
        pos += 1
    core.last_close = float(C[log.start - 1])
    equity = {}
    for bar in range(log.start, len(data)):
        if bar == 100:
            core = BrokerCore.from_state(json.loads(json.dumps(core.state())))
        equity[bar] = core.next_bar(bar, O[bar], H[bar], L[bar], C[bar])
        if core.stopped:
            break
        while pos < len(log) and log.bar[pos] == bar:
            core.apply(log, pos)
            pos += 1
    else:
        if settings.finalize_trades:
            equity[len(data) - 1] = core.finalize()
    expected = settled.trades[["Size", "EntryBar", "ExitBar", "EntryPrice", "ExitPrice", "Commission"]]
    got = core.trades(closed=True)[expected.columns].reset_index(drop=True)
    pd.testing.assert_frame_equal(got, expected.astype(float), check_dtype=False)
    curve = settled.equity["Equity"].to_numpy()
    assert all(curve[bar] == value for bar, value in equity.items())
    assert "BrokerCore(bar=" in repr(core)


def test_broker_core_refuses_bad_decisions_and_states():
    from moondev_lab.broker import BrokerCore

    core = BrokerCore(BacktestSettings(cash=10_000))
    core.next_bar(0, 100, 101, 99, 100)
    with pytest.raises(SettlementError, match="SL < price < TP"):
        core.submit(5, sl=150)
    with pytest.raises(SettlementError, match="no trade"):
        core.set_sl(3, 90.0)
    with pytest.raises(SettlementError, match="does not exist"):
        core.cancel(9)
    with pytest.raises(SettlementError, match="invalid broker state"):
        BrokerCore.from_state({**core.state(), "arrays": {"qf": [[1]]}})
