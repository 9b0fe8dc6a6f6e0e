"""moondev_lab._exact_stats against backtesting.py's own compute_stats: the same Series, value for value.

The trusted settlement computes its stats with _exact_stats; any difference from
backtesting.py would make an honest run a result_mismatch. So every stat is compared by
type and value (NaN equal to NaN), and the two frames by dtypes and values.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest
from broker_cases import RandomTrader, random_settings, synthetic_ohlc

from moondev_lab import _bt_compat, _exact_stats, broker
from moondev_lab._bt_compat import RecordingBacktest


def assert_identical(expected: pd.Series, got: pd.Series) -> None:
    assert type(expected) is type(got)
    assert list(expected.index) == list(got.index)
    for key in expected.index:
        e, g = expected[key], got[key]
        if key == "_strategy":
            continue
        if isinstance(e, pd.DataFrame):
            pd.testing.assert_frame_equal(e, g, check_exact=True, obj=key)
            continue
        assert type(e) is type(g), f"{key}: {type(e).__name__} != {type(g).__name__}"
        same = (e == g) or (isinstance(e, float) and math.isnan(e) and math.isnan(g)) or (e is pd.NaT and g is pd.NaT)
        assert same, f"{key}: {e!r} != {g!r}"


def _settled(data: pd.DataFrame, seed: int, settings=None, activity: float = 0.6):
    """Trades and equity of a random trader, settled by the trusted broker, as compute_stats gets them."""
    rng = np.random.default_rng(seed)
    settings = settings or random_settings(rng)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bt = RecordingBacktest(data, RandomTrader, **settings.kwargs())
        bt.run(seed=seed, activity=activity)
    _, curve, trades, start, _ = broker._replay(bt.order_log, data, settings)
    return trades, curve, max(start - 1, 0)


def _both(trades, equity, data, warmup, indicators=()):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = _exact_stats.compute_stats(trades, equity, data, warmup, indicators)
    if _exact_stats._mirrored_period(np.asarray(equity, float), data.index, warmup) is not None:
        assert not caught, [str(w.message) for w in caught]  # backtesting's own warns (pandas 4 deprecations)
    assert_identical(_bt_compat.compute_stats(trades, equity, data, warmup, indicators), got)
    return got


@pytest.mark.parametrize("seed", range(120))
def test_random_runs_give_the_same_stats(seed):
    rng = np.random.default_rng(1000 + seed)
    n = int(rng.choice([40, 300, 1500]))
    data = synthetic_ohlc(n, seed=seed)
    freq = ["1h", "15min", "1D", "4h", "1min"][seed % 5]
    idx = pd.date_range("2023-03-01", periods=n, freq=freq, tz=None if seed % 3 == 0 else "UTC")
    if seed % 4 == 1:  # business days only: no weekends, 252 trading days a year
        idx = pd.bdate_range("2023-03-01", periods=n, tz="UTC")
    data.index = idx.as_unit(["ns", "us", "ms", "s"][seed % 4])
    trades, equity, warmup = _settled(data, seed, activity=float(rng.choice([0.05, 0.3, 0.6, 0.9])))
    _both(trades, equity, data, warmup)
    if (equity > 0).all():  # the case was this module's own, not backtesting's fallback
        assert _exact_stats._mirrored_period(equity, data.index, warmup) is not None


def test_the_31k_btc_run_and_its_indicator_columns():
    from strategies import sma_cross
    from test_fast import BTC as btc

    ns: dict = {}
    exec(sma_cross(), ns)
    bt = RecordingBacktest(btc, ns["SmaCross"], cash=1_000_000, commission=0.001, finalize_trades=True)
    stats = bt.run(n1=10, n2=30)
    settings = broker.BacktestSettings(cash=1_000_000, commission=0.001, finalize_trades=True)
    _, curve, trades, start, _ = broker._replay(bt.order_log, btc, settings)
    got = _both(trades, curve, btc, start - 1, stats["_strategy"]._indicators)
    assert got["# Trades"] > 100 and any(c.startswith("Entry_") for c in got["_trades"].columns)


def test_no_trades_and_flat_equity():
    data = synthetic_ohlc(200, seed=3)
    got = _both([], np.full(200, 10_000.0), data, 0)
    assert got["# Trades"] == 0 and math.isnan(got["Avg. Drawdown [%]"])


def test_drawdown_only_on_the_last_bar_and_one_that_never_recovers():
    data = synthetic_ohlc(50, seed=4)
    _both([], np.r_[np.full(49, 100.0), 90.0], data, 0)
    _both([], np.r_[100.0, np.linspace(99, 50, 49)], data, 3)


def test_a_single_day_a_long_warm_up_and_irregular_bars():
    data = synthetic_ohlc(20, seed=5)  # hourly: all inside one day
    trades, equity, _ = _settled(data, 5, activity=0.9)
    _both(trades, equity, data, 19)
    irregular = synthetic_ohlc(400, seed=6)
    minutes = np.sort(np.random.default_rng(6).choice(100_000, 400, replace=False))
    irregular.index = pd.Timestamp("2023-01-01", tz="UTC") + pd.to_timedelta(minutes, unit="min")
    trades, equity, warmup = _settled(irregular, 6, activity=0.7)
    _both(trades, equity, irregular, warmup)


def test_a_trade_losing_everything_makes_the_average_trade_zero():
    data = synthetic_ohlc(300, seed=7)
    trades, equity, warmup = _settled(data, 7, activity=0.9)
    assert trades
    trades.pl_pct[0] = -1.5  # a short trade can lose more than 100%
    got = _both(trades, equity, data, warmup)
    assert got["Avg. Trade [%]"] == 0


@pytest.mark.parametrize("case", ["nan equity", "other time zone", "range index", "weekly bars", "unsorted"])
def test_what_it_does_not_mirror_goes_to_backtesting(case):
    data = synthetic_ohlc(120, seed=8)
    equity = np.linspace(1000, 1100, 120)
    if case == "nan equity":
        equity[5] = np.nan
    elif case == "other time zone":
        data.index = data.index.tz_convert("America/New_York")
    elif case == "range index":
        data = data.reset_index(drop=True)
    elif case == "weekly bars":
        data.index = pd.date_range("2020-01-05", periods=120, freq="7D", tz="UTC")
    else:
        data = data.iloc[np.r_[1, 0, 2:120]]
    assert _exact_stats._mirrored_period(equity, data.index, 0) is None
    _both([], equity, data, 0)


@pytest.mark.parametrize("case", ["whole units, no stops, no tags", "fractional units, some stops, text tags",
                                  "both kinds of units, every stop set, number tags"])
def test_trade_columns_build_the_frame_the_trade_objects_build(case):
    n = 7
    rng = np.random.default_rng(len(case))
    index = pd.date_range("2023-01-01", periods=40, freq="15min", tz="UTC").as_unit("s")
    is_float = {"whole units, no stops, no tags": np.zeros(n, bool), "fractional units, some stops, text tags":
                np.ones(n, bool)}.get(case, np.arange(n) % 2 == 0)
    size = np.where(is_float, rng.uniform(-3, 3, n), rng.integers(1, 9, n) * rng.choice([-1, 1], n)).astype(float)
    entry = np.sort(rng.integers(0, 30, n))
    stops = {"whole units, no stops, no tags": np.full(n, np.nan),
             "fractional units, some stops, text tags": np.where(np.arange(n) % 3 == 0, 95.0, np.nan)}
    sl = stops.get(case, rng.uniform(90, 99, n))
    tags, tag = {"whole units, no stops, no tags": ((), np.full(n, -1)),
                 "fractional units, some stops, text tags": (("a", "b"), np.arange(n) % 3 - 1)}.get(
        case, ((1, 2.5), np.arange(n) % 2))

    args = (size, is_float, entry, entry + rng.integers(0, 9, n), rng.uniform(99, 101, n), rng.uniform(99, 101, n),
            sl, np.full(n, np.nan), rng.uniform(0, 1, n), tag, tags, index)
    columns = _exact_stats.TradeColumns(*args, last_close=100.0)
    from_columns = _exact_stats._trades_frame(columns, ())
    objects = columns.objects()
    pd.testing.assert_frame_equal(_exact_stats._trades_frame(objects, ()), from_columns, check_exact=True)
    assert type(objects[0].size) is (float if is_float[0] else int) and objects[0].tp is None
