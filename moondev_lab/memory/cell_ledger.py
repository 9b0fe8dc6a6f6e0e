"""The per-cell memory ledger, and reading it back from executed notebooks.

Each watched cell publishes one display output whose mime bundle holds a
readable line (``text/plain``) and the record itself under
:data:`LEDGER_MIME`. Frontends show the line; papermill and nbclient keep
the JSON in the output notebook, so a batch can collect every cell's peak:

>>> df = read_ledger("notebooks/04_memory.ipynb")   # doctest: +SKIP
>>> df[["cell_index", "peak_above_start"]]               # doctest: +SKIP

In the kernel, :class:`CellLedger` keeps the records as one row of 14
numbers per cell in a ring buffer (about 120 bytes a cell; the few cells
with grown variables or alerts keep those on the side), so a session of
tens of thousands of cells stays small, and :meth:`CellLedger.report`
renders a readable summary with a downsampled timeline.

>>> led = CellLedger(capacity=3)
>>> for i in range(5):
...     led.append(CellRecord(i, None, 100, 100 + i, 100 + 2 * i, True, 0.001, [1, 0, 0], 0.0, 0.0))
>>> len(led), led.total, led[0].execution_count, led[-1].peak_above_start
(3, 5, 2, 8)
>>> [r.execution_count for r in led[-2:]], led
([3, 4], CellLedger(3 cells kept of capacity 3, 2 dropped))
"""
from __future__ import annotations

import math
from array import array
from dataclasses import dataclass, field
from pathlib import Path

from ._peak import RssSpan, format_bytes

LEDGER_MIME = "application/vnd.moondev.memwatch+json"
#: Bounds on what one published record may carry, however odd the cell.
_MAX_ITEMS, _MAX_TEXT = 10, 300


@dataclass
class CellRecord(RssSpan):
    """Memory facts about one executed cell (sizes in bytes)."""

    execution_count: int | None
    cell_id: str | None
    start_rss: int
    end_rss: int
    peak_rss: int
    exact: bool
    wall_s: float
    gc_collections: list[int]
    gc_pause_ms: float
    gc_max_pause_ms: float
    grown: list[tuple[str, int]] = field(default_factory=list)
    alerts: list[str] = field(default_factory=list)
    actions: list[str] = field(default_factory=list)
    limit: int | None = None
    limit_exceeded: bool = False
    cgroup_limit: int | None = None
    top_allocations: list[str] = field(default_factory=list)
    traced_peak: int | None = None
    #: "cell" for the always-on ledger, "profile" for a ``%%memwatch`` cell.
    kind: str = "cell"
    #: Variables deleted or shrunk in the cell, ``(name, negative bytes)``.
    freed: list[tuple[str, int]] = field(default_factory=list)

    def to_dict(self) -> dict:
        """The published record: flat JSON, every list and string bounded."""
        # Shallow and hand-made: dataclasses.asdict deep-copies (~150 µs per cell).
        d = self.__dict__.copy()
        d["gc_collections"] = self.gc_collections[:]
        d["grown"] = [list(g) for g in self.grown[:_MAX_ITEMS]] if self.grown else []
        d["freed"] = [list(g) for g in self.freed[:_MAX_ITEMS]] if self.freed else []
        for key in ("alerts", "actions", "top_allocations"):
            if d[key]:
                d[key] = [t[:_MAX_TEXT] for t in d[key][:_MAX_ITEMS]]
        d["delta"] = self.end_rss - self.start_rss
        d["peak_above_start"] = self.peak_above_start
        return d

    def line(self) -> str:
        """The compact one-line summary printed after a cell."""
        # One f-string for the common part: this runs after every watched cell.
        exact, wall = self.exact, self.wall_s
        cgroup = (f" ({self.peak_rss / self.cgroup_limit:.0%} of cgroup limit at peak)"
                  if self.cgroup_limit else "")
        out = (f"{'[memwatch]' if self.execution_count is None else f'[memwatch {self.execution_count}]'}"
               f" Δrss {format_bytes(self.end_rss - self.start_rss, signed=True)}"
               f" · peak +{'' if exact else '~'}{format_bytes(self.peak_above_start)}"
               f"{'' if exact else ' (approx.)'}"
               f" · rss {format_bytes(self.end_rss)}{cgroup}"
               f" · {_duration(wall)}")
        cols = self.gc_collections
        if any(cols):
            out += f" · gc {'/'.join(map(str, cols))} in {self.gc_pause_ms:.1f} ms"
        if self.grown:
            out += " · grew " + format_changes(self.grown)
        if self.freed:
            out += " · freed " + format_changes(self.freed)
        if self.limit_exceeded:
            out += f"\n  ⚠ crossed the soft limit {format_bytes(self.limit)}"
        for a in self.alerts:
            out += f"\n  ⚠ {a}"
        for a in self.actions:
            out += f"\n  ↳ pressure action {a}"
        if self.traced_peak is not None:
            out += f"\n  traced heap peak {format_bytes(self.traced_peak)}; top allocation sites:"
        for t in self.top_allocations:
            out += f"\n    {t}"
        return out

    def mimebundle(self) -> dict:
        return {"text/plain": self.line(), LEDGER_MIME: self.to_dict()}


def format_changes(pairs) -> str:
    """``[("prices", 8000132)]`` -> ``"prices +7.6 MiB"``."""
    return ", ".join(f"{n} {format_bytes(d, signed=True)}" for n, d in pairs)


def _duration(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


#: One row of numbers per cell (NaN for "none"); flags: 1 exact, 2 soft limit crossed, 4 a %%memwatch profile.
_COLUMNS = ("execution_count", "start_rss", "end_rss", "peak_rss", "wall_s", "gc0", "gc1", "gc2",
            "gc_pause_ms", "gc_max_pause_ms", "limit", "cgroup_limit", "traced_peak", "flags")
_WIDTH = len(_COLUMNS)
_EXACT, _EXCEEDED, _PROFILE = 1, 2, 4
_NAN = math.nan
_NO_EXTRA = ((), (), (), (), ())


def _none_if_nan(v: float) -> int | None:
    return None if v != v else int(v)


class CellLedger:
    """The in-kernel ledger: a ring buffer of the last ``capacity`` cells, stored as columns.

    Every cell is one row of 14 doubles in a flat ``array('d')``; the lists
    (grown and freed variables, alerts, actions, allocation sites) are kept
    on the side, only for the cells that have any. Past ``capacity`` the
    oldest cells are overwritten; ``total`` keeps counting. Indexing and
    iteration give :class:`CellRecord` objects, oldest first.
    """

    def __init__(self, capacity: int = 50_000) -> None:
        if capacity < 1:
            raise ValueError(f"a ledger needs room for at least one cell (capacity={capacity})")
        self.capacity = capacity
        self.total = 0
        self._rows = array("d")
        self._cell_ids: list[str | None] = []
        self._extra: dict[int, tuple] = {}

    def __len__(self) -> int:
        return min(self.total, self.capacity)

    @property
    def dropped(self) -> int:
        """Cells overwritten because the ring was full."""
        return self.total - len(self)

    def append(self, rec: CellRecord) -> None:
        ec, cols, limit, traced = rec.execution_count, rec.gc_collections, rec.limit, rec.traced_peak
        g0, g1, g2 = (cols + [0, 0, 0])[:3] if len(cols) != 3 else cols
        row = (_NAN if ec is None else ec, rec.start_rss, rec.end_rss, rec.peak_rss, rec.wall_s, g0, g1, g2,
               rec.gc_pause_ms, rec.gc_max_pause_ms, _NAN if limit is None else limit,
               _NAN if rec.cgroup_limit is None else rec.cgroup_limit, _NAN if traced is None else traced,
               (_EXACT if rec.exact else 0) | (_EXCEEDED if rec.limit_exceeded else 0)
               | (_PROFILE if rec.kind == "profile" else 0))
        seq = self.total
        if seq < self.capacity:
            self._rows.extend(row)
            self._cell_ids.append(rec.cell_id)
        else:
            slot = seq % self.capacity
            self._rows[slot * _WIDTH:(slot + 1) * _WIDTH] = array("d", row)
            self._cell_ids[slot] = rec.cell_id
            self._extra.pop(seq - self.capacity, None)
        if rec.grown or rec.freed or rec.alerts or rec.actions or rec.top_allocations:
            self._extra[seq] = (rec.grown, rec.freed, rec.alerts, rec.actions, rec.top_allocations)
        self.total = seq + 1

    def clear(self) -> None:
        self.total = 0
        self._rows = array("d")
        self._cell_ids = []
        self._extra = {}

    def _seqs(self) -> range:
        return range(self.total - len(self), self.total)

    def __repr__(self) -> str:
        dropped = f", {self.dropped:,} dropped" if self.dropped else ""
        return f"CellLedger({len(self):,} cells kept of capacity {self.capacity:,}{dropped})"

    def __getitem__(self, i: int | slice) -> CellRecord | list[CellRecord]:
        n = len(self)
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(n))]
        if not -n <= i < n:
            raise IndexError(f"ledger index {i} out of range ({n} cells kept)")
        seq = self.total - n + (i % n)
        slot = seq % self.capacity
        r = self._rows[slot * _WIDTH:(slot + 1) * _WIDTH]
        grown, freed, alerts, actions, tops = self._extra.get(seq, _NO_EXTRA)
        flags = int(r[13])
        return CellRecord(
            _none_if_nan(r[0]), self._cell_ids[slot], int(r[1]), int(r[2]), int(r[3]), bool(flags & _EXACT),
            r[4], [int(r[5]), int(r[6]), int(r[7])], r[8], r[9], list(grown), list(alerts), list(actions),
            _none_if_nan(r[10]), bool(flags & _EXCEEDED), _none_if_nan(r[11]), list(tops), _none_if_nan(r[12]),
            "profile" if flags & _PROFILE else "cell", list(freed))

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def to_frame(self):
        """One row per kept cell, oldest first; sizes in bytes, plus ``*_mib`` helpers."""
        import numpy as np
        import pandas as pd

        n = len(self)
        num = np.frombuffer(self._rows, dtype=np.float64).reshape(-1, _WIDTH) if n else np.empty((0, _WIDTH))
        if self.total > self.capacity:  # oldest first
            cut = self.total % self.capacity
            num = np.concatenate([num[cut:], num[:cut]])
            ids = self._cell_ids[cut:] + self._cell_ids[:cut]
        else:
            ids = list(self._cell_ids)
        flags = num[:, 13].astype(np.int64)
        extra = [self._extra.get(s, _NO_EXTRA) for s in self._seqs()]

        def ints(j: int):
            return num[:, j].astype(np.int64)

        def nullable(j: int):
            return pd.array(num[:, j], dtype="Float64").astype("Int64") if n else pd.array([], dtype="Int64")

        def lists(k: int, pairs: bool = False):
            return [[list(p) for p in e[k]] if pairs else list(e[k]) for e in extra]

        df = pd.DataFrame({
            "execution_count": nullable(0), "cell_id": ids,
            "kind": np.where(flags & _PROFILE, "profile", "cell"),
            "start_rss": ints(1), "end_rss": ints(2), "peak_rss": ints(3), "exact": (flags & _EXACT) > 0,
            "wall_s": num[:, 4], "gc_collections": num[:, 5:8].astype(np.int64).tolist(),
            "gc_pause_ms": num[:, 8], "gc_max_pause_ms": num[:, 9],
            "grown": lists(0, True), "freed": lists(1, True), "alerts": lists(2), "actions": lists(3),
            "limit": nullable(10), "limit_exceeded": (flags & _EXCEEDED) > 0, "cgroup_limit": nullable(11),
            "top_allocations": lists(4), "traced_peak": nullable(12),
        })
        df["delta"] = df["end_rss"] - df["start_rss"]
        df["peak_above_start"] = (df["peak_rss"] - df["start_rss"]).clip(lower=0)
        return _with_mib(df)

    def report(self, top: int = 10, last: int = 10) -> "LedgerReport":
        """A readable summary: the cells with the highest peaks and the latest ones."""
        return ledger_report(self.to_frame(), top=top, last=last, dropped=self.dropped)

    def plot(self, ax=None, max_points: int = 500):
        """Matplotlib timeline: RSS after each cell and the peak inside it (downsampled)."""
        return plot_timeline(self.to_frame(), ax=ax, max_points=max_points)


def _with_mib(df):
    if not df.empty:
        for col in ("delta", "peak_above_start", "end_rss", "peak_rss"):
            df[col.replace("_rss", "") + "_mib"] = df[col] / 2**20
    return df


def records_frame(rows: list[dict]):
    """A ledger DataFrame from published records (dicts), as :func:`read_ledger` reads them."""
    import pandas as pd

    return _with_mib(pd.DataFrame(rows))


@dataclass
class LedgerReport:
    """What ``%memwatch report`` shows: a summary line and readable tables.

    ``frame`` is the full ledger (numbers in bytes); ``sections`` are
    ``(title, DataFrame of formatted text)`` pairs.
    """

    summary: str
    sections: list = field(default_factory=list)
    frame: object = None

    def __repr__(self) -> str:
        parts = [self.summary]
        for title, table in self.sections:
            parts += ["", title, table.to_string(index=False)]
        return "\n".join(parts)

    def _repr_html_(self) -> str:
        from html import escape

        out = f"<p><b>{escape(self.summary)}</b></p>"
        for title, table in self.sections:
            out += f"<p>{escape(title)}</p>" + table.to_html(index=False, border=0)
        return out


def _readable(df):
    """Formatted text, one row per cell: sizes with units, GC as gen0/gen1/gen2, variables by name."""
    import pandas as pd

    def cell(v):
        return "–" if pd.isna(v) else str(int(v))

    def gc(cols, pause):
        return f"{'/'.join(map(str, cols))} in {pause:.1f} ms" if any(cols) else ""

    def alerts(row):
        notes = list(row.get("alerts") or [])
        if row.get("limit_exceeded"):
            notes.insert(0, f"crossed the soft limit {format_bytes(row.get('limit'))}")
        return "; ".join(notes)

    rows = df.to_dict("records")
    return pd.DataFrame({
        "cell": [cell(r.get("execution_count")) for r in rows],
        "kind": [r.get("kind", "cell") for r in rows],
        "Δrss": [format_bytes(r["delta"], signed=True) for r in rows],
        "peak": [("+" if r.get("exact", True) else "+~") + format_bytes(r["peak_above_start"]) for r in rows],
        "rss after": [format_bytes(r["end_rss"]) for r in rows],
        "time": [_duration(r["wall_s"]) for r in rows],
        "gc (gen 0/1/2)": [gc(r.get("gc_collections") or [], r.get("gc_pause_ms") or 0.0) for r in rows],
        "grew": [format_changes(r.get("grown") or []) for r in rows],
        "freed": [format_changes(r.get("freed") or []) if isinstance(r.get("freed"), list) else "" for r in rows],
        "alerts": [alerts(r) for r in rows],
    })


def ledger_report(df, top: int = 10, last: int = 10, dropped: int = 0) -> LedgerReport:
    """Summarise a ledger DataFrame (from :meth:`CellLedger.to_frame` or :func:`read_ledger`).

    Up to ``top + last`` cells are shown: all of them in a short ledger, else
    the ``top`` highest peaks and the ``last`` latest cells.
    """
    import pandas as pd

    n = len(df)
    if n == 0:
        return LedgerReport("memwatch: no cells recorded yet", [], df)
    highest = df["peak_above_start"].idxmax()
    ec = df.at[highest, "execution_count"]
    where = f"row {highest}" if pd.isna(ec) else f"cell {int(ec)}"
    summary = (f"memwatch: {n:,} cells" + (f" (the {dropped:,} oldest dropped from the ring)" if dropped else "")
               + f", {_duration(float(df['wall_s'].sum()))} in cells; RSS {format_bytes(int(df['start_rss'].iloc[0]))}"
               f" → {format_bytes(int(df['end_rss'].iloc[-1]))}; highest peak"
               f" +{format_bytes(int(df.at[highest, 'peak_above_start']))} in {where}")
    crossed = int(df["limit_exceeded"].fillna(False).astype(bool).sum()) if "limit_exceeded" in df else 0
    alerted = int(df["alerts"].map(lambda a: isinstance(a, list) and bool(a)).sum()) if "alerts" in df else 0
    notes = [f"{crossed:,} crossed the soft limit"] * bool(crossed) + [f"{alerted:,} with alerts"] * bool(alerted)
    if notes:
        summary += "; " + ", ".join(notes)
    if n <= top + last:
        sections = [("every cell", _readable(df))]
    else:
        peaks = df.iloc[:-last].nlargest(top, "peak_above_start").sort_index()
        sections = [(f"the {top} highest peaks before the last {last} cells", _readable(peaks)),
                    (f"the last {last} cells", _readable(df.iloc[-last:]))]
    return LedgerReport(summary, sections, df)


def plot_timeline(df, ax=None, max_points: int = 500):
    """Plot RSS and peak (MiB) per cell from a ledger DataFrame.

    Past ``max_points`` cells, neighbouring cells are pooled into buckets and
    each bucket shows its highest RSS and highest peak, so no transient is
    lost and the plot costs the same for 500 or 50,000 cells.
    """
    import matplotlib.pyplot as plt
    import numpy as np

    if ax is None:
        _, ax = plt.subplots(figsize=(8, 3))
    if df.empty:
        ax.set_title("memwatch: no cells recorded yet")
        return ax
    n = len(df)
    ec = df["execution_count"].to_numpy(dtype=float, na_value=np.nan)
    x = np.where(np.isnan(ec), np.arange(n), ec)
    end, peak = df["end_rss"].to_numpy(dtype=float) / 2**20, df["peak_rss"].to_numpy(dtype=float) / 2**20
    pooled = ""
    if n > max_points:
        starts = np.unique(np.linspace(0, n, max_points + 1).astype(np.int64)[:-1])
        x, end, peak = x[starts], np.maximum.reduceat(end, starts), np.maximum.reduceat(peak, starts)
        pooled = f", highest of every ~{n / len(starts):.0f} cells"
    mark = {} if pooled else {"marker": "o"}
    ax.plot(x, end, label="RSS after cell" + pooled, **mark)
    ax.plot(x, peak, linestyle="--", label="peak inside cell", **({} if pooled else {"marker": "^"}))
    ax.set_xlabel("cell (execution count)")
    ax.set_ylabel("MiB")
    ax.set_title(f"memwatch timeline ({n:,} cells)")
    ax.legend(loc="best")
    return ax


def read_ledger(notebook_path: str | Path):
    """Every memwatch record in an executed notebook, as a DataFrame.

    Adds ``cell_index`` (position of the code cell in the notebook) so rows
    can be matched to cells even without execution counts.
    """
    import nbformat

    nb = nbformat.read(str(notebook_path), as_version=4)
    rows = []
    for idx, cell in enumerate(nb.cells):
        if cell.get("cell_type") != "code":
            continue
        for out in cell.get("outputs", []):
            data = out.get("data") or {}
            rec = data.get(LEDGER_MIME)
            if rec:
                rows.append({"cell_index": idx, **dict(rec)})
    return records_frame(rows)
