"""Timeframe strings ("15m", "1h", "1d") as nanoseconds, the way ccxt spells them."""
from __future__ import annotations

import re

_UNITS_NS = {
    "s": 1_000_000_000,
    "m": 60 * 1_000_000_000,
    "h": 3600 * 1_000_000_000,
    "d": 86400 * 1_000_000_000,
    "w": 7 * 86400 * 1_000_000_000,
}
_RE = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$")


def timeframe_ns(timeframe: str) -> int:
    """Length of one bar in nanoseconds.

    >>> timeframe_ns("15m") // 1_000_000_000
    900
    """
    m = _RE.match(str(timeframe))
    if not m or int(m.group(1)) <= 0:
        raise ValueError(
            f"unknown timeframe {timeframe!r}: use a number and one of s, m, h, d, w (e.g. '15m', '1h', '1d')"
        )
    return int(m.group(1)) * _UNITS_NS[m.group(2)]


def timeframe_ms(timeframe: str) -> int:
    return timeframe_ns(timeframe) // 1_000_000
