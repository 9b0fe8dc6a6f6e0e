"""Market-data file formats, told apart by their content (magic bytes, then sniffing), never by name alone.

Each format is a :class:`Format` in one registry: a ``sniff`` test on a
:class:`Sample` (the first bytes of the file, decompressed if gzip), a
``read`` that turns the file into :class:`~moondev_lab.data.ingest.RawCandles`
(validated afterwards like every other input), and optionally a ``write``
used by ``moondev-lab data export``. Formats are tried in ``priority`` order;
the first whose ``sniff`` says yes reads the file.

>>> from moondev_lab.data.formats import formats
>>> [f.name for f in formats()]
['parquet', 'feather', 'arrow-stream', 'ohlcv-json', 'csv']

Adding a format is one :func:`register` call in a module imported below.
A file no format claims raises :class:`UnknownFormatError`, which says what
the content looks like (``a ZIP archive``, ``HTML``, ``a JSON object``...).
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ..validate import DataValidationError

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from ..ingest import RawCandles

#: How much of a file detection looks at: enough for a CSV header and a few rows, small for any file.
HEAD_BYTES = 64 * 1024


class UnknownFormatError(DataValidationError):
    """No registered format recognises the file's content."""


@dataclass(frozen=True)
class Sample:
    """What detection sees of a file: its first bytes (decompressed if gzip) and its last 8 on disk."""

    path: Path
    head: bytes
    tail: bytes
    size: int
    gzip: bool = False

    def text(self) -> str | None:
        """The head as text (BOM removed), or None if it is not UTF-8/UTF-16 text."""
        raw = self.head
        for bom, enc in ((b"\xef\xbb\xbf", "utf-8"), (b"\xff\xfe", "utf-16-le"), (b"\xfe\xff", "utf-16-be")):
            if raw.startswith(bom):
                raw, encoding = raw[len(bom):], enc
                break
        else:
            encoding = "utf-8"
        if b"\x00" in raw and encoding == "utf-8":
            return None
        try:
            return raw.decode(encoding)
        except UnicodeDecodeError as e:
            if e.start >= len(raw) - 4:  # a multi-byte character cut by the sample's end
                return raw[:e.start].decode(encoding)
            return None

    @property
    def encoding(self) -> str:
        return {b"\xff\xfe": "utf-16", b"\xfe\xff": "utf-16"}.get(self.head[:2], "utf-8-sig")


@dataclass(frozen=True)
class Format:
    """One file format: how to recognise it, read it and (optionally) write it."""

    name: str
    label: str  # for people: "freqtrade/ccxt JSON candles"
    sniff: Callable[[Sample], bool]
    read: Callable[[Sample], "RawCandles"]
    write: Callable[["pd.DataFrame", Path], None] | None = None  # frame in freqtrade's columns
    suffix: str = ""
    priority: int = 50

    def __repr__(self) -> str:
        return f"Format({self.name!r}: {self.label})"


_REGISTRY: dict[str, Format] = {}


def register(fmt: Format) -> Format:
    """Add (or replace) a format in the registry."""
    _REGISTRY[fmt.name] = fmt
    return fmt


def formats() -> list[Format]:
    """All registered formats, in the order detection tries them."""
    return sorted(_REGISTRY.values(), key=lambda f: f.priority)


def get(name: str) -> Format:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown format {name!r}; known: {', '.join(_REGISTRY)}") from None


def writable() -> list[str]:
    return [f.name for f in formats() if f.write is not None]


def sample(path: str | Path) -> Sample:
    """Read what detection needs: bounded by :data:`HEAD_BYTES`, whatever the file's size."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory")
    with open(path, "rb") as f:  # FileNotFoundError names the path
        head = f.read(HEAD_BYTES)
        size = f.seek(0, 2)
        f.seek(max(0, size - 8))
        tail = f.read(8)
    if head[:2] != b"\x1f\x8b":
        return Sample(path, head, tail, size)
    try:  # decompress only the head: max_length bounds the output, whatever the ratio
        inner = zlib.decompressobj(wbits=31).decompress(head, HEAD_BYTES)
    except zlib.error as e:
        raise DataValidationError(f"{path}: damaged gzip file ({e})") from e
    return Sample(path, inner, tail, size, gzip=True)


def detect(path: str | Path) -> tuple[Format, Sample]:
    """The format of ``path``'s content, or :class:`UnknownFormatError` naming what it looks like."""
    s = sample(path)
    for fmt in formats():
        if fmt.sniff(s):
            return fmt, s
    raise UnknownFormatError(f"{s.path}: unknown format: {describe(s)}; "
                             f"expected one of: {', '.join(f.label for f in formats())}")


_MAGIC = [
    (b"PK\x03\x04", "a ZIP archive (an .xlsx workbook is one: save it as CSV)"),
    (b"\x89HDF", "HDF5 (freqtrade's old hdf5 format: `freqtrade convert-data --format-to feather` first)"),
    (b"SQLite format 3\x00", "an SQLite database"),
    (b"%PDF", "a PDF document"),
    (b"\x93NUMPY", "a NumPy .npy array"),
    (b"\x80\x04", "a Python pickle"),
    (b"\x80\x05", "a Python pickle"),
    (b"BZh", "a bzip2 archive"),
    (b"\xfd7zXZ", "an xz archive"),
    (b"\x28\xb5\x2f\xfd", "a zstd archive"),
    (b"FEA1", "a feather v1 file (rewrite it with pandas >= 1.0 / pyarrow as feather v2)"),
]


def describe(s: Sample) -> str:
    """A short phrase for what a sample looks like; never echoes more than 60 characters of it."""
    if not s.head:
        return "the file is empty" if s.size == 0 else "no readable content"
    for magic, what in _MAGIC:
        if s.head.startswith(magic):
            return what + (" inside gzip" if s.gzip else "")
    text = s.text()
    if text is None:
        return f"binary data starting {s.head[:8].hex(' ')}"
    stripped = text.lstrip()
    low = stripped[:200].lower()
    if low.startswith(("<!doctype html", "<html")) or "<body" in low:
        return "an HTML page (a download that failed, or a web page saved by mistake?)"
    if stripped.startswith("{"):
        return "a JSON object (expected a list of [time, open, high, low, close, volume] rows)"
    if stripped.startswith("["):
        return f"JSON that is not a list of candle rows (starts {_clip(stripped, 60)!r})"
    first = stripped.splitlines()[0] if stripped else ""
    if "\n" not in text and len(s.head) < s.size:
        return f"text whose first line is longer than {HEAD_BYTES // 1024} KiB (starts {_clip(first, 40)!r})"
    return f"text whose first line is {_clip(first, 60)!r}, which is not an OHLCV header"


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[:n] + "..."


# Built-in formats register themselves on import.
from . import arrow, delimited, ohlcv_json  # noqa: E402,F401  (import order is irrelevant: priorities decide)
