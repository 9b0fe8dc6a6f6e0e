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


# ----- a vectorised stand-in for the SMA crossover (robustness tests and bench) -------------------
# Long while SMA(fast) > SMA(slow) at a bar's close, held over the next bar, commission on each change.
# Not backtesting.py's fills (no next-open entry, no whole units): it makes 100-combination grids on
# tens of thousands of bars cost milliseconds where the statistics, not the broker, are under test.
def sma(x, n: int):
    import numpy as np

    c = np.cumsum(np.insert(np.asarray(x, dtype=float), 0, 0.0))
    out = np.full(len(x), np.nan)
    out[n - 1:] = (c[n:] - c[:-n]) / n
    return out


def sma_cross_returns(close, fast: int, slow: int, commission: float = 0.0):
    """Per-bar returns of the vectorised SMA crossover on ``close``."""
    import numpy as np

    close = np.asarray(close, dtype=float)
    f, s = sma(close, fast), sma(close, slow)
    pos = np.where(np.isfinite(s) & (f > s), 1.0, 0.0)
    r = np.zeros(len(close))
    r[1:] = pos[:-1] * (close[1:] / close[:-1] - 1) - commission * np.abs(np.diff(np.insert(pos[:-1], 0, 0.0)))
    return r
