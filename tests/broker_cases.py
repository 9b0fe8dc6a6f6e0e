"""Shared by the broker/settlement tests: data, a random trader, and the exactness check.

>>> frame = synthetic_ohlc(50, seed=1)
>>> bool((frame.High >= frame[["Open", "Close"]].max(axis=1)).all())
True
"""
from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pandas as pd
from backtesting import Backtest, Strategy

from moondev_lab._bt_compat import RecordingBacktest
from moondev_lab.broker import OrderLog, settle
from moondev_lab.sandbox.settings import BacktestSettings


def synthetic_ohlc(n: int, seed: int, start_price: float = 100.0) -> pd.DataFrame:
    """A random walk with gaps, flat (limit-move) bars and occasional crashes, hourly."""
    rng = np.random.default_rng(seed)
    close = np.empty(n)
    open_ = np.empty(n)
    price = start_price
    for i in range(n):
        gap = rng.choice([0.0, 0.0, 0.0, 0.0, rng.normal(0, 0.04)])
        open_[i] = max(price * (1 + gap), 0.5)
        move = rng.normal(0, 0.02) if rng.random() > 0.02 else rng.choice([-0.3, 0.25])
        close[i] = max(open_[i] * (1 + move), 0.5)
        price = close[i]
    spread = np.abs(rng.normal(0, 0.01, n)) * close
    flat = rng.random(n) < 0.05
    high = np.maximum(open_, close) + np.where(flat, 0, spread)
    low = np.maximum(np.minimum(open_, close) - np.where(flat, 0, spread[::-1]), 0.1)
    open_ = np.where(flat, close, open_)
    high, low = np.where(flat, close, high), np.where(flat, close, low)
    idx = pd.date_range("2024-01-01", periods=n, freq="1h", tz="UTC", name="ts")
    return pd.DataFrame({"Open": open_, "High": high, "Low": low, "Close": close,
                         "Volume": rng.integers(1, 1000, n).astype(float)}, index=idx)


def _sma5(close):
    return pd.Series(close).rolling(5).mean().to_numpy()


class RandomTrader(Strategy):
    """Random but reproducible decisions of every kind the broker knows."""

    seed = 0
    activity = 0.6

    def init(self):
        self.rng = np.random.default_rng(self.seed)
        self.sma = self.I(_sma5, self.data.Close)
        if self.rng.random() < 0.3:  # a decision in init(): bar -1
            self._decide()

    def next(self):
        while self.rng.random() < self.activity:
            self._decide()

    def _price(self, c, spread=0.05):
        return float(c * (1 + self.rng.uniform(-spread, spread)))

    def _decide(self):
        r = self.rng
        c = float(self.data.Close[-1])
        a = r.random()
        try:
            if a < 0.4:
                size = float(r.choice([r.uniform(0.01, 0.99), r.integers(1, 30), 0.9999]))
                kw = {"size": size}
                if r.random() < 0.3:
                    kw["limit"] = self._price(c)
                if r.random() < 0.25:
                    kw["stop"] = self._price(c)
                if r.random() < 0.4:
                    kw["sl"] = self._price(c, 0.1)
                if r.random() < 0.4:
                    kw["tp"] = self._price(c, 0.1)
                if r.random() < 0.2:
                    kw["tag"] = str(r.integers(0, 3))
                (self.buy if r.random() < 0.55 else self.sell)(**kw)
            elif a < 0.5 and self.trades:
                self.trades[r.integers(len(self.trades))].close(float(r.choice([1.0, 0.5, 0.3])))
            elif a < 0.57 and self.trades:
                self.position.close(float(r.choice([1.0, 0.5])))
            elif a < 0.67 and self.orders:
                self.orders[r.integers(len(self.orders))].cancel()
            elif a < 0.85 and self.trades:
                trade = self.trades[r.integers(len(self.trades))]
                trade.sl = None if r.random() < 0.2 else self._price(c, 0.08)
            elif self.trades:
                trade = self.trades[r.integers(len(self.trades))]
                trade.tp = None if r.random() < 0.2 else self._price(c, 0.08)
        except ValueError:  # e.g. SL above a long's price: backtesting.py rejects the order
            pass


def random_settings(rng: np.random.Generator) -> BacktestSettings:
    commission = float(rng.choice([0.0, 0.001, 0.002]))
    return BacktestSettings(
        cash=float(rng.choice([2_000, 10_000, 100_000])), commission=commission,
        spread=float(rng.choice([0.0, 0.0, 0.001])), margin=float(rng.choice([1.0, 1.0, 0.5, 0.1])),
        trade_on_close=bool(rng.random() < 0.3), hedging=bool(rng.random() < 0.2),
        exclusive_orders=bool(rng.random() < 0.2), finalize_trades=bool(rng.random() < 0.8))


def equal_values(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    try:
        if pd.isna(a) and pd.isna(b):
            return True
    except (TypeError, ValueError):
        pass
    return bool(a == b)


def assert_settles_exactly(data: pd.DataFrame, strategy: type, settings: BacktestSettings, *,
                           via_json: bool = True, plain_check: bool = True, **params):
    """Run with backtesting.py, settle the recorded log, and demand identical trades, equity and stats."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bt = RecordingBacktest(data, strategy, **settings.kwargs())
        stats = bt.run(**params)
        if plain_check:  # recording changes nothing
            plain = Backtest(data, strategy, **settings.kwargs()).run(**params)
            _assert_same_stats(plain, stats)
    log = bt.order_log
    if via_json:
        log = OrderLog.from_dict(json.loads(json.dumps(log.to_dict())))
    settled = settle(log, data, settings, indicators=stats["_strategy"]._indicators)
    _assert_same_stats(stats, settled.stats)
    return stats, settled


def _assert_same_stats(expected: pd.Series, got: pd.Series) -> None:
    assert list(expected.index) == list(got.index)
    for key in expected.index:
        if key == "_strategy":
            continue
        if key in ("_trades", "_equity_curve"):
            e, g = expected[key], got[key]
            assert list(e.columns) == list(g.columns), key
            assert (e.dtypes == g.dtypes).all(), (key, e.dtypes[e.dtypes != g.dtypes], g.dtypes[e.dtypes != g.dtypes])
            assert e.equals(g), f"{key} differ:\n{_first_difference(e, g)}"
        else:
            assert equal_values(expected[key], got[key]), f"{key}: {expected[key]!r} != {got[key]!r}"


def _first_difference(e: pd.DataFrame, g: pd.DataFrame) -> str:
    if len(e) != len(g):
        return f"{len(e)} rows != {len(g)} rows\n{e.tail(3)}\n{g.tail(3)}"
    for i in range(len(e)):
        a, b = e.iloc[i], g.iloc[i]
        if not all(equal_values(x, y) for x, y in zip(a, b)):
            return f"row {i}:\n{pd.DataFrame({'expected': a, 'settled': b})}"
    return "(same values, different types)"
