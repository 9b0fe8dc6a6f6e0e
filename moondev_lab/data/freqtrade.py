"""freqtrade's data directory layout: ``PAIR-TIMEFRAME[-CANDLETYPE].EXT`` files.

freqtrade writes ``user_data/data/<exchange>/BTC_USDT-5m.feather`` (``/`` of
the pair spelled ``_``), futures under ``futures/`` as
``BTC_USDT_USDT-1h-futures.feather`` (the second ``_`` is the ``:`` of
``BTC/USDT:USDT``), and months as ``1Mo``. This module maps names both ways.

>>> parse_filename("BTC_USDT-5m.feather")
DataFile(pair='BTC/USDT', timeframe='5m', candle_type='spot')
>>> parse_filename("ETH_USDT_USDT-1h-futures.feather")
DataFile(pair='ETH/USDT:USDT', timeframe='1h', candle_type='futures')
>>> data_filename("BTC/USDT", "5m", "feather")
'BTC_USDT-5m.feather'
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

#: What freqtrade itself matches (idatahandler._OHLCV_REGEX, plus the extension).
_NAME = re.compile(r"^([a-zA-Z_\d-]+)-(\d+[a-zA-Z]{1,2})-?([a-zA-Z_]*)?\.(feather|parquet|json|json\.gz)$")
_PAIR = re.compile(r"^(([A-Za-z\d]{1,10})|^([A-Za-z\-]{1,6}))(_)")
_UNSAFE = ("/", " ", ".", "@", "$", "+", ":")
#: freqtrade's own suffixes, in its preference order when one pair has several.
SUFFIXES = ("feather", "parquet", "json.gz", "json")


@dataclass(frozen=True)
class DataFile:
    pair: str
    timeframe: str
    candle_type: str = "spot"


def parse_filename(name: str) -> DataFile | None:
    """The pair, timeframe and candle type a freqtrade data file name encodes, or None."""
    m = _NAME.match(Path(name).name)
    if not m:
        return None
    pair = _PAIR.sub(r"\g<1>/", m[1], count=1).replace("_", ":", 1)
    timeframe = re.sub("mo$", "M", m[2], flags=re.IGNORECASE)
    return DataFile(pair, timeframe, m[3] or "spot")


def pair_to_filename(pair: str) -> str:
    for ch in _UNSAFE:
        pair = pair.replace(ch, "_")
    return pair


def data_filename(pair: str, timeframe: str, suffix: str, candle_type: str = "spot") -> str:
    tail = "" if candle_type == "spot" else f"-{candle_type}"
    return f"{pair_to_filename(pair)}-{timeframe.replace('M', 'Mo')}{tail}.{suffix}"


def data_path(datadir: str | Path, pair: str, timeframe: str, suffix: str, candle_type: str = "spot") -> Path:
    """Where freqtrade looks for this series in ``datadir`` (futures files live in ``futures/``)."""
    d = Path(datadir) / ("futures" if candle_type != "spot" else "")
    return d / data_filename(pair, timeframe, suffix, candle_type)


def list_data_files(datadir: str | Path) -> list[tuple[Path, DataFile | None]]:
    """Every regular file in ``datadir`` and its ``futures/``, with what its name encodes (None: not a data file).

    When one series exists in several formats, only the one freqtrade would
    prefer is listed (see :data:`SUFFIXES`).
    """
    root = Path(datadir)
    files = [p for d in (root, root / "futures") if d.is_dir() for p in sorted(d.iterdir())
             if p.is_file() and not p.name.startswith(".")]
    chosen: dict[tuple, tuple[int, Path]] = {}
    out: list[tuple[Path, DataFile | None]] = []
    for p in files:
        info = parse_filename(p.name)
        if info is None:
            out.append((p, None))
            continue
        rank = next(i for i, s in enumerate(SUFFIXES) if p.name.endswith("." + s))
        key = (info, p.parent)
        if key not in chosen or rank < chosen[key][0]:
            chosen[key] = (rank, p)
    out += [(p, info) for (info, _), (_, p) in chosen.items()]
    return sorted(out, key=lambda t: str(t[0]))
