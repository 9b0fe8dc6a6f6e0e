"""Arrow-family files: parquet, feather (Arrow IPC file) and the Arrow IPC stream.

freqtrade's ``feather`` and ``parquet`` data formats store the columns
``date`` (tz-aware UTC), ``open``, ``high``, ``low``, ``close``, ``volume``;
any other table with a time column (or a datetime index in the pandas
metadata) and OHLCV columns reads as a generic file.
"""
from __future__ import annotations

from pathlib import Path

from ..ingest import RawCandles, clip, frame_rows
from ..validate import DataValidationError
from . import Format, Sample, register
from ._atomic import atomic_path

FREQTRADE_COLUMNS = ["date", "open", "high", "low", "close", "volume"]


def _to_raw(table, s: Sample, kind: str) -> RawCandles:
    frame = table.to_pandas()
    raw = frame_rows(frame, where=str(s.path))
    freqtrade = [str(c) for c in frame.columns][:6] == FREQTRADE_COLUMNS
    raw.format = f"freqtrade {kind}" if freqtrade else kind
    return raw


def _reader(kind: str, load):
    """A reader for one Arrow-family ``kind``; ``load(path)`` returns a pyarrow Table."""

    def read(s: Sample) -> RawCandles:
        import pyarrow as pa

        try:
            table = load(str(s.path))
        except (pa.ArrowException, OSError) as e:
            raise DataValidationError(f"{s.path}: damaged {kind} file: {clip(str(e), 160)}") from e
        return _to_raw(table, s, kind)

    return read


def _load_parquet(path: str):
    import pyarrow.parquet as pq

    return pq.read_table(path)


def _load_feather(path: str):
    import pyarrow.feather as feather

    return feather.read_table(path)


def _load_stream(path: str):
    import pyarrow as pa

    with pa.OSFile(path, "rb") as f:
        return pa.ipc.open_stream(f).read_all()


def _write_parquet(frame, path: Path) -> None:
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)


def _write_feather(frame, path: Path) -> None:
    with atomic_path(path) as tmp:  # lz4 as freqtrade writes it
        frame.reset_index(drop=True).to_feather(tmp, compression="lz4")


register(Format("parquet", "parquet (freqtrade's or any table with a time column)",
                lambda s: not s.gzip and s.head[:4] == b"PAR1", _reader("parquet", _load_parquet), _write_parquet,
                suffix="parquet", priority=10))
register(Format("feather", "feather / Arrow IPC file (freqtrade's or generic)",
                lambda s: not s.gzip and s.head[:6] == b"ARROW1", _reader("feather", _load_feather), _write_feather,
                suffix="feather", priority=11))
register(Format("arrow-stream", "Arrow IPC stream",
                lambda s: not s.gzip and s.head[:4] == b"\xff\xff\xff\xff", _reader("arrow-stream", _load_stream), priority=12))
