"""The per-cell memory ledger, and reading it back from executed notebooks.

Each watched cell publishes one display output whose mime bundle holds a
readable line (``text/plain``) and the record itself under
:data:`LEDGER_MIME`. Frontends show the line; papermill and nbclient keep
the JSON in the output notebook, so a batch can collect every cell's peak:

>>> df = read_ledger("notebooks/02_memwatch.ipynb")   # doctest: +SKIP
>>> df[["cell_index", "peak_above_start"]]               # doctest: +SKIP
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ._peak import RssSpan, format_bytes

LEDGER_MIME = "application/vnd.moondev.memwatch+json"


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

    def to_dict(self) -> dict:
        # Shallow and hand-made: dataclasses.asdict deep-copies (~150 µs per cell).
        d = self.__dict__.copy()
        d["gc_collections"] = self.gc_collections[:]
        d["grown"] = [list(g) for g in self.grown] if self.grown else []
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
               f" · {f'{wall * 1e3:.1f} ms' if wall < 1 else f'{wall:.2f} s'}")
        cols = self.gc_collections
        if any(cols):
            out += f" · gc {'/'.join(map(str, cols))} in {self.gc_pause_ms:.1f} ms"
        if self.grown:
            out += " · grew " + ", ".join(f"{n} {format_bytes(d, signed=True)}" for n, d in self.grown)
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


class CellLedger(list):
    """A list of :class:`CellRecord` with a DataFrame view and a timeline plot."""

    def to_frame(self):
        """One row per cell; sizes in bytes, plus ``*_mib`` helpers."""
        return records_frame([r.to_dict() for r in self])

    def plot(self, ax=None):
        """Matplotlib timeline: RSS after each cell and the peak inside it."""
        return plot_timeline(self.to_frame(), ax=ax)


def records_frame(rows: list[dict]):
    import pandas as pd

    df = pd.DataFrame(rows)
    if not df.empty:
        for col in ("delta", "peak_above_start", "end_rss", "peak_rss"):
            df[col.replace("_rss", "") + "_mib"] = df[col] / 2**20
    return df


def plot_timeline(df, ax=None):
    """Plot RSS and peak (MiB) per cell from a ledger DataFrame."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(8, 3))
    if df.empty:
        ax.set_title("memwatch: no cells recorded yet")
        return ax
    x = df["execution_count"].where(df["execution_count"].notna(), df.index.to_series())
    ax.plot(x, df["end_rss"] / 2**20, marker="o", label="RSS after cell")
    ax.plot(x, df["peak_rss"] / 2**20, marker="^", linestyle="--", label="peak inside cell")
    ax.set_xlabel("cell (execution count)")
    ax.set_ylabel("MiB")
    ax.set_title("memwatch timeline")
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
