"""backtesting.py 0.6.6's ``compute_stats``, value for value, in a fraction of its time.

The trusted settlement computes a run's 33 stats in the parent for every sandboxed run
(:func:`moondev_lab.broker.settle`), and then compares them with what the run claimed. Most
of ``compute_stats``' ~8 ms goes to pandas machinery around a few numbers: a row-wise
``DataFrame.apply`` over the drawdown periods, a daily ``resample``, a reindex, and the
data's period looked up twice. Here those pieces are numpy on the same arrays; every
reduction a stat comes from is still pandas' or numpy's own, on a Series or array with the
same values in the same order, so each stat is the same float (and the same type).

Anything this module does not mirror exactly (a non-datetime or unsorted index, a time
zone other than UTC, weekly or coarser bars, non-finite or non-positive equity) goes to
backtesting's own ``compute_stats``. ``tests/test_exact_stats.py`` checks the two against each other, stat
for stat and frame for frame, on random runs and on the edge cases.

>>> import numpy as np, pandas as pd
>>> idx = pd.date_range("2023-01-01", periods=5, freq="D", tz="UTC")
>>> ohlc = pd.DataFrame({"Close": [1.0, 2, 3, 2, 4]}, index=idx)
>>> s = compute_stats([], np.array([100.0, 100, 90, 95, 110]), ohlc, 0)
>>> round(float(s["Max. Drawdown [%]"]), 1), s["Max. Drawdown Duration"]
(-10.0, Timedelta('3 days 00:00:00'))
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import pandas as pd

from . import _bt_compat

_DAY_NS = 86_400 * 10**9
_RISK_FREE = 0.0  # as _bt_compat.compute_stats passes it

#: ``compute_stats``' stats, in its order (``Commissions [$]`` only in a run that paid some): the names a
#: grid may maximize and the RBI loop may rank by.
STAT_NAMES = ("Start", "End", "Duration", "Exposure Time [%]", "Equity Final [$]", "Equity Peak [$]",
              "Commissions [$]", "Return [%]", "Buy & Hold Return [%]", "Return (Ann.) [%]", "Volatility (Ann.) [%]",
              "CAGR [%]", "Sharpe Ratio", "Sortino Ratio", "Calmar Ratio", "Alpha [%]", "Beta", "Max. Drawdown [%]",
              "Avg. Drawdown [%]", "Max. Drawdown Duration", "Avg. Drawdown Duration", "# Trades", "Win Rate [%]",
              "Best Trade [%]", "Worst Trade [%]", "Avg. Trade [%]", "Max. Trade Duration", "Avg. Trade Duration",
              "Profit Factor", "Expectancy [%]", "SQN", "Kelly Criterion")


def check_stat(name: str, error: type[Exception] = ValueError) -> str:
    """``name`` if it is one of :data:`STAT_NAMES`, else ``error`` saying which names there are.

    >>> check_stat("Sharpe Ratio")
    'Sharpe Ratio'
    >>> check_stat("Sharpe")
    Traceback (most recent call last):
    ValueError: 'Sharpe' is not one of backtesting.py's stats: Start, End, Duration, ...
    """
    if name not in STAT_NAMES:
        raise error(f"{name!r} is not one of backtesting.py's stats: {', '.join(STAT_NAMES)}")
    return name


def compute_stats(trades: list, equity: np.ndarray, ohlc: pd.DataFrame, warmup_nbars: int,
                  indicators: Sequence = ()) -> pd.Series:
    """:func:`moondev_lab._bt_compat.compute_stats`, the same Series, faster (see the module)."""
    equity = np.asarray(equity, dtype=np.float64)
    period = _mirrored_period(equity, ohlc.index, warmup_nbars)
    if period is None:
        return _bt_compat.compute_stats(trades, equity, ohlc, warmup_nbars, indicators)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):  # as _bt_compat's
        return _stats(trades, equity, ohlc, warmup_nbars, indicators, period)


def _mirrored_period(equity: np.ndarray, index: pd.Index, warmup_nbars: int) -> pd.Timedelta | None:
    """The data's bar period if this module reproduces ``compute_stats`` for these inputs, else None."""
    if not (isinstance(index, pd.DatetimeIndex) and len(index) >= 2 and len(equity) == len(index)
            and (index.tz is None or str(index.tz) == "UTC") and index.is_monotonic_increasing
            and index.is_unique and bool(np.isfinite(equity).all()) and bool((equity > 0).all())
            and 0 <= warmup_nbars < len(index)):
        return None
    period = _data_period(index)
    return None if period.days in (7, 31, 365) else period  # weekly, monthly, yearly bars resample otherwise


def _stats(trades: list, equity: np.ndarray, ohlc: pd.DataFrame, warmup_nbars: int, indicators: Sequence,
           period: pd.Timedelta) -> pd.Series:
    index = ohlc.index
    n = len(index)
    dd = 1 - equity / np.maximum.accumulate(equity)
    dd_dur, dd_peaks = _drawdown_periods(dd, index)
    equity_df = pd.DataFrame({"Equity": equity, "DrawdownPct": dd, "DrawdownDuration": dd_dur.to_numpy()},
                             index=index)
    trades_df = _trades_frame(trades, indicators)
    # Python's own sum, in trade order (np.sum adds pairwise: another float)
    commissions = sum(trades.commission.tolist() if isinstance(trades, TradeColumns) else
                      (t._commissions for t in trades))
    pl, returns, durations = trades_df["PnL"], trades_df["ReturnPct"], trades_df["Duration"]
    resolution = getattr(period, "resolution_string", None) or period.resolution

    def ceil(value):  # compute_stats' _round_timedelta
        return value.ceil(resolution) if isinstance(value, pd.Timedelta) else value

    s: dict = {"Start": index[0], "End": index[-1]}
    s["Duration"] = s["End"] - s["Start"]
    in_market = np.zeros(n + 1, dtype=np.int64)  # +1 from each entry bar, -1 after each exit bar
    if len(trades):
        np.add.at(in_market, trades_df["EntryBar"].to_numpy(np.int64), 1)
        np.add.at(in_market, trades_df["ExitBar"].to_numpy(np.int64) + 1, -1)
    have_position = (np.cumsum(in_market[:n]) > 0).astype(np.int64)
    s["Exposure Time [%]"] = have_position.mean() * 100
    s["Equity Final [$]"] = equity[-1]
    s["Equity Peak [$]"] = equity.max()
    if commissions:
        s["Commissions [$]"] = commissions
    s["Return [%]"] = (equity[-1] - equity[0]) / equity[0] * 100
    close = ohlc.Close.values
    s["Buy & Hold Return [%]"] = (close[-1] - close[warmup_nbars]) / close[warmup_nbars] * 100

    day = index.asi8 // (_DAY_NS // _unit_ns(index))  # UTC (or naive) instants: whole days since the epoch
    weekday = (day + 3) % 7  # 1970-01-01 was a Thursday (Monday is 0)
    have_weekends = np.count_nonzero(weekday >= 5) / n > 2 / 7 * .6
    annual_days = 365 if have_weekends else 252
    day_returns = _day_returns(equity, day)
    gmean_day = _geometric_mean(day_returns.to_numpy())
    annual_return = (1 + gmean_day) ** annual_days - 1
    s["Return (Ann.) [%]"] = annual_return * 100
    s["Volatility (Ann.) [%]"] = np.sqrt((day_returns.var(ddof=1) + (1 + gmean_day) ** 2) ** annual_days
                                         - (1 + gmean_day) ** (2 * annual_days)) * 100
    years = (s["Duration"].days + s["Duration"].seconds / 86400) / 365.25
    s["CAGR [%]"] = ((s["Equity Final [$]"] / equity[0]) ** (1 / years) - 1) * 100 if years else np.nan
    s["Sharpe Ratio"] = (s["Return (Ann.) [%]"] - _RISK_FREE * 100) / (s["Volatility (Ann.) [%]"] or np.nan)
    losses = np.minimum(day_returns.to_numpy(), 0)  # clip(-inf, 0)
    downside = np.sqrt(np.mean(losses ** 2) if len(losses) else np.nan) * np.sqrt(annual_days)
    s["Sortino Ratio"] = (annual_return - _RISK_FREE) / downside
    max_dd = -np.nan_to_num(dd.max())
    s["Calmar Ratio"] = annual_return / (-max_dd or np.nan)
    beta = _beta(equity, close)
    s["Alpha [%]"] = s["Return [%]"] - _RISK_FREE * 100 - beta * (s["Buy & Hold Return [%]"] - _RISK_FREE * 100)
    s["Beta"] = beta
    s["Max. Drawdown [%]"] = max_dd * 100
    s["Avg. Drawdown [%]"] = -dd_peaks.mean() * 100
    s["Max. Drawdown Duration"] = ceil(dd_dur.max())
    s["Avg. Drawdown Duration"] = ceil(dd_dur.mean())
    s["# Trades"] = n_trades = len(trades_df)
    win_rate = np.nan if not n_trades else (pl > 0).mean()
    s["Win Rate [%]"] = win_rate * 100
    s["Best Trade [%]"] = returns.max() * 100
    s["Worst Trade [%]"] = returns.min() * 100
    s["Avg. Trade [%]"] = _geometric_mean(returns.to_numpy(np.float64)) * 100
    s["Max. Trade Duration"] = ceil(durations.max())
    s["Avg. Trade Duration"] = ceil(durations.mean())
    s["Profit Factor"] = returns[returns > 0].sum() / (abs(returns[returns < 0].sum()) or np.nan)
    s["Expectancy [%]"] = returns.mean() * 100
    s["SQN"] = np.sqrt(n_trades) * pl.mean() / (pl.std() or np.nan)
    s["Kelly Criterion"] = win_rate - (1 - win_rate) / (pl[pl > 0].mean() / -pl[pl < 0].mean())
    s["_strategy"] = _bt_compat.stats_strategy(n, warmup_nbars, indicators)
    s["_equity_curve"] = equity_df
    s["_trades"] = trades_df
    return _bt_compat.stats_series(s)


def _data_period(index: pd.DatetimeIndex) -> pd.Timedelta:
    """backtesting's ``_data_period``: the median step of the last 100 bars (one step when they are regular)."""
    steps = np.diff(index.asi8[-100:])
    if len(steps) and (steps == steps[0]).all():
        return pd.Timedelta(int(steps[0]), unit=index.unit)  # the median of equal steps is that step
    return _bt_compat.data_period(index)


def _geometric_mean(returns: np.ndarray):
    """backtesting's ``geometric_mean`` on an array: NaN counts as 0, and any return <= -100% makes it 0."""
    growth = np.where(np.isnan(returns), 0, returns) + 1
    if np.any(growth <= 0):
        return 0  # an int, as backtesting's
    return np.exp(np.log(growth).sum() / (len(growth) or np.nan)) - 1


def _unit_ns(index: pd.DatetimeIndex) -> int:
    """Nanoseconds in one tick of the index's unit (pandas 3 keeps s/ms/us/ns)."""
    return int(np.timedelta64(1, index.unit) / np.timedelta64(1, "ns"))


def _drawdown_periods(dd: np.ndarray, index: pd.DatetimeIndex) -> tuple[pd.Series, pd.Series]:
    """``compute_drawdown_duration_peaks``: each drawdown's duration and deepest point, at the bar it ends.

    A drawdown runs between two bars at a peak (drawdown 0) that are not neighbours; the
    last bar always ends one. Elsewhere both series are empty (NaT, NaN). With no drawdown
    at all, both are the drawdown itself with its zeros as NaN, as backtesting.py returns.
    """
    ends = np.unique(np.r_[np.flatnonzero(dd == 0), len(dd) - 1])
    keep = ends[1:] > ends[:-1] + 1
    if not keep.any():
        flat = pd.Series(np.where(dd == 0, np.nan, dd), index=index)
        return flat, flat
    start, end = ends[:-1][keep], ends[1:][keep]
    # The deepest point of [start, end]: the max over the segment from start up to the next peak
    # (reduceat's segments run to the next start), and the end bar itself (the last bar's dd).
    deepest = np.maximum(np.maximum.reduceat(dd, ends[:-1])[keep], dd[end])
    lasting = (index[end] - index[start]).to_numpy()
    durations = np.full(len(dd), np.timedelta64("NaT"), dtype=lasting.dtype)
    durations[end] = lasting
    peaks = np.full(len(dd), np.nan)
    peaks[end] = deepest
    return pd.Series(durations, index=index), pd.Series(peaks, index=index)


class _SettledTrade:
    """A closed trade with the attributes ``compute_stats`` reads from backtesting's ``Trade``."""

    __slots__ = ("size", "entry_bar", "exit_bar", "entry_price", "exit_price", "sl", "tp", "pl", "pl_pct",
                 "_commissions", "entry_time", "exit_time", "tag")


class TradeColumns:
    """Closed trades as columns (one row a trade, in closing order), with ``Trade.pl``/``pl_pct`` as
    backtesting computes them: what a settlement hands :func:`compute_stats`.

    A settlement may close thousands of trades; one Python object each, then one frame built from
    those objects, used to be most of its time. The columns are the trades: iterating (or indexing)
    gives ``Trade``-like copies of them, made once, for backtesting's own ``compute_stats``. So the
    columns are read-only once built: ``pl``, ``pl_pct`` and the copies are computed from them once.

    >>> idx = pd.date_range("2023-01-01", periods=4, freq="h", tz="UTC")
    >>> t = TradeColumns(np.array([2.0]), np.array([False]), np.array([1]), np.array([3]), np.array([10.0]),
    ...                  np.array([11.0]), np.array([np.nan]), np.array([np.nan]), np.array([0.5]),
    ...                  np.array([-1]), (), idx, last_close=11.0)
    >>> len(t), float(t.pl[0]), t[0].size, t[0].sl
    (1, 1.5, 2, None)
    """

    def __init__(self, size: np.ndarray, is_float: np.ndarray, entry_bar: np.ndarray, exit_bar: np.ndarray,
                 entry_price: np.ndarray, exit_price: np.ndarray, sl: np.ndarray, tp: np.ndarray,
                 commission: np.ndarray, tag: np.ndarray, tags: tuple, index: pd.Index, last_close: float):
        self.size, self.is_float = size, is_float
        self.entry_bar, self.exit_bar = entry_bar, exit_bar
        self.entry_price, self.exit_price, self.sl, self.tp = entry_price, exit_price, sl, tp
        self.commission, self.tag, self.tags, self.index = commission, tag, tags, index
        price = np.where(exit_price == 0, last_close, exit_price)  # Trade.pl: ``exit_price or last_price``
        self.pl = size * (price - entry_price) - commission
        self.pl_pct = np.copysign(1.0, size) * (price / entry_price - 1) - commission / (np.abs(size) * entry_price)
        self._objects: list | None = None

    def __len__(self) -> int:
        return len(self.size)

    def __iter__(self):
        return iter(self.objects())

    def __getitem__(self, i: int) -> _SettledTrade:
        return self.objects()[i]

    def tag_values(self) -> list:
        return [self.tags[k] if k >= 0 else None for k in self.tag.tolist()]

    def objects(self) -> list[_SettledTrade]:
        """The trades as ``Trade``-like objects (Python ints and floats, None for an unset SL/TP)."""
        if self._objects is None:
            out = []
            entry_times, exit_times = self.entry_times().tolist(), self.exit_times().tolist()
            for k, tag in enumerate(self.tag_values()):
                t = _SettledTrade()
                size = float(self.size[k])
                t.size = size if self.is_float[k] else int(size)
                t.entry_bar, t.exit_bar = int(self.entry_bar[k]), int(self.exit_bar[k])
                t.entry_price, t.exit_price = float(self.entry_price[k]), float(self.exit_price[k])
                sl, tp = float(self.sl[k]), float(self.tp[k])
                t.sl = None if math.isnan(sl) else sl
                t.tp = None if math.isnan(tp) else tp
                t._commissions = float(self.commission[k])
                t.pl, t.pl_pct = float(self.pl[k]), float(self.pl_pct[k])
                t.entry_time, t.exit_time, t.tag = entry_times[k], exit_times[k], tag
                out.append(t)
            self._objects = out
        return self._objects

    def entry_times(self) -> pd.Index:
        return self.index[self.entry_bar]

    def exit_times(self) -> pd.Index:
        return self.index[self.exit_bar]


def _trades_frame(trades, indicators: Sequence) -> pd.DataFrame:
    """``_trades`` as ``compute_stats`` builds it from ``Trade`` objects (columns, order, dtypes), from
    :class:`TradeColumns` or from the objects themselves."""
    if isinstance(trades, TradeColumns) and len(trades):  # no trades: the empty lists' frame, below
        df = _columns_frame(trades)
    else:
        columns = {"Size": "size", "EntryBar": "entry_bar", "ExitBar": "exit_bar", "EntryPrice": "entry_price",
                   "ExitPrice": "exit_price", "SL": "sl", "TP": "tp", "PnL": "pl", "Commission": "_commissions",
                   "ReturnPct": "pl_pct", "EntryTime": "entry_time", "ExitTime": "exit_time"}
        df = pd.DataFrame({name: [getattr(t, attr) for t in trades] for name, attr in columns.items()})
        df["Duration"] = df["ExitTime"] - df["EntryTime"]
        df["Tag"] = [t.tag for t in trades]
    if len(df):
        for ind in indicators:
            ind = np.atleast_2d(ind)
            for i, values in enumerate(ind):  # one column pair per row of a multi-row indicator
                suffix = f"_{i}" if len(ind) > 1 else ""
                df[f"Entry_{ind.name}{suffix}"] = values[df["EntryBar"].values]
                df[f"Exit_{ind.name}{suffix}"] = values[df["ExitBar"].values]
    return df


def _columns_frame(t: TradeColumns) -> pd.DataFrame:
    """The frame pandas infers from the objects' lists, built from the columns: a list of ints is int64
    (of floats, or of both, float64); of None and floats float64 with NaN, of None only object."""
    def unset_is_none(values):
        return [None] * len(values) if np.isnan(values).all() else values

    size = t.size if t.is_float.any() else t.size.astype(np.int64)
    df = pd.DataFrame({"Size": size, "EntryBar": t.entry_bar.astype(np.int64), "ExitBar": t.exit_bar.astype(np.int64),
                       "EntryPrice": t.entry_price, "ExitPrice": t.exit_price, "SL": unset_is_none(t.sl),
                       "TP": unset_is_none(t.tp), "PnL": t.pl, "Commission": t.commission, "ReturnPct": t.pl_pct,
                       "EntryTime": t.entry_times(), "ExitTime": t.exit_times()})
    df["Duration"] = df["ExitTime"] - df["EntryTime"]
    df["Tag"] = t.tag_values()  # as a list: pandas infers its dtype (str, object, ...) as from the objects
    return df


def _day_returns(equity: np.ndarray, day: np.ndarray) -> pd.Series:
    """``Equity.resample('D').last().dropna().pct_change().dropna()``: the last equity of each day with bars."""
    last = np.r_[np.flatnonzero(day[1:] != day[:-1]), len(day) - 1]
    closes = equity[last]
    return pd.Series(closes[1:] / closes[:-1] - 1)


def _beta(equity: np.ndarray, close: np.ndarray) -> float:
    """The strategy's beta to the market: log returns' covariance over the market's variance."""
    equity_log = np.log(equity[1:] / equity[:-1])
    market_log = np.log(close[1:] / close[:-1])
    if len(equity_log) > 1 and len(market_log) > 1:
        cov = np.cov(equity_log, market_log)
        return cov[0, 1] / cov[1, 1]
    return np.nan
