"""Orders as both the live and the paper exchange see them: ``Order``, ``OrderState``, ``ClientOrderId``.

An order's life is an explicit state machine::

    NEW -> SUBMITTED -> ACCEPTED -> PARTIALLY_FILLED -> FILLED | CANCELED | REJECTED
                 \\-> IN_FLIGHT (sent, answer lost) -> whatever reconciliation finds

>>> cid = ClientOrderId.make("sma_cross", "2024-01-01 12:15", 3)
>>> cid
'ml-smacross-50670e-240101121500-3'
>>> cid.seq, cid.bar_time
(3, Timestamp('2024-01-01 12:15:00+0000', tz='UTC'))
>>> o = Order(cid, None, "BTC/USDT", "buy", "limit", 0.5, 40000.0)
>>> o.advance(OrderState.SUBMITTED).advance(OrderState.ACCEPTED).status
<OrderState.ACCEPTED: 'accepted'>
>>> o.advance(OrderState.NEW)
Traceback (most recent call last):
...
moondev_lab.exchange.orders.OrderStateError: order ml-smacross-50670e-240101121500-3: accepted -> new is not a legal transition
"""
from __future__ import annotations

import enum
import hashlib
import re
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

import pandas as pd

from ..errors import MoondevError


class OrderState(str, enum.Enum):
    NEW = "new"                            # built locally, not sent
    SUBMITTED = "submitted"                # request on the wire
    IN_FLIGHT = "in_flight"                # sent, outcome unknown (timeout, lost answer) until reconciled
    ACCEPTED = "accepted"                  # resting on the book, nothing filled
    PARTIALLY_FILLED = "partially_filled"
    FILLED = "filled"
    CANCELED = "canceled"                  # also expired; may carry a partial fill
    REJECTED = "rejected"                  # refused, by us before sending or by the exchange

    @property
    def terminal(self) -> bool:
        return self in _TERMINAL

    @property
    def open(self) -> bool:
        """Live on the exchange (or possibly so): must be reconciled after a restart."""
        return self in (OrderState.SUBMITTED, OrderState.IN_FLIGHT, OrderState.ACCEPTED,
                        OrderState.PARTIALLY_FILLED)

    def can_become(self, other: "OrderState") -> bool:
        return other in _NEXT[self]


_S = OrderState
_TERMINAL = frozenset({_S.FILLED, _S.CANCELED, _S.REJECTED})
_AFTER_SEND = {_S.ACCEPTED, _S.PARTIALLY_FILLED, _S.FILLED, _S.CANCELED, _S.REJECTED}
_NEXT: dict[OrderState, frozenset[OrderState]] = {
    _S.NEW: frozenset({_S.SUBMITTED, _S.REJECTED}),
    _S.SUBMITTED: frozenset(_AFTER_SEND | {_S.IN_FLIGHT}),
    # Reconciliation decides: found in some state, or absent (REJECTED: it never reached the book,
    # or SUBMITTED again: confirmed absent, so re-sending under the same id is safe).
    _S.IN_FLIGHT: frozenset(_AFTER_SEND | {_S.SUBMITTED}),
    _S.ACCEPTED: frozenset({_S.PARTIALLY_FILLED, _S.FILLED, _S.CANCELED}),
    _S.PARTIALLY_FILLED: frozenset({_S.PARTIALLY_FILLED, _S.FILLED, _S.CANCELED}),
    _S.FILLED: frozenset(),
    _S.CANCELED: frozenset(),
    _S.REJECTED: frozenset(),
}


class OrderStateError(MoondevError):
    """An order was asked to move to a state its current one cannot lead to."""


_CID_RE = re.compile(r"^[.A-Z:/a-z0-9_-]{1,36}$")   # Binance's rule for newClientOrderId
_OURS_RE = re.compile(r"^ml-(?P<slug>[a-z0-9]{0,8})-(?P<tag>[0-9a-f]{6})-(?P<bar>\d{12})-(?P<seq>\d{1,4})$")


class ClientOrderId(str):
    """Our deterministic client order id: strategy, bar time and a per-bar sequence number.

    Re-deciding the same bar after a restart gives the same id, so the exchange
    (and our own lookups) can tell a new order from one already sent. At most
    36 characters of ``[.A-Z:/a-z0-9_-]`` (Binance's ``newClientOrderId`` rule).
    Any valid string is accepted (e.g. ids of orders placed by hand); only ids
    made by :meth:`make` have ``tag``/``bar_time``/``seq``.
    """

    def __new__(cls, value: str) -> "ClientOrderId":
        if not isinstance(value, str) or not _CID_RE.match(value):
            raise ValueError(f"client order id {value!r} must be 1-36 characters of [.A-Z:/a-z0-9_-]")
        return super().__new__(cls, value)

    @classmethod
    def make(cls, strategy: str, bar_time: Any, seq: int) -> "ClientOrderId":
        if not 0 <= int(seq) <= 9999:
            raise ValueError(f"sequence number {seq} must be 0..9999 (per bar)")
        t = _utc(bar_time)
        return cls(f"ml-{_slug(strategy)}-{strategy_tag(strategy)}-{t:%y%m%d%H%M%S}-{int(seq)}")

    def _match(self):
        return _OURS_RE.match(self)

    @property
    def ours(self) -> bool:
        return self._match() is not None

    @property
    def tag(self) -> str | None:
        m = self._match()
        return m["tag"] if m else None

    @property
    def bar_time(self) -> pd.Timestamp | None:
        m = self._match()
        return pd.to_datetime(m["bar"], format="%y%m%d%H%M%S", utc=True) if m else None

    @property
    def seq(self) -> int | None:
        m = self._match()
        return int(m["seq"]) if m else None

    def belongs_to(self, strategy: str) -> bool:
        return self.tag == strategy_tag(strategy)


def strategy_tag(strategy: str) -> str:
    """Six hex digits that tell strategies apart even when their short names collide."""
    return hashlib.sha256(strategy.encode()).hexdigest()[:6]


def _slug(strategy: str) -> str:
    return re.sub(r"[^a-z0-9]", "", strategy.lower())[:8]


def _utc(when: Any) -> pd.Timestamp:
    t = pd.Timestamp(when, unit="ms") if isinstance(when, (int, float)) else pd.Timestamp(when)
    return t.tz_localize("UTC") if t.tzinfo is None else t.tz_convert("UTC")


@dataclass(frozen=True)
class Balance:
    """One currency's balance: ``free`` to spend, ``used`` locked in open orders."""

    currency: str
    free: float
    used: float
    total: float

    def __repr__(self) -> str:
        return f"Balance({self.currency}: free {self.free:.8g}, used {self.used:.8g}, total {self.total:.8g})"


_CCXT_STATUS = {"closed": _S.FILLED, "canceled": _S.CANCELED, "cancelled": _S.CANCELED,
                "expired": _S.CANCELED, "rejected": _S.REJECTED}


@dataclass
class Order:
    """One order, live or paper. ``amount``/``filled`` in base units; ``fee`` in ``fee_currency``."""

    client_order_id: ClientOrderId
    exchange_id: str | None
    symbol: str
    side: str                       # "buy" | "sell"
    type: str                       # "market" | "limit" | ...
    amount: float
    price: float | None = None
    filled: float = 0.0
    average: float | None = None
    status: OrderState = OrderState.NEW
    fee: float = 0.0
    timestamp: int | None = None    # ms since the epoch, as the exchange stamped it
    fee_currency: str | None = None
    #: The price a stop-loss / take-profit order is triggered at (None for plain orders).
    trigger_price: float | None = None
    #: When the exchange last changed it (a fill, a cancel), ms since the epoch.
    updated: int | None = None
    #: Why it is REJECTED or IN_FLIGHT, in words (never exchange text with keys in it).
    reason: str | None = None
    history: list[OrderState] = field(default_factory=list, repr=False, compare=False)

    def __post_init__(self):
        self.client_order_id = ClientOrderId(self.client_order_id)
        self.status = OrderState(self.status)
        if not self.history:
            self.history.append(self.status)

    @property
    def remaining(self) -> float:
        return max(0.0, self.amount - self.filled)

    def advance(self, state: OrderState, reason: str | None = None) -> "Order":
        """Move to ``state`` if the state machine allows it (staying put is always allowed)."""
        state = OrderState(state)
        if state != self.status or state == OrderState.PARTIALLY_FILLED:
            if state != self.status and not self.status.can_become(state):
                raise OrderStateError(f"order {self.client_order_id}: {self.status.value} -> {state.value} "
                                      "is not a legal transition")
            if state != self.status:
                self.history.append(state)
            self.status = state
        if reason is not None:
            self.reason = reason
        return self

    def update_from(self, other: "Order") -> "Order":
        """Take the exchange's view (fills, ids, status) of this same order, through legal transitions."""
        if other.client_order_id != self.client_order_id:
            raise ValueError(f"{other.client_order_id} is not {self.client_order_id}")
        if self.status == OrderState.NEW and other.status != OrderState.NEW:
            self.advance(OrderState.SUBMITTED)  # we learn of it only once it was sent
        self.advance(other.status, other.reason)
        for name in ("exchange_id", "price", "average", "timestamp", "fee_currency", "trigger_price", "updated"):
            if getattr(other, name) is not None:
                setattr(self, name, getattr(other, name))
        self.filled, self.fee = other.filled, other.fee
        return self

    @classmethod
    def from_ccxt(cls, d: Mapping[str, Any]) -> "Order":
        """Our ``Order`` from a ccxt order structure (``status`` open/closed/canceled/expired/rejected)."""
        filled = float(d.get("filled") or 0.0)
        status = _CCXT_STATUS.get(d.get("status") or "")
        if status is None:  # "open" (or missing): resting, maybe partly filled
            status = _S.PARTIALLY_FILLED if filled > 0 else _S.ACCEPTED
        fee = d.get("fee") or {}
        info = d.get("info") if isinstance(d.get("info"), dict) else {}
        # A cancel's answer carries a fresh id for the cancel itself; the order's own is origClientOrderId.
        cid = info.get("origClientOrderId") or d["clientOrderId"]
        return cls(client_order_id=cid, exchange_id=str(d["id"]) if d.get("id") else None,
                   symbol=d["symbol"], side=d["side"], type=d["type"], amount=float(d.get("amount") or 0.0),
                   price=_num(d.get("price")), filled=filled, average=_num(d.get("average")), status=status,
                   fee=float(fee.get("cost") or 0.0), fee_currency=fee.get("currency"),
                   timestamp=d.get("timestamp"),
                   trigger_price=_num(d.get("triggerPrice") or None),
                   updated=d.get("lastUpdateTimestamp") or d.get("lastTradeTimestamp"))

    def copy(self) -> "Order":
        return replace(self, history=list(self.history))

    def to_dict(self) -> dict[str, Any]:
        """Plain values (for SQLite, JSON and DataFrames)."""
        return {"client_order_id": str(self.client_order_id), "exchange_id": self.exchange_id,
                "symbol": self.symbol, "side": self.side, "type": self.type, "amount": self.amount,
                "price": self.price, "filled": self.filled, "average": self.average,
                "status": self.status.value, "fee": self.fee, "timestamp": self.timestamp,
                "fee_currency": self.fee_currency, "trigger_price": self.trigger_price, "updated": self.updated,
                "reason": self.reason}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Order":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d and k != "history"})

    def __repr__(self) -> str:
        px = f" @ {self.price:.8g}" if self.price is not None else ""
        px += f" (trigger {self.trigger_price:.8g})" if self.trigger_price is not None else ""
        avg = f", avg {self.average:.8g}" if self.average is not None else ""
        return (f"Order({self.client_order_id} {self.side} {self.amount:.8g} {self.symbol} {self.type}{px}: "
                f"{self.status.value}, filled {self.filled:.8g}{avg})")


def _num(x) -> float | None:
    return None if x is None else float(x)
