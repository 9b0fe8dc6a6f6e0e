"""The batch leaderboard: one row per idea, ok ideas ranked by out-of-sample metric, failures below.

>>> rows = [{"idea": "a", "status": "ok", "out_of_sample": {"Return [%]": 3.0}, "in_sample": {}},
...         {"idea": "b", "status": "failed", "error_kind": "not_understood", "error": "?"},
...         {"idea": "c", "status": "ok", "out_of_sample": {"Return [%]": 9.5}, "in_sample": {}}]
>>> board = build(rows, "Return [%]", {"state": "finished"})
>>> list(board["idea"]), list(board["rank"])
(['c', 'a', 'b'], [1, 2, 3])
"""
from __future__ import annotations

import html
import json
import math
import os
from pathlib import Path

import pandas as pd

from ._overfit import overfit_columns
from .ledger import metric_columns, rank_by_oos


class Leaderboard(pd.DataFrame):
    """A DataFrame of the batch's ideas whose HTML repr links each row to its run folder or notebook.

    ``summary`` holds the batch's settings-free totals (state, ok, failed, elapsed, out folder).
    """

    _metadata = ["summary"]

    @property
    def _constructor(self):
        return Leaderboard

    def _header(self) -> str:
        s = getattr(self, "summary", None) or {}
        return (f"batch {s.get('state', '?')}: {s.get('ok', 0)} ok, {s.get('failed', 0)} failed of "
                f"{s.get('ideas', len(self))} ideas in {s.get('elapsed_s', 0):.1f}s -> {s.get('out', '')}")

    def __repr__(self) -> str:
        shown = [c for c in self.columns if c not in ("error", "link", "worker")]
        return self._header() + "\n" + pd.DataFrame(self)[shown].to_string(
            index=False, float_format=lambda x: f"{x:.2f}", max_colwidth=40)

    def to_html_page(self, base: Path | None = None) -> str:
        """A table with escaped text and clickable links (relative to ``base`` when given)."""
        view = pd.DataFrame(self).copy()
        for col in view.columns:
            if view[col].dtype == object and col != "link":
                view[col] = view[col].map(lambda v: "" if v is None or v is pd.NA else html.escape(str(v)))
        if "link" in view:
            def anchor(target):
                if not isinstance(target, str) or not target:
                    return ""
                href = target
                if base is None:
                    href = Path(self.summary.get("out", "."), target).resolve().as_uri()
                return f'<a href="{html.escape(href)}">{html.escape(target)}</a>'

            view["link"] = view["link"].map(anchor)
        table = view.to_html(index=False, escape=False, na_rep="", float_format=lambda x: f"{x:.2f}")
        return f"<p><b>{html.escape(self._header())}</b></p>{table}"

    def _repr_html_(self) -> str:
        return self.to_html_page()


COLUMNS_BEFORE = ["rank", "idea", "status", "error_kind", "symbol", "timeframe", "model", "params"]
COLUMNS_AFTER = ["IS trades", "peak_mib", "wall_s", "link", "run_id", "worker", "error"]


def _params_text(params: dict | None) -> str:
    return ", ".join(f"{k}={v}" for k, v in (params or {}).items())


def _number(v):
    try:
        v = float(v)
    except (TypeError, ValueError):
        return math.nan
    return v


def build(rows: list[dict], metric: str, summary: dict) -> Leaderboard:
    """The leaderboard of a batch's rows (as the workers returned them, plus the client's fields)."""
    recs = []
    for r in rows:
        is_, oos = r.get("in_sample") or {}, r.get("out_of_sample") or {}
        cols = {k: _number(v) for k, v in metric_columns(is_, oos, metric).items()}
        peak = r.get("peak_bytes")
        recs.append({"idea": r["idea"], "status": r["status"], "error_kind": r.get("error_kind") or "",
                     "symbol": r.get("symbol"), "timeframe": r.get("timeframe"), "model": r.get("model"),
                     "params": _params_text(r.get("params")), **cols,
                     **{k: _number(v) for k, v in overfit_columns(r.get("overfitting")).items()},
                     "IS trades": _number(is_.get("# Trades")),
                     "peak_mib": round(peak / 2**20, 1) if peak else math.nan,
                     "wall_s": round(float(r.get("wall_s") or 0), 2), "link": r.get("link") or "",
                     "run_id": r.get("run_id"), "worker": r.get("worker") or "", "error": r.get("error") or ""})
    names = COLUMNS_BEFORE[1:] + list(metric_columns({}, {}, metric)) + list(overfit_columns(None)) + COLUMNS_AFTER
    df = pd.DataFrame(recs, columns=names)
    ok = rank_by_oos(df[df["status"] == "ok"].copy(), metric)
    rest = df[df["status"] != "ok"].sort_values(["error_kind", "idea"])
    df = pd.concat([ok, rest], ignore_index=True) if len(rest) else ok
    df.insert(0, "rank", range(1, len(df) + 1))
    board = Leaderboard(df)
    board.summary = dict(summary)
    return board


def write(board: Leaderboard, out: Path, settings: dict) -> None:
    """``leaderboard.csv``, ``leaderboard.html`` and ``batch.json`` in ``out`` (each replaced atomically)."""
    _atomic(out / "leaderboard.csv", pd.DataFrame(board).to_csv(index=False))
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>moondev_lab batch {html.escape(out.name)}"
            f"</title></head><body>{board.to_html_page(base=out)}</body></html>")
    _atomic(out / "leaderboard.html", page)
    _atomic(out / "batch.json", json.dumps({"settings": settings, "totals": board.summary}, indent=2,
                                           default=str, allow_nan=True))


def _atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
