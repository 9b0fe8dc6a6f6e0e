"""ccxt / freqtrade candles as JSON: ``[[ms, open, high, low, close, volume], ...]``, plain or ``.json.gz``.

This is what ``exchange.fetch_ohlcv`` returns and what freqtrade's ``json`` /
``jsongz`` data formats store (``PAIR-TIMEFRAME.json``). Such a file is often
one line of a megabyte or more, so it must never reach a CSV parser.
"""
from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

from ..ingest import RawCandles, ccxt_rows, clip
from ..validate import DataValidationError
from . import Format, Sample, register
from ._atomic import atomic_path

_START = re.compile(r"\s*\[\s*(\[|\])")


def _sniff(s: Sample) -> bool:
    text = s.text()
    return text is not None and _START.match(text) is not None


def _read(s: Sample) -> RawCandles:
    opener = gzip.open if s.gzip else open
    with opener(s.path, "rb") as f:
        data = f.read()
    try:
        rows = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise DataValidationError(f"{s.path}: malformed JSON candles: {clip(str(e), 120)}") from e
    if not isinstance(rows, list):
        raise DataValidationError(f"{s.path}: expected a JSON list of candle rows, got {type(rows).__name__}")
    return ccxt_rows(rows, where=s.path.name)


def _write(frame, path: Path) -> None:
    ms = frame["date"].dt.as_unit("ms").astype("int64")
    values = [[int(t), *row] for t, row in zip(ms, frame[["open", "high", "low", "close", "volume"]].to_numpy().tolist())]
    data = json.dumps(values, separators=(",", ":")).encode()
    with atomic_path(path) as tmp:
        tmp.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


register(Format("ohlcv-json", "freqtrade/ccxt JSON candles ([[ms, o, h, l, c, v], ...], also .json.gz)",
                _sniff, _read, _write, suffix="json", priority=30))
