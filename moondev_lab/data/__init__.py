"""The OHLCV data layer: validate, store (memory-mappable Arrow files), pool, fetch.

>>> from moondev_lab.data import DataPool, Store
>>> Store().import_csv("data/BTC-USD-15m.csv", "BTC/USD", "15m")   # doctest: +SKIP
>>> df = DataPool().get("BTC/USD", "15m")                           # doctest: +SKIP
>>> candles, report = read_file("BTC_USDT-5m.feather")   # any format, detected   # doctest: +SKIP
"""
from ._timeframes import timeframe_ms, timeframe_ns
from .ingest import from_ccxt, from_frame, read_csv, read_file
from .pool import DataPool, PoolStats, default_pool, ensure_sample
from .store import CorruptStoreError, Manifest, SeriesNotFound, Store, StoreError, WriteResult
from .validate import DataValidationError, ValidationReport, validate_ohlcv

__all__ = [
    "CorruptStoreError", "DataPool", "DataValidationError", "Manifest", "PoolStats", "SeriesNotFound",
    "Store", "StoreError", "ValidationReport", "WriteResult", "default_pool", "ensure_sample",
    "from_ccxt", "from_frame", "read_csv", "read_file", "timeframe_ms", "timeframe_ns", "validate_ohlcv",
]
