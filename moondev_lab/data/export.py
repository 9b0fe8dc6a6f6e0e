"""Write a stored series back out, as a plain file or into a freqtrade data directory.

Files carry freqtrade's columns (``date`` tz-aware UTC, ``open`` .. ``volume``),
so freqtrade, pandas and :func:`~moondev_lab.data.ingest.read_file` all read
them back; they appear atomically (temp file, then rename).

>>> from moondev_lab.data.export import export_series
>>> export_series("BTC/USDT", "5m", "feather", freqtrade_dir="user_data/data/binance")  # doctest: +SKIP
PosixPath('user_data/data/binance/BTC_USDT-5m.feather')
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from . import formats
from .freqtrade import data_filename, data_path
from .store import Store

_SUFFIX = {"csv": "csv", "parquet": "parquet", "feather": "feather", "ohlcv-json": "json"}


def freqtrade_frame(candles: pd.DataFrame) -> pd.DataFrame:
    """Store frame (``ts`` index, Title-case columns) -> freqtrade's columns."""
    out = candles.rename(columns=str.lower).rename_axis("date").reset_index()
    return out[["date", "open", "high", "low", "close", "volume"]]


def export_series(symbol: str, timeframe: str, format: str = "feather", *, out: str | Path | None = None,
                  freqtrade_dir: str | Path | None = None, source: str | None = None,
                  store: Store | None = None) -> Path:
    """Write one series; returns the path written.

    ``format`` is a registered writable format (csv, parquet, feather, ohlcv-json;
    "json" is accepted for ohlcv-json). With ``freqtrade_dir`` the file goes
    where freqtrade looks for it (``DIR/BTC_USDT-5m.feather``, futures pairs
    such as ``BTC/USDT:USDT`` under ``DIR/futures/``); else to ``out``, by
    default ``./<freqtrade file name>``.
    """
    name = "ohlcv-json" if format in ("json", "jsongz") else format
    fmt = formats.get(name)
    if fmt.write is None:
        raise ValueError(f"cannot write {fmt.label}; writable formats: {', '.join(formats.writable())}")
    suffix = _SUFFIX[name] + (".gz" if format == "jsongz" else "")
    if freqtrade_dir is not None and name == "csv":
        raise ValueError("freqtrade does not read CSV; use --format feather, parquet or json")
    candles = (store or Store()).read(symbol, timeframe, source)
    if freqtrade_dir is not None:
        path = data_path(freqtrade_dir, symbol, timeframe, suffix, "futures" if ":" in symbol else "spot")
    else:
        path = Path(out) if out is not None else Path(data_filename(symbol, timeframe, suffix))
    fmt.write(freqtrade_frame(candles), path)
    return path
