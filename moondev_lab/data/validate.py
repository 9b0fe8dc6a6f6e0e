"""Validation and repair of OHLCV candles.

Every load goes through :func:`validate_ohlcv`. In ``strict`` mode the first
problem raises :class:`DataValidationError` naming the row; in ``repair`` mode
bad rows are dropped or fixed and every change is listed in the returned
:class:`ValidationReport`. Nothing is ever changed silently.

>>> import pandas as pd
>>> raw = pd.DataFrame({"ts": pd.to_datetime(["2023-01-01 00:00", "2023-01-01 00:15"], utc=True),
...                     "Open": [1.0, 2.0], "High": [2.0, 3.0], "Low": [0.5, 1.5],
...                     "Close": [1.5, 2.5], "Volume": [10.0, 11.0]})
>>> clean, report = validate_ohlcv(raw, "15m")
>>> report.ok, len(clean)
(True, 2)
"""
from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Callable, Literal

import numpy as np
import pandas as pd

from ..errors import MoondevError
from ._timeframes import timeframe_ns

COLUMNS = ["Open", "High", "Low", "Close", "Volume"]
PRICES = ["Open", "High", "Low", "Close"]
Mode = Literal["strict", "repair"]
#: Above this a price is a unit or parsing mistake, not a market (BTC in VND is ~2.5e9);
#: 1e308 and inf parse as floats, so a finite-only check is not enough.
MAX_PRICE = 1e12
#: Volumes of meme coins reach 1e14 per candle; 1e20 is far beyond any market.
MAX_VOLUME = 1e20


@dataclass(frozen=True)
class Issue:
    """One problem found in one input row, and what repair did about it."""

    row: str  # human label: "CSV line 17", "row 4", "candle 12 of page 3"
    ts: str
    kind: str
    message: str
    action: str = ""  # filled in repair mode: "dropped", "fixed High 1.0 -> 2.0", ...

    def __str__(self) -> str:
        tail = f" -> {self.action}" if self.action else ""
        return f"{self.row} ({self.ts}): {self.message}{tail}"


@dataclass(frozen=True)
class Gap:
    """Missing bars between two consecutive candles."""

    after: pd.Timestamp
    before: pd.Timestamp
    missing_bars: int


@dataclass
class ValidationReport:
    """What validation found, and (in repair mode) what it changed."""

    mode: str
    timeframe: str
    rows_in: int
    rows_out: int = 0
    format: str = ""  # what the input was read as, e.g. "freqtrade feather" (see data.formats)
    issues: list[Issue] = field(default_factory=list)
    gaps: list[Gap] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when the input needed no change at all (gaps are only flagged)."""
        return not self.issues

    @property
    def changed(self) -> bool:
        return bool(self.issues) and self.mode == "repair"

    def summary(self) -> str:
        kinds: dict[str, int] = {}
        for i in self.issues:
            kinds[i.kind] = kinds.get(i.kind, 0) + 1
        parts = [f"{self.rows_in} rows in, {self.rows_out} out"]
        if kinds:
            parts.append(", ".join(f"{n} {k}" for k, n in sorted(kinds.items())))
        if self.gaps:
            parts.append(f"{len(self.gaps)} gaps ({sum(g.missing_bars for g in self.gaps)} missing bars)")
        return "; ".join(parts)

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame([i.__dict__ for i in self.issues], columns=["row", "ts", "kind", "message", "action"])

    def __repr__(self) -> str:
        fmt = f", {self.format}" if self.format else ""
        lines = [f"ValidationReport[{self.mode}, {self.timeframe}{fmt}]: {self.summary()}"]
        lines += [f"  {i}" for i in self.issues[:20]]
        if len(self.issues) > 20:
            lines.append(f"  ... {len(self.issues) - 20} more (see .to_frame())")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        head = f"<b>ValidationReport</b> [{self.mode}, {self.timeframe}]: {html.escape(self.summary())}"
        if not self.issues:
            return head
        return head + self.to_frame().head(50).to_html(index=False)


class DataValidationError(MoondevError, ValueError):
    """Raised in strict mode (and for unreadable input); ``.report`` has all findings."""

    def __init__(self, message: str, report: ValidationReport | None = None):
        super().__init__(message)
        self.report = report


def _fmt_ts(ts) -> str:
    return "NaT" if pd.isna(ts) else str(ts)


def validate_ohlcv(
    raw: pd.DataFrame,
    timeframe: str,
    mode: Mode = "strict",
    row_label: Callable[[int], str] | None = None,
) -> tuple[pd.DataFrame, ValidationReport]:
    """Check candles; return ``(clean_frame, report)``.

    ``raw`` has a ``ts`` column (``datetime64[ns, UTC]``, NaT allowed) and the
    float columns Open, High, Low, Close, Volume (NaN allowed). The clean frame
    is indexed by ``ts`` and sorted, with unique timestamps.
    """
    if mode not in ("strict", "repair"):
        raise ValueError(f"mode must be 'strict' or 'repair', not {mode!r}")
    label = row_label or (lambda i: f"row {i}")
    step = timeframe_ns(timeframe)
    report = ValidationReport(mode=mode, timeframe=timeframe, rows_in=len(raw))

    ts = raw["ts"].to_numpy(dtype="datetime64[ns]", copy=False) if len(raw) else np.array([], "datetime64[ns]")
    vals = {c: raw[c].to_numpy(dtype="float64") for c in COLUMNS}
    keep = np.ones(len(raw), dtype=bool)

    def problem(pos: int, kind: str, message: str, action: str = "dropped") -> None:
        issue = Issue(label(pos), _fmt_ts(raw["ts"].iloc[pos]), kind, message, action if mode == "repair" else "")
        if mode == "strict":
            report.issues.append(issue)
            raise DataValidationError(f"invalid candle at {issue}", report)
        report.issues.append(issue)

    # Row-level checks, in the order a user would want to hear about them.
    bad_ts = np.isnat(ts)
    for pos in np.flatnonzero(bad_ts):
        problem(int(pos), "bad_timestamp", "timestamp missing or unparseable")
    keep &= ~bad_ts

    nan_any = np.zeros(len(raw), dtype=bool)
    for c in COLUMNS:
        nan_any |= np.isnan(vals[c])
    for pos in np.flatnonzero(nan_any & keep):
        missing = [c for c in COLUMNS if np.isnan(vals[c][pos])]
        problem(int(pos), "missing_value", f"missing or non-numeric {', '.join(missing)}")
    keep &= ~nan_any

    with np.errstate(invalid="ignore"):
        absurd = np.zeros(len(raw), dtype=bool)
        for c in COLUMNS:
            absurd |= ~(np.abs(vals[c]) <= (MAX_VOLUME if c == "Volume" else MAX_PRICE))  # also catches inf
    for pos in np.flatnonzero(absurd & keep):
        what = ", ".join(f"{c}={float(vals[c][pos])!r}" for c in COLUMNS
                         if not abs(vals[c][pos]) <= (MAX_VOLUME if c == "Volume" else MAX_PRICE))
        kind = "non_finite" if any(np.isinf(vals[c][pos]) for c in COLUMNS) else "absurd_value"
        problem(int(pos), kind, f"{'non-finite' if kind == 'non_finite' else 'absurdly large'} {what} "
                                f"(prices must be finite and <= {MAX_PRICE:g}, volume <= {MAX_VOLUME:g})")
    keep &= ~absurd

    with np.errstate(invalid="ignore"):
        nonpos = np.zeros(len(raw), dtype=bool)
        for c in PRICES:
            nonpos |= vals[c] <= 0
        for pos in np.flatnonzero(nonpos & keep):
            what = ", ".join(f"{c}={float(vals[c][pos])!r}" for c in PRICES if vals[c][pos] <= 0)
            problem(int(pos), "non_positive_price", f"non-positive price {what}")
        keep &= ~nonpos

        negvol = vals["Volume"] < 0
        for pos in np.flatnonzero(negvol & keep):
            problem(int(pos), "negative_volume", f"negative Volume {float(vals['Volume'][pos])!r}")
        keep &= ~negvol

        o, h, l, c = (vals[k] for k in PRICES)
        hi_needed = np.fmax(np.fmax(o, c), l)
        lo_needed = np.fmin(np.fmin(o, c), h)
        bad_bounds = keep & ((h < l) | (h < np.fmax(o, c)) | (l > np.fmin(o, c)))
    if bad_bounds.any():
        h = vals["High"] = vals["High"].copy()
        l = vals["Low"] = vals["Low"].copy()
        for pos in np.flatnonzero(bad_bounds):
            hp, lp = float(h[pos]), float(l[pos])
            msg = (f"High {hp!r} < Low {lp!r}" if hp < lp else
                   f"High/Low ({hp!r}/{lp!r}) do not bound Open/Close ({float(o[pos])!r}/{float(c[pos])!r})")
            new_h = max(hp, float(hi_needed[pos]))
            new_l = min(lp, float(lo_needed[pos]))
            problem(int(pos), "high_low_bounds", msg, f"fixed High {hp!r} -> {new_h!r}, Low {lp!r} -> {new_l!r}")
            h[pos], l[pos] = new_h, new_l

    # Order and uniqueness are properties of the whole series.
    idx = np.flatnonzero(keep)
    kts = ts[idx].view("i8")
    if len(kts) > 1 and (np.diff(kts) < 0).any():
        first = int(idx[np.flatnonzero(np.diff(kts) < 0)[0] + 1])
        problem(first, "unsorted", "timestamps are not in increasing order", "sorted all rows by timestamp")
        order = np.argsort(kts, kind="stable")
        idx, kts = idx[order], kts[order]
    if len(kts) > 1:
        dup = np.flatnonzero(np.diff(kts) == 0)  # dup[i]: row i+1 repeats row i's time
        if len(dup):
            drop_mask = np.zeros(len(idx), dtype=bool)
            for d in dup:
                a, b = int(idx[d]), int(idx[d + 1])
                same = all(vals[c][a] == vals[c][b] for c in COLUMNS)
                detail = "identical values" if same else "different values, keeping the later row"
                problem(a, "duplicate", f"timestamp repeated at {label(b)} ({detail})", "dropped")
                drop_mask[d] = True  # the later row wins
            idx, kts = idx[~drop_mask], kts[~drop_mask]

    # A consistent, aligned grid is what backtests assume; gaps are normal on
    # exchanges (maintenance), so they are flagged, never "fixed".
    if len(kts) > 1:
        d = np.diff(kts)
        for g in np.flatnonzero(d > step):
            report.gaps.append(Gap(pd.Timestamp(kts[g], tz="UTC"), pd.Timestamp(kts[g + 1], tz="UTC"),
                                   int(d[g] // step) - 1))
        off = np.flatnonzero(d % step != 0)
        if len(off):
            report.notes.append(f"{len(off)} intervals are not a multiple of {timeframe}; is the timeframe right?")

    clean = pd.DataFrame(
        {c: vals[c][idx] for c in COLUMNS},
        index=pd.DatetimeIndex(pd.to_datetime(kts, unit="ns", utc=True), name="ts"),
    )
    report.rows_out = len(clean)
    return clean, report
