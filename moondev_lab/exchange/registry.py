"""Which exchanges the manager can trade on, and what is particular to each.

An exchange is one ``ExchangeSpec`` in a registry, not a branch of an
if-chain: its ccxt class, the ccxt options it needs, the request parameter
that carries our client order id and the one that looks an order up by it,
its client-id rule, and the message fragments that mean "below minimum" or
"duplicate order".

>>> get_spec("binance").client_id_param
'newClientOrderId'
>>> register_exchange(ExchangeSpec("mybinance", ccxt_id="binance"))   # e.g. a second endpoint
>>> "mybinance" in exchange_names()
True
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from ..errors import UnknownExchange


@dataclass(frozen=True)
class ExchangeSpec:
    name: str
    ccxt_id: str
    #: ccxt options merged into the exchange's own; ``maxRetriesOnFailure`` is always forced to 0.
    options: dict[str, Any] = field(default_factory=dict)
    client_id_param: str = "newClientOrderId"     # sent with create_order
    lookup_param: str = "origClientOrderId"       # sent with fetch_order / cancel_order
    client_id_pattern: str = r"^[.A-Z:/a-z0-9_-]{1,36}$"
    below_minimum_markers: tuple[str, ...] = ("NOTIONAL", "minimum amount precision", "MIN_NOTIONAL")
    duplicate_markers: tuple[str, ...] = ("Duplicate order",)

    def check_client_id(self, cid: str) -> None:
        if not re.match(self.client_id_pattern, cid):
            raise ValueError(f"client order id {cid!r} does not fit {self.name}'s rule {self.client_id_pattern}")


_SPECS: dict[str, ExchangeSpec] = {}


def register_exchange(spec: ExchangeSpec) -> None:
    _SPECS[spec.name] = spec


def get_spec(name: str) -> ExchangeSpec:
    try:
        return _SPECS[name]
    except KeyError:
        raise UnknownExchange(f"no exchange {name!r} registered; known: {', '.join(exchange_names())} "
                              "(add one with moondev_lab.exchange.register_exchange)", exchange=name) from None


def exchange_names() -> list[str]:
    return sorted(_SPECS)


# Spot only (one exchangeInfo call); no currency or margin endpoints, which need extra key permissions.
_BINANCE_OPTIONS = {"fetchMarkets": {"types": ["spot"]}, "fetchCurrencies": False, "fetchMargins": False}
register_exchange(ExchangeSpec("binance", "binance", _BINANCE_OPTIONS))
register_exchange(ExchangeSpec("binanceus", "binanceus", _BINANCE_OPTIONS))
