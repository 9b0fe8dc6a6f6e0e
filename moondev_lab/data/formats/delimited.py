"""CSV and other delimited text (``,`` ``;`` tab ``|``), plain or gzip, with or without a BOM."""
from __future__ import annotations

from pathlib import Path

from ..ingest import RawCandles, parse_csv, sniff_delimiter
from . import Format, Sample, register
from ._atomic import atomic_path


def _sniff(s: Sample) -> bool:
    text = s.text()
    if not text:
        return False
    lines = text.splitlines()
    if len(s.head) < s.size:  # the sample ends mid-line: judge whole lines only
        if len(lines) < 2:
            return False  # the first line does not even end in the sample: no CSV header is that long
        lines = lines[:-1]
    lines = lines[:20]
    return lines[0].count(sniff_delimiter(lines)) >= 4


def _read(s: Sample) -> RawCandles:
    return parse_csv(s.path, compression="gzip" if s.gzip else None, encoding=s.encoding)


def _write(frame, path: Path) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False, date_format="%Y-%m-%dT%H:%M:%SZ",
                     compression="gzip" if path.suffix == ".gz" else None)


register(Format("csv", "CSV (any common delimiter)", _sniff, _read, _write, suffix="csv", priority=90))
