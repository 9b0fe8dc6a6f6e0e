"""``PaperExchange``: the default exchange, filling orders with backtesting.py's rules, bar by bar.

It has the :class:`~moondev_lab.exchange.ExchangeManager` interface (``start``/``close``/``state``,
``fetch_ohlcv``, ``fetch_balance``, ``create_order``, ``fetch_order``, ``fetch_open_orders``,
``cancel_order``, ``reconcile``) and one more call, :meth:`on_candle`, which is the paper
exchange's clock: each closed candle fills what it allows. The fills are the trusted
broker's (:class:`~moondev_lab.broker.BrokerCore`, backtesting.py 0.6.6's ``_Broker`` in numba):
there is one implementation of the fill rules in the project, and this is a client of it.

- Market orders fill at the next candle's open (its close with ``trade_on_close``), stop and
  limit orders at their price or the gapped open, SL before TP in one bar, commission at
  entry and exit, spread at entry, sizes as a fraction of available margin (whole units at
  fill time) or whole units. ``params`` carry what ccxt has no field for: ``size`` (the
  strategy's signed size), ``stop``, ``sl``, ``tp``, ``tag``, ``trade`` (the trade a
  close or SL/TP belongs to).
- ``slippage`` (a fraction, off by default and for parity) is added to the spread paid at entry.
- With a ``path``, the state (broker arrays, orders, fills) lives in SQLite in WAL mode and
  is committed once per event (order, cancel, candle that filled), so a kill -9 loses
  nothing that was acknowledged; ``path=None`` keeps the broker in memory (parity replays).
- Memory stays flat however long it runs: only *open* orders are held in memory; finished
  orders and every fill live in SQLite only (the state file, or with ``path=None`` a
  scratch file deleted on ``close()``) and are read back on demand (``fetch_order``,
  ``fills()``, ``orders_frame()``).

>>> paper = PaperExchange(symbol="BTC/USDT").start()
>>> paper.on_candle(0, "2024-01-01 00:00", 100, 101, 99, 100, 1.0)
[]
>>> order = paper.create_order("BTC/USDT", "market", "buy", 10, client_order_id="ml-demo-000000-240101000000-0")
>>> [f["fill"] for f in paper.on_candle(1, "2024-01-01 00:15", 102, 103, 101, 103, 1.0)]
['entry']
>>> paper.fetch_order("ml-demo-000000-240101000000-0", "BTC/USDT").status.value, paper.position
('filled', 10.0)
"""
from __future__ import annotations

import io
import json
import math
import sqlite3
import tempfile
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

from .broker import BrokerCore
from .errors import ExchangeStateError, InsufficientFunds, OrderNotFound, OrderRejected
from .exchange.manager import ReconcileReport, State
from .exchange.orders import Balance, ClientOrderId, Order, OrderState
from .sandbox.settings import BacktestSettings

__all__ = ["PaperExchange"]

_KINDS = ("order", "sl", "tp", "close")
#: Candle times kept in memory (the state file stores the last 4; finalize needs the last one).
_TIMES_KEPT = 8


class PaperExchange:
    """A simulated account on one symbol, with the ExchangeManager interface (see the module doc).

    ``candles`` (a backtesting.py frame) answers ``fetch_ohlcv`` (e.g. a replay's data).
    The constructor does no I/O; ``start()`` opens or creates the state file.
    """

    name = "paper"

    def __init__(self, path: Path | str | None = None, *, symbol: str = "BTC/USDT",
                 settings: BacktestSettings | None = None, candles: pd.DataFrame | None = None,
                 slippage: float = 0.0):
        self.path = Path(path) if path is not None else None
        self.symbol = symbol
        base = settings or BacktestSettings()
        self.settings = replace(base, spread=base.spread + slippage) if slippage else base
        self.slippage = float(slippage)
        self.candles = candles
        self._state = State.NEW
        self._lock = threading.RLock()
        self._db: sqlite3.Connection | None = None
        self._core: BrokerCore | None = None
        # Open orders only: a finished one is written to SQLite and dropped from memory (_commit).
        self._orders: dict[str, Order] = {}
        self._meta: dict[str, dict] = {}           # cid -> {ordinal, kind, trade, bar}
        self._by_ordinal: dict[int, str] = {}
        self._scratch: tempfile.TemporaryDirectory | None = None
        self._times: dict[int, str] = {}           # the last few candles' times (bounded: _TIMES_KEPT)
        self._dirty: set[str] = set()
        self.transitions: list[tuple[State, State]] = []

    # ------------------------------------------------------------------ lifecycle
    @property
    def state(self) -> State:
        return self._state

    def _to(self, new: State) -> None:
        self.transitions.append((self._state, new))
        self._state = new

    def start(self) -> "PaperExchange":
        with self._lock:
            if self._state == State.READY:
                return self
            if self._state == State.CLOSED:
                raise ExchangeStateError("paper exchange is closed; make a new one", exchange=self.name)
            self._to(State.CONNECTING)
            self._core = BrokerCore(self.settings)
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")
            else:  # no durability wanted, but finished orders and fills still leave memory
                self._scratch = tempfile.TemporaryDirectory(prefix="moondev_paper_")
                db = sqlite3.connect(Path(self._scratch.name) / "paper.sqlite", check_same_thread=False,
                                     isolation_level=None)
                db.execute("PRAGMA journal_mode=OFF")
                db.execute("PRAGMA synchronous=OFF")
            db.execute("CREATE TABLE IF NOT EXISTS core (id INTEGER PRIMARY KEY CHECK (id = 1), meta TEXT, arrays BLOB)")
            db.execute("CREATE TABLE IF NOT EXISTS orders (cid TEXT PRIMARY KEY, ordinal INTEGER, data TEXT)")
            db.execute("CREATE INDEX IF NOT EXISTS orders_ordinal ON orders (ordinal)")
            db.execute("CREATE TABLE IF NOT EXISTS fills (id INTEGER PRIMARY KEY, data TEXT)")
            self._db = db
            if self.path is not None:
                self._load()
            self._to(State.READY)
            return self

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None
            if self._scratch is not None:
                self._scratch.cleanup()
                self._scratch = None
            if self._state != State.CLOSED:
                self._to(State.CLOSED)

    def __enter__(self) -> "PaperExchange":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        if self._core is None:
            return f"PaperExchange({self.symbol}, {self._state.value})"
        return (f"PaperExchange({self.symbol}, {self._state.value}, bar {self._core.bar}, "
                f"position {self.position:g}, equity {self._core.last_equity:.2f}, "
                f"{len(self.open_orders())} open orders)")

    def _ready(self) -> BrokerCore:
        if self._state != State.READY or self._core is None:
            raise ExchangeStateError(f"paper exchange is {self._state.value}; call start() first", exchange=self.name)
        return self._core

    # ------------------------------------------------------------------ persistence
    def _load(self) -> None:
        row = self._db.execute("SELECT meta, arrays FROM core WHERE id = 1").fetchone()
        if row is None:
            return
        meta = json.loads(row[0])
        with np.load(io.BytesIO(row[1])) as z:
            meta["arrays"] = {k: z[k] for k in z.files}
        self._core = BrokerCore.from_state(meta)
        self._times = {int(k): v for k, v in meta.get("times", {}).items()}
        for cid, ordinal, data in self._db.execute("SELECT cid, ordinal, data FROM orders"):
            d = json.loads(data)
            order = Order.from_dict(d["order"])
            if not order.status.open:  # finished: stays in SQLite only
                continue
            self._orders[cid] = order
            self._meta[cid] = d["meta"]
            if ordinal is not None and ordinal >= 0:
                self._by_ordinal[int(ordinal)] = cid

    def _stored_order(self, where: str, key) -> tuple[str, Order, dict] | None:
        row = self._db.execute(f"SELECT cid, data FROM orders WHERE {where} = ?", (key,)).fetchone() \
            if self._db is not None else None
        if row is None:
            return None
        d = json.loads(row[1])
        return row[0], Order.from_dict(d["order"]), d["meta"]

    def _find(self, cid: str) -> Order | None:
        """An order by id: open ones from memory, finished ones from SQLite."""
        order = self._orders.get(cid)
        if order is None:
            stored = self._stored_order("cid", cid)
            order = stored[1] if stored is not None else None
        return order

    def _commit(self, new_fills: Iterable[dict] = ()) -> None:
        """One transaction per event: the broker state, the orders it touched, its fills.

        Finished orders leave memory here, once written. Without a ``path`` only what leaves
        memory is written (finished orders, fills), to the scratch file.
        """
        new_fills = list(new_fills)
        durable = self.path is not None
        finished = [cid for cid in self._dirty if not self._orders[cid].status.open]
        if not durable and not finished and not new_fills:
            self._dirty.clear()
            return
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            if durable:
                self._write_core(db)
            for cid in self._dirty if durable else finished:
                m = self._meta[cid]
                db.execute("INSERT OR REPLACE INTO orders (cid, ordinal, data) VALUES (?, ?, ?)",
                           (cid, m.get("ordinal"), json.dumps({"order": self._orders[cid].to_dict(), "meta": m},
                                                             default=_plain)))
            db.executemany("INSERT INTO fills (data) VALUES (?)", [(json.dumps(f, default=_plain),) for f in new_fills])
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self._dirty.clear()
        for cid in finished:
            ordinal = self._meta.pop(cid).get("ordinal")
            del self._orders[cid]
            if ordinal is not None and self._by_ordinal.get(int(ordinal)) == cid:
                del self._by_ordinal[int(ordinal)]

    def _write_core(self, db: sqlite3.Connection) -> None:
        core = self._core
        arrays = core._state  # BrokerCore's flat arrays, stored as raw bytes (state() makes lists: slow)
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        meta = {"format": 1, "settings": core.settings.kwargs(), "bar": core.bar, "last_candle": core._last_candle,
                "last_close": core.last_close, "last_equity": core.last_equity,
                "tags": list(core._tags.values), "times": {str(k): v for k, v in list(self._times.items())[-4:]}}
        db.execute("INSERT OR REPLACE INTO core (id, meta, arrays) VALUES (1, ?, ?)",
                   (json.dumps(meta, default=_plain), buf.getvalue()))

    # ------------------------------------------------------------------ the clock
    @property
    def bar(self) -> int:
        """The last candle processed (-1 before the first)."""
        return self._ready().bar

    def on_candle(self, bar: int, time, open: float, high: float, low: float, close: float,
                  volume: float = 0.0) -> list[dict]:
        """Process one closed candle: fill what it allows. Returns its fills (entries and exits).

        A candle at or before the last one processed is ignored (a restart replays safely).
        """
        with self._lock:
            core = self._ready()
            if bar <= core.bar:
                return []
            K = core._K
            s = core._state
            before_q = set(s["qi"][:int(s["cnt"][K.C_NQ]), K.Q_ORD].tolist())
            n_trades, n_closed = int(s["cnt"][K.C_NTRADES]), int(s["cnt"][K.C_NCLOSED])
            cancels = int(s["cnt"][K.C_MARGIN_CANCELS])
            when = _iso(time)
            self._times[int(bar)] = when
            while len(self._times) > _TIMES_KEPT:
                del self._times[next(iter(self._times))]
            core.next_bar(int(bar), open, high, low, close)
            fills = self._settle_bar(before_q, n_trades, n_closed, cancels, int(bar), when)
            if fills or self._dirty or self.path is not None and bar % 500 == 0:
                self._commit(fills)
            return fills

    def finalize(self) -> list[dict]:
        """Close every open trade at the last candle's open (``finalize_trades``)."""
        with self._lock:
            core = self._ready()
            K, s = core._K, core._state
            before_q = set(s["qi"][:int(s["cnt"][K.C_NQ]), K.Q_ORD].tolist())
            n_trades, n_closed = int(s["cnt"][K.C_NTRADES]), int(s["cnt"][K.C_NCLOSED])
            core.finalize()
            fills = self._settle_bar(before_q, n_trades, n_closed, int(s["cnt"][K.C_MARGIN_CANCELS]), core.bar,
                                     self._times.get(core.bar, ""))
            self._commit(fills)
            return fills

    def _settle_bar(self, before_q: set, n_trades: int, n_closed: int, cancels: int, bar: int, when: str) -> list[dict]:
        core = self._core
        K, s = core._K, core._state
        cnt = s["cnt"]
        fills = []
        tf, ti = s["tf"], s["ti"]
        for t in range(n_trades, int(cnt[K.C_NTRADES])):
            fills.append({"fill": "entry", "trade": t, "bar": int(ti[t, K.T_ENTRY_BAR]), "time": when,
                          "size": float(tf[t, K.T_SIZE]), "price": float(tf[t, K.T_ENTRY])})
        for t in s["closed"][n_closed:int(cnt[K.C_NCLOSED])].tolist():
            fills.append({"fill": "exit", "trade": int(t), "bar": int(ti[t, K.T_EXIT_BAR]), "time": when,
                          "size": float(tf[t, K.T_SIZE]), "price": float(tf[t, K.T_EXIT]),
                          "entry_price": float(tf[t, K.T_ENTRY]), "commission": float(tf[t, K.T_COMM])})
        nq = int(cnt[K.C_NQ])
        queue = s["qi"][:nq]
        now_q = set(queue[:, K.Q_ORD].tolist())
        dropped = int(cnt[K.C_MARGIN_CANCELS]) - cancels
        for ordinal in sorted(before_q - now_q):
            cid = self._by_ordinal.get(ordinal)
            if cid is None:
                continue
            order, meta = self._orders[cid], self._meta[cid]
            if meta["kind"] == "order" and dropped > 0 and not fills:
                self._advance(order, OrderState.CANCELED, "not enough cash (margin) to fill it")
                dropped -= 1
            elif meta["kind"] in ("sl", "tp") and not self._contingent_filled(meta):
                self._advance(order, OrderState.CANCELED, "its trade closed")
            else:
                self._advance(order, OrderState.FILLED)
                price = next((f["price"] for f in fills if f["trade"] == meta.get("trade")), None)
                price = price if price is not None else (fills[0]["price"] if fills else None)
                order.filled, order.average = order.amount, price
            self._dirty.add(cid)
        for r in range(nq):  # orders the broker made itself: a new trade's SL/TP, exclusive_orders' closes
            ordinal = int(queue[r, K.Q_ORD])
            if ordinal not in self._by_ordinal:
                kind = _KINDS[int(queue[r, K.Q_KIND])]
                size = float(s["qf"][r, K.Q_SIZE])
                price = float(s["qf"][r, K.Q_STOP] if kind == "sl" else s["qf"][r, K.Q_LIMIT])
                cid = ClientOrderId(f"paper-{ordinal}")
                order = Order(cid, str(ordinal), self.symbol, "buy" if size > 0 else "sell",
                              {"sl": "stop", "tp": "limit"}.get(kind, "market"), abs(size),
                              None if math.isnan(price) else price)
                self._advance(order, OrderState.SUBMITTED)
                self._advance(order, OrderState.ACCEPTED)
                self._track(cid, order, {"ordinal": ordinal, "kind": kind, "trade": int(queue[r, K.Q_TRADE]),
                                         "bar": bar})
        return fills

    def _contingent_filled(self, meta: dict) -> bool:
        """Did this SL/TP order close its trade (rather than being removed with it)?"""
        K, s = self._core._K, self._core._state
        t = meta.get("trade", -1)
        if t is None or t < 0 or s["ti"][t, K.T_EXIT_BAR] < 0:
            return False
        exit_price, size = float(s["tf"][t, K.T_EXIT]), float(s["tf"][t, K.T_SIZE])
        level = float(s["tf"][t, K.T_SL if meta["kind"] == "sl" else K.T_TP])
        if math.isnan(level):
            level = meta.get("price") or math.nan
        long = size > 0
        if meta["kind"] == "sl":
            return exit_price <= level if long else exit_price >= level
        return exit_price >= level if long else exit_price <= level

    @staticmethod
    def _advance(order: Order, state: OrderState, reason: str | None = None) -> None:
        if order.status.can_become(state) or order.status == state:
            order.advance(state, reason)

    def _track(self, cid: str, order: Order, meta: dict) -> None:
        self._orders[cid] = order
        self._meta[cid] = meta
        if meta.get("ordinal") is not None:
            self._by_ordinal[int(meta["ordinal"])] = cid
        self._dirty.add(cid)

    # ------------------------------------------------------------------ ExchangeManager interface
    def fetch_ohlcv(self, symbol: str, timeframe: str, since: int | None = None,
                    limit: int | None = None) -> list[list[float]]:
        """Candles of ``candles`` (ms, O, H, L, C, V), from ``since`` (ms), at most ``limit``."""
        self._ready()
        if self.candles is None:
            return []
        frame = self.candles
        ms = (frame.index.asi8 // 1_000_000) if frame.index.tz is None else (
            frame.index.tz_convert("UTC").asi8 // 1_000_000)
        lo = int(np.searchsorted(ms, since)) if since is not None else 0
        hi = len(frame) if limit is None else min(len(frame), lo + int(limit))
        vals = frame[["Open", "High", "Low", "Close", "Volume"]].to_numpy()[lo:hi]
        return [[int(t), *map(float, v)] for t, v in zip(ms[lo:hi], vals)]

    def fetch_balance(self) -> dict[str, Balance]:
        """Quote currency: equity at the last close (free = available margin); base: the position."""
        core = self._ready()
        base, _, quote = self.symbol.partition("/")
        equity = core.last_equity
        K, s = core._K, core._state
        used = sum(abs(float(s["tf"][t, K.T_SIZE])) * core.last_close for t in core._active()) * self.settings.margin
        free = max(0.0, equity - used) if not math.isnan(equity) else core.cash
        pos = float(self.position)
        return {quote or "USD": Balance(quote or "USD", free, equity - free, equity),
                base: Balance(base, max(pos, 0.0), 0.0, pos)}

    @property
    def position(self) -> float:
        """Signed units held (the sum of open trades)."""
        return float(self._ready().position_size)

    @property
    def equity(self) -> float:
        return float(self._ready().last_equity)

    def create_order(self, symbol: str, type: str, side: str, amount: float, price: float | None = None, *,
                     client_order_id: str, params: dict | None = None) -> Order:
        """Queue an order; it fills on the next candle(s). The same id again returns the same order."""
        with self._lock:
            core = self._ready()
            cid = ClientOrderId(client_order_id)
            known = self._find(cid)
            if known is not None:
                return known.copy()
            if symbol != self.symbol:
                raise OrderRejected(f"paper exchange trades {self.symbol} only, not {symbol}", exchange=self.name)
            p = dict(params or {})
            sign = 1.0 if side == "buy" else -1.0
            size = float(p.get("size", sign * float(amount)))
            if size == 0 or math.isnan(size) or (size > 0) != (side == "buy"):
                raise OrderRejected(f"order {cid}: size {size} does not match side {side}", exchange=self.name)
            limit = price if type in ("limit", "stop_limit") else None
            stop = p.get("stop") if type in ("stop", "stop_limit", "stop_market") else p.get("stop")
            trade = p.get("trade")
            order = Order(cid, None, symbol, side, type, abs(size) if abs(size) >= 1 else float(amount), price)
            order.advance(OrderState.SUBMITTED)
            tag = p.get("tag")
            K = core._K
            ordinal = int(core._state["cnt"][K.C_NEXT_ORD])
            try:
                if trade is None:
                    kind = "order"
                    core.submit(size, limit=limit, stop=stop, sl=p.get("sl"), tp=p.get("tp"), tag=tag)
                elif p.get("close"):
                    kind = "close"
                    core._event(K.E_CLOSE, size, math.nan, math.nan, math.nan, math.nan, int(trade), -1)
                else:  # a new SL (stop) or TP (limit) for an open trade
                    kind = "sl" if stop else "tp"
                    level = float(stop if stop else limit)
                    t = int(trade)
                    core._event(K.E_CONTINGENT, size, math.nan if stop else level, level if stop else math.nan,
                                math.nan, math.nan, t, int(core._state["ti"][t, K.T_TAG]))
            except Exception as e:  # the broker's own rule (e.g. SL < price < TP) refused it
                order.advance(OrderState.REJECTED, str(e))
                self._track(cid, order, {"ordinal": None, "kind": "order", "trade": trade, "bar": core.bar})
                self._commit()
                if "margin" in str(e):
                    raise InsufficientFunds(f"paper order {cid}: {e}", order=order.copy(), exchange=self.name) from None
                raise OrderRejected(f"paper order {cid}: {e}", order=order.copy(), exchange=self.name) from None
            order.exchange_id = str(ordinal)
            order.advance(OrderState.ACCEPTED)
            self._track(cid, order, {"ordinal": ordinal, "kind": kind, "trade": trade, "bar": core.bar,
                                     "price": price, "size": size})
            self._commit()
            return order.copy()

    def fetch_order(self, client_order_id: str, symbol: str) -> Order | None:
        with self._lock:
            self._ready()
            order = self._find(str(client_order_id))
            return order.copy() if order is not None else None

    def open_orders(self) -> list[Order]:
        return [o.copy() for o in self._orders.values() if o.status.open]

    def fetch_open_orders(self, symbol: str) -> list[Order]:
        with self._lock:
            self._ready()
            return [o for o in self.open_orders() if o.symbol == symbol]

    def cancel_order(self, client_order_id: str, symbol: str) -> Order:
        with self._lock:
            core = self._ready()
            cid = str(client_order_id)
            order = self._find(cid)
            if order is None:
                raise OrderNotFound(f"paper: no order {cid} on {symbol}", exchange=self.name)
            if not order.status.open:
                return order.copy()
            core.cancel(int(self._meta[cid]["ordinal"]))
            self._advance(order, OrderState.CANCELED, "canceled")
            self._dirty.add(cid)
            self._commit()
            return order.copy()

    def client_order_id(self, ordinal: int) -> str | None:
        """The id of the order the broker numbers ``ordinal`` (orders it made itself included)."""
        with self._lock:
            cid = self._by_ordinal.get(int(ordinal))
            if cid is None:
                stored = self._stored_order("ordinal", int(ordinal))
                cid = stored[0] if stored is not None else None
            return cid

    def reconcile(self, known_orders: Iterable[Order], *, symbols: Iterable[str] | None = None,
                  strategy: str | None = None, unknown: str = "cancel") -> ReconcileReport:
        """Match stored orders with the paper book (the book is the SQLite state itself)."""
        with self._lock:
            self._ready()
            report = ReconcileReport(symbols=[self.symbol])
            known = {str(o.client_order_id): o for o in known_orders}
            for cid, order in known.items():
                mine = self._find(cid)
                if mine is None:
                    report.missing.append(order.copy().advance(OrderState.REJECTED, "never reached the exchange")
                                          if order.status.can_become(OrderState.REJECTED) else order.copy())
                else:
                    report.updated.append(mine.copy())
            for cid, order in list(self._orders.items()):
                if cid in known or not order.status.open:
                    continue
                if cid.startswith("paper-") or order.client_order_id.ours and (
                        strategy is None or order.client_order_id.belongs_to(strategy)):
                    report.adopted.append(order.copy())
                elif unknown == "cancel":
                    report.canceled.append(self.cancel_order(cid, self.symbol))
                elif unknown == "adopt":
                    report.adopted.append(order.copy())
                else:
                    report.ignored.append(order.copy())
            return report

    # ------------------------------------------------------------------ reading
    def fills(self) -> pd.DataFrame:
        """Every entry and exit so far (read from SQLite)."""
        with self._lock:
            self._ready()
            return pd.DataFrame([json.loads(d) for (d,) in self._db.execute("SELECT data FROM fills ORDER BY id")])

    def trades(self) -> pd.DataFrame:
        """Closed trades as the broker has them (Size, EntryBar, ExitBar, prices, SL, TP, Commission, Tag)."""
        frame = self._ready().trades(closed=True)
        frame["PnL"] = frame["Size"] * (frame["ExitPrice"] - frame["EntryPrice"]) - frame["Commission"]
        return frame

    def orders_frame(self) -> pd.DataFrame:
        """Every order so far, finished (from SQLite) and open, in the order they were placed."""
        with self._lock:
            self._ready()
            rows = {}
            for cid, data in self._db.execute("SELECT cid, data FROM orders ORDER BY rowid"):
                if cid not in self._orders:
                    d = json.loads(data)
                    rows[cid] = {**d["order"], **{f"meta_{k}": v for k, v in d["meta"].items()}}
            for c, o in self._orders.items():
                rows[c] = {**o.to_dict(), **{f"meta_{k}": v for k, v in self._meta[c].items()}}
            return pd.DataFrame(list(rows.values()))


def _iso(t) -> str:
    ts = t if isinstance(t, pd.Timestamp) else pd.Timestamp(t)
    if ts.tzinfo is None:
        ts = ts.tz_localize("UTC")
    elif ts.utcoffset().total_seconds() != 0 or str(ts.tzinfo) != "UTC":  # (a UTC time: no conversion)
        ts = ts.tz_convert("UTC")
    return ts.isoformat()


def _plain(v: Any):
    if isinstance(v, (np.integer, np.floating, np.bool_)):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return str(v)
