"""The trusted broker: the strategy decides, the broker settles.

A strategy's run is reduced to its :class:`OrderLog`: every order, SL/TP change,
close and cancel it made, each with the bar of the ``next()`` call that made it.
:func:`settle` replays such a log against the real OHLCV data with backtesting.py
0.6.6's ``_Broker`` fill rules (compiled with numba, see
:mod:`moondev_lab._broker_kernel`) and computes the trades, the equity curve and
backtesting.py's stats itself (``compute_stats``' values, see :mod:`moondev_lab._exact_stats`). Because the
settlement runs in a process that never ran the strategy's code, a strategy cannot
fake its results: only its decisions cross the sandbox boundary.

>>> from moondev_lab._bt_compat import RecordingBacktest
>>> bt = RecordingBacktest(df, SmaCross, cash=1e6, commission=0.001)   # doctest: +SKIP
>>> stats = bt.run()                                                   # doctest: +SKIP
>>> s = settle(bt.order_log, df, BacktestSettings(cash=1e6))           # doctest: +SKIP
>>> s.stats["Return [%]"] == stats["Return [%]"]                       # doctest: +SKIP
True

:class:`BrokerCore` runs the same fill rules one bar at a time, with a state that
can be saved and restored (the paper exchange persists it between candles).
"""
from __future__ import annotations

import base64
import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from . import _bt_compat, _exact_stats
from .errors import MoondevError
from .sandbox.settings import BacktestSettings

__all__ = ["OrderLog", "Settlement", "SettlementError", "settle", "BrokerCore"]

#: An order log decoded from untrusted JSON holds at most this many decisions.
MAX_EVENTS = 1_000_000
_FORMAT = 1
_COLUMNS = {"bar": np.int64, "kind": np.int8, "size": np.float64, "limit": np.float64, "stop": np.float64,
            "sl": np.float64, "tp": np.float64, "ref": np.int64, "tag": np.int64}
_KINDS = ("order", "sl/tp", "close", "cancel")


class SettlementError(MoondevError, ValueError):
    """The order log cannot be settled: malformed, for other data, or impossible under the fill rules."""


# ---------------------------------------------------------------- the order log
@dataclass(frozen=True, repr=False, eq=False)
class OrderLog:
    """Every decision of one run, as parallel arrays (one row per decision, in decision order).

    ``kind``: 0 a new order (``buy``/``sell``), 1 a new SL (``stop``) or TP (``limit``)
    order for trade ``ref`` (``trade.sl = ...``), 2 ``trade.close()`` of trade ``ref``
    for ``size`` units, 3 the cancel of order ``ref``. Trades and orders are referred to
    by ordinal: their creation order, counting every Trade object (new trades and the
    reduced copies a partial close makes) and every order (including the broker's own).
    ``bar`` is the bar of the ``next()`` call, or -1 for ``init()``. Prices are NaN when
    not set. ``tag`` indexes ``tags``.

    ``start`` is the first bar the broker processes (the indicators' warm-up + 1);
    ``n_bars``, ``first_time`` and ``last_time`` identify the data the run saw.

    >>> log = OrderLog.from_rows([(5, 0, 0.5, float("nan"), float("nan"), 90.0, float("nan"), -1, -1)],
    ...                          start=3, index=pd.RangeIndex(10))
    >>> len(log), log.to_frame().loc[0, "kind"]
    (1, 'order')
    >>> OrderLog.from_dict(log.to_dict()).sl[0]
    np.float64(90.0)
    """

    bar: np.ndarray
    kind: np.ndarray
    size: np.ndarray
    limit: np.ndarray
    stop: np.ndarray
    sl: np.ndarray
    tp: np.ndarray
    ref: np.ndarray
    tag: np.ndarray
    tags: tuple = ()
    start: int = 1
    n_bars: int = 0
    first_time: str | None = None
    last_time: str | None = None
    strategy: str = ""
    params: dict = field(default_factory=dict)

    @classmethod
    def from_rows(cls, rows: Sequence[tuple], *, start: int, index: pd.Index, tags: Iterable = (),
                  strategy: str = "", params: dict | None = None) -> "OrderLog":
        """From ``(bar, kind, size, limit, stop, sl, tp, ref, tag)`` rows (what the recorder collects)."""
        cols = list(zip(*rows)) if rows else [()] * len(_COLUMNS)
        return cls.from_columns(cols, start=start, index=index, tags=tags, strategy=strategy, params=params)

    @classmethod
    def from_columns(cls, columns: Sequence, *, start: int, index: pd.Index, tags: Iterable = (),
                     strategy: str = "", params: dict | None = None) -> "OrderLog":
        """From the nine columns of :meth:`from_rows`' rows, as arrays or sequences (each copied)."""
        arrays = {name: np.array(col, dtype=dtype) for (name, dtype), col in zip(_COLUMNS.items(), columns)}
        first, last = (_time_key(index[0]), _time_key(index[-1])) if len(index) else (None, None)
        return cls(**arrays, tags=tuple(tags), start=int(start), n_bars=len(index), first_time=first,
                   last_time=last, strategy=str(strategy), params=dict(params or {}))

    def __len__(self) -> int:
        return len(self.bar)

    def __repr__(self) -> str:
        counts = np.bincount(self.kind.astype(np.int64), minlength=4) if len(self) else np.zeros(4, int)
        shown = ", ".join(f"{name}={int(c)}" for name, c in zip(("orders", "sltp", "closes", "cancels"), counts))
        return f"OrderLog({self.strategy or '?'}: {len(self)} decisions ({shown}), start={self.start}, bars={self.n_bars})"

    def to_frame(self) -> pd.DataFrame:
        """One row per decision, for reading (kind as text, tags as values)."""
        frame = pd.DataFrame({name: getattr(self, name) for name in _COLUMNS})
        frame["kind"] = [_KINDS[k] for k in self.kind]
        frame["tag"] = [self.tags[t] if t >= 0 else None for t in self.tag]
        return frame

    def to_dict(self) -> dict:
        """JSON-able and compact: each column as base64 of its little-endian bytes."""
        return {"format": _FORMAT, "n": len(self),
                "columns": {name: base64.b64encode(np.ascontiguousarray(getattr(self, name), dtype=np.dtype(dtype)
                                                                        .newbyteorder("<")).tobytes()).decode()
                            for name, dtype in _COLUMNS.items()},
                "tags": [_json_tag(t) for t in self.tags], "start": self.start, "n_bars": self.n_bars,
                "first_time": self.first_time, "last_time": self.last_time, "strategy": self.strategy,
                "params": {str(k): _json_tag(v) for k, v in self.params.items()}}

    @classmethod
    def from_dict(cls, d: dict, *, max_events: int = MAX_EVENTS) -> "OrderLog":
        """Decode :meth:`to_dict`'s output, which may come from untrusted code: every field is checked."""
        try:
            if not isinstance(d, dict) or d.get("format") != _FORMAT:
                raise ValueError(f"not an order log of format {_FORMAT}")
            n = d["n"]
            if not isinstance(n, int) or not 0 <= n <= max_events:
                raise ValueError(f"the log holds {n!r} decisions; at most {max_events:,} are allowed")
            arrays = {}
            for name, dtype in _COLUMNS.items():
                raw = d["columns"][name]
                dt = np.dtype(dtype).newbyteorder("<")
                if not isinstance(raw, str) or len(raw) > 4 * (n * dt.itemsize + 2) // 3 + 4:
                    raise ValueError(f"column {name!r} is malformed")
                data = base64.b64decode(raw, validate=True)
                if len(data) != n * dt.itemsize:
                    raise ValueError(f"column {name!r} has {len(data)} bytes, not {n * dt.itemsize}")
                arrays[name] = np.frombuffer(data, dtype=dt).astype(dtype)
            tags = d.get("tags") or []
            if not isinstance(tags, list) or len(tags) > max(n, 1):
                raise ValueError("tags are malformed")
            meta = {k: d.get(k) for k in ("start", "n_bars")}
            if not all(isinstance(v, int) and v >= 0 for v in meta.values()):
                raise ValueError("start/n_bars must be non-negative integers")
            times = [d.get(k) for k in ("first_time", "last_time")]
            if not all(t is None or isinstance(t, str) and len(t) < 64 for t in times):
                raise ValueError("first_time/last_time are malformed")
            params = d.get("params") or {}
            strategy = d.get("strategy") or ""
            if not isinstance(params, dict) or not isinstance(strategy, str):
                raise ValueError("strategy/params are malformed")
        except (KeyError, TypeError, ValueError, base64.binascii.Error) as exc:
            raise SettlementError(f"invalid order log: {exc}") from None
        return cls(**arrays, tags=tuple(tags), start=meta["start"], n_bars=meta["n_bars"], first_time=times[0],
                   last_time=times[1], strategy=strategy[:200], params=params)


def _time_key(t) -> str:
    return t.isoformat() if hasattr(t, "isoformat") else str(t)


def _json_tag(value):
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return value.item()
    return str(value)


# ---------------------------------------------------------------- settlement
@dataclass(repr=False)
class Settlement:
    """What the trusted broker made of an order log.

    ``stats`` is a ``pd.Series`` like ``Backtest.run()``'s (with ``_trades`` and
    ``_equity_curve``); ``trades`` and ``equity`` are those two frames.
    ``margin_cancels`` counts orders the broker dropped for lack of margin (backtesting.py
    warns about each), ``deferred_contingent`` SL/TP fills deferred to the next bar
    (also a warning there).
    """

    stats: pd.Series
    margin_cancels: int = 0
    deferred_contingent: int = 0
    out_of_money: bool = False

    @property
    def trades(self) -> pd.DataFrame:
        return self.stats["_trades"]

    @property
    def equity(self) -> pd.DataFrame:
        return self.stats["_equity_curve"]

    def __repr__(self) -> str:
        s = self.stats
        return (f"Settlement(trades={int(s['# Trades'])}, return={s['Return [%]']:.2f}%, "
                f"equity_final={s['Equity Final [$]']:.2f}{', out of money' if self.out_of_money else ''})")


class _StrategyRef:
    """``stats['_strategy']`` of a settlement: the strategy's name and parameters, not its code."""

    def __init__(self, name: str, params: dict):
        self.name, self._params = name, dict(params)

    def __str__(self) -> str:
        params = ",".join(f"{k}={v}" for k, v in self._params.items())
        return f"{self.name}({params})" if params else self.name

    __repr__ = __str__


def _kernel_settings(settings: BacktestSettings) -> tuple:
    """``_Broker.__init__``'s checks, and its settings as the kernel's scalars."""
    if not settings.cash > 0:
        raise SettlementError(f"cash should be > 0, is {settings.cash}")
    if not 0 < settings.margin <= 1:
        raise SettlementError(f"margin should be between 0 and 1, is {settings.margin}")
    commission = settings.commission
    if callable(commission):
        raise SettlementError("a callable commission cannot be settled; use a float or (fixed, relative)")
    fixed, rel = commission if isinstance(commission, (tuple, list)) else (0.0, commission)
    if not (fixed >= 0 and -.1 <= rel < .1):
        raise SettlementError(f"commission out of range: fixed={fixed}, relative={rel}")
    return (float(settings.spread), float(fixed), float(rel), 1 / settings.margin,
            bool(settings.trade_on_close), bool(settings.hedging), bool(settings.exclusive_orders))


def _ohlc(data: pd.DataFrame) -> tuple[np.ndarray, ...]:
    return tuple(np.ascontiguousarray(data[c].to_numpy(dtype=np.float64)) for c in ("Open", "High", "Low", "Close"))


def settle(log: OrderLog, data: pd.DataFrame, settings: BacktestSettings | None = None, *,
           indicators: Sequence = ()) -> Settlement:
    """Replay ``log`` on ``data`` with backtesting.py's fill rules; trades, equity and stats from scratch.

    ``settings`` are the ``Backtest(...)`` money settings the run used (the sandbox's
    :class:`~moondev_lab.sandbox.settings.BacktestSettings`). ``indicators`` (a
    strategy's ``_indicators``, in-process only) adds backtesting's ``Entry_*``/``Exit_*``
    trade columns; without them the trade frame has the core columns only.

    >>> s = settle(bt.order_log, df, BacktestSettings(cash=1e6))   # doctest: +SKIP
    >>> s.trades[["EntryBar", "ExitBar", "PnL"]].head(2)          # doctest: +SKIP
    """
    state, curve, trades, start, status = _replay(log, data, settings)
    stats = _exact_stats.compute_stats(trades, curve, data, max(start - 1, 0), indicators)
    stats["_strategy"] = _StrategyRef(log.strategy, log.params)
    cnt = state["cnt"]
    from . import _broker_kernel as K

    return Settlement(stats, margin_cancels=int(cnt[K.C_MARGIN_CANCELS]), deferred_contingent=int(cnt[K.C_DEFERRED]),
                      out_of_money=status == K.OUT_OF_MONEY)


#: Stats a grid may be ranked by that :func:`settled_score` takes from the settled equity and trades with
#: ``compute_stats``' own expressions, skipping the rest of it (most of a settlement's time).
_SCORES = {
    "Return [%]": lambda curve, pl: (curve[-1] - curve[0]) / curve[0] * 100,
    "Equity Final [$]": lambda curve, pl: curve[-1],
    "# Trades": lambda curve, pl: len(pl),
    "SQN": lambda curve, pl: np.sqrt(len(pl)) * pl.mean() / (pl.std() or np.nan),
}


def settled_score(log: OrderLog, data: pd.DataFrame, settings: BacktestSettings | None, key: str) -> float | None:
    """``float(settle(...).stats[key])``, or None for a run without trades (a grid's score, as ranked).

    For the keys in ``_SCORES`` only that stat is computed, exactly as ``compute_stats`` computes it.

    >>> settled_score(bt.order_log, df, BacktestSettings(), "Return [%]")   # doctest: +SKIP
    """
    if key not in _SCORES:
        stats = settle(log, data, settings).stats
        return float(stats[key]) if stats["# Trades"] else None
    _, curve, trades, _, _ = _replay(log, data, settings)
    if not trades:
        return None
    return float(_SCORES[key](curve, pd.Series(trades.pl)))


def _replay(log: OrderLog, data: pd.DataFrame, settings: BacktestSettings | None):
    """The order log run through the fill rules: ``(state, equity curve, closed trades, start bar, status)``."""
    from . import _broker_kernel as K  # numba: only where settling happens, never in the sandbox

    settings = settings or BacktestSettings()
    spread, fixed, rel, leverage, toc, hedging, exclusive = _kernel_settings(settings)
    n = len(data)
    _check_data(log, data)
    O, H, L, C = _ohlc(data)
    start = int(log.start)
    state = K.new_state(order_cap=16, trade_cap=max(64, 2 * len(log) + 16))
    state["acc"][K.A_CASH] = float(settings.cash)
    equity = np.full(n, np.nan)
    ev = [np.ascontiguousarray(getattr(log, c), dtype=d) for c, d in _COLUMNS.items()]
    ev[1] = ev[1].astype(np.int64)
    bar, pos, phase = start, 0, 0
    while True:
        status, bar, pos, phase = K.run_bars(
            state["qf"], state["qi"], state["tf"], state["ti"], state["active"], state["closed"], state["cnt"],
            state["acc"], O, H, L, C, equity, *ev, start, bar, pos, phase,
            spread, fixed, rel, leverage, toc, hedging, exclusive, bool(settings.finalize_trades))
        if status != K.NEED_ROOM:
            break
        state = K.grow(state)
    if status < 0:
        where = f"decision #{pos}" if pos < len(log) else "the end of the run"
        raise SettlementError(f"order log cannot be settled at bar {bar}, {where}: {K.STATUS_TEXT[status]}")
    cash = float(state["acc"][K.A_CASH])
    curve = pd.Series(equity).bfill().fillna(cash).values  # exactly Backtest.run's
    return state, curve, _closed_trades(state, data.index, C, log.tags), start, status


def _check_data(log: OrderLog, data: pd.DataFrame) -> None:
    n = len(data)
    if log.n_bars != n:
        raise SettlementError(f"the order log is for {log.n_bars} bars, the data has {n}")
    if n and (log.first_time, log.last_time) != (_time_key(data.index[0]), _time_key(data.index[-1])):
        raise SettlementError(f"the order log is for {log.first_time}..{log.last_time}, the data spans "
                              f"{_time_key(data.index[0])}..{_time_key(data.index[-1])}")
    if not 1 <= log.start:
        raise SettlementError(f"start must be >= 1, not {log.start}")
    if len(log) and (log.tag.max() >= len(log.tags) or log.tag.min() < -1):
        raise SettlementError("an order's tag is not in the log's tag table")
    if len(log) and (log.kind.min() < 0 or log.kind.max() > 3):
        raise SettlementError("unknown decision kind")


def _closed_trades(state: dict, index: pd.Index, close: np.ndarray, tags: tuple) -> _exact_stats.TradeColumns:
    """``broker.closed_trades`` as columns, with ``Trade.pl``/``pl_pct`` computed as backtesting does."""
    from . import _broker_kernel as K

    ids = state["closed"][:int(state["cnt"][K.C_NCLOSED])]
    tf, ti = state["tf"][ids], state["ti"][ids]
    return _exact_stats.TradeColumns(
        tf[:, K.T_SIZE], ti[:, K.T_FLOAT] != 0, ti[:, K.T_ENTRY_BAR], ti[:, K.T_EXIT_BAR], tf[:, K.T_ENTRY],
        tf[:, K.T_EXIT], tf[:, K.T_SL], tf[:, K.T_TP], tf[:, K.T_COMM], ti[:, K.T_TAG], tags, index,
        last_close=float(close[-1]) if len(close) else math.nan)


# ---------------------------------------------------------------- one bar at a time
class BrokerCore:
    """backtesting.py's broker driven one bar at a time, with a state that survives a restart.

    The same compiled fill rules as :func:`settle`. Call :meth:`next_bar` with each
    closed candle (it fills what the bar allows, like ``_Broker.next``), then make the
    strategy's decisions (:meth:`submit`, :meth:`set_sl`, :meth:`close_trade`,
    :meth:`cancel`, ...) as ``Strategy.next`` would. :meth:`state` is JSON-able;
    :meth:`from_state` continues exactly where it left off.

    >>> core = BrokerCore(BacktestSettings(cash=10_000, commission=0.0))
    >>> core.next_bar(0, 100.0, 101.0, 99.0, 100.0)
    10000.0
    >>> order = core.submit(10)
    >>> core.next_bar(1, 102.0, 103.0, 101.0, 103.0)   # filled at the open: 10 x (103 - 102)
    10010.0
    >>> core2 = BrokerCore.from_state(core.state())
    >>> core2.trades()[["Size", "EntryPrice"]].values.tolist()
    [[10.0, 102.0]]
    """

    def __init__(self, settings: BacktestSettings | None = None):
        from . import _broker_kernel as K

        self._K = K
        self.settings = settings or BacktestSettings()
        self._params = _kernel_settings(self.settings)
        self._state = K.new_state()
        self._state["acc"][K.A_CASH] = float(self.settings.cash)
        self._tags = _bt_compat.TagTable()
        self.bar = -1
        self.last_close = math.nan
        self.last_equity = float(self.settings.cash)
        self._last_candle: tuple | None = None

    # ----- bars
    def next_bar(self, bar: int, open: float, high: float, low: float, close: float) -> float:
        """Fill at this candle (``_Broker.next``); returns the equity at its close."""
        K = self._K
        if self.stopped:
            raise SettlementError("the account ran out of money; the broker has stopped")
        self._make_room(0)
        prev = close if math.isnan(self.last_close) else self.last_close
        spread, fixed, rel, leverage, toc, hedging, _ = self._params
        status, equity = K.next_bar(*self._arrays(), float(open), float(high), float(low), float(close), float(prev),
                                    int(bar), spread, fixed, rel, leverage, toc, hedging)
        self._check(status)
        self._last_candle = (int(bar), float(open), float(high), float(low), float(close), float(prev))
        self.bar, self.last_close, self.last_equity = int(bar), float(close), float(equity)
        return self.last_equity

    def finalize(self) -> float:
        """``finalize_trades``: close every open trade, filling on the last candle again (at its open)."""
        if self._last_candle is None or self.stopped:
            return self.last_equity
        K = self._K
        self._make_room(int(self._state["cnt"][K.C_NACTIVE]))
        s = self._state
        K.finalize(s["qf"], s["qi"], s["tf"], s["ti"], s["active"], s["cnt"])
        bar, o, h, l_, c, prev = self._last_candle
        self.last_close = prev  # Backtest.run re-runs the broker on the same bar
        return self.next_bar(bar, o, h, l_, c)

    # ----- decisions
    def submit(self, size: float, *, limit: float | None = None, stop: float | None = None,
               sl: float | None = None, tp: float | None = None, tag=None) -> int:
        """``Strategy.buy`` (size > 0) / ``sell`` (size < 0); returns the order's ordinal."""
        p = _bt_compat.price_or_nan
        self._event(self._K.E_NEW, float(size), p(limit), p(stop), p(sl), p(tp), -1, self._tags.id(tag))
        return int(self._state["cnt"][self._K.C_NEXT_ORD]) - 1

    def set_sl(self, trade: int, price: float | None) -> None:
        """``trade.sl = price`` (None removes it)."""
        self._set_contingent(trade, price, self._K.T_SL_ORD, stop=True)

    def set_tp(self, trade: int, price: float | None) -> None:
        """``trade.tp = price`` (None removes it)."""
        self._set_contingent(trade, price, self._K.T_TP_ORD, stop=False)

    def close_trade(self, trade: int, portion: float = 1.0) -> None:
        """``trade.close(portion)``: fills at the next bar's open, ahead of other orders."""
        if not 0 < portion <= 1:
            raise SettlementError("portion must be a fraction between 0 and 1")
        size = float(self._state["tf"][trade, self._K.T_SIZE]) if 0 <= trade < self._n_trades() else math.nan
        units = math.copysign(max(1, int(round(abs(size) * portion))), -size) if not math.isnan(size) else 0.0
        self._event(self._K.E_CLOSE, units, math.nan, math.nan, math.nan, math.nan, trade, -1)

    def close_position(self, portion: float = 1.0) -> None:
        """``position.close(portion)``."""
        for trade in self._active():
            self.close_trade(int(trade), portion)

    def cancel(self, order: int) -> None:
        """``order.cancel()``."""
        self._event(self._K.E_CANCEL, 0.0, math.nan, math.nan, math.nan, math.nan, int(order), -1)

    def apply(self, log: OrderLog, i: int) -> None:
        """Make decision ``i`` of an order log (a replay of a recorded run, bar by bar)."""
        tag = int(log.tag[i])
        self._event(int(log.kind[i]), float(log.size[i]), float(log.limit[i]), float(log.stop[i]), float(log.sl[i]),
                    float(log.tp[i]), int(log.ref[i]), self._tags.id(log.tags[tag]) if tag >= 0 else -1)

    # ----- reading
    @property
    def cash(self) -> float:
        return float(self._state["acc"][self._K.A_CASH])

    @property
    def stopped(self) -> bool:
        return bool(self._state["cnt"][self._K.C_STOPPED])

    @property
    def position_size(self) -> int:
        return int(sum(int(self._state["tf"][t, self._K.T_SIZE]) for t in self._active()))

    def orders(self) -> pd.DataFrame:
        """The queue, in processing order."""
        K, s = self._K, self._state
        nq = int(s["cnt"][K.C_NQ])
        frame = pd.DataFrame(s["qf"][:nq], columns=["size", "limit", "stop", "sl", "tp"])
        frame.insert(0, "order", s["qi"][:nq, K.Q_ORD])
        frame["trade"] = s["qi"][:nq, K.Q_TRADE]
        frame["kind"] = [("order", "sl", "tp", "close")[k] for k in s["qi"][:nq, K.Q_KIND]]
        frame["tag"] = [self._tags.values[t] if t >= 0 else None for t in s["qi"][:nq, K.Q_TAG]]
        return frame

    def trades(self, closed: bool = False) -> pd.DataFrame:
        """Open trades (or closed ones, in closing order), indexed by trade ordinal."""
        K, s = self._K, self._state
        ids = s["closed"][:int(s["cnt"][K.C_NCLOSED])] if closed else self._active()
        tf, ti = s["tf"][ids], s["ti"][ids]
        return pd.DataFrame({"Size": tf[:, K.T_SIZE], "EntryBar": ti[:, K.T_ENTRY_BAR],
                             "ExitBar": ti[:, K.T_EXIT_BAR], "EntryPrice": tf[:, K.T_ENTRY],
                             "ExitPrice": tf[:, K.T_EXIT], "SL": tf[:, K.T_SL], "TP": tf[:, K.T_TP],
                             "Commission": tf[:, K.T_COMM],
                             "Tag": [self._tags.values[t] if t >= 0 else None for t in ti[:, K.T_TAG]]},
                            index=pd.Index(ids, name="trade"))

    # ----- persistence
    def state(self) -> dict:
        """Everything needed to continue, as JSON-able lists."""
        return {"format": _FORMAT, "settings": self.settings.kwargs(), "bar": self.bar, "last_candle": self._last_candle,
                "last_close": self.last_close, "last_equity": self.last_equity,
                "tags": [_json_tag(t) for t in self._tags.values],
                "arrays": {k: v.tolist() for k, v in self._state.items()}}

    @classmethod
    def from_state(cls, d: dict) -> "BrokerCore":
        core = cls(BacktestSettings(**d["settings"]))
        try:
            fresh = core._state
            arrays = {k: np.array(d["arrays"][k], dtype=fresh[k].dtype) for k in fresh}
            if any(arrays[k].ndim != fresh[k].ndim or arrays[k].shape[1:] != fresh[k].shape[1:] for k in fresh):
                raise ValueError("array shapes do not match")
        except (KeyError, TypeError, ValueError) as exc:
            raise SettlementError(f"invalid broker state: {exc}") from None
        core._state = arrays
        for tag in d.get("tags") or []:
            core._tags.id(tag)
        core.bar, core.last_close, core.last_equity = int(d["bar"]), float(d["last_close"]), float(d["last_equity"])
        core._last_candle = tuple(d["last_candle"]) if d.get("last_candle") else None
        return core

    def __repr__(self) -> str:
        return (f"BrokerCore(bar={self.bar}, cash={self.cash:.2f}, equity={self.last_equity:.2f}, "
                f"position={self.position_size}, orders={int(self._state['cnt'][self._K.C_NQ])})")

    # ----- internals
    def _arrays(self) -> tuple:
        s = self._state
        return s["qf"], s["qi"], s["tf"], s["ti"], s["active"], s["closed"], s["cnt"], s["acc"]

    def _active(self) -> np.ndarray:
        return self._state["active"][:int(self._state["cnt"][self._K.C_NACTIVE])].copy()

    def _n_trades(self) -> int:
        return int(self._state["cnt"][self._K.C_NTRADES])

    def _make_room(self, extra: int) -> None:
        s = self._state
        while not self._K.room(s["qf"], s["tf"], s["cnt"], extra):
            s = self._state = self._K.grow(s)

    def _check(self, status: int) -> None:
        if status < 0:
            raise SettlementError(self._K.STATUS_TEXT[status])

    def _event(self, kind, size, limit, stop, sl, tp, ref, tag) -> None:
        K = self._K
        self._make_room(1)
        s = self._state
        last = self.last_close
        spread, *_rest, exclusive = self._params
        status = K.apply_event(s["qf"], s["qi"], s["tf"], s["ti"], s["active"], s["cnt"], kind, size, limit, stop,
                               sl, tp, ref, tag, last, spread, exclusive)
        self._check(status)

    def _set_contingent(self, trade: int, price, col: int, stop: bool) -> None:
        K, s = self._K, self._state
        if not 0 <= trade < self._n_trades():
            raise SettlementError(f"no trade #{trade}")
        current = int(s["ti"][trade, col])
        if current >= 0:
            self.cancel(current)
        if price:
            size = -float(s["tf"][trade, K.T_SIZE])
            p = float(price)
            self._event(K.E_CONTINGENT, size, math.nan if stop else p, p if stop else math.nan, math.nan, math.nan,
                        trade, int(s["ti"][trade, K.T_TAG]))
