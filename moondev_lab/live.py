"""The live runner: a backtested strategy, unchanged, trading bar by bar on paper (default) or live.

- **What it runs.** An RBI run folder (``strategy.py`` + the parameters in ``stats.json``)
  or any backtesting.py ``Strategy`` file (:func:`load_strategy`).
- **Where the code runs.** In a sandboxed child (:class:`~moondev_lab.sandbox._session.StrategySession`):
  closed candles and the account's position go in, decisions come out. This process
  holds the exchange, the keys and the risk limits; the child never sees them. The child
  is in the pool's namespaces (user, pid, net, mount, IPC) under its Landlock, seccomp and
  rlimits; its layers are ``runner.session.layers`` and the ``start`` event's ``layers``.
- **Memory.** Flat over a long run: the runner keeps a trailing ``history_bars`` of candles,
  the paper exchange only its open orders (finished ones and fills are in SQLite), and the
  session allocates a replay's buffers once.
- **The bars.** Newly *closed* candles, polled with ``fetch_ohlcv``; the still-forming
  candle is dropped. Indicators are updated causally over a trailing window each bar
  (see :class:`~moondev_lab._bt_compat.LiveStrategy`).
- **Orders.** Each decision becomes an exchange order under a deterministic
  :class:`~moondev_lab.exchange.ClientOrderId` (strategy, bar time, sequence number in
  the bar), through a per-exchange :class:`Route` (a registry). The paper route expresses
  everything backtesting.py can; the ccxt route (:mod:`moondev_lab._ccxt_route`, spot) market,
  limit, stop and stop-limit entries, closes, and sl/tp as exchange orders placed once the
  entry fills (an OCO for both); it refuses shorts and the rest by name (which stops trading:
  the account and the strategy would drift apart).
- **Restart.** Progress is committed per bar. On start the runner reconciles its stored
  open orders with the exchange (adopting or cancelling unknown ones), then rebuilds the
  strategy by replaying its bars (deterministic ids: a decision already sent is found,
  one lost in a crash is sent once). The live route then adopts the sl/tp orders it still
  wants, cancels its own that it does not, and places what a filled entry still needs after
  the first re-decided bar. A reconciliation that cannot complete, or a shadow position that
  differs from the account's (as of the bar's close), stops trading with a clear message.
- **Safety.** :class:`~moondev_lab.risk.RiskGuard` checks every order; the kill switch is
  ``KILL`` in the state folder or SIGTERM. Every decision, order, fill and refusal goes to
  the :class:`~moondev_lab.eventlog.EventLog` (``events.sqlite``).

>>> src = load_strategy("runs/run-00001")                                      # doctest: +SKIP
>>> with LiveRunner(src, PaperExchange(symbol="BTC/USD", candles=df), state_dir="live") as r:  # doctest: +SKIP
...     r.replay(df)
...     r.status()
"""
from __future__ import annotations

import enum
import hashlib
import json
import math
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from .errors import ExchangeError, MoondevError, ReconciliationError
from .eventlog import EventLog
from .exchange.orders import ClientOrderId, Order
from .risk import KillSwitch, RiskBreach, RiskGuard, RiskLimits
from .sandbox._session import SessionError, SessionState, StepResult, StrategySession, bars_of
from .sandbox.settings import BacktestSettings

__all__ = ["LiveRunner", "LiveError", "RunnerState", "StrategySource", "load_strategy", "Route", "ROUTES",
           "register_route"]

#: Bars handed to the strategy per message in a replay (one per message live).
REPLAY_CHUNK = 2048
#: Client ids of the strategy's orders the ccxt route remembers for a later cancel (oldest forgotten first).
ORDER_IDS_KEPT = 10_000
_NEW, _CONTINGENT, _CLOSE, _CANCEL = range(4)


class LiveError(MoondevError):
    """The live runner cannot start or go on (a clear reason; trading is stopped)."""


class RunnerState(str, enum.Enum):
    NEW = "new"
    STARTING = "starting"
    RECONCILING = "reconciling"
    TRADING = "trading"
    STOPPED = "stopped"      # kill switch, risk, drift, strategy error: no more orders
    CLOSED = "closed"


# ---------------------------------------------------------------- what to run
@dataclass(frozen=True)
class StrategySource:
    """A strategy's code and parameters, and where they came from."""

    code: str
    params: dict = field(default_factory=dict)
    name: str = "strategy"
    origin: str = ""
    dataset: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v}" for k, v in self.params.items())
        return f"StrategySource({self.name}({params}) from {self.origin or 'code'})"


def load_strategy(target: str | Path) -> StrategySource:
    """An RBI run folder (``strategy.py`` + ``stats.json``'s params) or a ``.py`` strategy file.

    >>> load_strategy("/nonexistent")
    Traceback (most recent call last):
    ...
    moondev_lab.live.LiveError: /nonexistent: no such run folder or strategy file
    """
    import ast

    from ._ast_parse import parse as parse_python

    path = Path(target)
    params: dict = {}
    dataset: dict = {}
    if path.is_dir():
        code_path = path / "strategy.py"
        if not code_path.is_file():
            raise LiveError(f"{path}: not a run folder (no strategy.py)")
        stats = path / "stats.json"
        if stats.is_file():
            try:
                meta = json.loads(stats.read_text())
            except (OSError, ValueError) as e:
                raise LiveError(f"{stats}: unreadable ({e})") from None
            params = dict(meta.get("params") or {}) if isinstance(meta, dict) else {}
            ds = meta.get("datasets") if isinstance(meta, dict) else None
            dataset = ds if isinstance(ds, dict) else {}
    elif path.is_file():
        code_path = path
    else:
        raise LiveError(f"{path}: no such run folder or strategy file")
    try:
        code = code_path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise LiveError(f"{code_path}: unreadable ({e})") from None
    try:
        tree = parse_python(code)
    except SyntaxError as e:
        raise LiveError(f"{code_path}: not valid Python (line {e.lineno}: {e.msg})") from None
    classes = [n.name for n in tree.body if isinstance(n, ast.ClassDef)]
    if not classes:
        raise LiveError(f"{code_path}: defines no class (expected a backtesting.py Strategy)")
    return StrategySource(code, params, classes[-1], str(path), dataset)


# ---------------------------------------------------------------- decisions -> orders
class OrdinalIds:
    """The strategy broker's order numbers -> our client ids, for its cancels; the last ``cap`` only.

    A backtesting.py strategy cancels orders still waiting in its broker, so a bounded map is
    enough and keeps a months-long run's memory flat.

    >>> ids = OrdinalIds(cap=2)
    >>> for cid in ("a", "b", "c"):
    ...     _ = ids.add(cid)
    >>> ids.get(0), ids.get(2), len(ids)
    (None, 'c', 3)
    """

    def __init__(self, cap: int = ORDER_IDS_KEPT):
        from collections import OrderedDict

        self.cap = int(cap)
        self._ids: OrderedDict[int, str] = OrderedDict()
        self._next = 0

    def add(self, cid: str) -> int:
        ordinal, self._next = self._next, self._next + 1
        self._ids[ordinal] = cid
        while len(self._ids) > self.cap:
            self._ids.popitem(last=False)
        return ordinal

    def put(self, ordinal: int, cid: str) -> None:
        """Remember ``cid`` under the strategy broker's own number for it (live rows carry it)."""
        self._ids[ordinal] = cid
        self._next = max(self._next, ordinal + 1)
        while len(self._ids) > self.cap:
            self._ids.popitem(last=False)

    def get(self, ordinal: int) -> str | None:
        return self._ids.get(ordinal)

    def __len__(self) -> int:
        """Orders numbered so far (remembered or not)."""
        return self._next


@dataclass
class Decision:
    """One decision of the strategy at a bar, as the router sees it."""

    bar: int
    time: pd.Timestamp
    seq: int
    kind: int
    size: float
    limit: float
    stop: float
    sl: float
    tp: float
    ref: int
    tag: Any
    cid: ClientOrderId

    @property
    def side(self) -> str:
        return "buy" if self.size > 0 else "sell"

    @property
    def what(self) -> str:
        return ("order", "sl/tp", "close", "cancel")[self.kind]

    def to_event(self) -> dict:
        return {"bar": self.bar, "bar_time": self.time, "seq": self.seq, "decision": self.what,
                "size": self.size, **{k: getattr(self, k) for k in ("limit", "stop", "sl", "tp")
                                      if not math.isnan(getattr(self, k))},
                "ref": self.ref if self.ref >= 0 else None, "tag": self.tag, "client_order_id": str(self.cid)}


class CannotExpress(MoondevError):
    """A decision the exchange route has no order type for (named in the message)."""


class Route:
    """How decisions become orders on one kind of exchange. Subclass and register in ``ROUTES``."""

    def __init__(self, exchange, symbol: str, unit: float = 1.0):
        self.exchange, self.symbol, self.unit = exchange, symbol, float(unit)
        self.ordinal_cids = OrdinalIds()

    def position(self) -> float:
        """The account's position in the strategy's units."""
        raise NotImplementedError

    def check(self, d: Decision) -> None:
        """Raise :class:`CannotExpress` if this decision has no order type here."""

    def send(self, d: Decision, price: float) -> Order | list[Order] | None:
        raise NotImplementedError

    def cancel_cid(self, ref: int) -> str | None:
        return self.ordinal_cids.get(ref)

    def number(self, d: Decision) -> None:
        """Remember a decision's client id under the strategy broker's number for its order."""
        if d.kind in (_NEW, _CLOSE):
            self.ordinal_cids.add(str(d.cid))

    # Hooks for routes that keep orders of their own on the exchange (sl/tp placed after a fill).
    def observe(self, d: Decision, order: Order | None = None) -> None:
        """A decision that is not sent now (replayed after a restart, or found sent already)."""

    def sync(self, place: bool = True) -> list[Order]:
        """Once a bar, before its decisions: the route's own follow-up orders (``place=False``: only learn
        what filled; after a restart the re-decided bar places at its end)."""
        return []

    def bar_done(self) -> None:
        """After a bar's decisions; raise :class:`CannotExpress` for a shape only the whole bar shows."""

    def resume(self, open_orders: list[Order], strategy: str, through: pd.Timestamp | None = None) -> list[Order]:
        """After a restart's rebuild: settle the route's own orders with what the exchange holds (set by
        bars up to ``through``, the last committed one)."""
        return []

    def unseen_fills(self, after_ms: int) -> float:
        """Units the exchange filled on the route's resting orders at or after ``after_ms`` (signed)."""
        return 0.0


class PaperRoute(Route):
    """Everything backtesting.py can do: the paper exchange runs the same broker."""

    def position(self) -> float:
        return self.exchange.position

    def send(self, d: Decision, price: float) -> Order | None:
        ex = self.exchange
        if d.kind == _CANCEL:
            cid = ex.client_order_id(d.ref)
            return ex.cancel_order(cid, self.symbol) if cid else None
        params: dict = {"size": d.size, "tag": d.tag}
        if d.kind == _NEW:
            type_ = "stop_limit" if not math.isnan(d.limit) and not math.isnan(d.stop) else \
                "limit" if not math.isnan(d.limit) else "stop" if not math.isnan(d.stop) else "market"
            params.update({k: getattr(d, k) for k in ("stop", "sl", "tp") if not math.isnan(getattr(d, k))})
            order_price = None if math.isnan(d.limit) else d.limit
        elif d.kind == _CLOSE:
            type_, order_price = "market", None
            params.update(trade=d.ref, close=True)
        else:  # a trade's new SL (stop) or TP (limit)
            is_sl = not math.isnan(d.stop)
            type_, order_price = ("stop", None) if is_sl else ("limit", d.limit)
            params.update(trade=d.ref, **({"stop": d.stop} if is_sl else {}))
        amount = abs(d.size) if abs(d.size) >= 1 else max(abs(d.size) * ex.equity / price, 0.0)
        return ex.create_order(self.symbol, type_, d.side, amount, order_price, client_order_id=d.cid, params=params)


#: Exchange kinds -> their route (extend with :func:`register_route`); "module:Class" is imported on use.
ROUTES: dict[str, type[Route] | str] = {"paper": PaperRoute, "ccxt": "moondev_lab._ccxt_route:CcxtRoute"}


def register_route(name: str, route: type[Route] | str) -> None:
    """Make ``route`` the way decisions reach exchanges of kind ``name``."""
    ROUTES[name] = route


def route_class(name: str) -> type[Route]:
    route = ROUTES[name]
    if isinstance(route, str):
        import importlib

        module, _, cls = route.partition(":")
        route = ROUTES[name] = getattr(importlib.import_module(module), cls)
    return route


# ---------------------------------------------------------------- the runner
class LiveRunner:
    """Runs one strategy on one exchange and symbol (see the module doc).

    ``exchange`` is a :class:`~moondev_lab.paper.PaperExchange` or an
    :class:`~moondev_lab.exchange.ExchangeManager`. ``state_dir`` holds the event log,
    the runner's progress and the ``KILL`` file. ``warmup_bars``: history fetched before
    the first decision when trading live. ``on_event`` gets every event (CLI ``--json``).
    ``size_at_send``: turn fraction-of-equity sizes into units at the decision bar's close
    (default: live yes, paper no).
    """

    def __init__(self, source: StrategySource, exchange, *, symbol: str, timeframe: str = "15m",
                 state_dir: Path | str, settings: BacktestSettings | None = None,
                 limits: RiskLimits | None = None, window: int = 1000, warmup_bars: int = 1000,
                 unit: float = 1.0, on_event: Callable[[str, dict], None] | None = None,
                 clock: Callable[[], float] = time.time, timeout: float = 60.0, size_at_send: bool | None = None):
        self.source = source
        self.exchange = exchange
        self.symbol, self.timeframe = symbol, timeframe
        self.state_dir = Path(state_dir)
        self.settings = settings or BacktestSettings()
        self.paper = getattr(exchange, "name", "") == "paper"
        # Fraction-of-equity sizes become units when deciding (at the bar's close), as a live order needs;
        # the paper exchange can wait for the fill, as backtesting.py does (parity may ask for the live rule).
        self.size_at_send = not self.paper if size_at_send is None else bool(size_at_send)
        self.route: Route = route_class("paper" if self.paper else "ccxt")(exchange, symbol, unit)
        self.kill_switch = KillSwitch(self.state_dir / "KILL")
        self.guard = RiskGuard(limits or RiskLimits(), self.kill_switch)
        self.events = EventLog(self.state_dir / "events.sqlite")
        self.window, self.warmup_bars, self.timeout = int(window), int(warmup_bars), float(timeout)
        self.on_event = on_event
        self.clock = clock
        self.state = RunnerState.NEW
        self.stop_reason: str | None = None
        self.session: StrategySession | None = None
        code_hash = hashlib.sha256(source.code.encode()).hexdigest()[:12]
        self.strategy_id = f"{source.name}:{code_hash}:{json.dumps(source.params, sort_keys=True, default=str)}"
        self._db: sqlite3.Connection | None = None
        # A trailing window of candles: ``_times[k]`` is bar ``_base + k``. The strategy's own history
        # lives in its session; here only bars not yet handed over, plus ``history_bars`` before them.
        self._times = np.empty(0, "M8[ns]")
        self._ohlcv = np.empty((0, 5))
        self._base = 0
        self.history_bars = self.window + max(self.warmup_bars, 0)
        self._n = 0                       # bars the strategy has seen
        self._done = -1                   # last bar whose decisions were all handled (committed)
        self._unsure_until = -1           # after a restart: bars whose orders may be partly sent already
        self._tags: list = []
        self.last_bar: pd.Timestamp | None = None
        self.last_order: str | None = None
        self.position = 0.0
        self.equity = math.nan
        self.strategy_start: int | None = None   # the first bar next() ran on (warm-up + 1), once known
        self.counts = {"bars": 0, "decisions": 0, "orders": 0, "fills": 0, "refused": 0}

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> "LiveRunner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.session is not None:
            self.session.close()
            self.session = None
        self.kill_switch.close()
        self.events.close()
        if self._db is not None:
            self._db.close()
            self._db = None
        self.state = RunnerState.CLOSED

    def _emit(self, event: str, /, **data) -> None:
        self.events.append(event, **data)
        if self.on_event is not None:
            self.on_event(event, data)

    def _stop(self, reason: str) -> None:
        if self.state != RunnerState.STOPPED:
            self.state = RunnerState.STOPPED
            self.stop_reason = reason
            self._emit("stopped", reason=reason)

    def _progress_db(self) -> sqlite3.Connection:
        if self._db is None:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.state_dir / "runner.sqlite", isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("CREATE TABLE IF NOT EXISTS progress (id INTEGER PRIMARY KEY CHECK (id = 1), strategy TEXT, "
                       "symbol TEXT, first_time INTEGER, history INTEGER, done INTEGER)")
            self._db = db
        return self._db

    def _stored(self) -> tuple | None:
        return self._progress_db().execute("SELECT strategy, symbol, first_time, history, done FROM progress").fetchone()

    def _save_progress(self, first_time: int, history: int) -> None:
        self._progress_db().execute("INSERT OR REPLACE INTO progress VALUES (1, ?, ?, ?, ?, ?)",
                                    (self.strategy_id, self.symbol, first_time, history, self._done))

    # ------------------------------------------------------------------ start
    def start(self, history: pd.DataFrame | None = None, *, capacity: int = 0) -> dict:
        """Open the sandbox session, reconcile with the exchange, rebuild the strategy's state.

        ``history``: the candles to start from (a replay passes its data, from its first bar);
        without it they are fetched (``warmup_bars`` closed candles, or from the stored start).
        ``capacity``: bars the session will see in all, when known (a replay): its buffers are
        then allocated once instead of growing.
        """
        unsupported = [k for k in ("exclusive_orders", "hedging") if getattr(self.settings, k, False)]
        if unsupported and not self.paper:
            # Both make the strategy's broker close trades on its own (not decisions the route could send).
            raise LiveError(f"{', '.join(unsupported)}=True is not supported by the live route: its broker's "
                            "own closes are not orders the exchange would see; trade it on paper")
        self.state = RunnerState.STARTING
        self.kill_switch.install() if _main_thread() else None
        if getattr(self.exchange, "state", None) is not None and self.exchange.state.value == "new":
            self.exchange.start()
        stored = self._stored()
        if stored is not None and stored[0] != self.strategy_id:
            raise LiveError(f"{self.state_dir} holds the state of another strategy ({stored[0][:80]}); "
                            "use another --state folder")
        self._reconcile()
        if history is None:
            history = self._fetch_history(stored)
        times, ohlcv = bars_of(history)
        if stored is not None:
            first = np.datetime64(int(stored[2]), "ns")
            at = int(np.searchsorted(times, first))
            if at >= len(times) or times[at] != first:
                raise LiveError("the candles the stored run started from are not available any more; "
                                "cannot rebuild the strategy's state")
            times, ohlcv = times[at:], ohlcv[at:]
            n_history, self._done = int(stored[3]), int(stored[4])
        else:
            n_history = self._history_length(len(times))
        self.session = StrategySession(self.source.code, params=self.source.params, settings=self.settings,
                                       window=self.window, timeout=self.timeout, size_at_send=self.size_at_send)
        try:
            self.session.open()
            info = self.session.start(times[:n_history], ohlcv[:n_history], capacity=capacity)
        except SessionError as e:
            self._stop(f"the strategy could not start: {e}")
            raise LiveError(f"the strategy could not start: {e}") from None
        self._times, self._ohlcv, self._base, self._n = times, ohlcv, 0, n_history
        if stored is None:
            self._done = n_history - 1
            self._save_progress(int(times[0].astype("M8[ns]").astype(np.int64)), n_history)
        self._emit("start", strategy=self.source.name, params=self.source.params, symbol=self.symbol,
                   exchange=getattr(self.exchange, "name", "?"), history=n_history, resumed=stored is not None,
                   warmup=info["warmup"], indicators=info["indicators"], layers=self.session.layers)
        self.state = RunnerState.TRADING
        if stored is not None and self._done >= self._n:
            self._rebuild(self._done)
        if not self.paper and self.state == RunnerState.TRADING:
            through = pd.Timestamp(self._times[self._done - self._base]).tz_localize("UTC") \
                if self._base <= self._done < self._base + len(self._times) else None
            self._route_call(lambda: self.route.resume(self.exchange.fetch_open_orders(self.symbol),
                                                       self.source.name, through), "after the restart")
        self._trim()
        return info

    def _route_call(self, fn: Callable[[], Any], when: str) -> None:
        """The route's own follow-up orders (sl/tp after a fill, ...), logged; a refusal stops trading."""
        try:
            orders = fn() or []
        except CannotExpress as e:
            self.counts["refused"] += 1
            self._emit("refused", client_order_id=None, reason=str(e), cause="order type")
            self._stop(f"cannot express the strategy's order on this exchange: {e}")
            return
        except ExchangeError as e:
            self.counts["refused"] += 1
            self._emit("refused", client_order_id=None, reason=str(e), cause=type(e).__name__)
            self._stop(f"the route's own orders {when}: {e}")
            return
        self._emit_orders(orders)

    def _trim(self) -> None:
        """Forget candles the strategy has seen, but for the last ``history_bars`` (amortised: in batches)."""
        drop = self._n - self._base - self.history_bars
        if drop >= max(self.history_bars, 1):
            self._times, self._ohlcv = self._times[drop:].copy(), self._ohlcv[drop:].copy()
            self._base += drop

    def _bars(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """Bars ``lo`` to ``hi - 1`` (global numbers) of the trailing window."""
        return self._times[lo - self._base:hi - self._base], self._ohlcv[lo - self._base:hi - self._base]

    def _history_length(self, available: int) -> int:
        if self.paper and self.warmup_bars <= 0:
            return 1
        return max(1, min(self.warmup_bars, available))

    def _reconcile(self) -> None:
        self.state = RunnerState.RECONCILING
        known = [Order.from_dict(d) for d in self._known_orders()]
        try:
            report = self.exchange.reconcile(known, symbols=[self.symbol], strategy=self.source.name)
        except (ReconciliationError, ExchangeError) as e:
            self._stop(f"reconciliation could not complete: {e}")
            raise LiveError(f"reconciliation could not complete, so nothing will be traded: {e}") from None
        self._emit("reconciled", updated=len(report.updated), missing=len(report.missing),
                   adopted=len(report.adopted), canceled=len(report.canceled), ignored=len(report.ignored))

    def _known_orders(self) -> list[dict]:
        frame = self.events.frame("order")
        if frame.empty or "order.client_order_id" not in frame:
            return []
        last = frame.drop_duplicates("order.client_order_id", keep="last")
        cols = [c for c in last.columns if c.startswith("order.")]
        rows = last[cols].rename(columns=lambda c: c[len("order."):]).to_dict("records")
        return [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
                for r in rows if r.get("status") in ("submitted", "accepted", "partially_filled", "in_flight")]

    def _fetch_history(self, stored) -> pd.DataFrame:
        rows = self.exchange.fetch_ohlcv(self.symbol, self.timeframe, since=int(stored[2]) // 1_000_000
                                         if stored else None, limit=None if stored else self.warmup_bars + 1)
        frame = self._closed_frame(rows)
        if frame.empty:
            raise LiveError(f"{self.symbol} {self.timeframe}: the exchange returned no closed candles")
        return frame

    def _closed_frame(self, rows) -> pd.DataFrame:
        """Candles as a frame, without the still-forming one (its close time is in the future)."""
        if not rows:
            return pd.DataFrame(columns=["Open", "High", "Low", "Close", "Volume"])
        a = np.asarray(rows, dtype=float)
        step_ms = _timeframe_ms(self.timeframe)
        now_ms = self.clock() * 1000
        a = a[a[:, 0] + step_ms <= now_ms]
        idx = pd.to_datetime(a[:, 0].astype(np.int64), unit="ms", utc=True)
        return pd.DataFrame(a[:, 1:6], index=idx, columns=["Open", "High", "Low", "Close", "Volume"])

    def _rebuild(self, done: int) -> None:
        """Replay bars up to ``done`` without sending: restores the strategy's state (checked below)."""
        lo = self._n
        result = self.session.step(*self._bars(lo, done + 1))
        self._tags = result.tags
        self._n = done + 1
        seq, last = 0, None
        for row in result.decisions:
            if not lo <= row[0] <= done:  # (a hostile session's bar number: not one of these bars)
                continue
            seq = seq + 1 if row[0] == last else 0
            last = row[0]
            d = self._decision(row, seq)
            self.route.number(d)
            self.route.observe(d)
        self.position, self.equity = result.position, result.equity
        # A paper clock ahead of us is checked at the next chunk. A live account may already hold what the
        # orders of bar done (or of done + 1, when the crash came in its middle) bought: they fill when sent,
        # the strategy's broker at the next open. So live, the first exact check is after bar done + 2.
        if self.paper and self.exchange.bar <= done:
            self._check_position(result.position, "after the restart")
        self._unsure_until = done + 1
        self._emit("rebuilt", bars=self._n, position=result.position)

    def _decision(self, row, seq: int) -> Decision:
        bar, kind, size, limit, stop, sl, tp, ref, tag = row
        t = pd.Timestamp(self._times[bar - self._base]).tz_localize("UTC")
        cid = ClientOrderId.make(self.source.name, t, seq)
        return Decision(bar, t, seq, kind, size, limit, stop, sl, tp, ref,
                        self._tags[tag] if 0 <= tag < len(self._tags) else None, cid)

    def _check_position(self, shadow: float, when: str, as_of_ms: int | None = None) -> None:
        account = self.route.position()
        if as_of_ms is not None and abs(account - shadow) > 1e-6 * max(1.0, abs(shadow)):
            # The exchange may have filled a resting order (an sl/tp, a stop entry) in the bar after this
            # one, before we got to this one: the account as of this bar's close is without those fills.
            account -= self.route.unseen_fills(as_of_ms)
        if abs(account - shadow) > 1e-6 * max(1.0, abs(shadow)):
            self._stop(f"position drift {when}: the account holds {account:.8g}, the strategy believes {shadow:.8g}")

    # ------------------------------------------------------------------ bars
    def feed(self, frame: pd.DataFrame, *, chunk: int = REPLAY_CHUNK) -> None:
        """Closed candles after the ones seen so far (a replay's rest, or what polling found)."""
        times, ohlcv = bars_of(frame)
        seen = self._n - self._base
        if self._n and len(times):
            keep = times > self._times[seen - 1]
            times, ohlcv = times[keep], ohlcv[keep]
        if not len(times):
            return
        self._times = np.concatenate([self._times[:seen], times])
        self._ohlcv = np.concatenate([self._ohlcv[:seen], ohlcv])
        end = self._base + len(self._times)
        ahead = None  # paper: the chunk the session decides while this process settles the one before
        try:
            while self._n < end and self.state == RunnerState.TRADING:
                lo = self._n
                hi = ahead or min(lo + chunk, end)
                if ahead is None:
                    # the paper exchange's clock must not run ahead of the strategy: one chunk at a time
                    position = self.route.position() if self.paper and self.exchange.bar < lo else None
                    self.session.step_send(*self._bars(lo, hi), position=position)
                result, ahead = self.session.step_result(), None
                if self.paper and hi < end:
                    # Paper fills follow the strategy's own broker's rules, so the next chunk's decisions
                    # do not wait on this one's fills: send it now; its position is checked here instead.
                    ahead = min(hi + chunk, end)
                    self.session.step_send(*self._bars(hi, ahead), position=None)
                self._step(lo, hi, result)
                if self.kill_switch.engaged and self.state == RunnerState.TRADING:
                    self._stop(f"kill switch: {self.kill_switch.engaged}")
        except SessionError as e:
            ahead = None
            self._stop(f"strategy session: {e}")
        finally:
            if ahead is not None and self.session.state == SessionState.RUNNING:
                try:  # stopped with a chunk still out: take its answer, so the session stays in step
                    self.session.step_result()
                except SessionError:
                    pass
        self._trim()

    def _step(self, lo: int, hi: int, result: StepResult) -> None:
        """Bars ``lo..hi-1`` through the route, with the session's decisions for them."""
        self._tags = result.tags
        self.strategy_start = result.start
        by_bar: dict[int, list] = {}
        for row in result.decisions:
            by_bar.setdefault(int(row[0]), []).append(row)
        if not self.paper and hi - 1 > self._unsure_until:
            # A live market order fills when sent, the strategy's broker fills it at the next bar's open:
            # so the account now (before this bar's orders) must hold what the broker holds after this bar.
            closed = int(self._times[hi - 1 - self._base].astype("M8[ms]").astype(np.int64)) + \
                _timeframe_ms(self.timeframe)
            self._check_position(result.position, f"at bar {hi - 1}", as_of_ms=closed)
        for i in range(lo, hi):
            if self.state != RunnerState.TRADING:
                break
            self._bar(i, by_bar.get(i, ()))
        self._n = hi
        self.position, self.equity = result.position, result.equity
        if result.stopped:
            self._stop(f"the strategy stopped: {result.stopped}")
        if self.paper and self.state == RunnerState.TRADING:
            # a paper chunk's next one was sent without the account's position: check it here
            self._check_position(result.position, f"at bar {hi - 1}")

    def _bar(self, i: int, rows) -> None:
        reason = self.kill_switch.engaged
        if reason:
            self._stop(f"kill switch: {reason}")
            return
        t = pd.Timestamp(self._times[i - self._base]).tz_localize("UTC")
        o, h, l_, c, v = (float(x) for x in self._ohlcv[i - self._base])
        if self.paper:
            for f in self.exchange.on_candle(i, t, o, h, l_, c, v):
                self.counts["fills"] += 1
                self._emit("fill", **f)
            self.guard.update_equity(self.exchange.equity, t)
        self.last_bar = t
        self.counts["bars"] += 1
        redecided = i <= self._unsure_until  # after a restart: its decisions may replace the route's orders
        if not self.paper and i > self._done:
            self._route_call(lambda: self.route.sync(place=not redecided), f"at bar {i}")
        seq = 0
        for row in rows:
            d = self._decision(row, seq)
            seq += 1
            self.counts["decisions"] += 1
            if i <= self._done:  # decided before a restart: sent already, or found missing by reconciliation
                continue
            self._handle(d, c)
            if self.state != RunnerState.TRADING:
                return
        if rows and i > self._done:
            self._route_call(self.route.bar_done, f"at bar {i}")
            if self.state != RunnerState.TRADING:
                return
        if not self.paper and i > self._done and redecided:
            self._route_call(self.route.sync, f"at bar {i}")
            if self.state != RunnerState.TRADING:
                return
        if i > self._done:
            self._done = i
            if rows or self.paper is False or i % 256 == 0:
                self._progress_db().execute("UPDATE progress SET done = ? WHERE id = 1", (i,))

    def _handle(self, d: Decision, price: float) -> None:
        self._emit("decision", **d.to_event())
        existing = self.exchange.fetch_order(d.cid, self.symbol) if d.kind != _CANCEL else None
        if existing is not None:  # sent before a crash: never again
            self.route.number(d)
            self.route.observe(d, existing)
            self._emit("order", order=existing.to_dict(), resent=False)
            return
        try:
            self.route.check(d)
            if d.kind in (_NEW, _CLOSE):
                equity = self.exchange.equity if self.paper else self.equity
                equity = self.settings.cash if not equity == equity else equity  # NaN before the first bar
                amount = abs(d.size) if abs(d.size) >= 1 else abs(d.size) * max(equity, 0.0) / price
                self.guard.check(d.side, amount * self.route.unit, price, position=self.route.position() * self.route.unit)
                self.route.equity = equity
            order = self.route.send(d, price)
        except CannotExpress as e:
            self.counts["refused"] += 1
            self._emit("refused", client_order_id=str(d.cid), reason=str(e), cause="order type")
            self._stop(f"cannot express the strategy's order on this exchange: {e}")
            return
        except RiskBreach as e:
            self.counts["refused"] += 1
            self._emit("refused", client_order_id=str(d.cid), reason=str(e), cause="risk")
            # The strategy believes the order exists: going on would trade a position it does not have.
            self._stop(f"risk limit: {e}")
            return
        except ExchangeError as e:
            self.counts["refused"] += 1
            order = getattr(e, "order", None)
            self._emit("refused", client_order_id=str(d.cid), reason=str(e), cause=type(e).__name__,
                       order=order.to_dict() if order is not None else None)
            if type(e).__name__ in ("OrderInFlight", "ReconciliationError"):
                self._stop(f"order {d.cid}: {e}")
            return
        self.route.number(d)
        self._emit_orders(order if isinstance(order, list) else [order] if order is not None else [])

    def _emit_orders(self, orders: list[Order]) -> None:
        for order in orders:
            self.counts["orders"] += 1
            self.last_order = f"{order.side} {order.amount:g} {order.type} ({order.status.value})"
            self._emit("order", order=order.to_dict())

    # ------------------------------------------------------------------ running
    def replay(self, frame: pd.DataFrame, *, finalize: bool | None = None) -> "LiveRunner":
        """Start on ``frame``'s first bar(s) and feed the rest (paper only): the parity path."""
        if self.state == RunnerState.NEW:
            self.start(frame, capacity=len(frame))
        self.feed(frame)
        if self.paper and (self.settings.finalize_trades if finalize is None else finalize) \
                and self.state == RunnerState.TRADING:
            for f in self.exchange.finalize():
                self._emit("fill", **f)
        return self

    def poll(self) -> int:
        """Fetch candles, feed the newly closed ones; returns how many were new."""
        if self.kill_switch.engaged:
            self._stop(self.kill_switch.engaged)
            return 0
        since = int(self._times[self._n - 1 - self._base].astype("M8[ms]").astype(np.int64)) if self._n else None
        frame = self._closed_frame(self.exchange.fetch_ohlcv(self.symbol, self.timeframe, since=since))
        before = self._n
        self.feed(frame, chunk=1)
        return self._n - before

    def run(self, *, interval: float = 5.0, max_bars: int | None = None, status: Callable[[str], None] | None = None,
            sleep: Callable[[float], None] = time.sleep) -> None:
        """Poll until stopped (kill switch, SIGTERM, risk, an error) or ``max_bars`` new bars."""
        seen = 0
        while self.state == RunnerState.TRADING:
            seen += self.poll()
            if status is not None:
                status(self.status_line())
            if max_bars is not None and seen >= max_bars:
                break
            if self.state == RunnerState.TRADING:
                sleep(interval)

    def session_start(self) -> int | None:
        """The first bar the strategy's ``next()`` runs on (its warm-up + 1), once known."""
        return self.strategy_start

    # ------------------------------------------------------------------ status
    def status(self) -> dict:
        return {"state": self.state.value, "position": self.position, "equity": self.equity,
                "last_bar": self.last_bar.isoformat() if self.last_bar is not None else None,
                "last_order": self.last_order, "stop_reason": self.stop_reason, **self.counts}

    def status_line(self) -> str:
        s = self.status()
        bar = f"{self.last_bar:%Y-%m-%d %H:%M}" if self.last_bar is not None else "-"
        eq = f"{s['equity']:.2f}" if not math.isnan(s["equity"]) else "-"
        why = f" ({s['stop_reason']})" if s["stop_reason"] else ""
        return (f"{s['state']}{why} | position {s['position']:g} | equity {eq} | last bar {bar} | "
                f"last order {s['last_order'] or '-'} | bars {s['bars']} orders {s['orders']} fills {s['fills']}")

    def __repr__(self) -> str:
        return f"LiveRunner({self.source.name} on {getattr(self.exchange, 'name', '?')} {self.symbol}: {self.status_line()})"


def _timeframe_ms(tf: str) -> int:
    units = {"m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}
    try:
        return int(tf[:-1]) * units[tf[-1]]
    except (KeyError, ValueError):
        raise LiveError(f"unknown timeframe {tf!r} (e.g. 1m, 15m, 1h, 1d)") from None


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
