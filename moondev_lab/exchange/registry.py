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
from typing import Any, Callable

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
    #: Builds the request of a one-cancels-the-other list (take-profit limit + stop-loss limit), or None.
    oco: Callable[..., dict] | None = None

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


def binance_oco(market_id: str, side: str, quantity: str, take_profit: str, stop_loss: str, stop_limit: str,
                list_id: str, take_profit_id: str, stop_loss_id: str) -> dict:
    """Binance spot ``POST /api/v3/orderList/oco``: a LIMIT_MAKER take-profit and a STOP_LOSS_LIMIT leg.

    >>> binance_oco("BTCUSDT", "sell", "0.1", "44000", "39000", "38800", "l", "t", "s")["aboveType"]
    'LIMIT_MAKER'
    """
    tp = {"Type": "LIMIT_MAKER", "Price": take_profit, "ClientOrderId": take_profit_id}
    sl = {"Type": "STOP_LOSS_LIMIT", "StopPrice": stop_loss, "Price": stop_limit, "TimeInForce": "GTC",
          "ClientOrderId": stop_loss_id}
    # A sell list's take-profit is above the price and its stop below; a buy list's the other way round.
    above, below = (tp, sl) if side == "sell" else (sl, tp)
    return {"symbol": market_id, "side": side.upper(), "quantity": quantity, "listClientOrderId": list_id,
            "newOrderRespType": "FULL", **{"above" + k: v for k, v in above.items()},
            **{"below" + k: v for k, v in below.items()}}


# Spot only (one exchangeInfo call); no currency or margin endpoints, which need extra key permissions.
_BINANCE_OPTIONS = {"fetchMarkets": {"types": ["spot"]}, "fetchCurrencies": False, "fetchMargins": False}
register_exchange(ExchangeSpec("binance", "binance", _BINANCE_OPTIONS, oco=binance_oco))
register_exchange(ExchangeSpec("binanceus", "binanceus", _BINANCE_OPTIONS, oco=binance_oco))
