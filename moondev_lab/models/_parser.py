"""Read a trading idea's text into a :class:`StrategySpec`, or say honestly what was not understood.

The parser is rule-based and deterministic. It

1. rejects ideas that need data an OHLCV series does not have (funding rates,
   liquidations, order books, options, on-chain data...) or concepts it cannot
   code faithfully (divergences, Fibonacci levels, pullbacks, unknown named
   indicators...), naming each;
2. reads stops and targets (``2% stop``, ``2x ATR trailing stop``, ``2:1 reward``);
3. splits the rest into clauses, each an entry or an exit clause, and reads the
   indicators in each (with their numbers: ``RSI(14) < 30``, ``20/50 SMA``);
4. fills every number the text did not give with a stated default, recorded in
   ``spec.assumptions`` (never silently).

"Days", "periods" and "bars" are all read as bars of whatever data the harness
runs on.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from .. import signals as registry
from .spec import Signal, StrategySpec, Stop

NUM = r"(\d+(?:\.\d+)?)"
UNIT = r"(?:[- ]?(?:period|day|bar|candle|session|hour|week|month|d|h)s?)"
_UNIT_BARS = {"week": 7, "month": 30}

# --- concepts the offline model refuses, each with the label reported in not_understood ---------------
BLOCKERS: list[tuple[str, str]] = [
    (r"funding", "funding rates (not in OHLCV data)"),
    (r"liquidat", "liquidation data (not in OHLCV data)"),
    (r"order ?book|order[- ]flow|bid[- ]ask|\bbids?\b|\basks?\b|market depth|book depth|depth imbalance|imbalances?\b",
     "order book / order flow (not in OHLCV data)"),
    (r"open interest", "open interest (not in OHLCV data)"),
    (r"sentiment|\bnews\b|social|twitter|tweets?|fear (?:and|&) greed|google trends", "sentiment / news data"),
    (r"on[- ]chain|whale|exchange (?:in|out)flows?|\binflows?\b|\boutflows?\b|hash ?rate|\bminers?\b|stablecoin|mvrv|"
     r"\bnvt\b|sopr|wallet", "on-chain data"),
    (r"implied vol|\biv\b|\boptions?\b|put[/ -]call|\bskew\b|gamma|\bvix\b|vvix|volatility surface",
     "options / implied volatility data"),
    (r"\bbasis\b|contango|backwardation|term structure|futures (?:premium|curve)", "futures basis / term structure"),
    (r"pairs? trad|cointegrat|correlat|arbitrage|\betfs?\b|dominance|altcoin|eth/btc|\bsectors?\b|basket|"
     r"cross[- ]asset|\byields?\b|treasury|\bbonds?\b|s&p|\bdollar\b|\bdxy\b|\bgold\b|\bspread between|"
     r"\bspreads?\b", "other markets / multi-asset data"),
    (r"short interest|\bstocks?\b|equities|earnings|dividend|analyst|sell-side|\bratings?\b|valuation|"
     r"fundamental", "stock / fundamental data"),
    (r"diverg", "divergence"),
    (r"fibonacci|\bfib\b", "Fibonacci levels"),
    (r"fractal", "fractals"),
    (r"volume profile|market profile|volume nodes?|low[- ]volume node|high[- ]volume node|point of control|\bpoc\b|"
     r"value area", "volume / market profile"),
    (r"pivot", "pivot points"),
    (r"support|resistance|swing (?:high|low)s?|key levels?|round numbers?", "support / resistance levels"),
    (r"engulfing|\bdoji|hammer|candlestick pattern|pin ?bar|inside bar|outside bar|heikin|renko|three white|"
     r"morning star|evening star", "candlestick patterns"),
    (r"ichimoku|kumo|tenkan|kijun", "Ichimoku"),
    (r"supertrend|super trend", "SuperTrend"),
    (r"\bhull\b|\bhma\b", "Hull moving average"),
    (r"\bkama\b|kaufman|adaptive moving", "adaptive moving averages"),
    (r"\btema\b|\bdema\b|triple exponential|double exponential", "TEMA / DEMA"),
    (r"guppy|gmma", "Guppy multiple moving averages"),
    (r"klinger", "Klinger oscillator"),
    (r"choppiness|chop index", "Choppiness index"),
    (r"mass index", "Mass index"),
    (r"elder|force index", "Elder ray / force index"),
    (r"kroll|forecast oscillator|chande'?s? (?!momentum)", "Chande forecast / Kroll indicators"),
    (r"ultimate oscillator|awesome oscillator|aroon|\btrix\b|ulcer|chaikin (?:oscillator|volatility)|"
     r"accumulation[/ -]distribution|\ba/d line|ease of movement|coppock|know sure thing|\bkst\b|"
     r"schaff|fisher transform|ehlers|detrended|dpo\b|\bppo\b|\bpvo\b|\bmomentum oscillator",
     "an oscillator the offline model does not implement"),
    (r"z[- ]score|hurst|kalman|garch|entropy|wavelet|fourier|markov|machine learning|neural|\bml\b|regression|"
     r"\bai\b", "statistical / machine-learning models"),
    (r"cluster", "liquidity / volume / volatility clusters"),
    (r"session|overnight|asian|london|new york|weekend|time of day|hour of|opening range|\bmonday|\bfriday|"
     r"intraday high|daily open|market open|market close", "session / time-of-day rules"),
    (r"pullback|pull back|retest|retrac|consolidat|range[- ]bound|sideways", "pullbacks / retests / consolidation"),
    (r"historical volatility|realized volatility|volatility ratio|volatility[- ]adjusted|atr ratio|"
     r"volatility percentile|volatility regime", "volatility measures other than ATR / band width"),
    (r"slope|angle|accelerat|decelerat", "slopes / acceleration"),
    (r"percentile (?:volume|of volume)|volume percentile|\d+(?:st|nd|rd|th) percentile volume",
     "volume percentiles"),
    (r"volume[- ]weighted (?!average price)|\bvwma\b|volume oscillator|on[- ]balance volume divergence|"
     r"volume delta|\bcvd\b|cumulative delta|\bdelta\b|\btick\b|upside/downside volume|up/down volume",
     "volume-weighted variants / volume delta"),
    (r"\bgaps?\b(?!.*true range)", "price gaps"),
    (r"higher highs|lower lows|higher lows|lower highs|trend ?lines?|channel lines?|wedge|triangle|flag|"
     r"head and shoulders|double (?:top|bottom)|chart pattern", "chart patterns"),
    (r"anchored vwap", "anchored VWAP"),
]
# Qualifiers the harness owns: noted, not refused.
IGNORABLE: list[tuple[str, str]] = [
    (r"\b\d+\s*-?\s*(?:min(?:ute)?|m|h|hour|hr)s?[- ](?:time ?frame|chart|candles?|bars?)|\b(?:daily|weekly|hourly|"
     r"4h|1h|15m|short-term|intraday) (?:time ?frame|chart|candles?|bars?)|on (?:the )?\d+\s*[mhd] time ?frame|"
     r"time ?frame", "the timeframe: the harness runs on the data you choose"),
    (r"position siz\w*|scal(?:e|ing) (?:in|out|positions?)|(?:size|sizing) (?:by|based)|risk (?:\d+(?:\.\d+)?%|"
     r"per trade)|kelly|leverage", "position sizing: the harness sizes orders"),
]
_INDICATOR_NAME = re.compile(r"\b((?:[A-Z][\w'+/-]*\s+){1,3}(?i:index|oscillator|indicator|ratio|bands?|channels?|"
                             r"exit|cloud|ribbon|line|flow))\b")


@dataclass
class _Hit:
    kind: str
    params: dict
    phrase: str
    span: tuple[int, int]


@dataclass
class _Ctx:
    text: str  # lower-cased idea
    spans: list[tuple[int, int]] = field(default_factory=list)  # what was recognised
    assumptions: list[str] = field(default_factory=list)

    def note(self, msg: str) -> None:
        if msg not in self.assumptions:
            self.assumptions.append(msg)


def _bars(value: str, unit: str | None) -> int:
    unit = (unit or "").strip(" -s")
    return int(float(value)) * _UNIT_BARS.get(unit, 1)


def _num(s: str | None) -> float | None:
    return None if s is None else float(s)


def _int_or_float(v: float):
    return int(v) if float(v).is_integer() else float(v)


# ------------------------------------------------------------------ stops and targets
_ATR = r"(?:atrs?|average true ranges?)"
_MULT = NUM + r"\s*(?:x|×|times)?\s*(?:the\s+)?(?:\d+[- ]?(?:period|day|bar)\s+|daily\s+)?"


def _parse_stops(ctx: _Ctx) -> tuple[Stop | None, Stop | None, int | None]:
    t = ctx.text
    sl = tp = None
    max_bars = None

    def take(m):
        ctx.spans.append(m.span())

    # ATR stops
    for m in re.finditer(r"(trailing\s+)?" + _MULT + _ATR + r"\b[^,;.]{0,25}?(trailing\s+)?(stop|sl\b|trail)", t):
        sl = sl or Stop("atr", float(m.group(2)), trailing=bool(m.group(1) or m.group(3) or "trail" in m.group(4)))
        take(m)
    for m in re.finditer(r"(trailing\s+)?(?:stop(?:[- ]loss)?|sl)\s+(?:of|at|set at|placed at|based on)?\s*(?:a\s+)?"
                         + _MULT + _ATR, t):
        sl = sl or Stop("atr", float(m.group(2)), trailing=bool(m.group(1)))
        take(m)
    for m in re.finditer(r"(?:trail(?:ing|s)?|chandelier)[^,;.]{0,20}?" + _MULT + _ATR, t):
        sl = sl or Stop("atr", float(m.group(1)), trailing=True)
        take(m)
    m = re.search(r"chandelier(?: exits?| stops?)?", t)
    if m:
        take(m)
        if not sl:
            sl = Stop("atr", 3.0, trailing=True)
            ctx.note("Chandelier exit read as a 3x ATR trailing stop")
    # percent stops
    for m in re.finditer(r"(trailing\s+)?" + NUM + r"\s*%\s*(trailing\s+)?(?:stop|sl\b|stop[- ]loss|trail)", t):
        sl = sl or Stop("pct", float(m.group(2)), trailing=bool(m.group(1) or m.group(3)))
        take(m)
    for m in re.finditer(r"(trailing\s+)?stop(?:[- ]loss)?\s+(?:of|at)?\s*(?:a\s+)?" + NUM + r"\s*%", t):
        sl = sl or Stop("pct", float(m.group(2)), trailing=bool(m.group(1)))
        take(m)
    # targets
    for m in re.finditer(NUM + r"\s*%\s*(?:take[- ]profit|profit(?: target)?|target|tp\b|gain)", t):
        tp = tp or Stop("pct", float(m.group(1)))
        take(m)
    for m in re.finditer(r"(?:take[- ]profit|profit target|target(?:ing)?|tp)\s+(?:of|at)?\s*(?:a\s+)?" + NUM + r"\s*%", t):
        tp = tp or Stop("pct", float(m.group(1)))
        take(m)
    for m in re.finditer(_MULT + _ATR + r"\s+(?:profit|take[- ]profit|target)", t):
        tp = tp or Stop("atr", float(m.group(1)))
        take(m)
    for m in re.finditer(r"(?:take[- ]profit|profit target|target(?:ing)?)\s+(?:of|at)?\s*(?:a\s+)?" + _MULT + _ATR, t):
        tp = tp or Stop("atr", float(m.group(1)))
        take(m)
    # "exits at a 2x ATR move", "2-3 ATR units from entry": both a stop and a target
    for m in re.finditer(_MULT + r"(?:-\s*\d+(?:\.\d+)?\s*)?" + _ATR + r"\s*(?:move|moves|reversal|from (?:the )?entry|"
                         r"away|units?|range|bands?|exit)", t):
        v = float(m.group(1))
        if not sl:
            sl = Stop("atr", v)
        if not tp:
            tp = Stop("atr", v)
        ctx.note(f"'{m.group(0).strip()}' read as a stop-loss and a take-profit of {v:g} ATR")
        take(m)
    for m in re.finditer(r"exit\w*\s+(?:at|on|when)\s+(?:price moves\s+)?" + _MULT + _ATR, t):
        v = float(m.group(1))
        sl, tp = sl or Stop("atr", v), tp or Stop("atr", v)
        ctx.note(f"'{m.group(0).strip()}' read as a stop-loss and a take-profit of {v:g} ATR")
        take(m)
    # ATR-based trailing stop with no number
    m = re.search(r"(?:atr|volatility)[- ]based (?:trailing )?stop|trailing stop (?:based on|using|of|at) (?:the |a )?"
                  r"(?:\w+ ){0,2}(?:atr|average true range)|atr trailing stop|trailing atr|volatility stop|"
                  r"dynamic atr", t)
    if m and not sl:
        sl = Stop("atr", 2.0, trailing=True)
        ctx.note("ATR trailing stop without a multiple: 2x ATR assumed")
        take(m)
    m = re.search(r"trailing stop|trailing[- ]stop[- ]loss", t)
    if m and not sl:
        sl = Stop("pct", 2.0, trailing=True)
        ctx.note("trailing stop without a size: 2% assumed")
        take(m)
    elif m:
        take(m)
    if not sl:
        m = re.search(r"\bstop[- ]?loss\b|\bstops?\b(?! (?:when|if|on))", t)
        if m and re.search(r"atr|average true range", t[max(0, m.start() - 40):m.end() + 40]):
            sl = Stop("atr", 2.0)
            ctx.note("ATR stop without a multiple: 2x ATR assumed")
            take(m)
    # risk:reward
    m = re.search(NUM + r"\s*:\s*1\b(?:\s*(?:risk[- ]reward|reward[- ]to[- ]risk|reward|r:r|rr|ratio))?", t) \
        or re.search(r"(?:risk[- ]reward|reward[- ]to[- ]risk)(?: ratio)?(?: of)?\s*(?:1\s*:\s*)" + NUM, t)
    if m and sl and not tp:
        rr = float(m.group(1))
        tp = Stop(sl.kind, round(sl.value * rr, 4), atr_n=sl.atr_n)
        take(m)
    elif m and not sl and not tp:
        sl, tp = Stop("pct", 1.0), Stop("pct", float(m.group(1)))
        ctx.note(f"risk-reward {m.group(1)}:1 with no stop size: 1% stop assumed")
        take(m)
    # time exit
    m = re.search(r"(?:after|within|hold(?:ing)?(?: for)?|max(?:imum)? of|time[- ]based exit (?:of|after)?)\s+"
                  r"(\d+)\s*(bars?|candles?|periods?|days?|hours?)", t)
    if m:
        max_bars = _bars(m.group(1), m.group(2))
        take(m)
    return sl, tp, max_bars


# ------------------------------------------------------------------------ indicators
def _period_near(clause: str, start: int, end: int, default: int | None = None) -> int | None:
    """The look-back written just before (``20-period RSI``) or after (``RSI(14)``, ``RSI 14``) a name (>= 2)."""
    n = _period_near_raw(clause, start, end, default)
    return None if n is None else max(2, n)


def _period_near_raw(clause: str, start: int, end: int, default: int | None = None) -> int | None:
    before = clause[max(0, start - 30):start]
    m = re.search(r"(\d+)\s*(" + UNIT[3:-1] + r")?[- ]*(?:simple |exponential |moving )?$", before)
    if m and not re.search(r"[%x×.]\s*$", before[:m.start() + len(before) - len(before)] or ""):
        if not re.search(r"[\d.]\s*[x×%]\s*$", before[:m.end()]):
            return _bars(m.group(1), m.group(2))
    after = clause[end:end + 40]
    m = re.match(r"\s*\(\s*(\d+)|\s*[- ]?(\d+)\b(?!\s*%|\s*x\b|\.\d)(?:\s*(" + UNIT[3:-1] + r"))?", after)
    if m:
        return _bars(m.group(1) or m.group(2), m.group(3))
    m = re.match(r"[^,;]{0,25}?(?:over|of|with|using)\s+(?:the\s+|a\s+)?(?:last\s+|past\s+)?(\d+)\s*(" + UNIT[3:-1] + r")",
                 after)
    return _bars(m.group(1), m.group(2)) if m else default


_BELOW = r"(?:<=?|below|under|less than|drops?\s+(?:below|under|to)|falls?\s+(?:below|under|to)|crosses?\s+(?:below|under)|" \
         r"dips?\s+(?:below|under|to)|beneath|reaches?|hits?|oversold\s+(?:at|level|below|of)?)"
_ABOVE = r"(?:>=?|above|over|exceeds?|exceeding|greater than|rises?\s+(?:above|over|to)|crosses?\s+(?:above|over)|" \
         r"climbs?\s+(?:above|over)|spikes?\s+(?:above|over)|overbought\s+(?:at|level|above|of)?)"


def _thresholds(seg: str) -> tuple[float | None, float | None]:
    low = re.search(_BELOW + r"\s*(?:the\s+|a\s+)?(?:level\s+of\s+)?(-?\d+(?:\.\d+)?)(?!\s*[%x×]|\s*(?:period|day|bar))", seg)
    high = re.search(_ABOVE + r"\s*(?:the\s+|a\s+)?(?:level\s+of\s+)?(-?\d+(?:\.\d+)?)(?!\s*[%x×]|\s*(?:period|day|bar))", seg)
    # "reaches/hits N" counts as below only when N is on the low side
    lo = _num(low.group(1)) if low else None
    hi = _num(high.group(1)) if high else None
    if low and re.match(r"reach|hit", low.group(0)) and lo is not None and lo >= 50:
        lo, hi = None, hi if hi is not None else lo
    m = re.search(r"(-?\d+)\s*/\s*(-?\d+)\s*(?:levels?|thresholds?|bands?)", seg)
    if m and lo is None and hi is None:
        lo, hi = sorted((float(m.group(1)), float(m.group(2))))
    return lo, hi


def _oscillators(clause: str, role: str, direction_hint: str, ctx: _Ctx, offset: int) -> list[_Hit]:
    hits = []
    taken: list[tuple[int, int]] = []
    for osc in registry.kinds("oscillator"):
        kind, pat = osc.name, osc.pattern
        n_def, lo_def, hi_def = osc.defaults["n"], osc.defaults["low"], osc.defaults["high"]
        for m in re.finditer(pat, clause):
            if any(a <= m.start() < b for a, b in taken):
                continue
            taken.append(m.span())
            n = _period_near(clause, m.start(), m.end())
            nxt = re.search(r"\b(?:and|while|with|or when|but)\b\s+(?!(?:above|below|over|under)\b)(?:the\s+)?"
                            r"(?!rsi|price)[a-z]", clause[m.end():])
            seg = clause[m.end(): m.end() + (nxt.start() if nxt else 80)]
            seg = re.sub(r"\(\s*\d+\s*\)", "", seg)
            lo, hi = _thresholds(seg)
            params: dict = {"n": n}  # None: filled with the default after merging clauses
            words_os = "oversold" in seg or "oversold" in clause
            words_ob = "overbought" in seg or "overbought" in clause
            mid = (lo_def + hi_def) / 2
            single = lo if hi is None else hi if lo is None else None
            if lo is None and hi is None:
                if words_os or words_ob:
                    lo, hi = lo_def, hi_def
                elif re.search(r"cross\w*\s+(?:above|over|below|under)?\s*(?:the\s+)?(?:zero|centre|center|mid)", seg):
                    params.update(mode="midline", level=_int_or_float(mid))
                else:
                    lo, hi = lo_def, hi_def
                    ctx.note(f"{kind.upper()} levels not given: {lo_def}/{hi_def}")
            elif single is not None and abs(single - mid) <= (hi_def - lo_def) * 0.125:
                params.update(mode="midline", level=_int_or_float(single))
            elif lo is None:
                lo = 2 * mid - hi
            elif hi is None:
                hi = 2 * mid - lo
            if "mode" not in params:
                params.update(low=_int_or_float(lo), high=_int_or_float(hi))
            hits.append(_Hit(kind, params, clause[m.start():m.end() + len(seg)], (offset + m.start(), offset + m.end())))
    return hits


_MA = r"(sma|ema|wma|ma|moving averages?|simple moving averages?|exponential moving averages?)"


def _ma_type(word: str) -> str:
    return "EMA" if word.startswith(("ema", "exponential")) else "WMA" if word == "wma" else "SMA"


def _moving_averages(clause: str, ctx: _Ctx, offset: int) -> list[_Hit]:
    hits = []
    used: list[tuple[int, int]] = []

    def add(kind, params, m):
        hits.append(_Hit(kind, params, m.group(0), (offset + m.start(), offset + m.end())))
        used.append(m.span())

    pats = [
        r"(\d+)\s*/\s*(\d+)\s*" + UNIT + r"?\s*" + _MA,
        r"(\d+)" + UNIT + r"?\s*(?:and|&|vs\.?|versus)\s*(\d+)" + UNIT + r"?\s*" + _MA,
        r"(?:\b" + _MA + r"\s*\(?\s*(\d+)\s*(?:,|/|and)\s*(\d+)\s*\)?)",
    ]
    for i, pat in enumerate(pats):
        for m in re.finditer(pat, clause):
            g = [x for x in m.groups() if x]
            nums = [int(x) for x in g if x.isdigit()]
            word = next(x for x in g if not x.isdigit())
            if len(nums) >= 2 and nums[0] != nums[1]:
                add("ma_cross", {"ma": _ma_type(word), "fast": min(nums[:2]), "slow": max(nums[:2])}, m)
    cross = (r"(\d+)" + UNIT + r"?\s*" + _MA + r"\s+(?:crosses|crossing|cross|crossed|moves|is|rises|stays|remains)?\s*"
             r"(above|over|below|under)\s+(?:the\s+|a\s+|its\s+)?(\d+)" + UNIT + r"?\s*" + _MA + r"?")
    for m in re.finditer(cross, clause):
        if any(a <= m.start() < b for a, b in used):
            continue
        a, b = int(m.group(1)), int(m.group(4))
        if a != b:
            add("ma_cross", {"ma": _ma_type(m.group(2)), "fast": min(a, b), "slow": max(a, b)}, m)
    for m in re.finditer(r"golden cross|death cross", clause):
        add("ma_cross", {"ma": "SMA", "fast": 50, "slow": 200}, m)
    m = re.search(r"\b" + _MA + r"\s+cross(?:over|es|ing)?|cross(?:over|ing)? of (?:the )?(?:two )?" + _MA, clause)
    if m and not hits and not any(a <= m.start() < b for a, b in used):
        add("ma_cross", {"ma": _ma_type(m.group(1) or m.group(2)), "fast": 10, "slow": 30}, m)
        ctx.note("moving-average crossover without lengths: 10/30 assumed")
    price = (r"(?:price|close|closes?|closing price|trades?|trading)\s+(?:is\s+|closes\s+|crosses\s+|breaks\s+|moves\s+|"
             r"stays\s+|remains\s+|holds\s+)?(above|below|over|under)\s+(?:the\s+|its\s+|a\s+)?(?:(\d+)" + UNIT +
             r"?\s*)?" + _MA)
    for m in re.finditer(price, clause):
        if any(a <= m.start() < b for a, b in used):
            continue
        n = int(m.group(2)) if m.group(2) else 50
        if not m.group(2):
            ctx.note("moving average without a length: 50 assumed")
        add("price_ma", {"ma": _ma_type(m.group(3)), "n": n, "side": m.group(1)}, m)
    for m in re.finditer(r"(above|below|over|under)\s+(?:the\s+|its\s+)?(\d+)" + UNIT + r"?\s*" + _MA + r"\b", clause):
        if not any(a <= m.start() < b for a, b in used):
            add("price_ma", {"ma": _ma_type(m.group(3)), "n": int(m.group(2)), "side": m.group(1)}, m)
    return hits


def _squeeze_params(clause: str, ctx: _Ctx) -> dict:
    look = None
    m = re.search(r"(?:lowest|narrowest|low|minimum|tightest|smallest)\b[^,;]{0,30}?(?:in|of|over)\s+(?:the\s+)?"
                  r"(?:last\s+|past\s+|prior\s+)?(\d+)" + UNIT, clause) or \
        re.search(r"(\d+)" + UNIT + r"\s+(?:low|lows|lowest|minimum|narrowest)", clause) or \
        re.search(r"(?:lowest|narrowest|low|minimum|tightest)\b\s+(?:in|of|over)\s+(?:the\s+)?(?:last\s+|past\s+)?(\d+)"
                  + UNIT, clause)
    if m:
        unit = re.search(r"(week|month)", m.group(0))
        look = _bars(m.group(1), unit.group(1) if unit else None)
    pct = None
    m2 = re.search(r"(?:lowest|bottom)\s+(\d+(?:\.\d+)?)\s*%|(\d+(?:\.\d+)?)(?:st|nd|rd|th)?\s+percentile|"
                   r"percentile\s+(?:below|under|of)\s+(\d+(?:\.\d+)?)", clause)
    if m2:
        pct = float(next(g for g in m2.groups() if g)) / 100
    if look is None:
        look = 100
        ctx.note("band-width squeeze look-back not given: 100 bars")
    if pct is None:
        pct = round(max(0.05, min(0.2, 2.0 / look)), 3) if m else 0.1
        ctx.note(f"a squeeze means band width in the lowest {pct:.0%} of its look-back")
    return {"lookback": max(look, 10), "pct": min(max(pct, 0.01), 0.5), "recent": 5}


def _bands(clause: str, role: str, ctx: _Ctx, offset: int, full: str) -> list[_Hit]:
    hits = []
    bb = re.search(r"bollinger(?:\s*bands?(?:\s*width)?)?|bandwidth|\bbbands?\b|\bbb\b(?:\s*width)?", clause)
    kc = re.search(r"keltner(?:\s*channels?)?|\bkc\b", clause)
    squeeze_words = r"width|bandwidth|squeez|contract|narrow|compress|tighten|lowest|percentile|inside|within"
    if bb:
        n = _period_near(clause, bb.start(), bb.end())
        k = re.search(NUM + r"\s*(?:σ|sd\b|std|standard deviations?|sigma|stdev)", clause)
        m = re.search(r"bollinger[^,;(]{0,15}\(\s*(\d+)\s*,\s*" + NUM + r"\s*\)", clause)
        if m:
            n, k_val = int(m.group(1)), float(m.group(2))
        else:
            k_val = float(k.group(1)) if k else 2.0
        if n is None:
            n = 20
            ctx.note("Bollinger period not given: 20")
        seg = clause[max(0, bb.start() - 40): bb.end() + 60]
        if re.search(r"expan|widen|rises above|expanding beyond|increas", seg) and re.search(r"width|bandwidth", seg):
            hits.append(_Hit("bb_expand", {"n": n, "k": k_val, **_squeeze_params(clause, ctx)} | {"pct": 0.5},
                             bb.group(0), (offset + bb.start(), offset + bb.end())))
            ctx.note("band-width expansion means width above the median of its look-back")
        elif re.search(squeeze_words, seg):
            params = {"n": n, "k": k_val, **_squeeze_params(clause, ctx)}
            if kc and re.search(r"squeez|inside|within|contract", clause):
                params.update(keltner=True, kc_mult=1.5)
                ctx.spans.append((offset + kc.start(), offset + kc.end()))
                kc = None if not re.search(r"(?:close|break|outside|beyond)\w*[^,;]{0,20}keltner|keltner[^,;]{0,20}"
                                           r"(?:breakout|break)", clause) else kc
            hits.append(_Hit("bb_squeeze", params, bb.group(0), (offset + bb.start(), offset + bb.end())))
            # "...and price closes above the upper band": a breakout trigger in the same clause
            if re.search(r"(?:close|break|breach|move|price|exit)\w*\s+(?:above\s+|below\s+|outside\s+(?:of\s+)?|beyond\s+|"
                         r"through\s+|out of\s+|a\s+|the\s+)*(?:upper|lower|bands?|either band|(?:bollinger )?"
                         r"(?:band )?(?:squeeze|contraction))", clause):
                hits.append(_Hit("bb", {"n": n, "k": k_val, "mode": "breakout"}, bb.group(0),
                                 (offset + bb.start(), offset + bb.end())))
        else:
            mode = "reversion"
            if re.search(r"breakout|break\w*\s+(?:above|out|through)|(?:close[sd]?|closing|price|moves?)\s+(?:above|outside|"
                         r"beyond)\s+(?:the\s+)?(?:upper|bands?)|outside (?:the |both )?bands?|expan", clause):
                mode = "breakout"
            elif not re.search(r"revers|revert|lower|touch|bounce|oversold|fade|inside|below", clause) and \
                    re.search(r"breakout|momentum|trend", full):
                mode = "breakout"
            hits.append(_Hit("bb", {"n": n, "k": k_val, "mode": mode}, bb.group(0),
                             (offset + bb.start(), offset + bb.end())))
    if kc:
        n = _period_near(clause, kc.start(), kc.end()) or 20
        mm = re.search(NUM + r"\s*(?:x|×)?\s*atr", clause)
        mode = "breakout" if re.search(r"break|outside|beyond|above the upper|breach", clause) else "reversion"
        hits.append(_Hit("keltner", {"n": n, "mult": float(mm.group(1)) if mm else 2.0, "mode": mode}, kc.group(0),
                         (offset + kc.start(), offset + kc.end())))
    return hits


def _others(clause: str, role: str, ctx: _Ctx, offset: int) -> list[_Hit]:
    """Kinds of the registry's "other" family, each read by its own entry, in registration order."""
    hits = []

    def add(kind, params, m):
        hits.append(_Hit(kind, params, m.group(0), (offset + m.start(), offset + m.end())))

    for kind in registry.kinds("other"):
        kind.read(clause, ctx, add)
    return hits


# --------------------------------------------------------------------------- assembly
_EXIT_WORDS = re.compile(r"\b(?:exit\w*|close (?:the |all )?(?:position|trade|long|short)s?|closing|cover\w*|"
                         r"take profits?|sell (?:when|if|on|at)|selling (?:when|if))\b")
_ENTRY_WORDS = re.compile(r"\b(?:enter\w*|entr(?:y|ies)|buy\w*|go(?:es|ing)? long|go(?:es|ing)? short|long when|"
                          r"short when|trigger\w*|trades? (?:when|if|on))\b")
_SPLIT = re.compile(r",(?![^(]*\))|;|\.(?!\d)|\band (?=(?:then )?(?:exit|sell|clos|cover|take))|\bwith (?=(?:an? )?exits?\b)|"
                    r"\b(?:while|whereas) (?=(?:shorting|selling|going short|exit))|\bor (?=short\w* when)")


def _direction(t: str, ctx: _Ctx) -> str:
    longish = re.search(r"\blongs?\b|\bbuy\w*|bullish|upside|go long", t)
    shortish = re.search(r"\bshort(?:s|ing|ed)?\b(?![- ]term)|\bsell short|bearish|downside", t)
    if re.search(r"long/short|long and short|long or short|both directions|either direction|direction of the "
                 r"(?:prevailing |breakout|trend|move|signal)|in the breakout direction|breakout direction|"
                 r"long/short|bidirectional", t) or (longish and shortish):
        return "both"
    if shortish:
        return "short"
    if not longish and re.search(r"breakouts?\b", t) and not re.search(r"\bbuy|long", t):
        ctx.note("direction not stated for breakouts: both sides traded")
        return "both"
    if not longish:
        ctx.note("direction not stated: long only")
    return "long"


def _overlaps(span, spans) -> bool:
    return any(span[0] < b and a < span[1] for a, b in spans)


def parse_idea(idea: str) -> tuple[StrategySpec | None, list[str]]:
    """``(spec, not_understood)``: a spec when the idea maps to code, else None and what was not understood.

    >>> spec, missing = parse_idea("Buy when RSI(14) < 30, sell when RSI > 70, 2% stop")
    >>> spec.describe()
    'long; entry: rsi(n=14, low=30, high=70); exit: rsi(n=14, low=30, high=70); stop 2%'
    >>> parse_idea("Short when funding rates spike and RSI > 70")[1]
    ['funding rates (not in OHLCV data)']
    """
    text = re.sub(r"[\u2010-\u2015]", "-", idea or "").replace("\u00d7", "x").replace("\u2264", "<=").replace("\u2265", ">=")
    t = text.lower()
    if len(t) != len(text):
        t = text.encode("ascii", "replace").decode().lower()
        text = t
    ctx = _Ctx(t)
    not_understood: list[str] = []
    for pat, label in BLOCKERS:
        if re.search(pat, t) and label not in not_understood:
            not_understood.append(label)
    for pat, label in IGNORABLE:
        m = re.search(pat, t)
        if m:
            ctx.note(f"ignored {label}")
            ctx.spans.append(m.span())
    if "median" in t:
        ctx.note("a median is read as the moving average of the same length")
    direction = _direction(t, ctx)
    sl, tp, max_bars = _parse_stops(ctx)

    # Entry and exit clauses. Stops were parsed above; blank them so "2x ATR stop" is not an ATR filter.
    masked = list(t)
    for a, b in ctx.spans:
        masked[a:b] = " " * (b - a)
    masked_t = "".join(masked)
    has_buy = bool(re.search(r"\bbuy", t))
    hits: list[tuple[str, _Hit]] = []
    role, pos, last_osc = "entry", 0, ""
    for part in _SPLIT.split(masked_t):
        start = masked_t.index(part, pos) if part else pos
        pos = start + len(part)
        if not part.strip():
            continue
        sell_exit = bool(re.search(r"\bsell(?:ing)? (?:when|if|on|at)", part)) and has_buy
        if (_EXIT_WORDS.search(part) and not re.search(r"(?:price|close|closes|bands?)\s+exits?\b", part)) or sell_exit:
            role = "exit"
        elif _ENTRY_WORDS.search(part):
            role = "entry"
        osc_hits = _oscillators(part, role, direction, ctx, start)
        pronoun = re.search(r"\bit\s+(?=(?:rises|crosses|exceeds|falls|drops|goes|moves|reaches|hits)\b)", part)
        if not osc_hits and pronoun and last_osc:  # "exit when it rises above 60": it = the oscillator named before
            osc_hits = _oscillators(part[:pronoun.start()] + last_osc + " " + part[pronoun.end():], role, direction,
                                    ctx, start)
        last_osc = osc_hits[-1].kind if osc_hits else last_osc
        clause_hits = (osc_hits + _moving_averages(part, ctx, start)
                       + _bands(part, role, ctx, start, t) + _others(part, role, ctx, start))
        hits += [(role, h) for h in clause_hits]
    for _, h in hits:
        ctx.spans.append(h.span)

    # Named indicators we did not recognise ("Mass Index", "Choppiness Index", ...)
    for m in _INDICATOR_NAME.finditer(text):
        name = m.group(1).strip()
        if not _overlaps(m.span(), ctx.spans) and not re.search(r"(?i)risk|reward|sharpe|true range|moving average|"
                                                                 r"bollinger|keltner|donchian|money flow", name):
            label = f"indicator '{name}'"
            if label not in not_understood and not any(name.lower() in x.lower() for x in not_understood):
                not_understood.append(label)

    signals = _merge(hits, direction)
    oscillators = {k.name: k for k in registry.kinds("oscillator")}
    filters = registry.filter_only_kinds()
    for s in signals:
        if s.kind in oscillators and s.params.get("n") is None:
            s.params["n"] = oscillators[s.kind].defaults["n"]
            ctx.note(f"{s.kind.upper()} period not given: {s.params['n']}")
    entries = [s for s in signals if s.entry]
    if not entries:
        not_understood.append("no entry rule the offline model recognises")
    directional = [s for s in entries if s.kind not in filters]
    if entries and not directional:
        if re.search(r"breakouts?|break out", t) and any(s.kind in ("bb_squeeze", "bb_expand") for s in entries):
            sq = next(s for s in entries if s.kind in ("bb_squeeze", "bb_expand"))
            bb = next((s for s in signals if s.kind == "bb"), None)  # e.g. an exit "on band touch"
            if bb is None:
                signals.append(Signal("bb", {"n": sq.params["n"], "k": sq.params["k"], "mode": "breakout"},
                                      entry=True, phrase="breakout"))
            else:
                bb.params["mode"], bb.entry = "breakout", True
            ctx.note("the squeeze breakout trades a close outside the Bollinger bands")
        elif re.search(r"breakouts?|break out", t):
            signals.append(Signal("donchian", {"n": 20, "exit_n": 10}, entry=True, phrase="breakout"))
            ctx.note("'breakout' with no level: a 20-bar high/low (Donchian) breakout")
        elif direction in ("long", "short") and not any("direction not stated" in a for a in ctx.assumptions):
            ctx.note(f"no directional trigger stated: {direction} entries on the filter conditions alone")
        else:
            not_understood.append("no directional entry signal (only filters such as volume or ADX)")
    if not_understood:
        return None, not_understood
    if not any(s.exit for s in signals):
        for s in signals:
            if s.entry and s.kind not in filters:
                s.exit = True
        if not (sl or tp or max_bars):
            ctx.note("no exit stated: exit when the entry signal reverses")
        else:
            ctx.note("exit also when the entry signal reverses")
    spec = StrategySpec(idea=idea, direction=direction, signals=signals, stop_loss=sl, take_profit=tp,
                        max_bars=max_bars, assumptions=ctx.assumptions)
    return spec, []


def _merge(hits: list[tuple[str, _Hit]], direction: str) -> list[Signal]:
    """One signal per kind; a kind seen in an entry clause and an exit clause is both."""
    out: dict[str, Signal] = {}
    for role, h in hits:
        params = {k: v for k, v in h.params.items() if k != "side"}
        if h.kind in out:
            sig = out[h.kind]
            for k, v in params.items():
                if k in ("low", "high") and role == "exit":
                    sig.params[k] = v if k == ("high" if direction != "short" else "low") else sig.params[k]
                elif sig.params.get(k) is None:
                    sig.params[k] = v
        else:
            sig = out[h.kind] = Signal(h.kind, params, phrase=h.phrase)
        if role == "entry":
            sig.entry = True
        else:
            sig.exit = True
    return list(out.values())
