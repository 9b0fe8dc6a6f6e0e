"""What one Dask worker does for one idea: the RBI loop directly, or one papermill notebook.

Both task functions are module-level (Dask ships them by reference), never raise for
anything an idea can do, and return a plain dict the client turns into a leaderboard row
and ledger writes. Workers write no ledger and need no shared filesystem:

* the RBI loop writes into a :class:`RecordingLedger` (in memory), whose calls travel
  back with the result and are replayed by the client on the real ledger;
* the run folder (strategy, stats, plot) or the executed notebook travels back as text; a
  notebook hands its idea's result back with :func:`moondev_lab.results.publish_result`
  (as ``notebooks/rbi_template.ipynb`` does), read here with ``results.read_results``.

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
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ._batch_memory import TreeWatch, kill_tree, parent_of
from ._batch_pool import worker_sandbox
from ._tempdirs import owned_tempdir
from .ledger import Idea, Ledger, LedgerError
from .results import RESULT_MIME, read_results

#: Ledger calls the RBI loop makes that change the ledger, and which kind of id their first argument is.
RECORDED_CALLS = {"add_idea": None, "experiment": "idea", "start_run": "experiment", "add_code": "run",
                  "add_usage": "run", "finish_run": "run", "record_success": "experiment",
                  "record_failure": "experiment"}


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
    parameters: dict = field(default_factory=dict)  # the notebook's parameters besides the idea
    kernel_name: str = "python3"
    cell_timeout: float = 600.0
    cwd: str | None = None


class RecordingLedger(Ledger):
    """An in-memory ledger that also keeps a log of its writes, for the client to replay.

    Only the outermost calls are logged (``experiment(text, ...)`` adds its idea itself), each
    with what it returned, so :func:`replay` can map the worker's ids onto the client's.

    >>> led = RecordingLedger()
    >>> run = led.start_run(led.experiment("20/50 SMA crossover", "BTC/USD", "15m", "offline"))
    >>> [name for name, *_ in led.calls]
    ['experiment', 'start_run']
    """

    def __init__(self) -> None:
        super().__init__(":memory:")
        self.calls: list[tuple[str, tuple, dict, Any]] = []
        self._depth = 0


def _recorded(name: str):
    def method(self, *args, **kwargs):
        self._depth += 1
        try:
            out = getattr(Ledger, name)(self, *args, **kwargs)
        finally:
            self._depth -= 1
        if self._depth == 0:
            self.calls.append((name, args, kwargs, out))
        return out

    method.__name__ = name
    method.__doc__ = getattr(Ledger, name).__doc__
    return method


for _name in RECORDED_CALLS:
    setattr(RecordingLedger, _name, _recorded(_name))


def _ident(value: Any) -> Any:
    return getattr(value, "id", value)


def replay(ledger: Ledger, calls: list, run_dir: str | Callable[[int], str | None] | None = None) -> int | None:
    """Apply a worker's recorded ledger calls to ``ledger``, mapping its ids; returns the (last) run id.

    Ideas, experiments and runs get the client ledger's ids; an experiment the worker
    referred to is the client's experiment of the same idea, symbol, timeframe and model.
    ``run_dir`` replaces the worker's run folder: a path, or a function of the new run id.

    >>> worker, client = RecordingLedger(), Ledger(":memory:")
    >>> _ = client.add_idea("an idea the client had first")
    >>> exp = worker.experiment("20/50 SMA crossover", "BTC/USD", "15m", "offline")
    >>> worker.finish_run(worker.start_run(exp), "ok"); worker.record_success(exp.id)
    >>> run = replay(client, worker.calls, run_dir="runs/x")
    >>> client.run(run)["run_dir"], client.experiment("20/50 SMA crossover", "BTC/USD", "15m", "offline").status
    ('runs/x', 'done')
    """
    ids: dict[str, dict] = {"idea": {}, "experiment": {}, "run": {}}
    run_id = None
    for name, args, kwargs, returned in calls:
        kind = RECORDED_CALLS[name]
        if kind and args and not isinstance(args[0], str):  # experiment("text", ...) needs no mapping
            worker_id = _ident(args[0])
            if worker_id not in ids[kind]:
                raise LedgerError(f"recorded {name} refers to {kind} {worker_id}, which the worker never created")
            mapped = ids[kind][worker_id]
            args = (mapped if not isinstance(args[0], int) else _ident(mapped), *args[1:])
        if name == "finish_run" and run_dir is not None:
            kwargs = {**kwargs, "run_dir": run_dir(args[0]) if callable(run_dir) else run_dir}
        out = getattr(ledger, name)(*args, **kwargs)
        if name == "add_idea":
            ids["idea"][returned.id] = out
        elif name == "experiment":
            ids["experiment"][returned.id] = out
            ids["idea"][returned.idea_id] = Idea(out.idea_id, out.text)
        elif name == "start_run":
            ids["run"][returned] = run_id = out
    return run_id


def outcome_calls(idea: str, symbol: str, timeframe: str, model: str, row: dict) -> list:
    """The ledger calls that record an idea's outcome when no RBI loop ran on the worker (notebook mode)."""
    from .rbi import MODEL_UNAVAILABLE

    led = RecordingLedger()
    exp = led.experiment(idea, symbol, timeframe, model)
    run = led.start_run(exp, {"mode": "notebook"})
    if row["status"] == "ok":
        led.record_success(exp.id)
    else:  # a model outage is not the idea's fault: retried, never charged (as in rbi)
        led.record_failure(exp.id, f"{row.get('error_kind')}: {row.get('error')}",
                           charge=row.get("error_kind") != MODEL_UNAVAILABLE)
    led.finish_run(run, row["status"], error_kind=row.get("error_kind"), error_message=row.get("error"),
                   **{k: row.get(k) for k in ("in_sample", "out_of_sample", "params")})
    led.close()
    return led.calls


# ----- the worker's model factory ----------------------------------------------------------
_factory = None
_lock = threading.Lock()


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
    runs = owned_tempdir("batch")
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
               "overfitting": res.overfitting,  # issue 15: trials, dsr, psr, pbo, ...
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
def ipc_kernel_manager():
    """A kernel manager over IPC sockets: no "running over TCP without encryption" warning, no open port.

    Each kernel gets its own socket path: jupyter_client's default (``kernel-ipc`` in the cwd)
    would make two kernels started at once from one folder share sockets.
    """
    from jupyter_client.manager import AsyncKernelManager
    from traitlets import default

    class IPCKernelManager(AsyncKernelManager):
        def __init__(self, **kwargs):
            kwargs.setdefault("transport", "ipc")
            super().__init__(**kwargs)

        @default("ip")
        def _unique_ip(self) -> str:  # short: a socket path must stay under ~100 bytes
            return os.path.join(tempfile.gettempdir(), f"moondev-kernel-{uuid.uuid4().hex[:12]}")

    return IPCKernelManager


def _watched_kernel_manager(started: list):
    """An IPC kernel manager class that reports its kernel's pid as soon as it runs (for the memory watch)."""

    class WatchedKernelManager(ipc_kernel_manager()):
        async def start_kernel(self, **kw):
            await super().start_kernel(**kw)
            started.append(self.provisioner.pid)

    return WatchedKernelManager


def run_notebook(item: dict, spec: IdeaSpec) -> dict:
    """Execute the batch's notebook for one idea with papermill, its kernel under the memory limit."""
    import nbformat
    import papermill as pm
    from nbclient.exceptions import CellTimeoutError, DeadKernelError
    from papermill.exceptions import PapermillExecutionError

    from .memory import read_ledger

    t0 = time.perf_counter()
    tmp = owned_tempdir("batch-notebook")
    out = tmp / "idea.ipynb"
    params = {"idea": item["idea"], **spec.parameters}
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
        results = read_results(out)
        result = results[-1] if results else None
        if row["error_kind"] is None:
            if result is None:
                row.update(error_kind="no_result", error=f"the notebook published no {RESULT_MIME} output")
            else:
                row.update({k: result.get(k) for k in ("status", "error_kind", "error", "overfitting")},
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
    row.update(calls=outcome_calls(item["idea"], spec.cfg["symbol"], spec.cfg["timeframe"], spec.model_name, row),
               worker=_where(),
               wall_s=time.perf_counter() - t0)
    return row


TASKS = {"direct": run_direct, "notebook": run_notebook}
