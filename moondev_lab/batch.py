"""Batches: many ideas through the RBI loop on Dask, and one notebook over many parameter sets.

>>> import moondev_lab as ml
>>> board = ml.run_batch("ideas.txt", workers=2, out="runs/batch1")          # doctest: +SKIP
>>> board.head()                                      # ranked, with an HTML repr   # doctest: +SKIP
>>> board = ml.run_batch(["RSI < 30", "SMA cross"], client=client)            # doctest: +SKIP

:func:`run_batch` runs each idea as one Dask task: the RBI loop on the worker's own
sandbox pool (default), or the batch notebook through papermill (``notebook=``). A
LocalCluster sized from CPU and memory is the default; ``scheduler=`` (or
``$DASK_SCHEDULER_ADDRESS``) or ``client=`` use an existing cluster, by the same code.
Results come back to this process, which alone writes the ledger (see
:mod:`moondev_lab._batch_worker` for what workers need). Each idea is journalled in the
ledger with its records in one transaction, so ``resume=`` skips exactly what finished.

Notebook batches over parameter sets (no ideas):

>>> from moondev_lab.batch import run_notebooks
>>> report = run_notebooks("notebooks/01_data.ipynb",
...                        [{"start": "2023-02-01"}, {"start": "2023-05-01"}])   # doctest: +SKIP
>>> report.table()[["start", "status", "max_cell_peak_mib"]]                    # doctest: +SKIP

Each run's kernel gets ``%memwatch on`` first, so the executed notebook
carries an exact per-cell memory ledger and the batch reads every cell's peak
back. That matters because the kernels papermill starts are separate
processes: a Dask worker's memory limit never sees them, but the ledger does.
A failing run is reported with its error and never stops the others.
"""
from __future__ import annotations

import enum
import json
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import pandas as pd
from tqdm.auto import tqdm

from . import config
from ._batch_ideas import BatchError, BatchItem, idea_key, read_ideas, select
from .ledger import normalise_idea
from ._batch_leaderboard import Leaderboard, build, write
from ._batch_worker import TASKS, IdeaSpec, ipc_kernel_manager

if TYPE_CHECKING:
    import nbformat

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


def with_memwatch(notebook: str | Path) -> "nbformat.NotebookNode":
    """The notebook with a first cell that turns the per-cell memory ledger on."""
    import nbformat  # here, not at the top: it costs a direct-mode batch ~1 s of start-up (jsonschema)

    nb = nbformat.read(str(notebook), as_version=4)
    if any(c.cell_type == "code" and "%memwatch on" in c.source for c in nb.cells):
        return nb  # it turns the ledger on itself (rbi_template.ipynb does)
    # The new cell has an id (nbformat 4.5); older notebooks are upgraded so every cell has one.
    nb.cells.insert(0, nbformat.v4.new_code_cell(MEMWATCH_CELL, metadata={"tags": ["moondev-memwatch"]}))
    nb.nbformat_minor = max(nb.nbformat_minor, 5)
    _, nb = nbformat.validator.normalize(nb)
    return nbformat.from_dict(nb)


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
                            progress_bar=False, execution_timeout=timeout, cwd=cwd,
                            kernel_manager_class=ipc_kernel_manager())
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





# ----- batches of ideas ---------------------------------------------------------------

DEFAULT_NOTEBOOK = config.PACKAGE_DIR.parent / "notebooks" / "rbi_template.ipynb"


def notebook_parameters(notebook: str | Path, cfg: dict, model: str, extra: dict | None = None) -> dict:
    """What a batch sets in ``notebook`` besides the idea: the batch's settings it declares, then ``extra``.

    ``ledger_path`` is set to ``":memory:"``: the batch (the client), not the notebook, writes the ledger.
    """
    import papermill as pm

    declared = pm.inspect_notebook(str(notebook))
    ours = {"symbol": cfg.get("symbol"), "timeframe": cfg.get("timeframe"), "model": model,
            "target": cfg.get("target"), "start": cfg.get("start"), "end": cfg.get("end"), "ledger_path": ":memory:"}
    return {**{k: v for k, v in ours.items() if k in declared}, **(extra or {})}


class BatchState(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    FINISHED = "finished"
    INTERRUPTED = "interrupted"


@dataclass
class BatchSettings:
    """Everything that defines a batch; saved in ``batch.json`` so ``resume`` can carry it on."""

    batch_id: str
    ideas: list[str]
    mode: str
    model: str
    cfg: dict
    memory_limit_mb: int
    ledger: str
    notebook: str | None = None
    parameters: dict | None = None
    sandbox_size: int = 2  # at most; a worker takes no more than its host's CPUs shared by its workers
    cell_timeout: float = 600.0
    source: str | None = None  # where the ideas came from, for the record


class Batch:
    """One batch of ideas: ``start()`` (journal, cluster), ``run()`` (submit, collect, record), ``close()``."""

    def __init__(self, settings: BatchSettings, out: Path, *, cluster: Any, model_obj: Any = None,
                 progress: bool = True):
        self.settings, self.out, self.cluster = settings, Path(out), cluster
        self.model_obj = model_obj
        self.progress = progress
        self.state = BatchState.NEW
        self.rows: dict[str, dict] = {}
        self.skipped = 0
        self.elapsed_s = 0.0
        self.startup_s = 0.0  # cluster start and worker warm-up, before the first idea is submitted
        self.warm_up: dict = {}  # worker address -> its warm-up report

    def _spec(self) -> IdeaSpec:
        s = self.settings
        nb, cwd, params = None, None, {}
        if s.mode == "notebook":
            import nbformat

            nb = nbformat.writes(with_memwatch(s.notebook))
            cwd = str(Path(s.notebook).resolve().parent.parent)  # notebooks run from the project root
            params = notebook_parameters(s.notebook, s.cfg, s.model, s.parameters)
        return IdeaSpec(s.mode, self.model_obj if self.model_obj is not None else s.model, s.model, s.cfg,
                        s.memory_limit_mb, s.sandbox_size, nb, params, "python3", s.cell_timeout, cwd)

    def start(self) -> "Batch":
        from .ledger import Ledger
        from ._batch_journal import BatchJournal

        self.out.mkdir(parents=True, exist_ok=True)
        self.ledger = Ledger(self.settings.ledger)
        self.journal = BatchJournal(self.ledger)
        self.rows = self.journal.finished(self.settings.batch_id)
        c = self.settings.cfg
        # Done means the ledger's experiment (idea, symbol, timeframe, model) is done or given up,
        # whoever ran it: another batch, `rbi`, a notebook on this ledger.
        done = self.journal.finished_experiments(c["symbol"], c["timeframe"], self.settings.model)
        self.keys = {it.index: self._key(it.idea) for it in self._items()}
        elsewhere = {it.index for it in self._items()
                     if normalise_idea(it.idea) in done and self.keys[it.index] not in self.rows}
        self.todo = [it for it in self._items() if self.keys[it.index] not in self.rows and it.index not in elsewhere]
        self.skipped = len(elsewhere)
        self._write()  # batch.json exists from the start, so an interrupted batch can be resumed
        t0 = time.perf_counter()
        self.client = self.cluster.start()
        if self.settings.mode == "direct" and self.todo:
            # Each worker's pool, imports and compiled broker come up now, all workers at once, so
            # no idea's wall time or peak memory carries its worker's start-up (notebook kernels
            # start their own pools: nothing to warm there).
            from ._batch_warmup import WarmUpPlan, warm_cluster

            plan = WarmUpPlan.for_batch(self.settings.cfg, self.settings.sandbox_size, self.client)
            self.warm_up = warm_cluster(self.client, plan)
        self.startup_s = time.perf_counter() - t0
        self.state = BatchState.RUNNING
        return self

    def _items(self) -> list[BatchItem]:
        return [BatchItem(i, text) for i, text in enumerate(self.settings.ideas)]

    def _key(self, idea: str) -> str:
        """The idea's key in this batch's journal (which ideas of the batch finished, for ``resume``)."""
        c = self.settings.cfg
        return idea_key(idea, c["symbol"], c["timeframe"], self.settings.model)

    def run(self) -> Leaderboard:
        from distributed import as_completed

        spec, task = self._spec(), TASKS[self.settings.mode]
        t0 = time.perf_counter()
        pending = iter(self.todo)
        futures: dict[str, tuple[Any, BatchItem]] = {}
        window = as_completed()

        def submit_next() -> None:
            item = next(pending, None)
            if item is not None:
                f = self.client.submit(task, {"index": item.index, "idea": item.idea}, spec, pure=False,
                                       key=f"moondev-idea-{self.settings.batch_id}-{item.index}")
                futures[f.key] = (f, item)
                window.add(f)

        # A bounded window of tasks in flight: Ctrl-C loses little, and the scheduler never holds thousands.
        for _ in range(2 * self.cluster.threads()):
            submit_next()
        n_ok = sum(r["status"] == "ok" for r in self.rows.values())
        n_failed = len(self.rows) - n_ok
        bar = tqdm(total=len(self.todo), desc="batch", unit="idea", disable=not self.progress)
        try:
            for f in window:
                _, item = futures.pop(f.key)
                row = self._collect(f, item)
                n_ok += row["status"] == "ok"
                n_failed += row["status"] != "ok"
                bar.update(1)
                bar.set_postfix_str(f"ok {n_ok}, failed {n_failed}")
                submit_next()
            self.state = BatchState.FINISHED
        except KeyboardInterrupt:  # stop cleanly: what finished is recorded already
            self.client.cancel([f for f, _ in futures.values()], force=True)
            self.state = BatchState.INTERRUPTED
        finally:
            bar.close()
            self.elapsed_s = time.perf_counter() - t0
        return self._write()

    def _collect(self, future: Any, item: BatchItem) -> dict:
        from distributed import KilledWorker

        try:
            row = future.result()
        except KilledWorker as e:
            row = {"status": "failed", "error_kind": "worker_lost",
                   "error": f"the workers running it died too often: {e}"[:500]}
        except Exception as e:  # noqa: BLE001 - a cancelled task, a worker that could not unpickle it
            row = {"status": "failed", "error_kind": "internal", "error": f"{type(e).__name__}: {e}"[:500]}
        future.release()
        row = {"idea": item.idea, "index": item.index, **row}
        c = self.settings.cfg
        row.update(symbol=c["symbol"], timeframe=c["timeframe"], model=self.settings.model)
        row["link"] = link = self._materialise(item, row.pop("files", None) or {})
        key = self.keys[item.index]
        calls = row.pop("calls", [])
        row["run_id"] = self.journal.record(self.settings.batch_id, key, row, calls,
                                            run_dir=str((self.out / link).resolve()) if link else None)
        self.rows[key] = row
        return row

    def _materialise(self, item: BatchItem, files: dict[str, str]) -> str | None:
        """Write what the worker sent back under ``out``: the run folder, or the executed notebook."""
        if not files:
            return None
        slug = f"{item.index:05d}-{re.sub(r'[^a-z0-9]+', '-', item.idea.lower())[:40].strip('-') or 'idea'}"
        if self.settings.mode == "notebook":
            target = self.out / "notebooks" / f"{slug}.ipynb"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(files["idea.ipynb"])
        else:
            target = self.out / "runs" / slug
            target.mkdir(parents=True, exist_ok=True)
            for name, text in files.items():
                (target / name).write_text(text)
        return str(target.relative_to(self.out))

    def _write(self) -> Leaderboard:
        rows = list(self.rows.values())
        ok = sum(r["status"] == "ok" for r in rows)
        summary = {"state": self.state.value if self.state is not BatchState.NEW else "running",
                   "ideas": len(self.settings.ideas), "ok": ok, "failed": len(rows) - ok, "skipped_done": self.skipped,
                   "not_run": len(self.settings.ideas) - len(rows) - self.skipped,
                   "elapsed_s": round(self.elapsed_s, 2), "startup_s": round(self.startup_s, 2),
                   "out": str(self.out),
                   "ideas_per_min": round(len(self.todo) / self.elapsed_s * 60, 2) if self.elapsed_s else None,
                   "max_peak_mib": round(max((r.get("peak_bytes") or 0 for r in rows), default=0) / 2**20, 1),
                   "sum_peak_mib": round(sum(r.get("peak_bytes") or 0 for r in rows) / 2**20, 1)}
        if self.state is not BatchState.NEW:
            summary["cluster"] = self.cluster.describe()
        if self.warm_up:
            summary["warm_up"] = {"workers": len(self.warm_up),
                                  "max_s": max(r.get("seconds") or 0 for r in self.warm_up.values()),
                                  "sandbox_sizes": sorted({r.get("sandbox_size") for r in self.warm_up.values()
                                                           if r.get("sandbox_size")}),
                                  "failed": {a: r["error"] for a, r in self.warm_up.items() if not r.get("ok")}}
        board = build(rows, self.settings.cfg.get("metric", "Return [%]"), summary)
        write(board, self.out, asdict(self.settings))
        return board

    def close(self) -> None:
        self.cluster.close()
        if getattr(self, "ledger", None) is not None:
            self.ledger.close()


def _model_and_cfg(model: Any, cfg: Any) -> tuple[Any, str, dict]:
    """(model object or None, model name, RBIConfig fields): what every worker gets."""
    from .rbi import RBIConfig, check_config

    cfg = cfg or RBIConfig()
    try:
        check_config(cfg)  # here, not in every worker: one error line, no failed rows
    except ValueError as e:
        raise BatchError(str(e)) from None
    cfg_dict = {k: v for k, v in asdict(cfg).items() if k != "runs_dir"}
    if isinstance(model, str):
        from .models import ModelFactory

        return None, ModelFactory().resolve(model)[1], cfg_dict  # "auto" is decided once, here, for all
    return model, getattr(model, "name", type(model).__name__), cfg_dict


def run_on_executor(ideas: Iterable[str], executor: Any, *, model: Any = "auto", cfg: Any = None,
                    ledger: Any = None, progress: bool = True):
    """``run_rbi(..., executor=...)``: each idea one task on any ``concurrent.futures.Executor``.

    The task is the batch's direct-mode task, so it runs wherever the executor runs it (a Dask
    worker included) on that process's own sandbox pool; this process replays its ledger writes
    and writes its run folder under ``cfg.runs_dir``.
    """
    from concurrent.futures import as_completed

    from .ledger import Ledger
    from .rbi import IdeaResult, RBIReport
    from ._batch_worker import replay, run_direct

    model_obj, model_name, cfg_dict = _model_and_cfg(model, cfg)
    spec = IdeaSpec("direct", model_obj if model_obj is not None else model_name, model_name, cfg_dict, 2048)
    ledger = ledger or Ledger()
    runs = Path(getattr(cfg, "runs_dir", None) or config.runs_dir())
    texts = [t.strip() for t in ideas if t and t.strip()]
    t0 = time.perf_counter()
    futures = {executor.submit(run_direct, {"index": i, "idea": t}, spec): i for i, t in enumerate(texts)}
    results: list = [None] * len(texts)
    for f in tqdm(as_completed(futures), total=len(futures), desc="RBI", unit="idea", disable=not progress):
        i = futures[f]
        try:
            row = f.result()
        except Exception as e:  # noqa: BLE001 - a lost worker: that idea fails, the others go on
            row = {"status": "failed", "error_kind": "worker_lost" if "Killed" in type(e).__name__ else "internal",
                   "error": f"{type(e).__name__}: {e}", "calls": [], "files": {}}
        files = row.get("files") or {}

        def write_run_dir(run_id: int, files: dict = files) -> str | None:
            if not files:
                return None
            folder = runs / f"run-{run_id:05d}"
            folder.mkdir(parents=True, exist_ok=True)
            for name, text in files.items():
                (folder / name).write_text(text)
            return str(folder)

        run_id = replay(ledger, row.get("calls", []), write_run_dir)
        run_dir = ledger.run(run_id)["run_dir"] if run_id is not None else None
        results[i] = IdeaResult(texts[i], row["status"], run_id=run_id, error_kind=row.get("error_kind"),
                                error=row.get("error"), in_sample=row.get("in_sample") or {},
                                out_of_sample=row.get("out_of_sample") or {}, params=row.get("params") or {},
                                debug_iterations=row.get("debug", 0), optimize_iterations=row.get("optimize", 0),
                                saved=bool(row.get("saved")), run_dir=run_dir)
    metric = cfg_dict["metric"]
    return RBIReport(results, metric, time.perf_counter() - t0,
                     ledger.usage_summary(r.run_id for r in results if r.run_id is not None))


def _load_settings(resume: Path) -> BatchSettings:
    try:
        saved = json.loads((resume / "batch.json").read_text())["settings"]
        return BatchSettings(**saved)
    except (OSError, KeyError, TypeError, ValueError) as e:
        raise BatchError(f"{resume}: not a batch folder to resume (no readable batch.json: {e})") from None


def run_batch(ideas: str | Path | Iterable[str] | None = None, *, client: Any = None, workers: int | None = None,
              scheduler: str | None = None, out: str | Path | None = None, resume: str | Path | None = None,
              notebook: str | Path | bool | None = None, parameters: dict | None = None, model: Any = "auto",
              cfg: Any = None, memory_limit_mb: int = 2048, limit: int | None = None, sample: int | None = None,
              seed: int = 0, ledger: str | Path | None = None, progress: bool = True) -> Leaderboard:
    """Run a batch of ideas; returns the leaderboard (also written to ``out``).

    ``ideas``: a list, or a text file / CSV with an ``idea`` column. ``notebook=True`` or a path
    runs each idea as that notebook (default ``notebooks/rbi_template.ipynb``) with papermill;
    ``parameters`` are extra notebook parameters. ``cfg`` is an :class:`~moondev_lab.rbi.RBIConfig`.
    ``memory_limit_mb`` bounds each idea: its sandbox tasks (direct) or its kernel (notebook).
    ``resume`` is a batch folder to carry on, with its saved settings.
    """
    model_obj = None
    if resume is not None:
        out = Path(resume)
        settings = _load_settings(out)
    else:
        if ideas is None:
            raise BatchError("give ideas (a list or a file), or resume= a batch folder")
        source = str(ideas) if isinstance(ideas, (str, Path)) else None
        texts = read_ideas(ideas) if source else [str(i) for i in ideas]
        items = select(texts, limit=limit, sample=sample, seed=seed)
        if not items:
            raise BatchError(f"no ideas to run{f' in {source}' if source else ''}")
        model_obj, model_name, cfg_dict = _model_and_cfg(model, cfg)
        nb = None
        if notebook:
            nb = Path(DEFAULT_NOTEBOOK if notebook is True else notebook)
            if not nb.is_file():
                raise BatchError(f"{nb}: no such notebook")
        if memory_limit_mb < 64:
            raise BatchError(f"memory_limit_mb must be at least 64, not {memory_limit_mb}")
        out = Path(out) if out else config.home() / "batches" / f"batch-{time.strftime('%Y%m%d-%H%M%S')}"
        if (out / "batch.json").exists():
            raise BatchError(f"{out} already holds a batch: resume it with --resume {out}, or choose another --out")
        settings = BatchSettings(uuid.uuid4().hex[:12], [it.idea for it in items], "notebook" if nb else "direct",
                                 model_name, cfg_dict, int(memory_limit_mb), str(ledger or config.ledger_path()),
                                 str(nb.resolve()) if nb else None, dict(parameters or {}), source=source)
    from ._batch_cluster import BatchCluster

    batch = Batch(settings, out, cluster=BatchCluster(client, scheduler, workers, settings.memory_limit_mb),
                  model_obj=model_obj, progress=progress)
    try:
        batch.start()
        return batch.run()
    finally:
        batch.close()


__all__ = ["Batch", "BatchError", "BatchReport", "BatchSettings", "Leaderboard", "run_batch",
           "run_notebooks", "run_one", "with_memwatch"]
