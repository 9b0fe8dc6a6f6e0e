"""The one module that touches backtesting.py's private API, checked against the pinned version.

Two things live here:

- :class:`RecordingBacktest`, a ``Backtest`` whose runs record every decision the
  strategy makes (orders, SL/TP changes, closes, cancels) in an
  :class:`~moondev_lab.broker.OrderLog`. It swaps ``self._broker`` per instance for a
  :class:`RecordingBroker` (a ``_Broker`` subclass); nothing process-wide is patched.
- :func:`compute_stats`, backtesting.py's own ``_stats.compute_stats``, fed with
  trades and equity that the trusted broker settled.

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
from functools import partial

import backtesting
import numpy as np
import pandas as pd
from backtesting import Backtest
from backtesting._stats import compute_stats as _bt_compute_stats
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
            self._recorder.add(NEW if trade is None else CONTINGENT, order.size, order.limit, order.stop,
                               order.sl, order.tp, -1 if trade is None else trade._ml_ordinal, order.tag)
        return order


class RecordingBacktest(Backtest):
    """``Backtest`` whose every run leaves the strategy's decisions in ``.order_log``.

    Results are backtesting.py's own; only the broker object is a recording subclass,
    swapped in per instance.
    """

    max_events = DEFAULT_MAX_EVENTS

    def __init__(self, data, strategy, **kwargs):
        super().__init__(data, strategy, **kwargs)
        self._broker = partial(self._recording_broker, self._broker.keywords)
        self._recorder: Recorder | None = None
        self.order_log = None

    def _recording_broker(self, keywords: dict, **kwargs) -> RecordingBroker:
        self._recorder = Recorder(self.max_events)
        return RecordingBroker(recorder=self._recorder, **keywords, **kwargs)

    # Backtest.run reads ``_finalize_trades`` once, right after its bar loop: from then on,
    # Trade.close() calls are finalize_trades' own, not the strategy's.
    @property
    def _finalize_trades(self) -> bool:
        if self._recorder is not None:
            self._recorder.finalizing = True
        return self.__dict__["_finalize_value"]

    @_finalize_trades.setter
    def _finalize_trades(self, value: bool) -> None:
        self.__dict__["_finalize_value"] = value

    def run(self, **kwargs) -> pd.Series:
        if self._broker.func.__self__ is not self:  # a copy (Backtest.optimize runs copy(self)): record here
            self._broker = partial(self._recording_broker, *self._broker.args)
        stats = super().run(**kwargs)
        self.order_log = order_log_of(self._recorder, stats["_strategy"], self._data.index)
        return stats


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


def build_plot(results: pd.Series, df: pd.DataFrame, **kwargs):
    """backtesting.py's interactive figure for ``results`` on ``df``, *without* showing or saving it."""
    with _silent_plotting() as plotting:
        return plotting.plot(results=results, df=df, indicators=[], open_browser=False, **kwargs)


def build_heatmaps(heatmap: pd.Series, agg: str = "max", ncols: int = 3, plot_width: int = 1200):
    """backtesting.py's ``plot_heatmaps`` figure, without showing it."""
    with _silent_plotting() as plotting:
        return plotting.plot_heatmaps(heatmap, agg, ncols, plot_width=plot_width, open_browser=False)
