"""The one place that touches backtesting.py's private API (pinned: backtesting==0.6.6).

If a backtesting.py upgrade moves these attributes, only this module changes.
"""
from __future__ import annotations

import pandas as pd


def equity_curve(stats: pd.Series) -> pd.Series:
    """The per-bar equity of a ``Backtest.run()`` result (``stats._equity_curve['Equity']``)."""
    return stats._equity_curve["Equity"]


def strategy_params(stats: pd.Series, names) -> dict:
    """The values of parameters ``names`` on the strategy instance a run used (``stats._strategy``)."""
    strategy = stats._strategy
    return {name: getattr(strategy, name) for name in names}
