"""Write backtesting.py code from a :class:`~moondev_lab.models.spec.StrategySpec`.

Every signal kind below knows its class parameters, its ``init`` lines (all
indicators through ``self.I`` with talib or a small numpy helper), and its
long/short *state* at bar ``i``. The strategy opens a trade on the bar where
the AND of all entry states becomes true (a rising edge, so two conditions
need not fire on the very same bar), and closes it when any exit state holds,
or by its stop-loss / take-profit / time exit.

Parameters are class attributes, so ``Backtest.optimize`` (and the RBI grid)
can tune them.
"""
from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass, field

from .spec import Signal, StrategySpec

# Helpers the generated code may need; only those used are emitted.
_HELPERS = {
    "bb_band": '''
def bb_band(close, n, k, which):
    """Bollinger band: which 0 = upper, 1 = middle, 2 = lower."""
    return talib.BBANDS(close, timeperiod=int(n), nbdevup=k, nbdevdn=k)[which]
''',
    "bb_width_rank": '''
def bb_width_rank(close, n, k, lookback):
    """Where today's band width sits in its last ``lookback`` bars: 0 = narrowest, 1 = widest."""
    upper, mid, lower = talib.BBANDS(close, timeperiod=int(n), nbdevup=k, nbdevdn=k)
    width = pd.Series((upper - lower) / mid)
    return width.rolling(int(lookback), min_periods=int(lookback)).rank(pct=True).to_numpy()
''',
    "keltner": '''
def keltner(high, low, close, n, mult, which):
    """Keltner channel: EMA(n) +/- mult * ATR(n); which 0 = upper, 1 = middle, 2 = lower."""
    mid = talib.EMA(close, int(n))
    atr = talib.ATR(high, low, close, int(n))
    return (mid + mult * atr, mid, mid - mult * atr)[which]
''',
    "squeeze": '''
def squeeze(high, low, close, n, k, mult):
    """1.0 while the Bollinger bands sit inside the Keltner channel (a volatility squeeze)."""
    upper, mid, lower = talib.BBANDS(close, timeperiod=int(n), nbdevup=k, nbdevdn=k)
    kc_mid = talib.EMA(close, int(n))
    atr = talib.ATR(high, low, close, int(n))
    return ((upper < kc_mid + mult * atr) & (lower > kc_mid - mult * atr)).astype(float)
''',
    "cmf": '''
def cmf(high, low, close, volume, n):
    """Chaikin money flow over n bars."""
    rng = np.where(high - low == 0, np.nan, high - low)
    mfv = ((close - low) - (high - close)) / rng * volume
    s = pd.Series(np.nan_to_num(mfv))
    return (s.rolling(int(n)).sum() / pd.Series(volume).rolling(int(n)).sum()).to_numpy()
''',
    "vwap": '''
def rolling_vwap(high, low, close, volume, n):
    """Volume-weighted average price over the last n bars."""
    typical = pd.Series((high + low + close) / 3 * volume)
    return (typical.rolling(int(n)).sum() / pd.Series(volume).rolling(int(n)).sum()).to_numpy()
''',
    "vortex": '''
def vortex(high, low, close, n, which):
    """Vortex indicator: which 0 = VI+, 1 = VI-."""
    h, l, c = pd.Series(high), pd.Series(low), pd.Series(close)
    tr = pd.Series(talib.TRANGE(high, low, close)).rolling(int(n)).sum()
    vm = (h - l.shift()).abs() if which == 0 else (l - h.shift()).abs()
    return (vm.rolling(int(n)).sum() / tr).to_numpy()
''',
    "obv_gap": '''
def obv_vs_average(close, volume, n):
    """On-balance volume minus its n-bar average (> 0: accumulation)."""
    obv = talib.OBV(close, volume)
    return obv - talib.SMA(obv, int(n))
''',
}


@dataclass
class KindCode:
    params: dict  # class attribute name -> value
    init: list[str]
    long: str  # state at bar i (entry condition for longs)
    short: str
    exit_long: str | None = None  # default: the short state
    exit_short: str | None = None  # default: the long state
    symmetric: bool = False  # a filter that says nothing about direction (volume, ADX, squeeze)
    helpers: list[str] = field(default_factory=list)


_OSC = {  # kind: (talib call, default n)
    "rsi": ("talib.RSI(close, {n})", 14),
    "stoch": ("talib.STOCH(high, low, close, {n}, 3, 0, 3, 0)[0]", 14),
    "stochrsi": ("talib.STOCHRSI(close, {n}, 14, 3, 0)[0]", 14),
    "cci": ("talib.CCI(high, low, close, {n})", 20),
    "willr": ("talib.WILLR(high, low, close, {n})", 14),
    "mfi": ("talib.MFI(high, low, close, volume, {n})", 14),
    "cmo": ("talib.CMO(close, {n})", 14),
}



def _band(params: dict, pre: str, call: str, label: str, helper: str, mode: str) -> "KindCode":
    """Upper/middle/lower band indicators: a breakout rides the band, a reversion fades it to the middle."""
    init = [f"self.{pre}_{part} = self.I({call}, {i}, name='{label} {name}')"
            for i, (part, name) in enumerate([("upper", "upper"), ("mid", "middle"), ("lower", "lower")])]
    up, mid, lo = (f"self.{pre}_{x}[i]" for x in ("upper", "mid", "lower"))
    if mode == "breakout":
        return KindCode(params, init, f"close[i] > {up}", f"close[i] < {lo}", f"close[i] < {mid}", f"close[i] > {mid}",
                        helpers=[helper])
    return KindCode(params, init, f"close[i] < {lo}", f"close[i] > {up}", f"close[i] > {mid}", f"close[i] < {mid}",
                    helpers=[helper])

def _kind_code(sig: Signal) -> KindCode:
    k, p = sig.kind, sig.params
    if k in _OSC:
        call, _ = _OSC[k]
        fn = call.format(n=f"self.{k}_n")
        init = [f"self.{k} = self.I(lambda: {fn}, name={k.upper()!r})"]
        if p.get("mode") == "midline":
            return KindCode({f"{k}_n": p["n"], f"{k}_level": p["level"]}, init,
                            f"self.{k}[i] > self.{k}_level", f"self.{k}[i] < self.{k}_level")
        return KindCode({f"{k}_n": p["n"], f"{k}_low": p["low"], f"{k}_high": p["high"]}, init,
                        f"self.{k}[i] < self.{k}_low", f"self.{k}[i] > self.{k}_high")
    if k == "ma_cross":
        ma = p["ma"]
        return KindCode({"fast_n": p["fast"], "slow_n": p["slow"]},
                        [f"self.fast = self.I(talib.{ma}, close, self.fast_n, name='{ma}(fast)')",
                         f"self.slow = self.I(talib.{ma}, close, self.slow_n, name='{ma}(slow)')"],
                        "self.fast[i] > self.slow[i]", "self.fast[i] < self.slow[i]")
    if k == "price_ma":
        ma = p["ma"]
        return KindCode({"trend_n": p["n"]}, [f"self.trend = self.I(talib.{ma}, close, self.trend_n, name='{ma}')"],
                        "close[i] > self.trend[i]", "close[i] < self.trend[i]")
    if k == "bb":
        return _band({"bb_n": p["n"], "bb_k": p["k"]}, "bb", "bb_band, close, self.bb_n, self.bb_k", "BB",
                     "bb_band", p["mode"])
    if k == "bb_squeeze":
        if p.get("keltner"):
            return KindCode({"sq_n": p["n"], "sq_k": p["k"], "sq_kc_mult": p["kc_mult"], "sq_recent": p["recent"]},
                            ["self.squeeze = self.I(squeeze, high, low, close, self.sq_n, self.sq_k, self.sq_kc_mult, "
                             "name='squeeze', overlay=False)"],
                            "(self.squeeze[i - self.sq_recent:i] > 0).any()", "(self.squeeze[i - self.sq_recent:i] > 0).any()",
                            symmetric=True, helpers=["squeeze"])
        cond = "(self.bbw_rank[i - self.sq_recent:i] <= self.sq_pct).any()"
        return KindCode({"sq_n": p["n"], "sq_k": p["k"], "sq_lookback": p["lookback"], "sq_pct": p["pct"],
                         "sq_recent": p["recent"]},
                        ["self.bbw_rank = self.I(bb_width_rank, close, self.sq_n, self.sq_k, self.sq_lookback, "
                         "name='BB width rank', overlay=False)"], cond, cond, symmetric=True, helpers=["bb_width_rank"])
    if k == "bb_expand":
        cond = "self.bbw_rank[i] >= self.bbx_pct"
        return KindCode({"bbx_n": p["n"], "bbx_k": p["k"], "bbx_lookback": p["lookback"], "bbx_pct": p["pct"]},
                        ["self.bbw_rank = self.I(bb_width_rank, close, self.bbx_n, self.bbx_k, self.bbx_lookback, "
                         "name='BB width rank', overlay=False)"], cond, cond, symmetric=True, helpers=["bb_width_rank"])
    if k == "keltner":
        return _band({"kc_n": p["n"], "kc_mult": p["mult"]}, "kc",
                     "keltner, high, low, close, self.kc_n, self.kc_mult", "KC", "keltner", p["mode"])
    if k == "macd":
        params = {"macd_fast": p["fast"], "macd_slow": p["slow"], "macd_signal": p["signal"]}
        init = ["self.macd = self.I(lambda: talib.MACD(close, self.macd_fast, self.macd_slow, self.macd_signal)[0], "
                "name='MACD', overlay=False)",
                "self.macd_sig = self.I(lambda: talib.MACD(close, self.macd_fast, self.macd_slow, self.macd_signal)[1], "
                "name='MACD signal', overlay=False)"]
        if p["mode"] == "zero":
            return KindCode(params, init, "self.macd[i] > 0", "self.macd[i] < 0")
        return KindCode(params, init, "self.macd[i] > self.macd_sig[i]", "self.macd[i] < self.macd_sig[i]")
    if k == "donchian":
        return KindCode({"dc_n": p["n"], "dc_exit_n": p["exit_n"]},
                        ["self.dc_high = self.I(talib.MAX, high, self.dc_n, name='Donchian high')",
                         "self.dc_low = self.I(talib.MIN, low, self.dc_n, name='Donchian low')",
                         "self.dc_exit_high = self.I(talib.MAX, high, self.dc_exit_n, name='exit high')",
                         "self.dc_exit_low = self.I(talib.MIN, low, self.dc_exit_n, name='exit low')"],
                        "close[i] > self.dc_high[i - 1]", "close[i] < self.dc_low[i - 1]",
                        "close[i] < self.dc_exit_low[i - 1]", "close[i] > self.dc_exit_high[i - 1]")
    if k == "volume":
        op = ">" if p["cmp"] == "above" else "<"
        return KindCode({"vol_n": p["n"], "vol_mult": p["mult"]},
                        ["self.vol_avg = self.I(talib.SMA, volume, self.vol_n, name='volume average', overlay=False)"],
                        f"volume[i] {op} self.vol_mult * self.vol_avg[i]", f"volume[i] {op} self.vol_mult * self.vol_avg[i]",
                        symmetric=True)
    if k == "atr_regime":
        op = ">" if p["cmp"] == "above" else "<"
        return KindCode({"atrr_n": p["n"], "atrr_avg_n": p["avg_n"], "atrr_mult": p["mult"]},
                        ["self.atrr = self.I(talib.ATR, high, low, close, self.atrr_n, name='ATR', overlay=False)",
                         "self.atrr_avg = self.I(talib.SMA, self.atrr, self.atrr_avg_n, name='ATR average', overlay=False)"],
                        f"self.atrr[i] {op} self.atrr_mult * self.atrr_avg[i]",
                        f"self.atrr[i] {op} self.atrr_mult * self.atrr_avg[i]", symmetric=True)
    if k == "adx":
        op = ">" if p["cmp"] == "above" else "<"
        return KindCode({"adx_n": p["n"], "adx_level": p["level"]},
                        ["self.adx = self.I(talib.ADX, high, low, close, self.adx_n, name='ADX', overlay=False)"],
                        f"self.adx[i] {op} self.adx_level", f"self.adx[i] {op} self.adx_level", symmetric=True)
    if k == "di":
        return KindCode({"di_n": p["n"]},
                        ["self.plus_di = self.I(talib.PLUS_DI, high, low, close, self.di_n, name='+DI', overlay=False)",
                         "self.minus_di = self.I(talib.MINUS_DI, high, low, close, self.di_n, name='-DI', overlay=False)"],
                        "self.plus_di[i] > self.minus_di[i]", "self.plus_di[i] < self.minus_di[i]")
    if k == "cmf":
        return KindCode({"cmf_n": p["n"]}, ["self.cmf = self.I(cmf, high, low, close, volume, self.cmf_n, name='CMF', "
                                            "overlay=False)"],
                        "self.cmf[i] > 0", "self.cmf[i] < 0", helpers=["cmf"])
    if k == "obv":
        return KindCode({"obv_n": p["n"]}, ["self.obv_gap = self.I(obv_vs_average, close, volume, self.obv_n, "
                                            "name='OBV - average', overlay=False)"],
                        "self.obv_gap[i] > 0", "self.obv_gap[i] < 0", helpers=["obv_gap"])
    if k == "vwap":
        return KindCode({"vwap_n": p["n"]}, ["self.vwap = self.I(rolling_vwap, high, low, close, volume, self.vwap_n, "
                                             "name='VWAP')"],
                        "close[i] > self.vwap[i]", "close[i] < self.vwap[i]", helpers=["vwap"])
    if k == "sar":
        return KindCode({"sar_step": p["step"], "sar_max": p["max"]},
                        ["self.sar = self.I(talib.SAR, high, low, self.sar_step, self.sar_max, name='SAR')"],
                        "close[i] > self.sar[i]", "close[i] < self.sar[i]")
    if k == "roc":
        return KindCode({"roc_n": p["n"], "roc_level": p["level"]},
                        ["self.roc = self.I(talib.ROC, close, self.roc_n, name='ROC', overlay=False)"],
                        "self.roc[i] > self.roc_level", "self.roc[i] < -self.roc_level")
    if k == "vortex":
        return KindCode({"vi_n": p["n"]},
                        ["self.vi_plus = self.I(vortex, high, low, close, self.vi_n, 0, name='VI+', overlay=False)",
                         "self.vi_minus = self.I(vortex, high, low, close, self.vi_n, 1, name='VI-', overlay=False)"],
                        "self.vi_plus[i] > self.vi_minus[i]", "self.vi_plus[i] < self.vi_minus[i]", helpers=["vortex"])
    raise ValueError(f"no code template for signal kind {k!r}")


def class_name(spec: StrategySpec) -> str:
    kinds = [s.kind for s in spec.entry_signals][:3]
    words = "".join(w.capitalize() for k in kinds for w in k.split("_"))
    return re.sub(r"\W", "", words or "Idea") + "Strategy"


def _join(exprs: list[str], op: str) -> str:
    return f" {op} ".join(f"({e})" for e in exprs) if exprs else "False"


def generate(spec: StrategySpec) -> tuple[str, str]:
    """``(code, class_name)`` for ``spec``. The code defines exactly one Strategy subclass."""
    name = spec.name if spec.name != "IdeaStrategy" else class_name(spec)
    params: dict = {}
    init: list[str] = []
    helpers: list[str] = []
    longs, shorts, exit_longs, exit_shorts = [], [], [], []
    codes = [(s, _kind_code(s)) for s in spec.signals]
    for sig, kc in codes:
        params.update(kc.params)
        init += kc.init
        helpers += [h for h in kc.helpers if h not in helpers]
        if sig.entry:
            longs.append(kc.long)
            shorts.append(kc.short)
        if sig.exit:
            if kc.symmetric:  # e.g. "exit when volume drops below its average": the state itself
                exit_longs.append(kc.long)
                exit_shorts.append(kc.short)
            else:
                exit_longs.append(kc.exit_long or kc.short)
                exit_shorts.append(kc.exit_short or kc.long)
    sl, tp = spec.stop_loss, spec.take_profit
    need_atr = any(s is not None and s.kind == "atr" for s in (sl, tp))
    if need_atr:
        params["atr_n"] = (sl if sl and sl.kind == "atr" else tp).atr_n
        init.append("self.atr = self.I(talib.ATR, high, low, close, self.atr_n, name='ATR', overlay=False)")
    if sl:
        params["sl_atr" if sl.kind == "atr" else "sl_pct"] = float(sl.value)
    if tp:
        params["tp_atr" if tp.kind == "atr" else "tp_pct"] = float(tp.value)
    if spec.max_bars:
        params["max_bars"] = int(spec.max_bars)

    lines = ['"""Generated by moondev_lab\'s offline model (deterministic) from the idea:',
             *textwrap.wrap(spec.idea, 100, initial_indent="    ", subsequent_indent="    "),
             "", *textwrap.wrap("Spec: " + spec.describe(), 100)]
    if spec.assumptions:
        lines += ["", "Assumptions:", *[f"- {a}" for a in spec.assumptions]]
    lines += ['"""', "import numpy as np", "import pandas as pd", "import talib", "from backtesting import Strategy", ""]
    for h in helpers:
        lines += [_HELPERS[h].strip("\n"), ""]
    lines += ["", f"class {name}(Strategy):"]
    for k, v in params.items():
        lines.append(f"    {k} = {v!r}")
    lines += ["    _size = 0.95  # fraction of equity per trade (the harness normalises sizes anyway)", "",
              "    def init(self):",
              "        close, high, low, volume = self.data.Close, self.data.High, self.data.Low, self.data.Volume"]
    lines += [f"        {ln}" for ln in init]
    lines += ["", "    def _long_setup(self, i):", "        close, volume = self.data.Close, self.data.Volume",
              f"        return bool({_join(longs, 'and')})", "",
              "    def _short_setup(self, i):", "        close, volume = self.data.Close, self.data.Volume",
              f"        return bool({_join(shorts, 'and')})", "",
              "    def _exit_long(self, i):", "        close, volume = self.data.Close, self.data.Volume",
              f"        return bool({_join(exit_longs, 'or')})", "",
              "    def _exit_short(self, i):", "        close, volume = self.data.Close, self.data.Volume",
              f"        return bool({_join(exit_shorts, 'or')})", ""]
    lines += _next_method(spec, sl, tp)
    return "\n".join(lines).rstrip() + "\n", name


def _stop_expr(stop, side: str, what: str) -> str:
    sign = {("long", "sl"): "-", ("long", "tp"): "+", ("short", "sl"): "+", ("short", "tp"): "-"}[(side, what)]
    if stop.kind == "atr":
        return f"price {sign} self.{what}_atr * self.atr[-1]"
    return f"price * (1 {sign} self.{what}_pct / 100)"


def _next_method(spec: StrategySpec, sl, tp) -> list[str]:
    out = ["    def next(self):", "        if len(self.data) < 3:", "            return", "        price = self.data.Close[-1]"]
    if spec.max_bars:
        out += ["        if self.trades and len(self.data) - 1 - self.trades[0].entry_bar >= self.max_bars:",
                "            self.position.close()", "            return"]
    if sl and sl.trailing:
        out += ["        for trade in self.trades:  # trailing stop: only ever tightens"]
        long_sl, short_sl = _stop_expr(sl, "long", "sl"), _stop_expr(sl, "short", "sl")
        if sl.kind == "atr":
            out += ["            if not np.isfinite(self.atr[-1]):", "                break"]
        out += ["            if trade.is_long:", f"                trade.sl = max(trade.sl or 0.0, {long_sl})",
                "            else:", f"                trade.sl = min(trade.sl or np.inf, {short_sl})"]
    out += ["        if self.position.is_long and self._exit_long(-1):", "            self.position.close()",
            "        elif self.position.is_short and self._exit_short(-1):", "            self.position.close()",
            "        if self.position:", "            return"]
    if spec.stop_loss and spec.stop_loss.kind == "atr" or spec.take_profit and spec.take_profit.kind == "atr":
        out += ["        if not np.isfinite(self.atr[-1]) or self.atr[-1] <= 0:", "            return"]
    sides = ["long", "short"] if spec.direction == "both" else [spec.direction]
    for side in sides:
        kw = ["size=self._size"]
        if sl:
            kw.append(f"sl={_stop_expr(sl, side, 'sl')}")
        if tp:
            kw.append(f"tp={_stop_expr(tp, side, 'tp')}")
        kw_s = ", ".join(kw)
        first = "if" if side == sides[0] else "elif"
        out += [f"        {first} self._{side}_setup(-1) and not self._{side}_setup(-2):",
                f"            self.{'buy' if side == 'long' else 'sell'}({kw_s})"]
    return out
