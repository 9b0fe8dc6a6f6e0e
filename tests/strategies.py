"""The sample strategy the tests and benches share: a talib SMA crossover.

>>> "class SmaCross(Strategy)" in sma_cross()
True
"""
from __future__ import annotations

_TEMPLATE = '''from backtesting import Strategy
from backtesting.lib import crossover
import talib


class SmaCross(Strategy):
    n1 = 10
    n2 = 30

    def init(self):
        self.a = self.I(talib.SMA, self.data.Close, self.n1)
        self.b = self.I(talib.SMA, self.data.Close, self.n2)

    def next(self):
        if crossover(self.a, self.b):
            {buy}
        elif crossover(self.b, self.a):
            self.position.close()
'''


def sma_cross(buy: str = "self.buy()") -> str:
    """The source, with ``buy`` as the order line (to try sizes the harness must normalise)."""
    return _TEMPLATE.format(buy=buy)


SMA_CROSS = sma_cross()
