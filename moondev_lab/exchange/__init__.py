"""The exchange layer: ``ExchangeManager`` over a real ccxt exchange, its pool, keys and order types.

>>> from moondev_lab.exchange import ClientOrderId, ExchangeManager, OrderState, State
>>> ExchangeManager("binance").state            # no I/O until start()
<State.NEW: 'new'>

``Order``, ``OrderState``, ``ClientOrderId`` and ``Balance`` (in ``.orders``) are
shared with the paper exchange, which mirrors the manager's public interface.
"""
from __future__ import annotations

from .credentials import Credentials, load_credentials, save_credentials
from .manager import ExchangeManager, ReconcileReport, RetryPolicy, State
from .orders import Balance, ClientOrderId, Order, OrderState, OrderStateError
from .pool import ConnectionPool
from .registry import ExchangeSpec, exchange_names, get_spec, register_exchange

__all__ = ["Balance", "ClientOrderId", "ConnectionPool", "Credentials", "ExchangeManager", "ExchangeSpec",
           "Order", "OrderState", "OrderStateError", "ReconcileReport", "RetryPolicy", "State",
           "exchange_names", "get_spec", "load_credentials", "register_exchange", "save_credentials"]
