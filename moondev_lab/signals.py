"""The signal kinds of the offline model: one registry entry per kind.

An entry holds everything about a kind: how the parser recognises it (``pattern`` /
``read``), its default parameters, the backtesting.py code the generator writes for it
(``code``), whether it only filters (``filter_only``: volume, ADX, squeeze...), and the
constraints its parameters must keep when the optimizer varies them. The parser
(:mod:`moondev_lab.models._parser`), the code generator (:mod:`moondev_lab.models._codegen`)
and the fast grid (:mod:`moondev_lab.fast`) all read this registry.

The vectorised form of a kind is its code itself: :mod:`moondev_lab._vectorise` evaluates
the ``init`` lines and the state expressions of :class:`KindCode` over whole arrays, so the
fast path computes exactly what the generated ``Strategy`` computes, with the same
indicator calls (talib, and the helpers of :mod:`moondev_lab._indicators`).

Adding a kind is one :func:`register` call (an entry with an ``example`` idea) and the
registry-wide tests pick it up (``tests/test_signals.py``).

>>> get("rsi").defaults
{'n': 14, 'low': 30, 'high': 70}
>>> get("volume").filter_only
True
>>> get("ma_cross").code({"ma": "SMA", "fast": 20, "slow": 50}).long
'self.fast[i] > self.slow[i]'
>>> valid_params({"fast_n": 50, "slow_n": 20})
False
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

from . import _indicators

__all__ = ["KindCode", "SignalKind", "register", "get", "kinds", "filter_only_kinds", "valid_params",
           "is_fraction", "helper_source"]


@dataclass
class KindCode:
    """The backtesting.py code of one signal: class parameters, ``init`` lines and states at bar ``i``."""

    params: dict  # class attribute name -> value
    init: list[str]
    long: str  # state at bar i (entry condition for longs)
    short: str
    exit_long: str | None = None  # default: the short state
    exit_short: str | None = None  # default: the long state
    symmetric: bool = False  # a filter that says nothing about direction (volume, ADX, squeeze)
    helpers: list[str] = field(default_factory=list)  # names of functions in moondev_lab._indicators


@dataclass(frozen=True)
class SignalKind:
    """One signal kind. ``code(params) -> KindCode``; ``read(clause, ctx, add)`` is the parser's hook.

    ``family`` tells the parser which reader handles the kind: ``"oscillator"`` (read by the
    shared oscillator reader from ``pattern`` and ``defaults``), ``"moving_average"`` and
    ``"band"`` (multi-kind readers in the parser), or ``"other"`` (read by ``read``, in
    registration order). ``less`` lists class-parameter pairs that must stay ordered
    (``a < b``); ``fractions`` class parameters that must stay in (0, 1).
    """

    name: str
    code: Callable[[dict], KindCode]
    family: str = "other"
    filter_only: bool = False
    pattern: str | None = None
    defaults: dict = field(default_factory=dict)
    read: Callable | None = None
    less: tuple[tuple[str, str], ...] = ()
    fractions: tuple[str, ...] = ()
    example: str = ""  # an idea the offline model reads as this kind (the registry tests run it)


_REGISTRY: dict[str, SignalKind] = {}


def register(kind: SignalKind) -> SignalKind:
    if kind.name in _REGISTRY:
        raise ValueError(f"signal kind {kind.name!r} is already registered")
    _REGISTRY[kind.name] = kind
    return kind


def get(name: str) -> SignalKind:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"no signal kind {name!r}; known: {', '.join(_REGISTRY)}") from None


def kinds(family: str | None = None) -> list[SignalKind]:
    """Registered kinds in registration order (the parser's reading order), optionally of one family."""
    return [k for k in _REGISTRY.values() if family is None or k.family == family]


def filter_only_kinds() -> tuple[str, ...]:
    return tuple(k.name for k in _REGISTRY.values() if k.filter_only)


def helper_source(name: str) -> str:
    """The source of helper ``name`` as the generated strategy embeds it."""
    import inspect

    return inspect.getsource(getattr(_indicators, name)).strip("\n")


# ------------------------------------------------------------------ parameter constraints
def is_fraction(name: str) -> bool:
    """A share of a look-back (sq_pct, bbx_pct), which must stay in (0, 1); sl_pct/tp_pct are percents."""
    declared = {f for k in _REGISTRY.values() for f in k.fractions}
    return name in declared or (name.endswith("_pct") and name not in ("sl_pct", "tp_pct"))


def valid_params(p: dict) -> bool:
    """Keep a strategy meaningful when its parameters move: ordered pairs, positive lengths and stops.

    The pairs come from the registry (fast < slow, MACD fast < slow) plus every ``X_low`` <
    ``X_high``; lengths (``_n``), ATR multiples, ``max_bars`` and percent stops stay positive.
    The rules go by parameter name, so they serve code that is not the offline model's too.
    """
    pairs = [pair for k in _REGISTRY.values() for pair in k.less]
    pairs = list(dict.fromkeys(pairs)) + [(k, k[:-4] + "_high") for k in p if k.endswith("_low")]
    if any(a in p and b in p and not p[a] < p[b] for a, b in pairs):
        return False
    return all(p[k] > 0 for k in p if k.endswith(("_n", "_atr", "_mult", "max_bars")) or k in ("sl_pct", "tp_pct"))


# ------------------------------------------------------------------ code templates
def _band(params: dict, pre: str, call: str, label: str, helper: str, mode: str) -> KindCode:
    """Upper/middle/lower band indicators: a breakout rides the band, a reversion fades it to the middle."""
    init = [f"self.{pre}_{part} = self.I({call}, {i}, name='{label} {name}')"
            for i, (part, name) in enumerate([("upper", "upper"), ("mid", "middle"), ("lower", "lower")])]
    up, mid, lo = (f"self.{pre}_{x}[i]" for x in ("upper", "mid", "lower"))
    if mode == "breakout":
        return KindCode(params, init, f"close[i] > {up}", f"close[i] < {lo}", f"close[i] < {mid}", f"close[i] > {mid}",
                        helpers=[helper])
    return KindCode(params, init, f"close[i] < {lo}", f"close[i] > {up}", f"close[i] > {mid}", f"close[i] < {mid}",
                    helpers=[helper])


def _oscillator(kind: str, call: str) -> Callable[[dict], KindCode]:
    def code(p: dict) -> KindCode:
        fn = call.format(n=f"self.{kind}_n")
        init = [f"self.{kind} = self.I(lambda: {fn}, name={kind.upper()!r})"]
        if p.get("mode") == "midline":
            return KindCode({f"{kind}_n": p["n"], f"{kind}_level": p["level"]}, init,
                            f"self.{kind}[i] > self.{kind}_level", f"self.{kind}[i] < self.{kind}_level")
        return KindCode({f"{kind}_n": p["n"], f"{kind}_low": p["low"], f"{kind}_high": p["high"]}, init,
                        f"self.{kind}[i] < self.{kind}_low", f"self.{kind}[i] > self.{kind}_high")

    return code


def _cmp(p: dict) -> str:
    return ">" if p["cmp"] == "above" else "<"


def _ma_cross(p: dict) -> KindCode:
    ma = p["ma"]
    return KindCode({"fast_n": p["fast"], "slow_n": p["slow"]},
                    [f"self.fast = self.I(talib.{ma}, close, self.fast_n, name='{ma}(fast)')",
                     f"self.slow = self.I(talib.{ma}, close, self.slow_n, name='{ma}(slow)')"],
                    "self.fast[i] > self.slow[i]", "self.fast[i] < self.slow[i]")


def _price_ma(p: dict) -> KindCode:
    ma = p["ma"]
    return KindCode({"trend_n": p["n"]}, [f"self.trend = self.I(talib.{ma}, close, self.trend_n, name='{ma}')"],
                    "close[i] > self.trend[i]", "close[i] < self.trend[i]")


def _bb(p: dict) -> KindCode:
    return _band({"bb_n": p["n"], "bb_k": p["k"]}, "bb", "bb_band, close, self.bb_n, self.bb_k", "BB", "bb_band",
                 p["mode"])


def _bb_squeeze(p: dict) -> KindCode:
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


def _bb_expand(p: dict) -> KindCode:
    cond = "self.bbw_rank[i] >= self.bbx_pct"
    return KindCode({"bbx_n": p["n"], "bbx_k": p["k"], "bbx_lookback": p["lookback"], "bbx_pct": p["pct"]},
                    ["self.bbw_rank = self.I(bb_width_rank, close, self.bbx_n, self.bbx_k, self.bbx_lookback, "
                     "name='BB width rank', overlay=False)"], cond, cond, symmetric=True, helpers=["bb_width_rank"])


def _keltner(p: dict) -> KindCode:
    return _band({"kc_n": p["n"], "kc_mult": p["mult"]}, "kc", "keltner, high, low, close, self.kc_n, self.kc_mult",
                 "KC", "keltner", p["mode"])


def _macd(p: dict) -> KindCode:
    params = {"macd_fast": p["fast"], "macd_slow": p["slow"], "macd_signal": p["signal"]}
    init = ["self.macd = self.I(lambda: talib.MACD(close, self.macd_fast, self.macd_slow, self.macd_signal)[0], "
            "name='MACD', overlay=False)",
            "self.macd_sig = self.I(lambda: talib.MACD(close, self.macd_fast, self.macd_slow, self.macd_signal)[1], "
            "name='MACD signal', overlay=False)"]
    if p["mode"] == "zero":
        return KindCode(params, init, "self.macd[i] > 0", "self.macd[i] < 0")
    return KindCode(params, init, "self.macd[i] > self.macd_sig[i]", "self.macd[i] < self.macd_sig[i]")


def _donchian(p: dict) -> KindCode:
    return KindCode({"dc_n": p["n"], "dc_exit_n": p["exit_n"]},
                    ["self.dc_high = self.I(talib.MAX, high, self.dc_n, name='Donchian high')",
                     "self.dc_low = self.I(talib.MIN, low, self.dc_n, name='Donchian low')",
                     "self.dc_exit_high = self.I(talib.MAX, high, self.dc_exit_n, name='exit high')",
                     "self.dc_exit_low = self.I(talib.MIN, low, self.dc_exit_n, name='exit low')"],
                    "close[i] > self.dc_high[i - 1]", "close[i] < self.dc_low[i - 1]",
                    "close[i] < self.dc_exit_low[i - 1]", "close[i] > self.dc_exit_high[i - 1]")


def _volume(p: dict) -> KindCode:
    op = _cmp(p)
    return KindCode({"vol_n": p["n"], "vol_mult": p["mult"]},
                    ["self.vol_avg = self.I(talib.SMA, volume, self.vol_n, name='volume average', overlay=False)"],
                    f"volume[i] {op} self.vol_mult * self.vol_avg[i]", f"volume[i] {op} self.vol_mult * self.vol_avg[i]",
                    symmetric=True)


def _atr_regime(p: dict) -> KindCode:
    op = _cmp(p)
    return KindCode({"atrr_n": p["n"], "atrr_avg_n": p["avg_n"], "atrr_mult": p["mult"]},
                    ["self.atrr = self.I(talib.ATR, high, low, close, self.atrr_n, name='ATR', overlay=False)",
                     "self.atrr_avg = self.I(talib.SMA, self.atrr, self.atrr_avg_n, name='ATR average', overlay=False)"],
                    f"self.atrr[i] {op} self.atrr_mult * self.atrr_avg[i]",
                    f"self.atrr[i] {op} self.atrr_mult * self.atrr_avg[i]", symmetric=True)


def _adx(p: dict) -> KindCode:
    op = _cmp(p)
    return KindCode({"adx_n": p["n"], "adx_level": p["level"]},
                    ["self.adx = self.I(talib.ADX, high, low, close, self.adx_n, name='ADX', overlay=False)"],
                    f"self.adx[i] {op} self.adx_level", f"self.adx[i] {op} self.adx_level", symmetric=True)


def _di(p: dict) -> KindCode:
    return KindCode({"di_n": p["n"]},
                    ["self.plus_di = self.I(talib.PLUS_DI, high, low, close, self.di_n, name='+DI', overlay=False)",
                     "self.minus_di = self.I(talib.MINUS_DI, high, low, close, self.di_n, name='-DI', overlay=False)"],
                    "self.plus_di[i] > self.minus_di[i]", "self.plus_di[i] < self.minus_di[i]")


def _cmf(p: dict) -> KindCode:
    return KindCode({"cmf_n": p["n"]}, ["self.cmf = self.I(cmf, high, low, close, volume, self.cmf_n, name='CMF', "
                                        "overlay=False)"],
                    "self.cmf[i] > 0", "self.cmf[i] < 0", helpers=["cmf"])


def _obv(p: dict) -> KindCode:
    return KindCode({"obv_n": p["n"]}, ["self.obv_gap = self.I(obv_vs_average, close, volume, self.obv_n, "
                                        "name='OBV - average', overlay=False)"],
                    "self.obv_gap[i] > 0", "self.obv_gap[i] < 0", helpers=["obv_vs_average"])


def _vwap(p: dict) -> KindCode:
    return KindCode({"vwap_n": p["n"]}, ["self.vwap = self.I(rolling_vwap, high, low, close, volume, self.vwap_n, "
                                         "name='VWAP')"],
                    "close[i] > self.vwap[i]", "close[i] < self.vwap[i]", helpers=["rolling_vwap"])


def _sar(p: dict) -> KindCode:
    return KindCode({"sar_step": p["step"], "sar_max": p["max"]},
                    ["self.sar = self.I(talib.SAR, high, low, self.sar_step, self.sar_max, name='SAR')"],
                    "close[i] > self.sar[i]", "close[i] < self.sar[i]")


def _roc(p: dict) -> KindCode:
    return KindCode({"roc_n": p["n"], "roc_level": p["level"]},
                    ["self.roc = self.I(talib.ROC, close, self.roc_n, name='ROC', overlay=False)"],
                    "self.roc[i] > self.roc_level", "self.roc[i] < -self.roc_level")


def _vortex(p: dict) -> KindCode:
    return KindCode({"vi_n": p["n"]},
                    ["self.vi_plus = self.I(vortex, high, low, close, self.vi_n, 0, name='VI+', overlay=False)",
                     "self.vi_minus = self.I(vortex, high, low, close, self.vi_n, 1, name='VI-', overlay=False)"],
                    "self.vi_plus[i] > self.vi_minus[i]", "self.vi_plus[i] < self.vi_minus[i]", helpers=["vortex"])


# ------------------------------------------------------------------ parser hooks ("other" family)
def _text():
    from .models import _parser  # the parser imports this module; its text helpers are read at parse time

    return _parser


def _read_macd(clause, ctx, add):
    m = re.search(r"\bmacd\b", clause)
    if m:
        p = re.search(r"macd\s*\(\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*\)", clause)
        fast, slow, sig = (int(p.group(1)), int(p.group(2)), int(p.group(3))) if p else (12, 26, 9)
        mode = "zero" if re.search(r"zero|0[- ]line|cent(?:er|re)[- ]?line|positive|negative", clause) and \
            not re.search(r"histogram", clause) else "signal"
        add("macd", {"fast": fast, "slow": slow, "signal": sig, "mode": mode}, m)


def _read_donchian(clause, ctx, add):
    P = _text()
    UNIT = P.UNIT
    m = re.search(r"donchian(?:\s*channels?)?", clause) or \
        re.search(r"(\d+)" + UNIT + r"\s+(?:high|highs|low|lows|range|channel)(?:\s*(?:/|or|and)\s*(?:high|low)s?)?\s*"
                  r"(?:breakout|break)|break\w*\s+(?:above|below|out of|through)\s+(?:the\s+)?(?:prior\s+|previous\s+|"
                  r"recent\s+)?(\d+)" + UNIT + r"\s+(?:high|low|range)|(?:highest high|lowest low)s?\s+(?:of|over|in)\s+"
                  r"(?:the\s+)?(?:last\s+|past\s+)?(\d+)" + UNIT + r"?|(\d+)" + UNIT + r"\s+breakouts?", clause)
    if m:
        nums = [g for g in m.groups() if g] if m.groups() else []
        n = int(nums[0]) if nums else P._period_near(clause, m.start(), m.end())
        if n is None:
            n = 20
            ctx.note("Donchian period not given: 20")
        add("donchian", {"n": n, "exit_n": max(2, n // 2)}, m)


def _read_volume(clause, ctx, add):
    """Plain volume only: volume-weighted things are refused as blockers."""
    P = _text()
    NUM, UNIT = P.NUM, P.UNIT
    for m in re.finditer(r"(?<!on-balance )(?<!on balance )\bvolume\b(?![- ]?(?:weighted|profile|oscillator|nodes?))", clause):
        seg = clause[max(0, m.start() - 35): m.end() + 70]
        below = re.search(r"declin|decreas|\blow\b|lower|drops?|falls?|below|dry|diminish|contract|fading|weak|thin", seg) \
            and not re.search(r"spike|surge|above|exceed|increas|rising|rises|jump|expan|high|heavy|strong|confirm", seg)
        mult = None
        mm = re.search(NUM + r"\s*(?:x|×|times)\b", seg)
        if mm:
            mult = float(mm.group(1))
        elif re.search(r"twice|double|2-fold", seg):
            mult = 2.0
        elif re.search(r"triple|three times|3-fold", seg):
            mult = 3.0
        else:
            mp = re.search(r"(\d+(?:\.\d+)?)\s*%\s*(?:above|higher|more|over|greater|increase)", seg)
            if mp:
                mult = 1 + float(mp.group(1)) / 100
        na = re.search(r"(\d+)" + UNIT + r"?\s*(?:moving\s+|simple\s+|rolling\s+)?(?:average|avg|ma|sma|mean|median)\b", seg) or \
            re.search(r"(?:average|avg|mean)\s+(?:of|over)\s+(?:the\s+)?(?:last\s+|past\s+)?(\d+)", seg)
        n = int(na.group(1)) if na else 20
        if not na:
            ctx.note("volume average length not given: 20 bars")
        if mult is None:
            if re.search(r"spike|surge|jump|burst|heavy|explod", seg):
                mult = 2.0
                ctx.note("a volume spike/surge without a size: 2x its average")
            else:
                mult = 1.0
        add("volume", {"n": n, "mult": P._int_or_float(mult), "cmp": "below" if below else "above"}, m)
        break


def _read_adx(clause, ctx, add):
    P = _text()
    m = re.search(r"\badx\b|average directional (?:index|movement)", clause)
    if m and not re.search(r"adx crossover|adx cross(?:es)?\b(?! (?:above|below))|\+di|di\+|-di|di-|dmi", clause):
        seg = clause[m.end(): m.end() + 50]
        lo, hi = P._thresholds(seg)
        n = P._period_near(clause, m.start(), m.end()) or 14
        if lo is not None and (hi is None or re.search(P._BELOW, seg).start() < re.search(P._ABOVE, seg).start()):
            add("adx", {"n": n, "level": P._int_or_float(lo), "cmp": "below"}, m)
        elif hi is not None:
            add("adx", {"n": n, "level": P._int_or_float(hi), "cmp": "above"}, m)
        elif re.search(r"below|weak|low|falling|declin|under", seg):
            add("adx", {"n": n, "level": 20, "cmp": "below"}, m)
            ctx.note("weak ADX read as ADX < 20")
        else:
            add("adx", {"n": n, "level": 25, "cmp": "above"}, m)
            ctx.note("ADX trend strength read as ADX > 25")


def _period_reader(kind: str, pattern: str, default: int) -> Callable:
    """A reader for a kind named by ``pattern`` whose one parameter is the look-back written next to it."""
    def read(clause, ctx, add):
        m = re.search(pattern, clause)
        if m:
            add(kind, {"n": _text()._period_near(clause, m.start(), m.end()) or default}, m)

    return read


def _read_obv(clause, ctx, add):
    m = re.search(r"\bobv\b|on[- ]balance volume", clause)
    if m:
        add("obv", {"n": 20}, m)


def _read_vwap(clause, ctx, add):
    m = re.search(r"\bvwap\b|volume[- ]weighted average price", clause)
    if m:
        n = _text()._period_near(clause, m.start(), m.end())
        if n is None:
            ctx.note("VWAP read as a rolling 96-bar VWAP")
        add("vwap", {"n": n or 96}, m)


def _read_sar(clause, ctx, add):
    m = re.search(r"parabolic sar|\bpsar\b|\bsar\b", clause)
    if m:
        add("sar", {"step": 0.02, "max": 0.2}, m)


def _read_roc(clause, ctx, add):
    P = _text()
    m = re.search(r"rate of change|\broc\b", clause)
    if m:
        seg = clause[m.end(): m.end() + 40]
        lv = re.search(P._ABOVE + r"\s*" + P.NUM, seg)
        add("roc", {"n": P._period_near(clause, m.start(), m.end()) or 10, "level": float(lv.group(1)) if lv else 0.0}, m)


def _read_atr_regime(clause, ctx, add):
    """ATR as a regime filter (stops were taken out of the text before)."""
    P = _text()
    m = re.search(r"\batr\b|average true range", clause)
    if m:
        seg = clause[max(0, m.start() - 30): m.end() + 60]
        up = re.search(r"expan|spike|rise|rising|above|exceed|increas|high|surge|jump", seg)
        down = re.search(r"contract|declin|falls?|below|low\b|decreas|compress|shrink", seg)
        if up or down:
            mm = re.search(P.NUM + r"\s*(?:x|×|times)", seg)
            na = re.search(r"(\d+)" + P.UNIT + r"?\s*(?:moving\s+)?(?:average|avg|mean|sma|median)", seg)
            add("atr_regime", {"n": P._period_near(clause, m.start(), m.end()) or 14,
                               "avg_n": int(na.group(1)) if na else 20, "mult": float(mm.group(1)) if mm else 1.0,
                               "cmp": "above" if up and (not down or up.start() < down.start()) else "below"}, m)
    elif re.search(r"volatility (?:contraction|compression|squeeze)|low volatility|(?:volatility )?contracts?", clause) \
            and not re.search(r"bollinger|keltner|band|width", clause):
        m = re.search(r"volatility (?:contraction|compression|squeeze)|low volatility|contracts?", clause)
        add("atr_regime", {"n": 14, "avg_n": 50, "mult": 1.0, "cmp": "below"}, m)
        ctx.note("volatility contraction read as ATR(14) below its 50-bar average")


# ------------------------------------------------------------------ the registry
# Oscillators: the parser's shared reader takes the pattern and the default period/levels.
# Registration order is the parser's matching order (stoch-RSI before RSI and stochastic).
for _name, _pattern, _n, _lo, _hi, _call, _example in [
    ("stochrsi", r"stoch(?:astic)?[ -]?rsi", 14, 20, 80, "talib.STOCHRSI(close, {n}, 14, 3, 0)[0]",
     "Buy when Stochastic RSI(14) < 20, sell when it rises above 80"),
    ("rsi", r"(?<![\w-])rsi\b|relative strength index", 14, 30, 70, "talib.RSI(close, {n})",
     "Buy when RSI(14) < 30, sell when RSI > 70, 2% stop"),
    ("stoch", r"stochastics?(?: oscillator)?|\bstoch\b|%k\b", 14, 20, 80, "talib.STOCH(high, low, close, {n}, 3, 0, 3, 0)[0]",
     "Buy when the stochastic oscillator(14) drops below 20, exit above 80"),
    ("cci", r"\bcci\b|commodity channel index", 20, -100, 100, "talib.CCI(high, low, close, {n})",
     "Go long when CCI(20) falls below -100 and exit when CCI rises above 100"),
    ("willr", r"williams\s*%?\s*r\b|\bwillr\b|williams percent range", 14, -80, -20, "talib.WILLR(high, low, close, {n})",
     "Buy when Williams %R(14) drops below -80, sell when it rises above -20"),
    ("mfi", r"\bmfi\b|money flow index", 14, 20, 80, "talib.MFI(high, low, close, volume, {n})",
     "Buy when MFI(14) < 20, sell when MFI > 80"),
    ("cmo", r"chande momentum oscillator|\bcmo\b", 14, -50, 50, "talib.CMO(close, {n})",
     "Buy when CMO(14) < -50, sell when CMO > 50"),
]:
    register(SignalKind(_name, _oscillator(_name, _call), family="oscillator", pattern=_pattern,
                        defaults={"n": _n, "low": _lo, "high": _hi}, example=_example))

register(SignalKind("ma_cross", _ma_cross, family="moving_average", defaults={"ma": "SMA", "fast": 10, "slow": 30},
                    less=(("fast_n", "slow_n"),), example="Buy when the 20 EMA crosses above the 50 EMA, short below"))
register(SignalKind("price_ma", _price_ma, family="moving_average", defaults={"ma": "SMA", "n": 50},
                    example="Go long when price closes above the 100 SMA with a 2x ATR trailing stop"))
register(SignalKind("bb", _bb, family="band", defaults={"n": 20, "k": 2.0, "mode": "reversion"},
                    example="Buy when price touches the lower Bollinger Band (20, 2) and exit at the middle band"))
register(SignalKind("bb_squeeze", _bb_squeeze, family="band", filter_only=True, fractions=("sq_pct",),
                    defaults={"n": 20, "k": 2.0, "lookback": 100, "pct": 0.1, "recent": 5},
                    example="Trade breakouts after a Bollinger Band squeeze (width at its lowest in 100 bars), "
                            "3% stop, 6% target"))
register(SignalKind("bb_expand", _bb_expand, family="band", filter_only=True, fractions=("bbx_pct",),
                    defaults={"n": 20, "k": 2.0, "lookback": 100, "pct": 0.5},
                    example="Buy when RSI(14) < 35 while Bollinger Band width is expanding"))
register(SignalKind("keltner", _keltner, family="band", defaults={"n": 20, "mult": 2.0, "mode": "reversion"},
                    example="Buy on a close above the upper Keltner Channel (20, 2x ATR), short below the lower one"))
register(SignalKind("macd", _macd, read=_read_macd, defaults={"fast": 12, "slow": 26, "signal": 9, "mode": "signal"},
                    less=(("macd_fast", "macd_slow"),),
                    example="Buy when MACD crosses above its signal line, sell when it crosses below"))
register(SignalKind("donchian", _donchian, read=_read_donchian, defaults={"n": 20, "exit_n": 10},
                    example="Buy a 55-bar Donchian channel breakout, exit at the 20-bar low"))
register(SignalKind("volume", _volume, read=_read_volume, filter_only=True,
                    defaults={"n": 20, "mult": 1.0, "cmp": "above"},
                    example="Buy when the 10/30 SMA cross up happens with volume 1.5x its 20-bar average"))
register(SignalKind("adx", _adx, read=_read_adx, filter_only=True, defaults={"n": 14, "level": 25, "cmp": "above"},
                    example="Buy when the 20/50 EMA cross happens and ADX(14) > 25"))
register(SignalKind("di", _di, defaults={"n": 14},
                    read=_period_reader("di", r"\+di|di\+|dmi|directional movement|adx crossover|adx cross", 14),
                    example="Go long when +DI crosses above -DI (DMI 14), short on the reverse"))
register(SignalKind("obv", _obv, read=_read_obv, defaults={"n": 20},
                    example="Buy when on-balance volume rises above its average, sell when it falls below"))
register(SignalKind("cmf", _cmf, defaults={"n": 20}, read=_period_reader("cmf", r"chaikin money flow|\bcmf\b", 20),
                    example="Go long when Chaikin Money Flow(20) turns positive, short when negative"))
register(SignalKind("vwap", _vwap, read=_read_vwap, defaults={"n": 96},
                    example="Buy when price crosses above VWAP, short when it falls below, 1% stop"))
register(SignalKind("sar", _sar, read=_read_sar, defaults={"step": 0.02, "max": 0.2},
                    example="Go long when price is above the Parabolic SAR, short below it"))
register(SignalKind("roc", _roc, read=_read_roc, defaults={"n": 10, "level": 0.0},
                    example="Buy when the rate of change(10) rises above 2, exit after 20 bars"))
register(SignalKind("vortex", _vortex, defaults={"n": 14},
                    read=_period_reader("vortex", r"vortex(?: indicator)?|\bvi\s*[+-]|\bvi\b", 14),
                    example="Go long when VI+ crosses above VI- (vortex 14), short when VI- is above"))
register(SignalKind("atr_regime", _atr_regime, read=_read_atr_regime, filter_only=True,
                    defaults={"n": 14, "avg_n": 20, "mult": 1.0, "cmp": "above"},
                    example="Buy a 20-bar breakout when ATR(14) is rising above its 50-bar average"))
