"""A pool of started ``ExchangeManager``s, one per (exchange, account).

Every caller that asks for the same (exchange, account) shares one manager,
so one lock and one rate-limit clock guard that account's ccxt object.

>>> pool = ConnectionPool(api_url=fake_url)            # doctest: +SKIP
>>> pool.get("binance") is pool.get("binance", "default")  # doctest: +SKIP
True
"""
from __future__ import annotations

import threading
from typing import Any

from .manager import ExchangeManager, State


class ConnectionPool:
    """Managers keyed by (exchange, account), started on first use; ``defaults`` go to each new one."""

    def __init__(self, **defaults: Any):
        self._defaults = defaults
        self._managers: dict[tuple[str, str], ExchangeManager] = {}
        self._lock = threading.Lock()

    def get(self, exchange: str = "binance", account: str = "default", **kwargs: Any) -> ExchangeManager:
        """The started manager for (exchange, account); ``kwargs`` apply only when it is created."""
        key = (exchange, account)
        with self._lock:
            manager = self._managers.get(key)
            if manager is None or manager.state == State.CLOSED:
                manager = ExchangeManager(exchange, account, **{**self._defaults, **kwargs})
                self._managers[key] = manager
        return manager.start()

    def close(self) -> None:
        with self._lock:
            managers, self._managers = list(self._managers.values()), {}
        for manager in managers:
            manager.close()

    def __len__(self) -> int:
        return len(self._managers)

    def __enter__(self) -> "ConnectionPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        inner = ", ".join(f"{e}/{a}: {m.state.value}" for (e, a), m in self._managers.items())
        return f"ConnectionPool({inner or 'empty'})"
