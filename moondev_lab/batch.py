"""Run one notebook over many parameter sets with papermill, locally or on a Dask cluster.

>>> from moondev_lab.batch import run_notebooks
>>> report = run_notebooks("notebooks/01_data_pool.ipynb",
...                        [{"start": "2023-02-01"}, {"start": "2023-05-01"}])   # doctest: +SKIP
>>> report.table()[["start", "status", "max_cell_peak_mib"]]                    # doctest: +SKIP

Each run's kernel gets ``%memwatch on`` first, so the executed notebook
carries an exact per-cell memory ledger and the batch reads every cell's peak
back. That matters because the kernels papermill starts are separate
processes: a Dask worker's memory limit never sees them, but the ledger does.
A failing run is reported with its error and never stops the others.
"""
from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nbformat
import pandas as pd
from tqdm.auto import tqdm

from . import config

MEMWATCH_CELL = "%load_ext moondev_lab\n%memwatch on"


@dataclass
class BatchReport:
    """One row per run: its parameters, status, time, output notebook and memory peaks."""

    runs: list[dict]
    elapsed_s: float

    def table(self) -> pd.DataFrame:
        return pd.DataFrame(self.runs)

    @property
    def ok(self) -> bool:
        return all(r["status"] == "ok" for r in self.runs)

    def __repr__(self) -> str:
        n_ok = sum(r["status"] == "ok" for r in self.runs)
        cols = [c for c in ("status", "seconds", "max_cell_peak_mib", "error") if c in self.table()]
        return (f"BatchReport: {n_ok}/{len(self.runs)} runs ok in {self.elapsed_s:.1f}s\n"
                + self.table()[cols].to_string())

    def _repr_html_(self) -> str:
        n_ok = sum(r["status"] == "ok" for r in self.runs)
        return (f"<b>BatchReport</b>: {n_ok}/{len(self.runs)} runs ok in {self.elapsed_s:.1f}s"
                + self.table().to_html(index=False, na_rep="", escape=True))


def with_memwatch(notebook: str | Path) -> nbformat.NotebookNode:
    """The notebook with a first cell that turns the per-cell memory ledger on."""
    nb = nbformat.read(str(notebook), as_version=4)
    cell = nbformat.v4.new_code_cell(MEMWATCH_CELL, metadata={"tags": ["moondev-memwatch"]})
    cell.pop("id", None)
    nb.cells.insert(0, cell)
    return nb


def run_one(notebook: Any, output: str, parameters: dict, kernel_name: str = "python3",
            timeout: float = 600, cwd: str | None = None) -> dict:
    """Execute one notebook run; never raises. Module-level so Dask can ship it to workers."""
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    from .memory import read_ledger

    row: dict[str, Any] = {**parameters, "status": "ok", "error": "", "output": output}
    t0 = time.perf_counter()
    try:
        pm.execute_notebook(notebook, output, parameters=parameters, kernel_name=kernel_name,
                            progress_bar=False, execution_timeout=timeout, cwd=cwd)
    except PapermillExecutionError as e:
        row.update(status="failed", error=f"cell {e.exec_count}: {e.ename}: {e.evalue}"[:500])
    except Exception as e:  # a kernel that died, a bad path: reported, the batch goes on
        row.update(status="failed", error=f"{type(e).__name__}: {e}"[:500])
    row["seconds"] = round(time.perf_counter() - t0, 2)
    try:
        ledger = read_ledger(output)
    except Exception:  # no output notebook was written
        ledger = pd.DataFrame()
    if len(ledger):
        row["cells_watched"] = len(ledger)
        row["max_cell_peak_mib"] = round(float(ledger["peak_above_start"].max()) / 2**20, 2)
        row["peak_rss_mib"] = round(float(ledger["peak_rss"].max()) / 2**20, 2)
    return row


def _slug(params: dict) -> str:
    text = "-".join(f"{k}={v}" for k, v in params.items()) or "run"
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", text)[:80]


def run_notebooks(notebook: str | Path, parameters: list[dict], out_dir: str | Path | None = None, *,
                  client: Any = None, parallel: int = 2, memwatch: bool = True, kernel_name: str = "python3",
                  timeout: float = 600, progress: bool = True) -> BatchReport:
    """Execute ``notebook`` once per parameter dict.

    ``client`` is a ``dask.distributed.Client`` (e.g. on a ``LocalCluster``);
    without one, runs go on a local thread pool of ``parallel`` kernels.
    Outputs go to ``out_dir`` (default ``$MOONDEV_LAB_HOME/batches/<name>-<time>``).
    """
    notebook = Path(notebook)
    out = Path(out_dir) if out_dir else config.home() / "batches" / f"{notebook.stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    source: Any = with_memwatch(notebook) if memwatch else str(notebook)
    outputs = [str(out / f"{i:03d}-{_slug(p)}.ipynb") for i, p in enumerate(parameters)]
    cwd = str(notebook.resolve().parent.parent)  # notebooks run from the project root
    t0 = time.perf_counter()
    args = [(source, o, p, kernel_name, timeout, cwd) for o, p in zip(outputs, parameters)]
    if client is not None:
        futures = [client.submit(run_one, *a, pure=False) for a in args]
        rows = [f.result() for f in tqdm(futures, desc=notebook.stem, unit="run", disable=not progress)]
    else:
        with ThreadPoolExecutor(max(1, parallel)) as ex:
            rows = list(tqdm(ex.map(lambda a: run_one(*a), args), total=len(args), desc=notebook.stem,
                             unit="run", disable=not progress))
    return BatchReport(rows, time.perf_counter() - t0)


__all__ = ["BatchReport", "run_notebooks", "run_one", "with_memwatch"]
