"""The fast grid against backtesting.py itself: random differential cases, edge cases, grids, confirmation.

backtesting.py runs in-process here on the offline model's *own* generated code (trusted);
``ml.grid`` never executes strategy code in-process.
"""
from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from backtesting import Backtest

from moondev_lab import signals
from moondev_lab.fast import FastGrid, GridResult, Plan, _NotExact, compare, grid, plan_of
from moondev_lab.models._parser import parse_idea
from moondev_lab.models.spec import Stop
from moondev_lab.sandbox.harness import stats_to_dict, trades_to_records
from moondev_lab.sandbox.settings import BacktestSettings

pytestmark = pytest.mark.filterwarnings("ignore")


def _btc() -> pd.DataFrame:
    df = pd.read_csv(Path(__file__).parent.parent / "data" / "BTC-USD-15m.csv")
    df.columns = [c.strip().capitalize() for c in df.columns]
    df.index = pd.to_datetime(df["Datetime"], utc=True)
    return df[["Open", "High", "Low", "Close", "Volume"]].astype(float)


BTC = _btc()


def synthetic(rng: np.random.Generator, n: int) -> pd.DataFrame:
    """A random walk with overnight-style gaps (open far from the last close) and limit-move bars (O=H=L=C)."""
    ret = rng.normal(0, 0.01, n)
    close = 100 * np.exp(np.cumsum(ret))
    gap = np.where(rng.random(n) < 0.03, rng.normal(0, 0.05, n), 0.0)
    open_ = np.r_[close[0], close[:-1]] * np.exp(gap)
    high = np.maximum(open_, close) * (1 + rng.random(n) * 0.01)
    low = np.minimum(open_, close) * (1 - rng.random(n) * 0.01)
    limit = rng.random(n) < 0.02
    high[limit] = low[limit] = open_[limit] = close[limit]
    volume = rng.integers(0, 1000, n).astype(float)
    volume[rng.random(n) < 0.02] = 0.0
    idx = pd.date_range("2024-01-01", periods=n, freq="15min", tz="UTC")
    return pd.DataFrame({"Open": open_, "High": high, "Low": low, "Close": close, "Volume": volume}, index=idx)


def backtesting_run(code: str, name: str, df: pd.DataFrame, params: dict) -> pd.Series:
    ns: dict = {}
    exec(compile(code, "<generated>", "exec"), ns)  # noqa: S102 - the offline model's own code
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Backtest(df, ns[name], **BacktestSettings().kwargs()).run(**params)


def assert_same(fast_stats: pd.Series, bt: pd.Series) -> None:
    diff = compare(fast_stats, stats_to_dict(bt), trades_to_records(bt["_trades"]))
    assert diff is None, diff
    assert len(stats_to_dict(bt)) - 1 == sum(not k.startswith("_") for k in fast_stats.index)  # the same 33 stats


# ----------------------------------------------------------------------------- random cases
def _random_spec(rng: np.random.Generator):
    kinds = signals.kinds()
    first = kinds[rng.integers(len(kinds))]
    spec, _ = parse_idea(first.example)
    if rng.random() < 0.3:  # a second kind's signals join the first's
        other, _ = parse_idea(kinds[rng.integers(len(kinds))].example)
        have = {s.kind for s in spec.signals}
        spec.signals += [s for s in other.signals if s.kind not in have]
    spec.direction = ["long", "short", "both"][rng.integers(3)]
    spec.stop_loss = [None, Stop("pct", float(rng.choice([0.5, 1.0, 3.0])), trailing=bool(rng.random() < 0.4)),
                      Stop("atr", float(rng.choice([1.0, 2.0])), trailing=bool(rng.random() < 0.5))][rng.integers(3)]
    spec.take_profit = [None, Stop("pct", float(rng.choice([1.0, 2.0, 5.0]))),
                        Stop("atr", float(rng.choice([1.5, 3.0])))][rng.integers(3)]
    spec.max_bars = int(rng.choice([0, 0, 0, 12, 40])) or None
    return spec


def _random_params(rng: np.random.Generator, params: dict) -> dict:
    out = {}
    for k, v in params.items():
        if rng.random() < 0.5 or isinstance(v, bool):
            continue
        f = float(rng.choice([0.5, 0.75, 1.25, 1.5, 2.0]))
        if isinstance(v, int):
            new = max(2, int(round(v * f))) if v >= 2 else v
        else:
            new = round(v * f, 4)
            if signals.is_fraction(k):
                new = min(0.9, new)
        out[k] = new
    return out


CASES = 520


@pytest.mark.timeout(600)
def test_random_cases_match_backtesting_py_trade_for_trade():
    rng = np.random.default_rng(20261201)
    checked = refused = 0
    families: set[str] = set()
    for case in range(CASES):
        spec = _random_spec(rng)
        plan = Plan.from_spec(spec)
        code, name = plan.code, plan.name
        n = int(rng.integers(250, 1200))
        if rng.random() < 0.5:
            s = int(rng.integers(0, len(BTC) - n))
            df = BTC.iloc[s:s + n]
        else:
            df = synthetic(rng, n)
        params = _random_params(rng, plan.defaults)
        try:
            bt = backtesting_run(code, name, df, params)
        except Exception:  # backtesting.py refuses it (e.g. SL above the price): the fast path must refuse too
            with pytest.raises(_NotExact):
                FastGrid(plan, df).settle(params)
            refused += 1
            continue
        fg = FastGrid(plan, df)
        fast = fg.settle(params).stats
        assert_same(fast, bt)
        m = fg.metrics(params)  # the compiled metrics are compute_stats' numbers too
        for k, v in m.items():
            assert v == bt[k] or (math.isnan(v) and math.isnan(bt[k])), (case, k, v, bt[k])
        families.update(s.kind for s in spec.signals)
        checked += 1
    assert checked >= 500 and refused < 20
    assert families == {k.name for k in signals.kinds()}


# ----------------------------------------------------------------------------- edge cases
def _plan(idea: str, **changes):
    spec, missing = parse_idea(idea)
    assert spec is not None, missing
    for k, v in changes.items():
        setattr(spec, k, v)
    plan = Plan.from_spec(spec)
    if not changes:  # the idea's own code is recognised as a spec strategy
        assert plan_of(plan.code) is not None
    return plan, plan.code, plan.name


def _both(idea: str, df: pd.DataFrame, params=None, **changes):
    plan, code, name = _plan(idea, **changes)
    bt = backtesting_run(code, name, df, params or {})
    fast = FastGrid(plan, df).settle(params or {}).stats
    assert_same(fast, bt)
    return fast, bt


def _frame(close, open_=None, high=None, low=None):
    close = np.asarray(close, float)
    open_ = close if open_ is None else np.asarray(open_, float)
    high = np.maximum(open_, close) if high is None else np.asarray(high, float)
    low = np.minimum(open_, close) if low is None else np.asarray(low, float)
    idx = pd.date_range("2024-01-01", periods=len(close), freq="15min", tz="UTC")
    return pd.DataFrame({"Open": open_, "High": high, "Low": low, "Close": close, "Volume": 1.0}, index=idx)


CROSS = "Buy when the 2/4 SMA cross up, sell on the cross down"


def test_no_trades():
    fast, bt = _both("Buy when RSI(14) < 30, sell when RSI > 70", BTC.iloc[:600], {"rsi_low": 0.001})
    assert fast["# Trades"] == 0 and math.isnan(fast["Win Rate [%]"])


def test_trade_open_at_the_end_is_closed_by_finalize_trades():
    df = _frame(np.r_[np.full(10, 100.0), np.linspace(100, 130, 20)])
    fast, _ = _both(CROSS, df)
    last = fast["_trades"].iloc[-1]
    assert last["ExitBar"] == len(df) - 1 and last["ExitPrice"] == df.Close.iloc[-1]


def test_sl_and_tp_in_one_bar_the_stop_loss_wins():
    close = np.r_[np.full(10, 100.0), np.linspace(100, 102, 8), [102.0, 102.0]]
    high, low = close.copy(), close.copy()
    high[-2], low[-2] = 200.0, 50.0  # one bar spans the stop (-5%) and the target (+5%)
    df = _frame(close, high=high, low=low)
    fast, _ = _both(CROSS, df, stop_loss=Stop("pct", 5.0), take_profit=Stop("pct", 5.0))
    t = fast["_trades"].iloc[0]
    assert t["ExitBar"] == len(df) - 2 and t["ExitPrice"] < t["EntryPrice"]


def test_gap_through_the_stop_fills_at_the_open():
    close = np.r_[np.full(10, 100.0), np.linspace(100, 110, 8), [80.0, 80.0]]
    open_ = close.copy()
    open_[-2] = 80.0  # gaps far below the 2% stop
    df = _frame(close, open_=open_)
    fast, _ = _both(CROSS, df, stop_loss=Stop("pct", 2.0))
    t = fast["_trades"].iloc[0]
    assert t["ExitPrice"] == 80.0


def test_fraction_too_small_for_one_unit_places_no_trade():
    df = _frame(np.r_[np.full(10, 2e6), np.linspace(2e6, 2.4e6, 20)])  # 0.95 x 1e6 cash buys no whole unit
    fast, _ = _both(CROSS, df)
    assert fast["# Trades"] == 0


def test_equity_to_zero_stops_the_run():
    close = np.r_[np.full(10, 100.0), np.linspace(100, 90, 8), [400.0, 400.0, 400.0]]  # a 4x jump in one bar
    df = _frame(close)
    spec_idea = "Short when the 2/4 SMA cross down, cover on the cross up"
    fast, _ = _both(spec_idea, df, direction="short")
    assert fast["Equity Final [$]"] == 0


def test_foreign_or_edited_code_is_not_a_spec_strategy():
    _, code, _ = _plan(CROSS)
    assert plan_of(code) is not None
    assert plan_of(code.replace("close[i] > self.trend[i]", "True").replace("self.fast[i] > self.slow[i]",
                                                                             "self.fast[i] >= self.slow[i]")) is None
    assert plan_of("class S(Strategy):\n    def next(self): pass\n") is None
    assert plan_of(code.replace("fast_n = 2", "fast_n = 3")) is not None  # other parameter values: still ours


# ----------------------------------------------------------------------------- grids
def test_grid_equals_backtest_optimize():
    df = BTC.iloc[:3000]
    params = {"fast_n": [5, 10, 20], "slow_n": [30, 60]}
    g = grid(CROSS, params, data=df, maximize="Return [%]")
    assert isinstance(g, GridResult) and g.engine == "fast"
    plan = plan_of(g.code)
    ns: dict = {}
    exec(g.code, ns)  # noqa: S102 - the offline model's own code
    from moondev_lab.sandbox.harness import _in_process_optimize  # threads: the class is not importable

    with warnings.catch_warnings(), _in_process_optimize():
        warnings.simplefilter("ignore")
        stats, heatmap = Backtest(df, ns[plan.name], **g.settings).optimize(**g.params, maximize=g.maximize,
                                                                          return_heatmap=True)
    pd.testing.assert_series_equal(g.heatmap, heatmap)
    assert g.best_params == {k: getattr(stats["_strategy"], k) for k in params}
    assert_same(g.best_stats, stats)
    assert "GridResult(fast" in repr(g) and "<img" in g._repr_html_()


def test_grid_keeps_returns_on_request_and_streams_otherwise():
    df = BTC.iloc[:2000]
    g = grid(CROSS, {"fast_n": [5, 10], "slow_n": [30, 60]}, data=df)
    assert g.returns is None
    g = grid(CROSS, {"fast_n": [5, 10], "slow_n": [30, 60]}, data=df, keep_returns=True)
    assert g.returns.shape == (len(df), 4)
    eq = (1 + g.returns["fast_n=5,slow_n=30"]).cumprod() * 1_000_000
    bt = backtesting_run(g.code, plan_of(g.code).name, df, {"fast_n": 5, "slow_n": 30})
    assert np.allclose(eq.to_numpy(), bt["_equity_curve"]["Equity"].to_numpy(), rtol=1e-12)


def test_one_pass_gives_the_score_and_the_returns_of_separate_runs():
    # a grid keeping its returns (PBO) runs each combination once: the same score and returns as two runs
    fg = FastGrid(plan_of(grid(CROSS, {"fast_n": [5]}, data=BTC.iloc[:1500]).code), BTC.iloc[:1500])
    for combo in ({"fast_n": 5, "slow_n": 30}, {"fast_n": 10, "slow_n": 60}, {"fast_n": 3, "slow_n": 1400}):
        for maximize in ("Return [%]", "Sharpe Ratio"):  # a kernel metric, and one that needs the settlement
            value, returns = fg.score_and_returns(combo, maximize)
            alone = fg.score(combo, maximize)
            assert value == alone or (math.isnan(value) and math.isnan(alone))
            assert np.array_equal(returns, fg.returns(combo))


def test_plan_of_is_the_same_plan_for_any_parameter_values_and_refuses_edits():
    from moondev_lab.models.offline import set_class_param

    code = grid(CROSS, {"fast_n": [5]}, data=BTC.iloc[:500]).code
    first = plan_of(code)
    tuned = set_class_param(code, "fast_n", 7)
    again = plan_of(tuned)  # from the generated code kept for the idea, with only fast_n edited
    assert again.defaults == {**first.defaults, "fast_n": 7} and again.code == tuned and again.spec is not first.spec
    assert plan_of(code).defaults == first.defaults  # the kept generation is not changed by a plan made from it
    assert plan_of(tuned.replace("fast_n = 7", "fast_n = 7  # edited")) is None
    assert plan_of(set_class_param(code, "fast_n", 7.0)) is None  # a float where the generator has an int


def test_grid_errors_are_clear():
    with pytest.raises(ValueError, match="has no parameter 'nope'"):
        grid(CROSS, {"nope": [1, 2]}, data=BTC.iloc[:500])
    with pytest.raises(ValueError, match="no optimization values"):
        grid(CROSS, {"fast_n": []}, data=BTC.iloc[:500])
    with pytest.raises(ValueError, match="could not map|not understood"):
        grid("Short when funding rates spike", data=BTC.iloc[:500])


# ----------------------------------------------------------------------------- confirmation in the sandbox
def _diverging(real_settle, column: str, delta):
    """``FastGrid.settle`` with the first trade's ``column`` moved by ``delta``: an injected fast-path bug."""

    def settle(self, combo):
        s = real_settle(self, combo)
        trades = s.stats["_trades"].copy()
        trades.loc[trades.index[0], column] += delta
        s.stats["_trades"] = trades
        return s

    return settle


@pytest.mark.timeout(300)
def test_confirmation_run_agrees_and_an_injected_divergence_is_caught(monkeypatch, caplog):
    from moondev_lab.sandbox import SandboxPool

    params = {"fast_n": [5, 10], "slow_n": [30]}
    with SandboxPool(1) as pool:
        g = grid(CROSS, params, start="2023-01-01", end="2023-01-20", pool=pool)
        assert g.engine == "fast" and g.confirmed is True and g.mismatch is None

        # a deliberate bug: the first trade's exit price is off by one dollar
        monkeypatch.setattr(FastGrid, "settle", _diverging(FastGrid.settle, "ExitPrice", 1.0))
        with caplog.at_level(logging.ERROR, logger="moondev_lab.fast"):
            bad = grid(CROSS, params, start="2023-01-01", end="2023-01-20", pool=pool)
    assert bad.confirmed is False and "trades differ" in bad.mismatch
    assert "MISMATCH" in caplog.text and "backtesting.py trades" in caplog.text
    # the backtesting.py result is the one kept
    assert bad.best_stats["Return [%]"] == g.best_stats["Return [%]"]
    assert list(bad.best_stats["_trades"]["ExitPrice"]) == list(g.best_stats["_trades"]["ExitPrice"])
    assert "MISMATCH" in repr(bad)


@pytest.mark.timeout(300)
def test_pool_optimize_uses_the_fast_grid_for_spec_strategies_and_falls_back_on_a_mismatch(monkeypatch, caplog):
    from moondev_lab import fast
    from moondev_lab.sandbox import DataRef, SandboxPool

    _, code, _ = _plan(CROSS)
    params = {"fast_n": [5, 10], "slow_n": [30, 40]}
    ref = DataRef(start="2023-01-01", end="2023-01-20")
    used: list = []
    real_pool_grid = fast.pool_grid
    monkeypatch.setattr(fast, "pool_grid", lambda *a, **k: used.append(real_pool_grid(*a, **k)) or used[-1])
    with SandboxPool(1) as pool:
        quick = pool.optimize(code, params, ref, maximize="Return [%]")
        assert used and used[-1] is quick  # the fast grid answered, confirmed by one sandbox run
        slow = pool.optimize(code, params, ref, maximize="Return [%]", fast=False)
        assert len(used) == 1
        assert quick.best_params == slow.best_params and quick.heatmap == slow.heatmap
        assert quick.result.ok and quick.result.stats == slow.result.stats
        assert quick.result.trades == slow.result.trades

        # a deliberate bug: the first trade's size is one unit off
        monkeypatch.setattr(FastGrid, "settle", _diverging(FastGrid.settle, "Size", 1))
        with caplog.at_level(logging.ERROR, logger="moondev_lab.fast"):
            fallback = pool.optimize(code, params, ref, maximize="Return [%]")
    assert used[-1] is None and "MISMATCH" in caplog.text  # reported, then the sandbox grid decided
    assert fallback.best_params == slow.best_params and fallback.heatmap == slow.heatmap
    assert fallback.result.stats == slow.result.stats


def test_foreign_code_never_takes_the_fast_grid():
    from moondev_lab.fast import pool_grid
    from moondev_lab.sandbox import DataRef

    code = "from backtesting import Strategy\nclass S(Strategy):\n    n = 1\n    def next(self): pass\n"
    assert pool_grid(None, code, {"n": [1, 2]}, [{"n": 1}, {"n": 2}], DataRef(), "SQN", timeout=5) is None


# ----------------------------------------------------------------------------- the compile cache
def test_numba_cache_directory_is_keyed_by_the_kernel_sources(tmp_path, monkeypatch):
    import os
    import time

    from moondev_lab import _broker_kernel as K

    here = Path(K.__file__).parent
    sources = tuple((here / name).read_bytes() for name in K.KERNEL_SOURCES)
    assert K.kernel_key() == K.kernel_key(sources, __import__("numba").__version__)
    edited = (sources[0] + b"\n# a changed fill rule\n", sources[1])
    assert K.kernel_key(edited) != K.kernel_key(sources)  # an edit to the broker alone changes the key
    assert K.kernel_key(sources, "0.69.0") != K.kernel_key(sources, "0.68.0")

    root = tmp_path / "numba-cache"
    stale, fresh = root / "0123456789abcdef", root / "fedcba9876543210"
    stale.mkdir(parents=True)
    (stale / "old.nbi").write_text("x")
    fresh.mkdir()
    old = time.time() - K.STALE_CACHE_SECONDS - 60
    os.utime(stale, (old, old))
    new_dir = K.keyed_cache_dir(root, K.kernel_key(edited))
    assert new_dir == root / K.kernel_key(edited) and new_dir.is_dir()
    assert not stale.exists() and fresh.exists()  # a day unused goes; a live sibling (another checkout) stays

    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    monkeypatch.setenv("MOONDEV_LAB_HOME", str(tmp_path / "home"))
    K._cache_dir()
    assert os.environ["NUMBA_CACHE_DIR"] == str(tmp_path / "home" / "numba-cache" / K.kernel_key())
