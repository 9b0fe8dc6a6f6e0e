"""Turn CSV files, ccxt ``fetch_ohlcv`` lists and DataFrames into clean candles.

Each reader normalises its input into a *raw* frame (``ts`` as
``datetime64[ns, UTC]`` plus float Open/High/Low/Close/Volume) and hands it to
:func:`~moondev_lab.data.validate.validate_ohlcv`, so every source is checked
the same way.

>>> from moondev_lab.data.ingest import read_csv
>>> df, report = read_csv("data/BTC-USD-15m.csv", "15m")   # doctest: +SKIP
>>> df.columns.tolist()                                      # doctest: +SKIP
['Open', 'High', 'Low', 'Close', 'Volume']
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

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
        raise DataValidationError(
            f"{where}: missing column(s) {', '.join(want.get(m, m) for m in missing)}; "
            f"found {[str(c) for c in columns]}"
        )
    return found


def _epoch_to_ns(values: np.ndarray) -> np.ndarray:
    """Numbers as epoch timestamps; the unit is inferred from the magnitude."""
    v = values.astype("float64")
    finite = v[np.isfinite(v)]
    mag = np.nanmedian(np.abs(finite)) if len(finite) else 0
    scale = 1 if mag > 1e17 else 1_000 if mag > 1e14 else 1_000_000 if mag > 1e11 else 1_000_000_000
    out = np.full(len(v), np.datetime64("NaT"), dtype="datetime64[ns]")
    ok = np.isfinite(v)
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
    has_tz = text.str.contains(_TZ_SUFFIX, na=False).to_numpy()
    present = text.notna().to_numpy()
    if has_tz[present].any() and not has_tz[present].all():
        minority_aware = has_tz[present].sum() <= (~has_tz[present]).sum()
        pos = int(np.flatnonzero(present & (has_tz if minority_aware else ~has_tz))[0])
        raise DataValidationError(
            f"{row_label(pos)}: timestamp {text.iloc[pos]!r} is "
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


def _to_raw(frame: pd.DataFrame, cols: dict[str, str], row_label) -> tuple[pd.DataFrame, list[str], list[tuple[int, str]]]:
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
            non_numeric.append((int(pos), f"{canon}={src.iloc[pos]!r}"))
        raw[canon] = num.astype("float64").reset_index(drop=True)
    return pd.DataFrame(raw), notes, non_numeric


def _finish(raw, notes, non_numeric, timeframe, mode, row_label) -> tuple[pd.DataFrame, ValidationReport]:
    if non_numeric and mode == "strict":
        pos, what = non_numeric[0]
        raise DataValidationError(f"{row_label(pos)}: {what} is not a number")
    clean, report = validate_ohlcv(raw, timeframe, mode, row_label)
    report.notes[:0] = notes
    if non_numeric:
        report.notes.append("non-numeric values were treated as missing: "
                            + "; ".join(f"{row_label(p)} {w}" for p, w in non_numeric[:10]))
    return clean, report


def read_csv(path: str | Path, timeframe: str, mode: Mode = "strict") -> tuple[pd.DataFrame, ValidationReport]:
    """Read an OHLCV CSV, tolerant of header quirks, strict about values.

    Handles ``datetime, open, high, low, close, volume,`` (spaces, trailing
    comma), any column order and case, and epoch or ISO timestamps.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such CSV file: {path}")
    try:
        # dtype=str keeps every field verbatim so errors can quote the bad text.
        frame = pd.read_csv(path, skipinitialspace=True, dtype=str, keep_default_na=False, na_values=[""])
    except pd.errors.ParserError as e:
        raise DataValidationError(f"{path}: malformed CSV: {e}") from e
    except pd.errors.EmptyDataError as e:
        raise DataValidationError(f"{path}: the file is empty") from e
    frame.columns = [str(c).strip() for c in frame.columns]
    # A trailing comma on every line yields an unnamed, all-empty column.
    frame = frame.loc[:, [c for c in frame.columns if not (c == "" or c.startswith("Unnamed:")) or frame[c].notna().any()]]
    label = lambda i: f"{path.name} line {i + 2}"  # noqa: E731 - line 1 is the header
    cols = _pick_columns(frame.columns, str(path))
    raw, notes, non_numeric = _to_raw(frame, cols, label)
    return _finish(raw, notes, non_numeric, timeframe, mode, label)


def from_ccxt(rows: Sequence[Sequence], timeframe: str, mode: Mode = "strict",
              where: str = "ccxt") -> tuple[pd.DataFrame, ValidationReport]:
    """Candles from ``exchange.fetch_ohlcv``: ``[[ms, o, h, l, c, v], ...]``.

    ccxt returns rows of ``None`` when an exchange answers 200 with a non-JSON
    body, so these rows are validated like any other input.
    """
    label = lambda i: f"{where} candle {i}"  # noqa: E731
    bad_shape = [i for i, r in enumerate(rows) if not isinstance(r, (list, tuple)) or len(r) < 6]
    if bad_shape:
        raise DataValidationError(f"{label(bad_shape[0])}: expected [ms, open, high, low, close, volume], got {rows[bad_shape[0]]!r}")
    arr = pd.DataFrame([list(r[:6]) for r in rows], columns=["ts", *COLUMNS])
    ms = pd.to_numeric(arr["ts"], errors="coerce").to_numpy(dtype="float64")
    ts = np.full(len(ms), np.datetime64("NaT"), dtype="datetime64[ns]")
    ok = np.isfinite(ms)
    ts[ok] = (ms[ok].astype("int64") * 1_000_000).view("datetime64[ns]")
    raw = pd.DataFrame({"ts": pd.to_datetime(ts, utc=True),
                        **{c: pd.to_numeric(arr[c], errors="coerce").astype("float64") for c in COLUMNS}})
    return _finish(raw, [], [], timeframe, mode, label)


def from_frame(frame: pd.DataFrame, timeframe: str, mode: Mode = "strict") -> tuple[pd.DataFrame, ValidationReport]:
    """Candles from a DataFrame indexed (or with a column) by time."""
    if isinstance(frame.index, pd.DatetimeIndex):
        frame = frame.rename_axis("ts").reset_index()
    cols = _pick_columns(frame.columns, "DataFrame")
    label = lambda i: f"row {i}"  # noqa: E731
    raw, notes, non_numeric = _to_raw(frame, cols, label)
    return _finish(raw, notes, non_numeric, timeframe, mode, label)
