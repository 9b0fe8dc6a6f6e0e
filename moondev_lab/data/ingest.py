"""Turn files, ccxt ``fetch_ohlcv`` lists and DataFrames into clean candles.

Each reader first parses its input into :class:`RawCandles` (``ts`` as
``datetime64[ns, UTC]`` plus float Open/High/Low/Close/Volume, a row label
for messages, and notes), then :func:`finish` hands that to
:func:`~moondev_lab.data.validate.validate_ohlcv`, so every source is
checked the same way. :func:`read_file` detects the format from the content
(see :mod:`moondev_lab.data.formats`) and can infer the timeframe.

>>> from moondev_lab.data.ingest import read_csv, read_file
>>> df, report = read_csv("data/BTC-USD-15m.csv", "15m")   # doctest: +SKIP
>>> df.columns.tolist()                                      # doctest: +SKIP
['Open', 'High', 'Low', 'Close', 'Volume']
>>> df, report = read_file("user_data/data/binance/BTC_USDT-5m.feather")   # doctest: +SKIP
>>> report.format, report.timeframe                                         # doctest: +SKIP
('feather', '5m')
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from ._timeframes import timeframe_ns
from .validate import COLUMNS, DataValidationError, Mode, ValidationReport, validate_ohlcv

_TIME_NAMES = ("datetime", "date", "time", "timestamp", "ts", "open_time", "open time", "opentime", "date_time")
_ALIASES = {
    "Open": ("open", "o"),
    "High": ("high", "h"),
    "Low": ("low", "l"),
    "Close": ("close", "c", "price"),
    "Volume": ("volume", "v", "vol"),
}
_TZ_SUFFIX = re.compile(r"(?:Z|[+-]\d{2}:?\d{2})$")
_TZ_CAPTURE = r"(Z|[+-]\d{2}:?\d{2})$"
_EPOCH = r"-?\d+(?:\.\d*)?"
#: No OHLCV line is anywhere near this long; longer lines are refused before pandas sees them,
#: so a huge field costs one read buffer, not gigabytes (and its text never reaches a message).
MAX_LINE_BYTES = 64 * 1024
#: A wider header is not an OHLCV table (and pandas dedupes column names in quadratic time).
MAX_COLUMNS = 64
_DELIMITERS = (",", ";", "\t", "|")


@dataclass
class RawCandles:
    """Parsed, not yet validated candles: ``frame`` has ``ts`` and the float COLUMNS."""

    frame: pd.DataFrame
    row_label: Callable[[int], str]
    notes: list[str] = field(default_factory=list)
    non_numeric: list[tuple[int, str]] = field(default_factory=list)
    format: str = ""


def clip(value, n: int = 80) -> str:
    """``repr`` of a value, cut to ``n`` characters: messages stay short whatever the input holds."""
    text = repr(value) if not isinstance(value, str) or len(value) <= n else repr(value[:n])
    return text if len(text) <= n + 2 else text[:n] + "..."


def _pick_columns(columns: Sequence[str], where: str) -> dict[str, str]:
    """Map our canonical names to the input's column names, case-insensitively."""
    lower = {str(c).strip().lower(): c for c in columns}
    found: dict[str, str] = {}
    for name in _TIME_NAMES:
        if name in lower:
            found["ts"] = lower[name]
            break
    for canon, aliases in _ALIASES.items():
        for a in aliases:
            if a in lower:
                found[canon] = lower[a]
                break
    missing = [c for c in ["ts", *COLUMNS] if c not in found]
    if missing:
        want = {"ts": "a time column (datetime/date/timestamp)"}
        shown = [clip(str(c), 30) for c in list(columns)[:12]]
        more = f" and {len(columns) - 12} more" if len(columns) > 12 else ""
        raise DataValidationError(
            f"{where}: missing column(s) {', '.join(want.get(m, m) for m in missing)}; "
            f"found {', '.join(shown)}{more}"
        )
    return found


def _epoch_to_ns(values: np.ndarray) -> np.ndarray:
    """Numbers as epoch timestamps; the unit is inferred from the magnitude."""
    v = values.astype("float64")
    finite = v[np.isfinite(v)]
    mag = np.nanmedian(np.abs(finite)) if len(finite) else 0
    scale = 1 if mag > 1e17 else 1_000 if mag > 1e14 else 1_000_000 if mag > 1e11 else 1_000_000_000
    out = np.full(len(v), np.datetime64("NaT"), dtype="datetime64[ns]")
    ok = np.isfinite(v) & (np.abs(v) * scale < 2**63)
    out[ok] = (v[ok] * scale).astype("int64").view("datetime64[ns]")
    return out


def _parse_times(col: pd.Series, row_label) -> tuple[pd.Series, list[str]]:
    """Parse a time column to UTC. Mixed naive/aware or mixed-offset input is an error."""
    notes: list[str] = []
    if pd.api.types.is_datetime64_any_dtype(col.dtype):
        if getattr(col.dt, "tz", None) is None:
            notes.append("naive timestamps were taken as UTC")
            return col.dt.tz_localize("UTC").dt.as_unit("ns"), notes
        return col.dt.tz_convert("UTC").dt.as_unit("ns"), notes
    if pd.api.types.is_numeric_dtype(col.dtype):
        return pd.Series(pd.to_datetime(_epoch_to_ns(col.to_numpy()), utc=True), index=col.index), notes

    text = col.astype("string").str.strip()
    present = text.notna().to_numpy()
    if present.any() and text[present].str.fullmatch(_EPOCH).all():
        if text[present].str.fullmatch(r"(19|20|21)\d{6}").all():  # 20240131: a date, not an epoch
            return pd.to_datetime(text, format="%Y%m%d", utc=True, errors="coerce").dt.as_unit("ns"), notes
        nums = pd.to_numeric(text, errors="coerce").to_numpy(dtype="float64", na_value=np.nan)
        notes.append("timestamps are epoch numbers; the unit (s/ms/us/ns) was taken from their size")
        return pd.Series(pd.to_datetime(_epoch_to_ns(nums), utc=True), index=col.index), notes
    has_tz = text.str.contains(_TZ_SUFFIX, na=False).to_numpy()
    if has_tz[present].any() and not has_tz[present].all():
        minority_aware = has_tz[present].sum() <= (~has_tz[present]).sum()
        pos = int(np.flatnonzero(present & (has_tz if minority_aware else ~has_tz))[0])
        raise DataValidationError(
            f"{row_label(pos)}: timestamp {clip(text.iloc[pos])} is "
            f"{'timezone-aware' if minority_aware else 'naive'} while most rows are "
            f"{'naive' if minority_aware else 'timezone-aware'}; timestamps must be timezone-consistent"
        )
    if has_tz[present].any():
        offsets = text[present].str.extract(_TZ_CAPTURE, expand=False).str.replace(":", "").unique()
        if len(offsets) > 1:
            notes.append(f"timestamps carried several UTC offsets {list(offsets)[:5]}; all converted to UTC")
    else:
        notes.append("naive timestamps were taken as UTC")
    parsed = pd.to_datetime(text, utc=True, errors="coerce", format="ISO8601")
    if parsed.isna().sum() > text.isna().sum():  # ISO8601 too strict for this file: let pandas infer
        parsed = pd.to_datetime(text, utc=True, errors="coerce", format="mixed")
    return parsed.dt.as_unit("ns"), notes


def parse_table(frame: pd.DataFrame, where: str, row_label: Callable[[int], str]) -> RawCandles:
    """A table with a time column and OHLCV columns (any case and common aliases) -> :class:`RawCandles`."""
    cols = _pick_columns(frame.columns, where)
    ts, notes = _parse_times(frame[cols["ts"]], row_label)
    raw = {"ts": ts.reset_index(drop=True)}
    non_numeric: list[tuple[int, str]] = []
    for canon in COLUMNS:
        src = frame[cols[canon]]
        num = pd.to_numeric(src, errors="coerce")
        bad = num.isna() & src.notna()
        if pd.api.types.is_object_dtype(src.dtype) or pd.api.types.is_string_dtype(src.dtype):
            bad &= src.astype("string").str.strip().ne("")
        for pos in np.flatnonzero(bad.to_numpy()):
            non_numeric.append((int(pos), f"{canon}={clip(src.iloc[pos])}"))
        raw[canon] = num.astype("float64").reset_index(drop=True)
    return RawCandles(pd.DataFrame(raw), row_label, notes, non_numeric)


def finish(raw: RawCandles, timeframe: str, mode: Mode = "strict") -> tuple[pd.DataFrame, ValidationReport]:
    """Validate parsed candles: ``(clean_frame, report)``."""
    if raw.non_numeric and mode == "strict":
        pos, what = raw.non_numeric[0]
        raise DataValidationError(f"{raw.row_label(pos)}: {what} is not a number")
    clean, report = validate_ohlcv(raw.frame, timeframe, mode, raw.row_label)
    report.notes[:0] = raw.notes
    report.format = raw.format
    if raw.non_numeric:
        report.notes.append("non-numeric values were treated as missing: "
                            + "; ".join(f"{raw.row_label(p)} {w}" for p, w in raw.non_numeric[:10]))
    return clean, report


def _check_lines(path: Path, opener, what: str) -> None:
    """Refuse overlong lines while streaming the file in 1 MiB blocks: memory stays one block."""
    line, since_newline = 1, 0  # line number at the block start; bytes of it seen so far
    with opener(path) as f:
        while block := f.read(1 << 20):
            newlines = np.flatnonzero(np.frombuffer(block, dtype=np.uint8) == 10)
            if not len(newlines):
                since_newline += len(block)
            else:
                lengths = np.diff(newlines, prepend=-1) - 1
                lengths[0] += since_newline
                over = np.flatnonzero(lengths > MAX_LINE_BYTES)
                if len(over):
                    line += int(over[0])
                    since_newline = MAX_LINE_BYTES + 1
                else:
                    line += len(newlines)
                    since_newline = len(block) - int(newlines[-1]) - 1
            if since_newline > MAX_LINE_BYTES:
                raise DataValidationError(f"{what} line {line} is longer than {MAX_LINE_BYTES:,} bytes: "
                                          "not an OHLCV row (refused before parsing)")


def sniff_delimiter(lines: list[str]) -> str:
    """The delimiter that splits the header and the first rows into the same number (>= 5) of fields."""
    best, best_n = ",", 0
    for d in _DELIMITERS:
        counts = {ln.count(d) for ln in lines if ln.strip()}
        n = min(counts, default=0)
        if n >= 4 and n > best_n and (max(counts) - n <= 1):  # a trailing delimiter on some lines is fine
            best, best_n = d, n
    return best


def parse_csv(path: str | Path, *, sep: str | None = None, compression: str | None = None,
              encoding: str = "utf-8-sig") -> RawCandles:
    """Parse an OHLCV CSV (no validation yet); see :func:`read_csv`."""
    import gzip

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such CSV file: {path}")
    opener = gzip.open if compression == "gzip" else open
    _check_lines(path, lambda p: opener(p, "rb"), path.name)
    with opener(path, "rt", encoding=encoding, errors="replace", newline="") as f:
        head = [f.readline() for _ in range(20)]
    header = head[0].strip()
    sep = sep or sniff_delimiter(head)
    width = header.count(sep) + 1
    if width > MAX_COLUMNS:
        raise DataValidationError(f"{path}: the header has {width:,} {sep!r}-separated columns "
                                  f"(more than {MAX_COLUMNS}): not an OHLCV table")
    # "1,5;2,25" rows: semicolon-separated with decimal commas (European spreadsheets).
    decimal = "," if sep == ";" and any(re.search(r"\d,\d", ln) for ln in head[1:]) else "."
    # Binance's public kline files (and many exports) have no header: an epoch and five numbers first.
    fields = [f.strip() for f in header.split(sep)]
    headless = len(fields) >= 6 and all(re.fullmatch(_EPOCH, f) for f in fields[:6])
    names = ["timestamp", *(c.lower() for c in COLUMNS), *(f"extra_{i}" for i in range(6, width))] if headless else None
    try:
        # dtype=str keeps every field verbatim so errors can quote the bad text.
        frame = pd.read_csv(path, sep=sep, skipinitialspace=True, dtype=str, keep_default_na=False,
                            na_values=[""], encoding=encoding, compression=compression,
                            header=None if headless else "infer", names=names)
    except pd.errors.ParserError as e:
        raise DataValidationError(f"{path}: malformed CSV: {clip(str(e), 200)}") from e
    except pd.errors.EmptyDataError as e:
        raise DataValidationError(f"{path}: the file is empty") from e
    frame.columns = [str(c).strip() for c in frame.columns]
    # A trailing comma on every line yields an unnamed, all-empty column.
    frame = frame.loc[:, [c for c in frame.columns if not (c == "" or c.startswith("Unnamed:")) or frame[c].notna().any()]]
    if decimal == ",":
        ts_col = _pick_columns(frame.columns, str(path))["ts"]
        frame = frame.apply(lambda col: col if col.name == ts_col else col.str.replace(",", ".", regex=False))
    first = 1 if headless else 2  # line 1 is the header, if there is one
    label = lambda i: f"{path.name} line {i + first}"  # noqa: E731
    raw = parse_table(frame, str(path), label)
    if headless:
        raw.notes.insert(0, "no header: columns read as time, open, high, low, close, volume (Binance/ccxt order)")
    if sep != ",":
        raw.notes.insert(0, f"delimiter {sep!r}" + (", decimal comma" if decimal == "," else ""))
    raw.format = "csv"
    return raw


def read_csv(path: str | Path, timeframe: str, mode: Mode = "strict") -> tuple[pd.DataFrame, ValidationReport]:
    """Read an OHLCV CSV, tolerant of header quirks, strict about values.

    Handles ``datetime, open, high, low, close, volume,`` (spaces, trailing
    comma), any column order and case, ``,``/``;``/tab/``|`` delimiters, a
    BOM, CRLF line ends, and ISO or epoch (s/ms/us/ns) timestamps. Lines
    over :data:`MAX_LINE_BYTES` and headers over :data:`MAX_COLUMNS` are
    refused before parsing, so no file can make it hang or blow up memory.
    """
    return finish(parse_csv(path), timeframe, mode)


def ccxt_rows(rows: Sequence[Sequence], where: str = "ccxt") -> RawCandles:
    """``[[ms, o, h, l, c, v], ...]`` -> :class:`RawCandles` (extra columns are ignored)."""
    label = lambda i: f"{where} candle {i}"  # noqa: E731
    bad_shape = [i for i, r in enumerate(rows) if not isinstance(r, (list, tuple)) or len(r) < 6]
    if bad_shape:
        raise DataValidationError(f"{label(bad_shape[0])}: expected [ms, open, high, low, close, volume], "
                                  f"got {clip(rows[bad_shape[0]])}")
    arr = pd.DataFrame([list(r[:6]) for r in rows], columns=["ts", *COLUMNS])
    times = pd.to_numeric(arr["ts"], errors="coerce").to_numpy(dtype="float64")
    # ccxt and freqtrade write milliseconds; other tools' exports use seconds: the size tells them apart.
    ts = _epoch_to_ns(times)
    raw = pd.DataFrame({"ts": pd.to_datetime(ts, utc=True),
                        **{c: pd.to_numeric(arr[c], errors="coerce").astype("float64") for c in COLUMNS}})
    finite = np.abs(times[np.isfinite(times)])
    notes = [] if not len(finite) or 1e11 < np.median(finite) <= 1e14 else \
        ["candle times are not epoch milliseconds; the unit was taken from their size"]
    return RawCandles(raw, label, notes)


def from_ccxt(rows: Sequence[Sequence], timeframe: str, mode: Mode = "strict",
              where: str = "ccxt") -> tuple[pd.DataFrame, ValidationReport]:
    """Candles from ``exchange.fetch_ohlcv``: ``[[ms, o, h, l, c, v], ...]``.

    ccxt returns rows of ``None`` when an exchange answers 200 with a non-JSON
    body, so these rows are validated like any other input.
    """
    return finish(ccxt_rows(rows, where), timeframe, mode)


def frame_rows(frame: pd.DataFrame, where: str = "DataFrame") -> RawCandles:
    """A DataFrame indexed (or with a column) by time -> :class:`RawCandles`."""
    if isinstance(frame.index, pd.DatetimeIndex):
        frame = frame.rename_axis("ts").reset_index()
    return parse_table(frame, where, lambda i: f"row {i}")


def from_frame(frame: pd.DataFrame, timeframe: str, mode: Mode = "strict") -> tuple[pd.DataFrame, ValidationReport]:
    """Candles from a DataFrame indexed (or with a column) by time."""
    return finish(frame_rows(frame), timeframe, mode)


def infer_timeframe(ts: pd.Series | np.ndarray) -> str:
    """The bar length most consecutive candles are apart, spelled like ccxt ("5m", "1h", "1d").

    >>> infer_timeframe(pd.Series(pd.date_range("2024-01-01", periods=5, freq="15min", tz="UTC")))
    '15m'
    """
    ns = pd.Series(ts).dropna().to_numpy(dtype="datetime64[ns]").view("int64")
    steps = np.diff(np.unique(ns))
    if not len(steps):
        raise DataValidationError("cannot infer the timeframe from fewer than two candles; pass a timeframe")
    values, counts = np.unique(steps, return_counts=True)
    step = int(values[np.argmax(counts)])
    for unit, size in (("w", 7 * 86400), ("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if step % (size * 1_000_000_000) == 0:
            tf = f"{step // (size * 1_000_000_000)}{unit}"
            timeframe_ns(tf)
            return tf
    raise DataValidationError(f"candles are {step} ns apart, not a whole number of seconds; pass a timeframe")


def read_file(path: str | Path, timeframe: str | None = None, mode: Mode = "strict",
              format: str | None = None) -> tuple[pd.DataFrame, ValidationReport]:
    """Read candles from any registered format, detected from the file's content.

    ``timeframe=None`` infers it from the candles' spacing (a note in the
    report says so). ``format`` forces a format by name (see
    :func:`moondev_lab.data.formats.formats`).
    """
    from . import formats

    fmt, sample = formats.detect(path) if format is None else (formats.get(format), formats.sample(path))
    raw = fmt.read(sample)
    raw.format = raw.format or fmt.name
    if timeframe is None:
        timeframe = infer_timeframe(raw.frame["ts"])
        raw.notes.insert(0, f"timeframe {timeframe} inferred from the candles' spacing")
    return finish(raw, timeframe, mode)
