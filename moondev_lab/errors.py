"""The package's one exception root, and the exchange errors under it.

Catch ``MoondevError`` for "anything moondev_lab refused or could not do";
catch a subclass to decide what to do next. Only ``TemporaryExchangeError``
is ever retried (reads only: orders are reconciled, never re-sent blindly).

>>> from moondev_lab.errors import BelowMinimum, MoondevError, OrderRejected
>>> issubclass(BelowMinimum, OrderRejected) and issubclass(OrderRejected, MoondevError)
True
"""
from __future__ import annotations

from typing import Any


class MoondevError(Exception):
    """Root of every error moondev_lab raises on purpose."""


class ExchangeError(MoondevError):
    """The exchange (or our layer over it) refused or failed; messages are scrubbed of keys."""

    def __init__(self, message: str, *, exchange: str | None = None, cause: str | None = None, **info: Any):
        super().__init__(message)
        self.exchange = exchange
        #: The ccxt exception class this came from, e.g. ``"DDoSProtection"`` (its text is not kept: it
        #: can carry request URLs and headers).
        self.cause = cause
        self.info = info


class TemporaryExchangeError(ExchangeError):
    """Worth retrying later: rate limits, timeouts, 5xx, garbage bodies, dropped connections."""


class RateLimited(TemporaryExchangeError):
    """HTTP 429/418 or Binance -1003: back off (418 means the IP is banned for a while)."""


class ExchangeUnavailable(TemporaryExchangeError):
    """5xx, maintenance, connection refused or reset."""


class ExchangeTimeout(TemporaryExchangeError):
    """No answer in time: for an order, its fate is unknown until it is looked up."""


class BadExchangeResponse(TemporaryExchangeError):
    """The exchange answered with something that is not the data asked for (e.g. a non-JSON 200)."""


class AuthError(ExchangeError):
    """Missing, wrong or insufficient API keys, or a bad signature."""


class ExchangeStateError(ExchangeError):
    """The manager is not in a state that allows this call (not started, closed, ...)."""


class UnknownExchange(ExchangeError, ValueError):
    """No exchange of that name is registered."""


class OrderRejected(ExchangeError):
    """The order was refused (by us before sending, or by the exchange); ``.order`` is its final record."""

    def __init__(self, message: str, *, order: Any = None, **kw: Any):
        super().__init__(message, **kw)
        self.order = order


class InsufficientFunds(OrderRejected):
    """Not enough free balance for the order."""


class BelowMinimum(OrderRejected):
    """Amount, price or notional below the market's minimum: refused, never silently enlarged."""


class OrderNotFound(ExchangeError):
    """The exchange does not know this order."""


class OrderInFlight(ExchangeError):
    """The order's fate is unknown (sent, then the network failed, and the lookups failed too).

    It stays ``IN_FLIGHT`` in ``.order`` until :meth:`ExchangeManager.reconcile` decides it.
    """

    def __init__(self, message: str, *, order: Any = None, **kw: Any):
        super().__init__(message, **kw)
        self.order = order


class ReconciliationError(ExchangeError):
    """Our orders could not be matched with the exchange's: trading stays blocked until they are."""
