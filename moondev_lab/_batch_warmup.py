"""Warming Dask workers up for a batch: their sandbox pool, the RBI loop's imports, the compiled broker.

A worker's first idea used to pay for all of it (seconds; tens of seconds when numba's
cache is cold), so that idea's wall time and the batch's scaling showed the worker's
start-up rather than the idea. A :class:`WarmUpPlugin` does it on every worker as it
joins (late ones too), in a thread, so the worker's event loop keeps answering the
scheduler; :func:`warm_cluster` waits for the workers there are now.

>>> pool_size(2, workers_here=2, cpus=2)     # 2 Dask workers on 2 cores: one sandbox each
1
>>> pool_size(2, workers_here=1, cpus=8)     # never more than the batch asked for
2

On one machine a cold numba cache is compiled by one worker at a time (a file lock
next to the cache): the others then load its result instead of compiling it again
side by side on the same cores.
"""
from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distributed.comm import get_address_host
from distributed.diagnostics.plugin import WorkerPlugin

#: A strategy small enough to cost nothing and real enough to go through the whole path:
#: sandbox task, order log, trusted settlement (the numba kernel), backtesting's stats.
WARM_CODE = """
from backtesting import Strategy
from backtesting.lib import crossover
import talib


class WarmUp(Strategy):
    def init(self):
        self.fast = self.I(talib.SMA, self.data.Close, 10)
        self.slow = self.I(talib.SMA, self.data.Close, 30)

    def next(self):
        if crossover(self.fast, self.slow):
            self.buy()
        elif crossover(self.slow, self.fast):
            self.position.close()
"""


def pool_size(wanted: int, workers_here: int, cpus: int | None = None) -> int:
    """Sandbox workers for one Dask worker: at most ``wanted``, and this host's CPUs shared by its workers."""
    cpus = cpus or len(os.sched_getaffinity(0)) or 1
    return max(1, min(wanted, cpus // max(1, workers_here)))


@dataclass(frozen=True)
class WarmUpPlan:
    """What the batch's ideas will need on a worker."""

    symbol: str
    timeframe: str
    source: str | None = None
    start: str | None = None
    end: str | None = None
    sandbox_size: int = 2
    workers_per_host: dict = field(default_factory=dict)  # host -> Dask workers on it, when the batch started

    @classmethod
    def for_batch(cls, cfg: dict, sandbox_size: int, client: Any) -> "WarmUpPlan":
        hosts: dict[str, int] = {}
        for info in client.scheduler_info()["workers"].values():
            hosts[info["host"]] = hosts.get(info["host"], 0) + 1
        return cls(cfg["symbol"], cfg["timeframe"], cfg.get("source"), cfg.get("start"), cfg.get("end"),
                   sandbox_size, hosts)


_report: dict = {}
_done = threading.Event()
_lock = threading.Lock()


@contextlib.contextmanager
def _one_compiler_per_machine():
    """Hold a lock next to numba's cache while the kernel loads, so a cold cache is compiled once."""
    import moondev_lab._broker_kernel  # noqa: F401  (sets NUMBA_CACHE_DIR; compiles nothing yet)

    folder = os.environ.get("NUMBA_CACHE_DIR")
    try:
        handle = open(Path(folder) / ".moondev-warm-up.lock", "a") if folder else None
    except OSError:  # a read-only cache: numba copes, and so do we, unlocked
        handle = None
    if handle is None:
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def warm_up(plan: WarmUpPlan, host: str | None = None) -> dict:
    """Warm this process up for ``plan`` (once; later calls return the first report). Never raises.

    A worker that cannot warm up (its store lacks the series, say) still takes ideas:
    they fail with their own cause, as they would have without a warm-up.
    """
    from ._batch_pool import worker_sandbox

    with _lock:
        if _done.is_set():
            return dict(_report)
        t0 = time.perf_counter()
        report: dict[str, Any] = {"ok": False, "error": None}
        try:
            # The template process imports its libraries while this one imports the RBI loop's.
            pool = worker_sandbox(pool_size(plan.sandbox_size, plan.workers_per_host.get(host, 1)), prime=False)
            report["sandbox_size"] = pool.size
            from . import plotting, rbi  # noqa: F401  (bokeh's included)
            from .sandbox import DataRef

            worker_sandbox(pool.size)

            ref = DataRef(plan.symbol, plan.timeframe, source=plan.source, start=plan.start, end=plan.end)
            with _one_compiler_per_machine():
                run = pool.run(WARM_CODE, ref, timeout=120)
            report["ok"] = run.ok
            report["error"] = None if run.ok else str(run.error)
        except Exception as e:  # noqa: BLE001 - reported; the ideas then fail with their own causes
            report["error"] = f"{type(e).__name__}: {e}"[:500]
        report["seconds"] = round(time.perf_counter() - t0, 2)
        _report.update(report)
        _done.set()
        return dict(report)


class WarmUpPlugin(WorkerPlugin):
    """Warms each worker up as it joins; ``setup`` returns at once (the worker keeps serving).

    The warm-up runs on the worker's own task executor, whose threads live as long as the
    worker: the sandbox template dies with the *thread* that started it (PR_SET_PDEATHSIG),
    so a pool started on a short-lived thread would lose its workers when that thread ended.
    """

    idempotent = True  # registering it again (another batch on this cluster) changes nothing
    name = "moondev-batch-warm-up"

    def __init__(self, plan: WarmUpPlan):
        self.plan = plan

    def setup(self, worker: Any) -> None:
        worker.executors["default"].submit(warm_up, self.plan, get_address_host(worker.address))


async def _wait_for_warm_up(timeout: float) -> dict:
    """Run on each worker by :func:`warm_cluster`: its warm-up report once done (or so far)."""
    await asyncio.to_thread(_done.wait, timeout)
    return dict(_report) if _done.is_set() else {"ok": False, "error": f"still warming up after {timeout:.0f} s"}


def warm_cluster(client: Any, plan: WarmUpPlan, timeout: float = 300.0) -> dict:
    """Warm every worker of ``client`` up (and any that join later); the workers' reports, by address.

    Never raises for a worker that fails or goes away meanwhile: its report says so, and the
    batch goes on (its ideas are retried elsewhere or recorded, as without a warm-up).
    """
    client.register_plugin(WarmUpPlugin(plan))
    replies = client.run(_wait_for_warm_up, timeout, on_error="return")
    return {addr: r if isinstance(r, dict) else {"ok": False, "error": f"{type(r).__name__}: {r}"[:500]}
            for addr, r in replies.items()}
