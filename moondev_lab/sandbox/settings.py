"""What the harness passes to ``Backtest(...)``; kept light (no pandas) for the parent.

>>> from moondev_lab.sandbox.settings import BacktestSettings
>>> BacktestSettings(cash=100_000).kwargs()["commission"]
0.001
"""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class BacktestSettings:
    """What the harness passes to ``Backtest(...)``; wild code cannot override these."""

    cash: float = 1_000_000
    commission: float = 0.001
    spread: float = 0.0
    margin: float = 1.0
    trade_on_close: bool = False
    hedging: bool = False
    exclusive_orders: bool = False
    finalize_trades: bool = True

    def kwargs(self) -> dict:
        return asdict(self)
