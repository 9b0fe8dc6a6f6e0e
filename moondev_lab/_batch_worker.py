"""What one Dask worker does for one idea: the RBI loop directly, or one papermill notebook.

Both task functions are module-level (Dask ships them by reference), never raise for
anything an idea can do, and return a plain dict the client turns into a leaderboard row
and ledger writes. Workers write no ledger and need no shared filesystem:

* the RBI loop writes into a :class:`RecordingLedger` (in memory), whose calls travel
  back with the result and are replayed by the client on the real ledger;
* the run folder (strategy, stats, plot) or the executed notebook travels back as text.

Market data is read from the *worker's* store (``$MOONDEV_LAB_HOME/store`` of the worker
process): on one machine every worker maps the same files, so their pages are shared;
on other machines run ``moondev-lab data import`` / ``data fetch`` there, or point
``MOONDEV_LAB_HOME`` of the workers at a shared home. The bundled BTC sample imports itself.
"""
from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ._batch_memory import TreeWatch, kill_tree, parent_of
from .ledger import Ledger

#: MIME type of the result a notebook publishes for the batch (see ``batch.publish_result``).
RESULT_MIME = "application/vnd.moondev.rbi-result+json"

#: Ledger calls the RBI loop makes that change the ledger, and which kind of id their first argument is.
RECORDED_CALLS = {"add_idea": None, "start_run": "idea", "add_code": "run", "add_usage": "run",
                  "finish_run": "run", "record_success": "idea", "record_failure": "idea"}


@dataclass(frozen=True)
class IdeaSpec:
    """The batch's settings, shipped with every idea task."""

    mode: str  # "direct" | "notebook"
    model: Any  # a model name resolved on the worker, or a picklable model object
    model_name: str
    cfg: dict  # RBIConfig fields
    memory_limit_mb: int
    sandbox_size: int = 2
    notebook: str | None = None  # the notebook's JSON (with %memwatch on), so workers need no copy of it
    parameters: dict = field(default_factory=dict)
    kernel_name: str = "python3"
    cell_timeout: float = 600.0
    cwd: str | None = None


class RecordingLedger(Ledger):
    """An in-memory ledger that also keeps a log of its writes, for the client to replay."""

    def __init__(self) -> None:
        super().__init__(":memory:")
        self.calls: list[tuple[str, tuple, dict, int | None]] = []


def _recorded(name: str):
    def method(self, *args, **kwargs):
        out = getattr(Ledger, name)(self, *args, **kwargs)
        returned = out if isinstance(out, int) else getattr(out, "id", None)
        self.calls.append((name, args, kwargs, returned))
        return out

    method.__name__ = name
    return method


for _name in RECORDED_CALLS:
    setattr(RecordingLedger, _name, _recorded(_name))


def replay(ledger: Ledger, calls: list, run_dir: str | Callable[[int], str | None] | None = None) -> int | None:
    """Apply a worker's recorded ledger calls to ``ledger``, mapping its ids; returns the run id.

    ``run_dir`` replaces the worker's run folder: a path, or a function of the new run id.
    """
    ids: dict[str, dict] = {"idea": {}, "run": {}}
    run_id = None
    for name, args, kwargs, returned in calls:
        kind = RECORDED_CALLS[name]
        if kind and args:
            args = (ids[kind].get(args[0], args[0]), *args[1:])
        if name == "finish_run" and run_dir is not None:
            kwargs = {**kwargs, "run_dir": run_dir(args[0]) if callable(run_dir) else run_dir}
        out = getattr(ledger, name)(*args, **kwargs)
        if name == "add_idea":
            ids["idea"][returned] = out.id
        elif name == "start_run":
            ids["run"][returned] = run_id = out
    return run_id


def outcome_calls(idea: str, model: str, row: dict) -> list:
    """The ledger calls that record an idea's outcome when no RBI loop ran on the worker (notebook mode)."""
    ok = row["status"] == "ok"
    done = ("record_success", (1,), {}, None) if ok else \
        ("record_failure", (1, f"{row.get('error_kind')}: {row.get('error')}"), {}, None)
    finish = {k: row.get(k) for k in ("in_sample", "out_of_sample", "params")}
    return [("add_idea", (idea,), {}, 1), ("start_run", (1, model), {}, 1), done,
            ("finish_run", (1, row["status"]), {"error_kind": row.get("error_kind"),
                                                 "error_message": row.get("error"), **finish}, None)]


# ----- the worker's sandbox pool ----------------------------------------------------------
_pool = None
_factory = None
_lock = threading.Lock()


def worker_sandbox(size: int):
    """This worker process's own sandbox pool, started on first use (closed at exit, dies with the worker)."""
    global _pool
    from .sandbox import SandboxPool

    with _lock:
        if _pool is None:
            _pool = SandboxPool(size)
            # Bring its warm workers and their standby children up now (an empty task fails at
            # once), so they are every idea's memory baseline rather than the first idea's peak.
            for _ in range(min(2, size)):
                _pool.run("", timeout=30)
        return _pool


def _model_factory():
    global _factory
    from .models import ModelFactory

    with _lock:
        if _factory is None:
            _factory = ModelFactory()
        return _factory


class LimitedSandbox:
    """The worker's pool as one idea sees it: every task under the idea's memory limit.

    ``len()`` is the pool's configured size, not its live workers (0 before the first task).
    """

    def __init__(self, pool: Any, limits: Any):
        self.pool, self.limits = pool, limits

    def run(self, *args, **kwargs):
        kwargs.setdefault("limits", self.limits)
        return self.pool.run(*args, **kwargs)

    def optimize(self, *args, **kwargs):
        kwargs.setdefault("limits", self.limits)
        return self.pool.optimize(*args, **kwargs)

    def __len__(self) -> int:
        return self.pool.size

    def __getattr__(self, name: str):
        return getattr(self.pool, name)


def _where() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _failed(item: dict, kind: str, error: str, **extra) -> dict:
    return {"index": item["index"], "idea": item["idea"], "status": "failed", "error_kind": kind,
            "error": error, "in_sample": {}, "out_of_sample": {}, "params": {}, "calls": [], "files": {},
            "worker": _where(), **extra}


def _read_files(folder: Path) -> dict[str, str]:
    return {p.name: p.read_text(errors="replace") for p in sorted(folder.iterdir()) if p.is_file()}


# ----- direct mode --------------------------------------------------------------------
def run_direct(item: dict, spec: IdeaSpec) -> dict:
    """The whole RBI loop for one idea, on this worker's sandbox pool."""
    from .rbi import RBI, RBIConfig
    from .sandbox import Limits

    t0 = time.perf_counter()
    runs = Path(tempfile.mkdtemp(prefix="moondev-batch-"))
    pool = None
    try:
        pool = worker_sandbox(spec.sandbox_size)
        # The idea's own processes are the pool's task children: the template and warm workers
        # are shared by every idea and excluded, and the idle standby children are the baseline.
        watch = TreeWatch(pool.pids)
        ledger = RecordingLedger()
        with watch:
            engine = RBI(spec.model, RBIConfig(**spec.cfg, runs_dir=runs), ledger=ledger,
                         sandbox=LimitedSandbox(pool, Limits(memory_mb=spec.memory_limit_mb)),
                         factory=_model_factory())
            res = engine.run_one(item["idea"])
        row = {"index": item["index"], "idea": item["idea"], "status": res.status, "error_kind": res.error_kind,
               "error": res.error, "in_sample": res.in_sample, "out_of_sample": res.out_of_sample,
               "params": res.params, "saved": res.saved, "debug": res.debug_iterations, "optimize": res.optimize_iterations,
               "calls": ledger.calls, "worker": _where(), "peak_bytes": watch.peak_above_baseline,
               "files": _read_files(Path(res.run_dir)) if res.run_dir else {}}
        ledger.close()
    except Exception as e:  # data missing on this worker, a model that cannot start: a failed row
        kind = "data_error" if type(e).__name__ in ("SeriesNotFound", "StoreError", "ValueError") else "internal"
        row = _failed(item, kind, f"{type(e).__name__}: {e}")
    finally:
        shutil.rmtree(runs, ignore_errors=True)
    row["wall_s"] = time.perf_counter() - t0
    return row


# ----- notebook mode ------------------------------------------------------------------
def _watched_kernel_manager(started: list):
    """A kernel manager class that reports its kernel's pid as soon as it runs (for the memory watch)."""
    from jupyter_client.manager import AsyncKernelManager

    class WatchedKernelManager(AsyncKernelManager):
        async def start_kernel(self, **kw):
            await super().start_kernel(**kw)
            started.append(self.provisioner.pid)

    return WatchedKernelManager


def published_result(nb) -> dict | None:
    """The last result a notebook published with ``RESULT_MIME``, if any."""
    found = None
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            data = out.get("data") or {}
            if RESULT_MIME in data:
                found = data[RESULT_MIME]
    return found


def run_notebook(item: dict, spec: IdeaSpec) -> dict:
    """Execute the batch's notebook for one idea with papermill, its kernel under the memory limit."""
    import nbformat
    import papermill as pm
    from nbclient.exceptions import CellTimeoutError, DeadKernelError
    from papermill.exceptions import PapermillExecutionError

    from .memory import read_ledger

    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="moondev-batch-nb-"))
    out = tmp / "idea.ipynb"
    cfg = spec.cfg
    params = {"idea": item["idea"], "symbol": cfg.get("symbol"), "timeframe": cfg.get("timeframe"),
              "model": spec.model_name, "target": cfg.get("target"), **spec.parameters}
    kernel: list[int] = []
    limit = spec.memory_limit_mb * 2**20
    watch = TreeWatch(lambda: kernel[:1], include_roots=True, limit=limit,
                      on_limit=lambda _: kill_tree(kernel[0]))
    row: dict[str, Any] = {"index": item["index"], "idea": item["idea"], "status": "failed", "error_kind": None,
                           "error": None, "in_sample": {}, "out_of_sample": {}, "params": {}}
    cwd = spec.cwd if spec.cwd and Path(spec.cwd).is_dir() else str(tmp)
    try:
        with watch:
            pm.execute_notebook(nbformat.reads(spec.notebook, as_version=4), str(out), parameters=params,
                                kernel_name=spec.kernel_name, progress_bar=False, cwd=cwd,
                                execution_timeout=spec.cell_timeout,
                                kernel_manager_class=_watched_kernel_manager(kernel))
    except PapermillExecutionError as e:
        memory = watch.exceeded or e.ename == "MemoryError"
        row.update(error_kind="memory_limit" if memory else "notebook_error",
                   error=f"cell {e.exec_count}: {e.ename}: {e.evalue}"[:500])
    except DeadKernelError as e:
        row.update(error_kind="memory_limit" if watch.exceeded else "kernel_died", error=str(e)[:500])
    except CellTimeoutError as e:
        row.update(error_kind="timeout", error=str(e)[:500])
    except Exception as e:  # noqa: BLE001 - a kernel that would not start, a bad notebook
        row.update(error_kind="memory_limit" if watch.exceeded else "internal", error=f"{type(e).__name__}: {e}"[:500])
    finally:
        if kernel and parent_of(kernel[0]) == os.getpid():
            kill_tree(kernel[0])  # papermill shuts its kernel down; this only catches a wedged one
    if watch.exceeded:
        row["error"] = (f"the kernel passed the memory limit of {spec.memory_limit_mb} MiB "
                        f"(peak {watch.peak / 2**20:.0f} MiB) and was stopped; {row['error']}")
    row["peak_bytes"] = watch.peak
    if out.exists():
        nb = nbformat.read(str(out), as_version=4)
        result = published_result(nb)
        if row["error_kind"] is None:
            if result is None:
                row.update(error_kind="no_result", error=f"the notebook published no {RESULT_MIME} output")
            else:
                row.update({k: result.get(k) for k in ("status", "error_kind", "error")},
                           **{k: result.get(k) or {} for k in ("in_sample", "out_of_sample", "params")})
        try:
            cells = read_ledger(str(out))
            if len(cells):
                row["max_cell_peak_bytes"] = int(cells["peak_above_start"].max())
        except Exception:  # noqa: BLE001 - a notebook without the memwatch cell
            pass
        row["files"] = {"idea.ipynb": out.read_text()}
    else:
        row["files"] = {}
    shutil.rmtree(tmp, ignore_errors=True)
    row.update(calls=outcome_calls(item["idea"], spec.model_name, row), worker=_where(),
               wall_s=time.perf_counter() - t0)
    return row


TASKS = {"direct": run_direct, "notebook": run_notebook}
