"""Indicator helpers of the offline model's strategies, defined once.

The code generator embeds each helper's *source* (``inspect.getsource``) in the strategy
it writes, and the fast path (:mod:`moondev_lab.fast`) calls the very same functions, so
the two cannot drift apart.

>>> import numpy as np
>>> close = np.linspace(100.0, 120.0, 40)
>>> bool(bb_band(close, 20, 2.0, 0)[-1] > bb_band(close, 20, 2.0, 2)[-1])
True
"""
import numpy as np
import pandas as pd
import talib


def bb_band(close, n, k, which):
    """Bollinger band: which 0 = upper, 1 = middle, 2 = lower."""
    return talib.BBANDS(close, timeperiod=int(n), nbdevup=k, nbdevdn=k)[which]


def bb_width_rank(close, n, k, lookback):
    """Where today's band width sits in its last ``lookback`` bars: 0 = narrowest, 1 = widest."""
    upper, mid, lower = talib.BBANDS(close, timeperiod=int(n), nbdevup=k, nbdevdn=k)
    width = pd.Series((upper - lower) / mid)
    return width.rolling(int(lookback), min_periods=int(lookback)).rank(pct=True).to_numpy()


def keltner(high, low, close, n, mult, which):
    """Keltner channel: EMA(n) +/- mult * ATR(n); which 0 = upper, 1 = middle, 2 = lower."""
    mid = talib.EMA(close, int(n))
    atr = talib.ATR(high, low, close, int(n))
    return (mid + mult * atr, mid, mid - mult * atr)[which]


def squeeze(high, low, close, n, k, mult):
    """1.0 while the Bollinger bands sit inside the Keltner channel (a volatility squeeze)."""
    upper, mid, lower = talib.BBANDS(close, timeperiod=int(n), nbdevup=k, nbdevdn=k)
    kc_mid = talib.EMA(close, int(n))
    atr = talib.ATR(high, low, close, int(n))
    return ((upper < kc_mid + mult * atr) & (lower > kc_mid - mult * atr)).astype(float)


def cmf(high, low, close, volume, n):
    """Chaikin money flow over n bars."""
    rng = np.where(high - low == 0, np.nan, high - low)
    mfv = ((close - low) - (high - close)) / rng * volume
    s = pd.Series(np.nan_to_num(mfv))
    return (s.rolling(int(n)).sum() / pd.Series(volume).rolling(int(n)).sum()).to_numpy()


def rolling_vwap(high, low, close, volume, n):
    """Volume-weighted average price over the last n bars."""
    typical = pd.Series((high + low + close) / 3 * volume)
    return (typical.rolling(int(n)).sum() / pd.Series(volume).rolling(int(n)).sum()).to_numpy()


def vortex(high, low, close, n, which):
    """Vortex indicator: which 0 = VI+, 1 = VI-."""
    h, l, c = pd.Series(high), pd.Series(low), pd.Series(close)
    tr = pd.Series(talib.TRANGE(high, low, close)).rolling(int(n)).sum()
    vm = (h - l.shift()).abs() if which == 0 else (l - h.shift()).abs()
    return (vm.rolling(int(n)).sum() / tr).to_numpy()


def obv_vs_average(close, volume, n):
    """On-balance volume minus its n-bar average (> 0: accumulation)."""
    obv = talib.OBV(close, volume)
    return obv - talib.SMA(obv, int(n))
