"""The one module that touches backtesting.py's private API, checked against the pinned version.

Two things live here:

- :class:`RecordingBacktest`, a ``Backtest`` whose runs record every decision the
  strategy makes (orders, SL/TP changes, closes, cancels) in an
  :class:`~moondev_lab.broker.OrderLog`. It swaps ``self._broker`` per instance for a
  :class:`RecordingBroker` (a ``_Broker`` subclass); nothing process-wide is patched.
- :func:`compute_stats`, backtesting.py's own ``_stats.compute_stats``, fed with
  trades and equity that the trusted broker settled, and the pieces of it that
  :mod:`moondev_lab._exact_stats` reuses (``data_period``, ``_Stats``, the stand-in strategy).

>>> from moondev_lab._bt_compat import RecordingBacktest
>>> bt = RecordingBacktest(df, SmaCross, cash=1e6)                # doctest: +SKIP
>>> stats = bt.run()                                              # doctest: +SKIP
>>> bt.order_log                                                  # doctest: +SKIP
OrderLog(SmaCross: 1367 decisions (orders=684, sltp=0, closes=683, cancels=0), start=30, bars=31066)
"""
from __future__ import annotations

import contextlib
import math
import threading
import types
from functools import partial

import backtesting
import numpy as np
import pandas as pd
from backtesting import Backtest
from backtesting._stats import _Stats
from backtesting._stats import compute_stats as _bt_compute_stats
from backtesting._util import _data_period as data_period
from backtesting._util import _Indicator, _indicator_warmup_nbars
from backtesting.backtesting import _Broker

from .errors import MoondevError

#: The backtesting.py version whose private API and fill rules this module mirrors.
PINNED_VERSION = "0.6.6"


class BacktestingVersionError(MoondevError, ImportError):
    """The installed backtesting.py is not the version the trusted broker mirrors."""


if backtesting.__version__ != PINNED_VERSION:
    raise BacktestingVersionError(
        f"moondev_lab's trusted broker mirrors backtesting.py {PINNED_VERSION}'s fill rules, but "
        f"{backtesting.__version__} is installed: pip install backtesting=={PINNED_VERSION}")


class OrderLogFull(MoondevError):
    """The strategy made more decisions than an order log may hold."""


#: Decision kinds (same numbers as :mod:`moondev_lab._broker_kernel`'s ``E_*``).
NEW, CONTINGENT, CLOSE, CANCEL = range(4)
DEFAULT_MAX_EVENTS = 2_000_000


def price_or_nan(value) -> float:
    """backtesting.py tests prices for truth: None and 0 both mean "not set"."""
    return float(value) if value else math.nan


class TagTable:
    """Order tags (any object) as small ints; equal hashable tags share one id."""

    def __init__(self):
        self.values: list = []
        self._ids: dict = {}

    def id(self, tag) -> int:
        if tag is None:
            return -1
        key = (type(tag), tag)
        try:
            hash(key)
        except TypeError:  # unhashable: by identity
            key = (type(tag), id(tag))
        found = self._ids.get(key)
        if found is None:
            found = self._ids[key] = len(self.values)
            self.values.append(tag)
        return found


class Recorder:
    """The decisions of one run, in the order they were made."""

    def __init__(self, max_events: int = DEFAULT_MAX_EVENTS):
        self.max_events = max_events
        self.rows: list[tuple] = []  # (bar, kind, size, limit, stop, sl, tp, ref, tag)
        self.tags = TagTable()
        self.bar = -1  # of the decision being made; -1 for Strategy.init()
        self.finalizing = False
        self.orders = 0  # ordinals, in creation order, as the settling broker numbers them
        self.trades = 0
        #: Live runs: a NEW row's ``ref`` is the order's own ordinal (its later CANCEL rows name it),
        #: since the broker also numbers the SL/TP orders it makes at fill time, which are not decisions.
        self.number_new = False

    def add(self, kind: int, size: float, limit=None, stop=None, sl=None, tp=None, ref: int = -1,
            tag=None) -> None:
        if len(self.rows) >= self.max_events:
            raise OrderLogFull(f"the strategy made more than {self.max_events:,} order decisions; "
                               "an order log holds at most that many")
        self.rows.append((self.bar, kind, float(size), price_or_nan(limit), price_or_nan(stop),
                          price_or_nan(sl), price_or_nan(tp), ref, self.tags.id(tag)))


class _RecordedOrders(list):
    """``_Broker.orders``: every insert numbers the order; the strategy's inserts and removes are logged."""

    def __init__(self, broker: "RecordingBroker"):
        super().__init__()
        self._broker = broker

    def insert(self, index, order) -> None:
        super().insert(index, order)
        rec = self._broker._recorder
        order._ml_ordinal = rec.orders
        rec.orders += 1
        if self._broker._deciding() and order.parent_trade is not None:  # Trade.close()
            rec.add(CLOSE, order.size, ref=order.parent_trade._ml_ordinal)

    def remove(self, order) -> None:
        super().remove(order)
        if self._broker._deciding():  # Order.cancel()
            self._broker._recorder.add(CANCEL, 0.0, ref=order._ml_ordinal)


class _RecordedTrades(list):
    """``_Broker.trades``: every Trade object (new trades and reduced copies) gets an ordinal."""

    def __init__(self, broker: "RecordingBroker"):
        super().__init__()
        self._broker = broker

    def append(self, trade) -> None:
        rec = self._broker._recorder
        trade._ml_ordinal = rec.trades
        rec.trades += 1
        super().append(trade)


class RecordingBroker(_Broker):
    """``_Broker`` that records the strategy's decisions; fills exactly as backtesting.py does.

    The broker's own actions (fills, contingent orders of a new trade, exclusive_orders'
    closes, finalize_trades) run with ``_nested > 0`` or while finalizing, and are not
    decisions: the settling broker repeats them itself.
    """

    def __init__(self, *, recorder: Recorder, **kwargs):
        super().__init__(**kwargs)
        self._recorder = recorder
        self._nested = 0  # 1 inside next(): the broker's own fills, not decisions
        self.orders = _RecordedOrders(self)
        self.trades = _RecordedTrades(self)

    def _deciding(self) -> bool:
        if self._nested or self._recorder.finalizing:
            return False
        # Strategy.init() runs with the whole series visible and before the broker's first bar.
        self._recorder.bar = len(self._data) - 1 if hasattr(self, "_i") else -1
        return True

    def next(self):
        # Called on every bar, so kept to two stores: no try/finally (an exception here ends the
        # run: _OutOfMoneyError stops the loop before the strategy decides again), and the bar
        # of a decision is read off the data's length only when one is made.
        self._nested = 1
        super().next()
        self._nested = 0

    def new_order(self, size, limit=None, stop=None, sl=None, tp=None, tag=None, *, trade=None):
        deciding = self._deciding()
        nested, self._nested = self._nested, 1  # exclusive_orders' cancels and closes are the broker's
        try:
            order = super().new_order(size, limit, stop, sl, tp, tag, trade=trade)
        finally:
            self._nested = nested
        if deciding:
            ref = trade._ml_ordinal if trade is not None else \
                getattr(order, "_ml_ordinal", -1) if self._recorder.number_new else -1
            self._recorder.add(NEW if trade is None else CONTINGENT, order.size, order.limit, order.stop,
                               order.sl, order.tp, ref, order.tag)
        return order


class RecordingBacktest(Backtest):
    """``Backtest`` whose every run leaves the strategy's decisions in ``.order_log``.

    Results are backtesting.py's own; only the broker object is a recording subclass,
    swapped in per instance.
    """

    max_events = DEFAULT_MAX_EVENTS
    #: Called with the run's :class:`~moondev_lab.broker.OrderLog` as soon as its decisions are final
    #: (right after the bar loop, before backtesting.py computes the stats), so that a trusted side can
    #: start settling it meanwhile. Not called when the loop ends early (out of money); ``order_log``
    #: after the run is the log to trust either way.
    on_decided = None

    def __init__(self, data, strategy, **kwargs):
        super().__init__(data, strategy, **kwargs)
        self._broker_keywords = self._broker.keywords
        self._recorder: Recorder | None = None
        self._run_broker: RecordingBroker | None = None
        self.order_log = None

    def _recording_broker(self, keywords: dict, **kwargs) -> RecordingBroker:
        self._recorder = Recorder(self.max_events)
        self._run_broker = RecordingBroker(recorder=self._recorder, **keywords, **kwargs)
        return self._run_broker

    # Backtest.run reads ``_finalize_trades`` once, right after its bar loop: from then on,
    # Trade.close() calls are finalize_trades' own, not the strategy's.
    @property
    def _finalize_trades(self) -> bool:
        if self._recorder is not None and not self._recorder.finalizing:
            self._recorder.finalizing = True
            if self.on_decided is not None:
                self._decided()
        return self.__dict__["_finalize_value"]

    def _decided(self) -> None:
        """Hand the finished decisions to :attr:`on_decided` (a best effort: the run goes on regardless)."""
        from .broker import OrderLog  # broker imports this module

        equity = self._run_broker._equity  # NaN until the loop's first bar: Backtest.run's own ``start``
        ran = np.flatnonzero(~np.isnan(equity))
        if not len(ran):
            return
        log = OrderLog.from_rows(self._recorder.rows, tags=self._recorder.tags.values, start=int(ran[0]),
                                 index=self._data.index, strategy=self._strategy.__name__,
                                 params=dict(self.__dict__.get("_run_params", {})))
        self.on_decided(log)

    @_finalize_trades.setter
    def _finalize_trades(self, value: bool) -> None:
        self.__dict__["_finalize_value"] = value

    def run(self, **kwargs) -> pd.Series:
        # Bound here, not in __init__: Backtest.optimize runs its grid on copy(self), whose
        # recorder must be the copy's own.
        self._broker = partial(self._recording_broker, self._broker_keywords)
        self.__dict__["_run_params"] = kwargs
        stats = super().run(**kwargs)
        self.order_log = order_log_of(self._recorder, stats["_strategy"], self._data.index)
        return stats


def strategy_class(bt: Backtest) -> type:
    """The ``Strategy`` class a ``Backtest`` was built with."""
    return bt._strategy


def order_log_of(recorder: Recorder, strategy, index: pd.Index):
    """The :class:`~moondev_lab.broker.OrderLog` of a finished run."""
    from .broker import OrderLog  # broker imports this module

    # Backtest.run's own ``start``. After the run the indicators are cut at the last bar run,
    # which still holds every indicator's first value: the warm-up reads the same.
    start = int(_indicator_warmup_nbars(strategy)) + 1
    params = dict(getattr(strategy, "_params", {}) or {})
    return OrderLog.from_rows(recorder.rows, tags=recorder.tags.values, start=start, index=index,
                              strategy=type(strategy).__name__, params=params)


# ---------------------------------------------------------------- stats
class _StatsStrategy:
    """Stands in for the strategy in ``compute_stats``: its warm-up and (optionally) indicators.

    ``compute_stats`` reads the warm-up from the strategy's indicator attributes (for
    Buy & Hold) and adds ``Entry_<indicator>``/``Exit_<indicator>`` trade columns.
    """

    def __init__(self, n_bars: int, warmup_nbars: int, indicators=()):
        marker = np.zeros(n_bars)
        marker[:warmup_nbars] = np.nan
        self._warmup = _Indicator(marker, name="warmup", scatter=False)
        self._indicators = list(indicators)


def compute_stats(trades: list, equity: np.ndarray, ohlc: pd.DataFrame, warmup_nbars: int,
                  indicators=()) -> pd.Series:
    """backtesting.py's ``compute_stats`` on settled trades (objects with ``Trade``'s attributes)."""
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):  # as noisy as Backtest.run otherwise
        return _bt_compute_stats(trades=trades, equity=equity, ohlc_data=ohlc,
                                 strategy_instance=_StatsStrategy(len(ohlc), warmup_nbars, indicators),
                                 risk_free_rate=0.0)


def stats_strategy(n_bars: int, warmup_nbars: int, indicators=()) -> _StatsStrategy:
    """The ``_strategy`` of stats computed from settled trades (see :func:`compute_stats`)."""
    return _StatsStrategy(n_bars, warmup_nbars, indicators)


def stats_series(stats: dict) -> pd.Series:
    """``compute_stats``' result type (backtesting's ``_Stats``, for its repr) of a dict of stats."""
    return _Stats(stats, dtype=object)


def strategy_indicators(strategy) -> list:
    """The indicators ``compute_stats`` adds as trade columns (``strategy._indicators``)."""
    return list(getattr(strategy, "_indicators", []) or [])


# ------------------------------------------------------------------ results of Backtest.run()
def equity_curve(stats: pd.Series) -> pd.Series:
    """The per-bar equity of a ``Backtest.run()`` result (``stats._equity_curve['Equity']``)."""
    return stats._equity_curve["Equity"]


def strategy_params(stats: pd.Series, names) -> dict:
    """The values of parameters ``names`` on the strategy instance a run used (``stats._strategy``)."""
    strategy = stats._strategy
    return {name: getattr(strategy, name) for name in names}


# ------------------------------------------------------------------ plotting (no show, no global reset, no tracking)
_plot_lock = threading.Lock()


def drawdown_duration(drawdown: pd.Series) -> pd.Series:
    """backtesting.py's ``DrawdownDuration`` column of ``_equity_curve`` for a drawdown series."""
    from backtesting._stats import compute_drawdown_duration_peaks

    duration, _peaks = compute_drawdown_duration_peaks(drawdown)
    return duration


@contextlib.contextmanager
def _silent_plotting():
    """backtesting.py's plotting with its show, global reset and remote tracking hook switched off.

    ``backtesting._plotting.plot`` always resets bokeh's global output state, shows
    the figure (CDN resources, or a file named after the strategy) and adds a
    document hook that loads a tracking iframe from the internet. Those three
    module-level hooks become no-ops, under a lock, for the duration of one call;
    the caller decides how to render (inline resources).
    """
    import backtesting._plotting as plotting

    names = ("show", "_bokeh_reset", "_add_popcon")
    with _plot_lock:
        saved = {n: getattr(plotting, n) for n in names}
        for n in names:
            setattr(plotting, n, lambda *a, **k: None)
        try:
            yield plotting
        finally:
            for n, f in saved.items():
                setattr(plotting, n, f)


def build_plot(results: pd.Series, df: pd.DataFrame, indicators=(), **kwargs):
    """backtesting.py's interactive figure for ``results`` on ``df``, *without* showing or saving it.

    ``indicators``: dicts as :func:`indicator_specs` gives (``values`` one row per line,
    ``len(df)`` bars), drawn as ``Backtest.plot()`` draws ``Strategy.I`` indicators.
    """
    shown = [_Indicator(spec["values"][0] if len(spec["values"]) == 1 else spec["values"], name=spec["name"],
                        plot=spec["plot"], overlay=spec["overlay"], scatter=spec["scatter"], color=spec["color"],
                        index=df.index) for spec in indicators]
    with _silent_plotting() as plotting:
        return plotting.plot(results=results, df=df, indicators=shown, open_browser=False, **kwargs)


def indicator_specs(strategy) -> list[dict]:
    """A finished run's ``Strategy.I`` indicators with their plot options, as plain values.

    Each: ``name`` (str, or one per row), ``values`` (2-D float64, one row per line),
    ``overlay``, ``scatter``, ``plot``, ``color``. Indicators that are not numbers are left out.
    """
    out = []
    for value in getattr(strategy, "_indicators", None) or []:
        try:
            values = np.atleast_2d(np.asarray(value, dtype=np.float64))
        except (TypeError, ValueError):
            continue
        if values.ndim != 2:
            continue  # backtesting.py does not plot >2-D indicators either
        opts = getattr(value, "_opts", {}) or {}
        name = getattr(value, "name", None) or "indicator"
        names = [str(n) for n in name] if isinstance(name, (list, tuple)) else str(name)
        if isinstance(names, list) and len(names) != len(values):
            names = ", ".join(names)
        color = opts.get("color")
        colors = None if color is None else [str(c) for c in ([color] if isinstance(color, str) else color)]
        out.append({"name": names, "values": values, "overlay": bool(opts.get("overlay")),
                    "scatter": bool(opts.get("scatter")), "plot": bool(opts.get("plot", True)), "color": colors})
    return out


def build_heatmaps(heatmap: pd.Series, agg: str = "max", ncols: int = 3, plot_width: int = 1200):
    """backtesting.py's ``plot_heatmaps`` figure, without showing it."""
    with _silent_plotting() as plotting:
        return plotting.plot_heatmaps(heatmap, agg, ncols, plot_width=plot_width, open_browser=False)
# ---------------------------------------------------------------- bar by bar (the live runner)
class LiveIndicatorError(MoondevError):
    """An indicator the live runner cannot recompute bar by bar (say which and why)."""


class _IndexWindow:
    """``_Array._opts['index']`` of a window: ``[:k]`` gives the window's own first k times."""

    __slots__ = ("_index", "_lo")

    def __init__(self, index: pd.Index, lo: int):
        self._index, self._lo = index, lo

    def __getitem__(self, item):
        if isinstance(item, slice) and item.start is None and item.step is None and item.stop is not None:
            return self._index[self._lo:self._lo + item.stop]
        return self._index[self._lo:][item]


class _WindowData:
    """What ``self.data`` is while an indicator function runs again over a trailing window.

    It answers what ``_Data`` answers (columns as ``_Array``, ``index``, ``df``, ``len``,
    ``pip``), over bars ``lo..n-1`` only, so a closure such as
    ``lambda: talib.RSI(self.data.Close, 14)`` sees the window, not the future.
    """

    def __init__(self, owner: "LiveStrategy", lo: int, n: int):
        self._owner, self._lo, self._n = owner, lo, n
        self._cache: dict = {}

    def __len__(self) -> int:
        return self._n - self._lo

    def __getitem__(self, key):
        arr = self._cache.get(key)
        if arr is None:
            arr = self._cache[key] = self._owner._window_column(key, self._lo, self._n)
        return arr

    def __getattr__(self, key):
        if key.startswith("_"):
            raise AttributeError(key)
        try:
            return self[key]
        except KeyError:
            raise AttributeError(f"Column '{key}' not in data") from None

    @property
    def index(self) -> pd.Index:
        return self._owner._index[self._lo:self._n]

    @property
    def df(self) -> pd.DataFrame:
        return self._owner._frame.iloc[self._lo:self._n]

    @property
    def pip(self) -> float:
        return self._owner.data.pip



_OHLCV = ("Open", "High", "Low", "Close", "Volume")


class _IndicatorSpec:
    """One ``self.I(func, *args, **kwargs)`` call of ``init()``, and how to call it again on a window."""

    __slots__ = ("func", "args", "kwargs", "name", "value", "window", "checked", "cells")

    def __init__(self, func, args, kwargs, name, value, window):
        self.func, self.args, self.kwargs, self.name, self.value = func, args, kwargs, name, value
        self.window, self.checked = window, False
        self.cells = None  # roles of the function's closure cells, when some hold data arrays


def _units_at_send(strategy, size: float) -> float | None:
    """A fraction-of-margin size as whole units now, at the last close (what a live order must carry).

    The same arithmetic as ``_Broker._process_orders`` at fill time, with the decision
    bar's close for the price: a live exchange needs a quantity before the fill price is
    known. The next bar's open may give one unit more or less (parity tags that).
    """
    broker = strategy._broker
    price = float(strategy.data.Close[-1])
    adjusted = price * (1 + math.copysign(broker._spread, size))
    per_unit = adjusted + broker._commission(size, price) / abs(size)
    units = int((broker.margin_available * broker._leverage * abs(size)) // per_unit)
    return float(units) if units else None


def _recording_subclass(strategy: type, size_rule=None, size_at_send: bool = False) -> type:
    """A per-run subclass of ``strategy`` whose ``I()`` records each call (nothing process-wide changes).

    ``size_rule`` maps a ``buy``/``sell`` size to the one the sandbox harness would use
    (or None to skip the order), so a live run sizes orders exactly as its backtest did.
    """
    from backtesting import Strategy

    def I(self, func, *args, name=None, plot=True, overlay=None, color=None, scatter=False, **kwargs):  # noqa: E743
        value = super(cls, self).I(func, *args, name=name, plot=plot, overlay=overlay, color=color,
                                   scatter=scatter, **kwargs)
        self.__dict__.setdefault("_ml_specs", []).append((func, args, kwargs, value))
        return value

    body = {"I": I, "__module__": strategy.__module__, "__qualname__": strategy.__qualname__}
    if size_rule is None and size_at_send:
        size_rule = float
    if size_rule is not None:
        def sized(orig):
            def order(self, *, size=Strategy._FULL_EQUITY, **kw):
                if size is not Strategy._FULL_EQUITY:
                    size = size_rule(size)
                    if size is None:
                        return None
                if size_at_send and 0 < size < 1 and kw.get("limit") is None and kw.get("stop") is None:
                    size = _units_at_send(self, size if orig is strategy.buy else -size)
                    if size is None:
                        return None
                return orig(self, size=size, **kw)
            order.__name__ = orig.__name__
            return order
        body["buy"], body["sell"] = sized(strategy.buy), sized(strategy.sell)
    cls = type(strategy.__name__, (strategy,), body)
    return cls


class LiveStrategy:
    """One ``Strategy`` instance run bar by bar, as ``Backtest.run``'s loop runs it, on growing data.

    ``start(times, ohlcv)`` runs ``init()`` over the history so far; each ``step(time, row)``
    adds one closed bar, updates every indicator *causally*, then (after the warm-up)
    runs the broker's fills and ``next()``, and returns the decisions ``next()`` made
    (rows of :class:`Recorder`). The broker is a :class:`RecordingBroker`, so the strategy
    sees positions, trades and equity exactly as in a backtest (its shadow of the
    exchange; the trusted side checks it against the real account).

    Indicators: each ``self.I(func, *args)`` is called again on every new bar over a
    trailing window of ``window`` bars (data columns and earlier indicators in ``args``,
    and ``self.data`` inside closures, are swapped for the window) and its last value is
    appended. For indicators with a finite look-back ``<= window`` that is the same
    function of the same inputs, equal up to the summation order of rolling sums
    (~1e-15 relative). For recursive ones (EMA, Wilder's RSI/ATR) the truncated history
    contributes ``(1 - alpha) ** window``; the first time a window truncates, the value is
    compared with the whole-prefix value and the window doubles (up to ``max_window``)
    until they agree to ``rtol``. Cost per bar: one call per indicator on ``window`` bars,
    never a re-run of the backtest.

    >>> live = LiveStrategy(SmaCross, {}, BacktestSettings().kwargs())     # doctest: +SKIP
    >>> live.start(times[:100], ohlcv[:100]); live.step(times[100], ohlcv[100])  # doctest: +SKIP
    []
    """

    def __init__(self, strategy: type, params: dict | None, settings: dict, *, window: int = 1000,
                 max_window: int = 1 << 15, rtol: float = 1e-10, size_rule=None, capacity: int = 0,
                 max_events: int = DEFAULT_MAX_EVENTS, size_at_send: bool = False):
        self._cls = _recording_subclass(strategy, size_rule, size_at_send)
        self._params = dict(params or {})
        self._settings = {k: settings[k] for k in ("cash", "commission", "spread", "margin", "trade_on_close",
                                                   "hedging", "exclusive_orders") if k in settings}
        self.window, self.max_window, self.rtol = int(window), int(max_window), float(rtol)
        self._capacity_hint = int(capacity)
        self.recorder = Recorder(max_events)
        self.recorder.number_new = True
        self.n = 0
        self.start_bar: int | None = None
        self.stopped: str | None = None
        self._first_valid: list[int | None] = []
        self._specs: list[_IndicatorSpec] = []
        self._attrs: list[tuple[str, int]] = []

    # ------------------------------------------------------------------ data
    def _alloc(self, cap: int, keep: int) -> None:
        from backtesting._util import _Data

        ts = np.empty(cap, "M8[ns]")
        buf = np.full((5, cap), np.nan)
        if keep:
            ts[:keep] = self._ts[:keep]
            buf[:, :keep] = self._buf[:, :keep]
        step = self._step
        if keep:
            ts[keep:] = ts[keep - 1] + step * np.arange(1, cap - keep + 1)
        self._ts, self._buf = ts, buf
        self._index = pd.DatetimeIndex(ts).tz_localize(self._tz) if self._tz else pd.DatetimeIndex(ts)
        self._frame = pd.DataFrame({c: buf[k] for k, c in enumerate(_OHLCV)}, index=self._index, copy=False)
        self.data = _Data(self._frame)
        self.data._set_length(max(keep, 1))

    def _window_column(self, key: str, lo: int, n: int):
        from backtesting._util import _Array

        k = _OHLCV.index(key)
        return _Array(self._buf[k, lo:n], name=key, index=_IndexWindow(self._index, lo))

    def _regrow(self, cap: int) -> None:
        """Bigger buffers, or a corrected time axis: a fresh ``_Data`` for the strategy and its broker."""
        n = self.n
        self._alloc(cap, n)
        self.data._set_length(n)
        self.strategy._data = self.broker._data = self.data
        equity = np.full(cap, np.nan)
        equity[:len(self.broker._equity)] = self.broker._equity[:cap]
        self.broker._equity = equity
        for spec in self._specs:
            self._grow_indicator(spec, cap)
        self.strategy._indicators = [s.value for s in self._specs]

    def _grow_indicator(self, spec: _IndicatorSpec, cap: int) -> None:
        from backtesting._util import _Indicator

        old = spec.value
        full = np.full(old.shape[:-1] + (cap,), np.nan)
        keep = min(old.shape[-1], cap)
        full[..., :keep] = np.asarray(old)[..., :keep]
        spec.value = _Indicator(full, name=old.name, **{**old._opts, "index": self._index})

    # ------------------------------------------------------------------ start
    def start(self, times: np.ndarray, ohlcv: np.ndarray, *, tz: str | None = "UTC") -> dict:
        """``init()`` over the history ``times`` (datetime64[ns]), ``ohlcv`` (n x 5)."""
        times = np.asarray(times, dtype="M8[ns]")
        n = len(times)
        if n < 1:
            raise LiveIndicatorError("a live strategy needs at least one bar of history to start")
        self._tz = tz
        diffs = np.diff(times[-1000:])
        self._step = np.median(diffs) if len(diffs) else np.timedelta64(1, "m")
        self._ts, self._buf = times, np.asarray(ohlcv, dtype=np.float64).T
        self.n = n
        self._alloc(max(self._capacity_hint, 2 * n, 1024), n)
        self.broker = RecordingBroker(recorder=self.recorder, data=self.data, index=self._index, **self._settings)
        self.strategy = self._cls(self.broker, self.data, self._params)
        self.strategy._ml_specs = []
        self.strategy.init()
        self.data._update()
        cap = len(self._ts)
        for func, args, kwargs, value in self.strategy._ml_specs:
            spec = _IndicatorSpec(func, None, None, value.name, value, self.window)
            spec.args = tuple(self._arg_role(a, n, spec.name, self._specs) for a in args)
            spec.kwargs = {k: self._arg_role(v, n, spec.name, self._specs) for k, v in kwargs.items()}
            # ``lambda: talib.RSI(close, 14)`` with ``close = self.data.Close`` taken in init(): the closure
            # holds the init-time array, so its cells are swapped for the window too.
            cells = getattr(func, "__closure__", None) or ()
            roles = tuple(self._arg_role(_cell_value(c), n, spec.name, self._specs) for c in cells)
            if any(r[0] != "const" for r in roles):
                spec.cells = roles
            self._specs.append(spec)
        by_id = {}
        for j, spec in enumerate(self._specs):
            by_id[id(spec.value)] = j
            self._grow_indicator(spec, cap)
        self._attrs = [(attr, by_id[id(v)]) for attr, v in _strategy_indicators_of(self.strategy)
                       if id(v) in by_id]
        self.strategy._indicators = [s.value for s in self._specs]
        self._first_valid = [self._first_valid_of(s.value, n) for s in self._specs]
        self._update_start()
        return {"warmup": None if self.start_bar is None else self.start_bar - 1,
                "indicators": [str(s.name) for s in self._specs], "bars": n}

    def _arg_role(self, a, n: int, name, specs: list):
        """How to rebuild argument ``a`` of indicator ``name`` over a window."""
        if isinstance(a, pd.DataFrame) and len(a) == n:
            return ("frame",)
        if isinstance(a, pd.Series) and len(a) == n:
            values = a.to_numpy()
            kind = "series"
        elif isinstance(a, np.ndarray) and a.ndim >= 1 and a.shape[-1] == n:
            values = a
            kind = "array"
        else:
            return ("const", a)
        for j, spec in enumerate(specs):
            v = np.asarray(spec.value)
            if values is spec.value or (values.shape == v.shape and np.shares_memory(values, v)):
                return (kind + "_ind", j, getattr(a, "name", None))
        if values.ndim == 1:
            for k, col in enumerate(_OHLCV):
                if np.shares_memory(values, self._buf[k]):
                    return (kind, k, getattr(a, "name", None))
            for k, col in enumerate(_OHLCV):
                if np.array_equal(values, self._buf[k, :n], equal_nan=True):
                    return (kind, k, getattr(a, "name", None))
            for j, spec in enumerate(specs):
                v = np.asarray(spec.value)
                if v.ndim == 1 and np.array_equal(values, v, equal_nan=True):
                    return (kind + "_ind", j, getattr(a, "name", None))
        raise LiveIndicatorError(
            f"indicator {name!r} takes an array computed in init() from the whole series; the live runner "
            "recomputes indicators from self.data columns and earlier indicators only. Compute it inside "
            "the indicator function (e.g. self.I(lambda c: f(c), self.data.Close)).")

    def _window_arg(self, role, lo: int, n: int, wdata: _WindowData):
        kind = role[0]
        if kind == "const":
            return role[1]
        if kind == "frame":
            return wdata.df
        if kind in ("array", "series"):
            arr = wdata[_OHLCV[role[1]]]
            return pd.Series(arr, index=self._index[lo:n], name=role[2]) if kind == "series" else arr
        value = self._specs[role[1]].value[..., lo:n]
        return pd.Series(np.asarray(value), index=self._index[lo:n], name=role[2]) if kind == "series_ind" \
            else value

    def _compute(self, spec: _IndicatorSpec, lo: int, n: int, wdata: _WindowData) -> np.ndarray:
        args = [self._window_arg(r, lo, n, wdata) for r in spec.args]
        kwargs = {k: self._window_arg(r, lo, n, wdata) for k, r in spec.kwargs.items()}
        func = spec.func
        if spec.cells is not None:
            func = types.FunctionType(func.__code__, func.__globals__, func.__name__, func.__defaults__,
                                      tuple(types.CellType(self._window_arg(r, lo, n, wdata)) for r in spec.cells))
        saved = self.strategy._data
        self.strategy._data = wdata
        try:
            value = func(*args, **kwargs)
        finally:
            self.strategy._data = saved
        if isinstance(value, pd.DataFrame):
            value = value.values.T
        value = np.asarray(value, dtype=float) if value is not None else None
        m = n - lo
        if value is not None and value.ndim == 2 and value.shape[0] == m and value.shape[1] != m:
            value = value.T
        if value is None or not 1 <= value.ndim <= 2 or value.shape[-1] != m:
            raise LiveIndicatorError(f"indicator {spec.name!r} returned shape {getattr(value, 'shape', None)} "
                                     f"on a {m}-bar window (its length must equal the window's)")
        return value[..., -1]

    def _first_valid_of(self, value, n: int) -> int | None:
        """The first bar with a value on every row (``_indicator_warmup_nbars``), None while unknown."""
        if value._opts.get("scatter"):
            return 0
        v = np.atleast_2d(np.asarray(value, dtype=float)[..., :n])
        ok = ~np.isnan(v)
        if not ok.any(axis=-1).all():
            return None
        return int(ok.argmax(axis=-1).max())

    def _update_start(self) -> None:
        # Only indicators bound to attributes count, as in ``_indicator_warmup_nbars``.
        firsts = [self._first_valid[j] for j in {j for _, j in self._attrs}]
        if self.start_bar is None and all(f is not None for f in firsts):
            self.start_bar = 1 + max(firsts, default=0)

    # ------------------------------------------------------------------ step
    def step(self, time, row) -> list[tuple]:
        """Add one closed bar; returns the decisions of this bar's ``next()`` (empty before the warm-up)."""
        from backtesting.backtesting import _OutOfMoneyError

        if self.stopped:
            return []
        i = self.n
        t = np.datetime64(pd.Timestamp(time).tz_localize(None) if pd.Timestamp(time).tzinfo is None
                          else pd.Timestamp(time).tz_convert("UTC").tz_localize(None), "ns")
        if i >= len(self._ts):
            self._regrow(2 * len(self._ts))
        if self._ts[i] != t:  # a gap (or a first guess of the bar spacing that was wrong)
            if i and t <= self._ts[i - 1]:
                raise LiveIndicatorError(f"bar time {pd.Timestamp(t)} is not after the last bar's")
            if i:
                self._step = t - self._ts[i - 1]
            self._regrow(len(self._ts))
            self._ts[i] = t  # (when i == 0 there is nothing before it to extrapolate from)
        self._buf[:, i] = row
        n = self.n = i + 1
        self.data._set_length(n)
        wdata = _WindowData(self, 0, n)
        for j, spec in enumerate(self._specs):
            lo = max(0, n - spec.window)
            if lo:
                wd = _WindowData(self, lo, n)
                value = self._compute(spec, lo, n, wd)
                if not spec.checked:
                    exact = self._compute(spec, 0, n, wdata)
                    if np.allclose(value, exact, rtol=self.rtol, atol=0, equal_nan=True):
                        spec.checked = True
                    else:
                        spec.window = min(2 * spec.window, self.max_window)
                        spec.checked = spec.window >= self.max_window
                        value = exact
            else:
                value = self._compute(spec, 0, n, wdata)
            spec.value[..., i] = value
            if self._first_valid[j] is None:
                self._first_valid[j] = self._first_valid_of(spec.value, n)
        self._update_start()
        if self.start_bar is None or i < self.start_bar:
            return []
        for attr, j in self._attrs:
            setattr(self.strategy, attr, self._specs[j].value[..., :n])
        rec = self.recorder
        first = len(rec.rows)
        try:
            with np.errstate(invalid="ignore"):
                self.broker.next()
                self.strategy.next()
        except _OutOfMoneyError:
            self.stopped = "out of money"
        rows = rec.rows[first:]
        del rec.rows[:]
        return rows

    # ------------------------------------------------------------------ views
    @property
    def position(self) -> float:
        """The shadow broker's position, in units (what the account should hold)."""
        return float(self.broker.position.size)

    @property
    def equity(self) -> float:
        return float(self.broker.equity)

    def indicator_values(self) -> list[tuple[str, np.ndarray]]:
        """Every indicator's causal values so far (``name``, array of ``n`` bars)."""
        return [(str(s.name), np.asarray(s.value)[..., :self.n]) for s in self._specs]


def _cell_value(cell):
    try:
        return cell.cell_contents
    except ValueError:  # an empty cell (a name assigned later)
        return None


def _strategy_indicators_of(strategy) -> list:
    """``(attribute, indicator)`` pairs the backtest loop would slice each bar (``_strategy_indicators``)."""
    from backtesting._util import _strategy_indicators

    return list(_strategy_indicators(strategy))


def indicator_arrays(strategy) -> list[tuple[str, np.ndarray]]:
    """A finished backtest's indicators (``strategy._indicators``), as (name, values) pairs."""
    return [(str(v.name), np.asarray(v, dtype=float)) for v in getattr(strategy, "_indicators", [])]
