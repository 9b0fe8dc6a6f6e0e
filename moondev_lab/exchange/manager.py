"""``ExchangeManager``: one real ccxt exchange, with an explicit lifecycle, safe retries and safe orders.

Lifecycle (``.state``)::

    NEW -> CONNECTING (load markets, check keys) -> READY <-> EXECUTING
                                                   EXECUTING -> ERROR -> RETRYING -> READY (next attempt)
                                                   ERROR (gave up) -> CLOSED, or RETRYING on the next call

* The constructor does no I/O; ``start()`` connects, ``close()`` closes.
* Reads (candles, balance, orders) are retried on temporary errors (HTTP 429/418,
  timeouts, 5xx, garbage bodies) with exponential backoff inside a bounded budget.
* Orders are never re-sent blindly: ccxt's ``maxRetriesOnFailure`` stays 0. Each
  order carries our deterministic client order id; when sending fails with an
  unknown outcome the order is ``IN_FLIGHT`` and is looked up by that id
  (``fetch_order``, then the open orders) before it is ever sent again, so an
  order the exchange accepted but whose answer was lost is placed exactly once.
* Amounts and prices go through the market's precision and limits: below the
  minimum is refused with ``BelowMinimum``, never enlarged.
* One lock per manager serialises every call on its (sync, not thread-safe) ccxt object.
* Keys never appear in reprs, logs or exception messages.

>>> with ExchangeManager("binance", api_url=fake_url) as ex:        # doctest: +SKIP
...     cid = ClientOrderId.make("sma_cross", bar_time, 0)
...     order = ex.create_order("BTC/USDT", "limit", "buy", 0.01, 39000, client_order_id=cid)
...     ex.state, order.status
(<State.READY: 'ready'>, <OrderState.ACCEPTED: 'accepted'>)
"""
from __future__ import annotations

import enum
import logging
import math
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from ..data.fetch import _looks_like_data  # one rule for "is this a data answer" (pandas is loaded anyway)
from ..errors import (AuthError, BadExchangeResponse, BelowMinimum, ExchangeError, ExchangeStateError,
                      ExchangeTimeout, ExchangeUnavailable, InsufficientFunds, OrderInFlight, OrderNotFound,
                      OrderRejected, RateLimited, ReconciliationError, TemporaryExchangeError)
from ._scrub import scrub, scrubbed_logger
from .credentials import Credentials, load_credentials
from .orders import Balance, ClientOrderId, Order, OrderState
from .registry import ExchangeSpec, get_spec

log = logging.getLogger(__name__)


class State(str, enum.Enum):
    NEW = "new"
    CONNECTING = "connecting"
    READY = "ready"
    EXECUTING = "executing"
    ERROR = "error"
    RETRYING = "retrying"
    CLOSED = "closed"


_S = State
_ALLOWED: dict[State, frozenset[State]] = {
    _S.NEW: frozenset({_S.CONNECTING, _S.CLOSED}),
    _S.CONNECTING: frozenset({_S.READY, _S.ERROR}),
    _S.READY: frozenset({_S.EXECUTING, _S.CLOSED}),
    _S.EXECUTING: frozenset({_S.READY, _S.ERROR}),
    _S.ERROR: frozenset({_S.RETRYING, _S.CLOSED}),
    # Back to READY for the next attempt of a call, or to CONNECTING when start() itself is retried.
    _S.RETRYING: frozenset({_S.READY, _S.CONNECTING}),
    _S.CLOSED: frozenset(),
}


@dataclass(frozen=True)
class RetryPolicy:
    """Backoff for temporary errors on reads: ``base * 2**n`` (x4 after a 418 ban), capped, within a budget.

    >>> RetryPolicy(base_delay=0.5).delay(2)
    2.0
    """

    attempts: int = 5           # tries per call, the first included
    base_delay: float = 0.5     # seconds
    max_delay: float = 30.0
    budget: float = 60.0        # total seconds of sleeping one call may spend
    jitter: float = 0.0         # fraction of random extra delay (spreads many clients apart)

    def delay(self, attempt: int, error: Exception | None = None, retry_after: float | None = None) -> float:
        d = self.base_delay * 2 ** attempt
        if isinstance(error, RateLimited) and error.info.get("status") == 418:
            d *= 4  # 418: the IP is banned for a while after ignoring 429s; back off harder
        if retry_after is not None:
            d = max(d, retry_after)
        d = min(d, self.max_delay)
        return d * (1 + self.jitter * random.random()) if self.jitter else d


# ccxt exception class name -> ours; most specific first (ccxt's own hierarchy decides the rest).
_CCXT_ERRORS: list[tuple[str, type[ExchangeError]]] = [
    ("InsufficientFunds", InsufficientFunds),
    ("AuthenticationError", AuthError),
    ("OrderNotFound", OrderNotFound),
    ("DDoSProtection", RateLimited),
    ("RateLimitExceeded", RateLimited),
    ("RequestTimeout", ExchangeTimeout),
    ("NetworkError", ExchangeUnavailable),   # ExchangeNotAvailable, OnMaintenance, InvalidNonce, resets
    ("BadResponse", BadExchangeResponse),
    ("OperationFailed", TemporaryExchangeError),
    ("BadSymbol", ExchangeError),
    ("InvalidOrder", OrderRejected),
    ("OperationRejected", OrderRejected),
    ("BadRequest", OrderRejected),           # only while ordering; see _translate
]


#: ccxt's unified params that make a create_order a stop-loss / take-profit (trigger) order.
_TRIGGER_PARAMS = ("stopLossPrice", "takeProfitPrice", "triggerPrice", "stopPrice")


@dataclass
class ReconcileReport:
    """What reconciliation found: our orders updated, unknown ones adopted/canceled/left alone."""

    updated: list[Order] = field(default_factory=list)   # known orders, now as the exchange has them
    missing: list[Order] = field(default_factory=list)   # known orders the exchange does not have
    adopted: list[Order] = field(default_factory=list)   # unknown open orders of this strategy, now known
    canceled: list[Order] = field(default_factory=list)  # unknown foreign open orders, canceled
    ignored: list[Order] = field(default_factory=list)   # unknown open orders left as they are
    symbols: list[str] = field(default_factory=list)

    @property
    def orders(self) -> list[Order]:
        """Every order the caller should now track (updated, missing with their final state, adopted)."""
        return self.updated + self.missing + self.adopted

    def __repr__(self) -> str:
        return (f"ReconcileReport({len(self.updated)} updated, {len(self.missing)} missing, "
                f"{len(self.adopted)} adopted, {len(self.canceled)} canceled, {len(self.ignored)} ignored "
                f"on {', '.join(self.symbols) or 'no symbols'})")


class ExchangeManager:
    """A real ccxt exchange behind a lifecycle, a lock, retries and order reconciliation.

    ``exchange`` names a registered :class:`ExchangeSpec`; ``account`` picks the
    keys (see :func:`load_credentials`). ``api_url`` swaps every API host (tests
    point it at a fake on 127.0.0.1). ``config`` is passed to the ccxt class
    (``timeout``, ``enableRateLimit``, ...). ``sleep`` is injectable for tests.
    """

    def __init__(self, exchange: str = "binance", account: str = "default", *,
                 credentials: Credentials | None = None, api_url: str | None = None,
                 config: dict[str, Any] | None = None, retry: RetryPolicy = RetryPolicy(),
                 require_keys: bool = False, symbols: Iterable[str] = (),
                 lookup_delay: float = 0.5, max_sends: int = 2,
                 sleep: Callable[[float], None] = time.sleep):
        self.spec: ExchangeSpec = get_spec(exchange)
        self.account = account
        self.retry = retry
        self.require_keys = require_keys
        self.symbols = list(symbols)
        self.lookup_delay = lookup_delay   # the exchange may need a moment before a new order is queryable
        self.max_sends = max_sends         # the first send plus re-sends after the order was confirmed absent
        self._credentials = credentials
        self._api_url = api_url
        self._config = dict(config or {})
        self._sleep = sleep
        self._lock = threading.RLock()
        self._ex = None
        self._state = State.NEW
        self._markets_loaded = False
        self._orders: dict[str, Order] = {}
        self._blocked: str | None = None
        #: Every state change, oldest first (bounded), for status lines and tests.
        self.transitions: list[tuple[State, State]] = []
        self.stats = {"calls": 0, "retries": 0, "order_sends": 0, "lookups": 0}
        #: The last error a call met (retried or not), for status lines.
        self.last_error: ExchangeError | None = None

    # ------------------------------------------------------------------ lifecycle
    @property
    def state(self) -> State:
        return self._state

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def trading_blocked(self) -> str | None:
        """Why new orders are refused (an order in flight, a failed reconciliation), or None."""
        return self._blocked

    def _to(self, new: State) -> None:
        old = self._state
        if new == old:
            return
        if new not in _ALLOWED[old]:
            raise ExchangeStateError(f"{self.name}: {old.value} -> {new.value} is not a legal transition",
                                     exchange=self.name)
        self._state = new
        self.transitions.append((old, new))
        del self.transitions[:-200]
        log.debug("%s/%s: %s -> %s", self.name, self.account, old.value, new.value)

    def start(self) -> "ExchangeManager":
        """Connect: build the ccxt object, load markets, check the keys (with retries). Idempotent."""
        import ccxt  # ~0.3 s, paid by those who trade only

        with self._lock:
            if self._state in (State.READY, State.EXECUTING):
                return self
            if self._state == State.CLOSED:
                raise ExchangeStateError(f"{self.name} manager is closed; make a new one", exchange=self.name)
            if self._state == State.ERROR:
                self._to(State.RETRYING)
            self._to(State.CONNECTING)
            try:
                if self._ex is None:
                    self._ex = self._build(ccxt)
                self._with_retries("load_markets", lambda: self._ex.load_markets(), connecting=True)
                self._markets_loaded = True
                if self._credentials.present:
                    # A signed read proves the key and secret work before anyone relies on them.
                    self._with_retries("check keys", lambda: self._valid_balance(self._ex.fetch_balance()),
                                       connecting=True)
                elif self.require_keys:
                    raise self._no_keys()
            except ExchangeError:
                if self._state != State.ERROR:
                    self._to(State.ERROR)
                raise
            self._to(State.READY)
            return self

    def close(self) -> None:
        """Close the HTTP session; the manager cannot be started again."""
        with self._lock:
            if self._state == State.CLOSED:
                return
            if self._ex is not None:
                try:
                    self._ex.close()
                except Exception:  # closing is best-effort; nothing to report upward
                    pass
            self._to(State.CLOSED)

    def __enter__(self) -> "ExchangeManager":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        keys = "keys set" if self._credentials and self._credentials.present else "no keys"
        markets = f", {len(self._ex.markets)} markets" if self._markets_loaded else ""
        blocked = f", trading blocked: {self._blocked}" if self._blocked else ""
        return f"ExchangeManager({self.name}/{self.account}, {self._state.value}, {keys}{markets}{blocked})"

    def _build(self, ccxt):
        from ..data.fetch import make_exchange

        scrubbed_logger("urllib3.connectionpool")  # its DEBUG lines carry signed URLs
        if self._credentials is None:
            self._credentials = load_credentials(self.spec.name, self.account)
        options = {**self.spec.options, **self._config.pop("options", {}),
                   "maxRetriesOnFailure": 0}  # never: it would re-POST orders
        config = {"timeout": 10_000, "enableRateLimit": True, **self._config, "options": options,
                  "verbose": False, "logger": scrubbed_logger("moondev_lab.exchange.wire"),  # it logs headers
                  **self._credentials.ccxt_config()}
        return make_exchange(self.spec.ccxt_id, api_url=self._api_url, **config)

    def _no_keys(self) -> AuthError:
        prefix = self.spec.name.upper() + ("" if self.account == "default" else "_" + self.account.upper())
        return AuthError(f"no API keys for {self.name}/{self.account}: set {prefix}_API_KEY and "
                         f"{prefix}_API_SECRET, or add them to $MOONDEV_LAB_HOME/credentials.toml (mode 0600)",
                         exchange=self.name)

    # ------------------------------------------------------------------ the call machinery
    def _ready(self) -> None:
        if self._state in (State.NEW, State.CONNECTING) or not self._markets_loaded:
            raise ExchangeStateError(f"{self.name} manager is {self._state.value}: call start() first",
                                     exchange=self.name)
        if self._state == State.CLOSED:
            raise ExchangeStateError(f"{self.name} manager is closed", exchange=self.name)
        if self._state == State.ERROR:  # the last call failed: this one is the retry
            self._to(State.RETRYING)
            self._to(State.READY)

    def _translate(self, e: BaseException, what: str, ordering: bool = False) -> ExchangeError:
        """Our error for a ccxt (or parsing) failure, with a scrubbed message and no ccxt text kept."""
        import ccxt

        if isinstance(e, ExchangeError):
            return e
        cls: type[ExchangeError] = ExchangeError
        if isinstance(e, ccxt.BaseError):
            for name, ours in _CCXT_ERRORS:
                if isinstance(e, getattr(ccxt, name)):
                    cls = ours
                    break
        elif isinstance(e, (TypeError, AttributeError, KeyError, ValueError, IndexError)):
            cls = BadExchangeResponse  # ccxt choked on a body that was not what the endpoint returns
        text = scrub(e)[:300]
        if cls is OrderRejected and not ordering:
            cls = ExchangeError
        if issubclass(cls, OrderRejected) and any(m in text for m in self.spec.below_minimum_markers):
            cls = BelowMinimum
        info: dict[str, Any] = {}
        if cls is RateLimited:
            info["status"] = 418 if " 418 " in str(e) else 429
        return cls(f"{self.name} {what}: {type(e).__name__}: {text}", exchange=self.name,
                   cause=type(e).__name__, **info)

    def _retry_after(self) -> float | None:
        headers = getattr(self._ex, "last_response_headers", None) or {}
        try:
            value = headers.get("Retry-After")
            return float(value) if value is not None else None
        except (TypeError, ValueError):
            return None

    def _once(self, what: str, fn: Callable[[], Any], ordering: bool = False) -> Any:
        """One attempt, READY -> EXECUTING -> READY (or ERROR on a temporary error)."""
        self._ready()
        self._to(State.EXECUTING)
        self.stats["calls"] += 1
        try:
            result = fn()
        except Exception as e:
            err = self.last_error = self._translate(e, what, ordering)
            self._to(State.ERROR if isinstance(err, TemporaryExchangeError) else State.READY)
            raise err from None  # the ccxt exception's text and traceback may carry URLs and headers
        self._to(State.READY)
        return result

    def _with_retries(self, what: str, fn: Callable[[], Any], connecting: bool = False) -> Any:
        """``fn`` retried on temporary errors only, within the policy's attempts and budget."""
        slept = 0.0
        for attempt in range(self.retry.attempts):
            try:
                if connecting:
                    return self._connecting_once(what, fn)
                return self._once(what, fn)
            except TemporaryExchangeError as err:
                delay = self.retry.delay(attempt, err, self._retry_after())
                if attempt + 1 >= self.retry.attempts or slept + delay > self.retry.budget:
                    raise type(err)(f"{err} (gave up after {attempt + 1} attempts)", exchange=self.name,
                                    cause=err.cause, **err.info) from None
                log.warning("%s %s failed (%s from %s); retry %d/%d in %.2fs", self.name, what,
                            err.__class__.__name__, err.cause,
                            attempt + 1, self.retry.attempts - 1, delay)
                self.stats["retries"] += 1
                self._to(State.RETRYING)
                self._sleep(delay)
                slept += delay
                self._to(State.CONNECTING if connecting else State.READY)
        raise AssertionError("unreachable")  # pragma: no cover

    def _connecting_once(self, what: str, fn: Callable[[], Any]) -> Any:
        if self._state == State.ERROR:
            self._to(State.RETRYING)
            self._to(State.CONNECTING)
        try:
            return fn()
        except Exception as e:
            err = self.last_error = self._translate(e, what)
            self._to(State.ERROR)
            raise err from None

    # ------------------------------------------------------------------ reads
    def fetch_ohlcv(self, symbol: str, timeframe: str, since: int | None = None,
                    limit: int | None = None) -> list[list[float]]:
        """Candles ``[ms, open, high, low, close, volume]``, validated (a garbage 200 is retried)."""
        with self._lock:
            def call():
                rows = self._ex.fetch_ohlcv(symbol, timeframe, since=since, limit=limit)
                if not rows and not _looks_like_data(self._ex.last_json_response):
                    # With `since` set ccxt drops the None rows of a non-JSON body: [] would mean "no candles".
                    raise BadExchangeResponse(f"{self.name} answered fetch_ohlcv with no candle data")
                return self._valid_candles(rows)
            return self._with_retries(f"fetch_ohlcv {symbol} {timeframe}", call)

    def fetch_balance(self) -> dict[str, Balance]:
        """Balances per currency (free, used, total)."""
        with self._lock:
            self._need_keys()
            raw = self._with_retries("fetch_balance", lambda: self._valid_balance(self._ex.fetch_balance()))
            return {c: Balance(c, float(v.get("free") or 0), float(v.get("used") or 0), float(v.get("total") or 0))
                    for c, v in raw.items() if isinstance(v, dict) and c not in ("info", "free", "used", "total")}

    def fetch_order(self, client_order_id: str, symbol: str) -> Order | None:
        """The exchange's view of our order, found by its client order id; None if it does not exist."""
        with self._lock:
            self._need_keys()
            cid = ClientOrderId(client_order_id)
            found = self._lookup_by_id(cid, symbol)
            if found is not None and cid in self._orders:
                # Ours: keep the type we placed it as (ccxt reads a STOP_LOSS_LIMIT back as "limit").
                return self._orders[cid].update_from(found).copy()
            return found

    def fetch_open_orders(self, symbol: str) -> list[Order]:
        """Every open order on ``symbol``, ours or not."""
        with self._lock:
            self._need_keys()
            return self._with_retries(f"fetch_open_orders {symbol}", lambda: [
                self._parse_order(d) for d in self._valid_list(self._ex.fetch_open_orders(symbol))])

    def _lookup_by_id(self, cid: ClientOrderId, symbol: str) -> Order | None:
        self.stats["lookups"] += 1
        try:
            return self._with_retries(f"fetch_order {cid}", lambda: self._parse_order(self._ex.fetch_order(
                None, symbol, {self.spec.lookup_param: str(cid)}), cid))
        except OrderNotFound:
            return None

    # ------------------------------------------------------------------ validation of answers
    def _need_keys(self) -> None:
        self._ready()
        if not self._credentials.present:
            raise self._no_keys()

    @staticmethod
    def _valid_candles(rows) -> list[list[float]]:
        if not isinstance(rows, list):
            raise BadExchangeResponse(f"candles: expected a list, got {type(rows).__name__}")
        out = []
        for r in rows:
            if (not isinstance(r, (list, tuple)) or len(r) < 6 or any(v is None for v in r[:6])
                    or any(isinstance(v, float) and math.isnan(v) for v in r[:6])):
                raise BadExchangeResponse(f"candles: malformed row {str(r)[:80]} (a non-JSON answer?)")
            out.append([int(r[0]), *map(float, r[1:6])])
        return out

    @staticmethod
    def _valid_balance(raw) -> dict:
        # An account answer holds a list of balances (maybe empty); {"code": 0} or a string does not.
        if not isinstance(raw, dict) or not _looks_like_data(raw.get("info")):
            raise BadExchangeResponse("balance: the answer was not an account object (a non-JSON answer?)")
        return raw

    @staticmethod
    def _valid_list(raw) -> list:
        if not isinstance(raw, list):
            raise BadExchangeResponse(f"expected a list of orders, got {type(raw).__name__}")
        return raw

    def _parse_order(self, raw, cid: ClientOrderId | None = None) -> Order:
        ok = isinstance(raw, dict) and raw.get("id") and raw.get("clientOrderId") and raw.get("side")
        if not ok:
            raise BadExchangeResponse(f"{self.name}: the answer is not an order (a non-JSON or empty body?)",
                                      exchange=self.name)
        order = Order.from_ccxt(raw)
        if cid is not None and order.client_order_id != cid:
            raise BadExchangeResponse(f"{self.name}: asked for order {cid}, got {order.client_order_id}",
                                      exchange=self.name)
        return order

    # ------------------------------------------------------------------ orders
    def _prepare(self, symbol: str, type: str, side: str, amount: float, price: float | None) -> tuple[float, float | None]:
        """Amount and price through the market's precision and limits; refuse, never enlarge."""
        import ccxt

        try:
            market = self._ex.market(symbol)
        except ccxt.BaseError as e:
            raise self._translate(e, f"market {symbol}") from None
        if side not in ("buy", "sell"):
            raise OrderRejected(f"side must be 'buy' or 'sell', not {side!r}", exchange=self.name)
        if not amount or amount <= 0 or not math.isfinite(amount):
            raise OrderRejected(f"amount must be a positive number, not {amount!r}", exchange=self.name)
        limits = market.get("limits") or {}
        try:
            amount_p = float(self._ex.amount_to_precision(symbol, amount))  # truncates to the lot step
        except ccxt.InvalidOrder:
            amount_p = 0.0
        amin = (limits.get("amount") or {}).get("min")
        if amount_p <= 0 or (amin and amount_p < amin):
            raise BelowMinimum(f"{symbol}: amount {amount:.10g} is below the minimum "
                               f"{amin or market['precision'].get('amount')} (refused; never enlarged)",
                               exchange=self.name)
        amax = (limits.get("amount") or {}).get("max")
        if amax and amount_p > amax:
            raise OrderRejected(f"{symbol}: amount {amount_p:.10g} is above the maximum {amax}", exchange=self.name)
        price_p = None
        if price is not None:
            if not price > 0 or not math.isfinite(price):
                raise OrderRejected(f"price must be a positive number, not {price!r}", exchange=self.name)
            price_p = float(self._ex.price_to_precision(symbol, price))
        elif type != "market":
            raise OrderRejected(f"a {type} order needs a price", exchange=self.name)
        cmin = (limits.get("cost") or {}).get("min")
        if price_p and cmin and amount_p * price_p < cmin:
            raise BelowMinimum(f"{symbol}: order value {amount_p * price_p:.8g} is below the minimum {cmin} "
                               "(refused; never enlarged)", exchange=self.name)
        return amount_p, price_p

    def create_order(self, symbol: str, type: str, side: str, amount: float, price: float | None = None, *,
                     client_order_id: str, params: dict | None = None) -> Order:
        """Place one order under our client order id, exactly once; returns its ``Order``.

        A market order's ``price``, if given, is only a reference for the
        minimum-value check (ccxt would otherwise turn it into a quote quantity).
        The same ``client_order_id`` again returns the order already placed.
        Raises ``BelowMinimum``/``InsufficientFunds``/``OrderRejected`` (``.order`` is REJECTED),
        ``OrderInFlight`` when its fate could not be learnt, ``ReconciliationError`` while blocked.
        """
        with self._lock:
            self._need_keys()
            cid = ClientOrderId(client_order_id)
            self.spec.check_client_id(cid)
            known = self._orders.get(cid)
            if known is not None and known.status != OrderState.REJECTED:
                if known.status.open:  # idempotent: report the order placed under this id, as it is now
                    found = self._lookup_by_id(cid, symbol)
                    if found is not None:
                        known.update_from(found)
                return known.copy()
            if self._blocked:
                raise ReconciliationError(f"{self.name}: trading is blocked: {self._blocked}", exchange=self.name)
            order = Order(cid, None, symbol, side, type, float(amount), price)
            try:
                amount_p, price_p = self._prepare(symbol, type, side, amount, price)
            except OrderRejected as e:
                e.order = order.advance(OrderState.REJECTED, str(e)).copy()
                raise
            order.amount, order.price = amount_p, price_p if type != "market" else None
            request = {**(params or {}), self.spec.client_id_param: str(cid)}
            for key in _TRIGGER_PARAMS:  # ccxt's unified stop-loss / take-profit trigger prices
                if request.get(key) is not None:
                    order.trigger_price = request[key] = self._price(symbol, request[key])
            self._orders[cid] = order
            send_price = price_p if type != "market" else None

            def send() -> list[Order]:
                order.advance(OrderState.SUBMITTED)
                return [self._parse_order(self._ex.create_order(symbol, type, side, amount_p, send_price,
                                                                dict(request)), cid)]

            return self._place([order], send)[0]

    def create_oco(self, symbol: str, side: str, amount: float, *, take_profit: float, stop_loss: float,
                   stop_limit: float, client_order_id: str, leg_ids: tuple[str, str]) -> list[Order]:
        """One-cancels-the-other on spot: a take-profit limit and a stop-loss limit sharing ``amount``.

        Binance's ``orderList/oco`` (ccxt has no unified call for it; its implicit method is
        used). ``client_order_id`` names the list, ``leg_ids`` the take-profit and the
        stop-loss leg, under the same exactly-once rules as :meth:`create_order` (a lost
        answer is looked up by the legs' ids before anything is sent again). Returns the
        legs ``[take_profit, stop_loss]``; one filling expires the other, cancelling one
        cancels both.
        """
        with self._lock:
            self._need_keys()
            if self.spec.oco is None:
                raise OrderRejected(f"{self.name}: no one-cancels-the-other orders here", exchange=self.name)
            cids = [ClientOrderId(c) for c in (client_order_id, *leg_ids)]
            for c in cids:
                self.spec.check_client_id(c)
            known = [self._orders.get(c) for c in cids[1:]]
            if all(k is not None and k.status != OrderState.REJECTED for k in known):
                return [k.copy() for k in known]
            if self._blocked:
                raise ReconciliationError(f"{self.name}: trading is blocked: {self._blocked}", exchange=self.name)
            legs = [Order(cids[1], None, symbol, side, "limit_maker", float(amount), take_profit),
                    Order(cids[2], None, symbol, side, "stop_loss_limit", float(amount), stop_limit,
                          trigger_price=stop_loss)]
            try:
                amount_p, tp_p = self._prepare(symbol, "limit", side, amount, take_profit)
                _, limit_p = self._prepare(symbol, "limit", side, amount, stop_limit)
            except OrderRejected as e:
                e.order = legs[1].advance(OrderState.REJECTED, str(e)).copy()
                raise
            legs[0].amount = legs[1].amount = amount_p
            legs[0].price, legs[1].price = tp_p, limit_p
            legs[1].trigger_price = sl_p = self._price(symbol, stop_loss)
            self._orders.update({o.client_order_id: o for o in legs})
            request = self.spec.oco(self._ex.market(symbol)["id"], side, self._ex.amount_to_precision(
                symbol, amount_p), self._ex.price_to_precision(symbol, tp_p), self._ex.price_to_precision(
                symbol, sl_p), self._ex.price_to_precision(symbol, limit_p), *map(str, cids))
            market = self._ex.market(symbol)

            def send() -> list[Order]:
                for o in legs:
                    o.advance(OrderState.SUBMITTED)
                raw = self._ex.private_post_orderlist_oco(request)
                reports = raw.get("orderReports") if isinstance(raw, dict) else None
                if not isinstance(reports, list) or len(reports) != 2:
                    raise BadExchangeResponse(f"{self.name}: the answer is not an order list", exchange=self.name)
                by_cid = {r.get("clientOrderId"): r for r in reports if isinstance(r, dict)}
                return [self._parse_order(self._ex.parse_order(by_cid.get(str(o.client_order_id)), market),
                                          o.client_order_id) for o in legs]

            return self._place(legs, send)

    def _price(self, symbol: str, price: float) -> float:
        if not price > 0 or not math.isfinite(price):
            raise OrderRejected(f"price must be a positive number, not {price!r}", exchange=self.name)
        return float(self._ex.price_to_precision(symbol, price))

    def _place(self, orders: list[Order], send: Callable[[], list[Order]]) -> list[Order]:
        """Send once; on an unknown outcome look every order up by its id before sending again."""
        what = f"create_order {orders[0].client_order_id}"
        for sends in range(1, self.max_sends + 1):
            self.stats["order_sends"] += 1
            try:
                got = self._once(what, send, ordering=True)
                return [o.update_from(g).copy() for o, g in zip(orders, got)]
            except OrderRejected as e:
                if not any(m in str(e) for m in self.spec.duplicate_markers):
                    for o in orders:
                        o.advance(OrderState.REJECTED, str(e))
                    e.order = orders[-1].copy()
                    raise
                for o in orders:  # our id is already on the book: an earlier send did arrive
                    o.advance(OrderState.IN_FLIGHT, "duplicate id: an earlier send arrived")
            except TemporaryExchangeError as e:
                for o in orders:
                    o.advance(OrderState.IN_FLIGHT, f"{e.cause or e.__class__.__name__} while sending")
            log.warning("%s order %s: outcome unknown (%s); looking it up before anything else",
                        self.name, orders[0].client_order_id, orders[0].reason)
            found = [self._resolve(o) for o in orders]
            if all(f is not None for f in found):
                return [o.update_from(f).copy() for o, f in zip(orders, found)]
            if any(f is not None for f in found):  # a list half seen: its other leg exists, the index lags
                self._blocked = f"order list {orders[0].client_order_id} is half visible; call reconcile()"
                raise OrderInFlight(f"{self.name} order list {orders[0].client_order_id}: only some legs found; "
                                    "it stays IN_FLIGHT until reconcile()", order=orders[0].copy(),
                                    exchange=self.name)
            if sends < self.max_sends:
                log.warning("%s order %s: confirmed absent, sending it again under the same id", self.name,
                            orders[0].client_order_id)
        for o in orders:
            o.advance(OrderState.REJECTED, f"not accepted after {self.max_sends} sends "
                                           f"(last: {o.reason}); confirmed absent")
        raise OrderRejected(f"{self.name} order {orders[0].client_order_id} was not placed: {orders[0].reason}",
                            order=orders[0].copy(), exchange=self.name)

    def _resolve(self, order: Order) -> Order | None:
        """Find an IN_FLIGHT order by its id (then among the open orders); None only when confirmed absent."""
        if self.lookup_delay:
            self._sleep(self.lookup_delay)
        try:
            found = self._lookup_by_id(order.client_order_id, order.symbol)
            if found is None:
                # The order index can lag the book: the open orders are the second witness.
                found = next((o for o in self.fetch_open_orders(order.symbol)
                              if o.client_order_id == order.client_order_id), None)
        except TemporaryExchangeError as e:
            self._blocked = f"order {order.client_order_id} is in flight (its fate is unknown); call reconcile()"
            raise OrderInFlight(f"{self.name} order {order.client_order_id}: sent, and its fate could not be "
                                f"learnt ({e.cause}); it stays IN_FLIGHT until reconcile()", order=order.copy(),
                                exchange=self.name, cause=e.cause) from None
        return found

    def cancel_order(self, client_order_id: str, symbol: str) -> Order:
        """Cancel our order; if it was already done (e.g. filled) return it as it ended."""
        with self._lock:
            self._need_keys()
            cid = ClientOrderId(client_order_id)
            try:
                result = self._with_retries(f"cancel_order {cid}", lambda: self._parse_order(
                    self._ex.cancel_order(None, symbol, {self.spec.lookup_param: str(cid)}), cid))
            except OrderNotFound:
                # Cancels are safe to repeat: a retried cancel (or a late one) finds the order already done.
                result = self._lookup_by_id(cid, symbol)
                if result is None:
                    raise OrderNotFound(f"{self.name}: no order {cid} on {symbol}", exchange=self.name) from None
            if cid in self._orders:
                return self._orders[cid].update_from(result).copy()
            return result

    # ------------------------------------------------------------------ reconciliation
    def reconcile(self, known_orders: Iterable[Order], *, symbols: Iterable[str] | None = None,
                  strategy: str | None = None, unknown: str = "cancel") -> ReconcileReport:
        """Match our stored orders with the exchange's after a restart (or an order in flight).

        Known open orders are updated (filled while we were away, canceled, ...);
        in-flight ones are decided. Unknown open orders on ``symbols``: ours (made
        by ``ClientOrderId.make``; of ``strategy`` when given) are adopted, another
        strategy's are left alone, foreign ones follow ``unknown`` ("cancel",
        "adopt" or "ignore"). If anything cannot be checked, ``ReconciliationError``
        and trading stays blocked.
        """
        if unknown not in ("cancel", "adopt", "ignore"):
            raise ValueError("unknown must be 'cancel', 'adopt' or 'ignore'")
        with self._lock:
            self._need_keys()
            known = {o.client_order_id: o.copy() for o in self._orders.values() if o.status.open}
            known.update({o.client_order_id: o.copy() for o in known_orders})
            report = ReconcileReport()
            scan = list(dict.fromkeys([*(symbols or []), *self.symbols, *(o.symbol for o in known.values()),
                                       *(o.symbol for o in self._orders.values())]))
            report.symbols = scan
            try:
                for order in known.values():
                    if not (order.status.open or order.status == OrderState.NEW):
                        continue  # final already; NEW may have been sent just before a crash
                    found = self._lookup_by_id(order.client_order_id, order.symbol)
                    if found is not None:
                        report.updated.append(order.update_from(found))
                    elif order.status in (OrderState.SUBMITTED, OrderState.IN_FLIGHT, OrderState.NEW):
                        report.missing.append(order.advance(OrderState.REJECTED, "never reached the exchange"))
                    else:  # it was on the book; the exchange no longer has it (purged after a cancel)
                        report.missing.append(order.advance(OrderState.CANCELED, "gone from the exchange"))
                for symbol in scan:
                    for other in self.fetch_open_orders(symbol):
                        if other.client_order_id in known:
                            continue
                        cid = other.client_order_id
                        policy = ("adopt" if strategy is None or cid.belongs_to(strategy) else "ignore") \
                            if cid.ours else unknown
                        if policy == "adopt":
                            known[cid] = other
                            report.adopted.append(other)
                        elif policy == "cancel":
                            report.canceled.append(self.cancel_order(cid, symbol))
                        else:
                            report.ignored.append(other)
            except ExchangeError as e:
                self._blocked = f"reconciliation could not complete ({type(e).__name__})"
                raise ReconciliationError(f"{self.name}: reconciliation could not complete, so trading stays "
                                          f"blocked: {e}", exchange=self.name, cause=type(e).__name__) from None
            self._orders.update({o.client_order_id: o for o in report.orders})
            self._blocked = None
            return report

    def orders(self) -> list[Order]:
        """Copies of every order this manager placed or reconciled."""
        with self._lock:
            return [o.copy() for o in self._orders.values()]
