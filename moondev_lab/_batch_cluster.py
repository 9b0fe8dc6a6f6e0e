"""Where a batch runs: a LocalCluster sized from this machine, or an existing Dask cluster.

>>> cluster = BatchCluster(workers=2)          # nothing starts until start()
>>> cluster.state.value
'new'
>>> local_size(memory_limit_mb=2048, cpus=8, available_mb=6000)   # memory caps it
2

The code path is the same either way: the client submits one task per idea and
collects them with ``as_completed``.
"""
from __future__ import annotations

import enum
import logging
import os
from typing import Any

from ._batch_ideas import BatchError

#: What one worker process costs besides its ideas: Dask itself, a sandbox template and two warm workers.
WORKER_OVERHEAD_MB = 600


def local_size(memory_limit_mb: int, cpus: int | None = None, available_mb: float | None = None) -> int:
    """Workers for a LocalCluster: one per CPU, as many as memory allows with one idea each."""
    if available_mb is None:
        import psutil

        available_mb = psutil.virtual_memory().available / 2**20
    cpus = cpus or os.cpu_count() or 1
    return max(1, min(cpus, int(available_mb // (memory_limit_mb + WORKER_OVERHEAD_MB))))


class ClusterState(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    CLOSED = "closed"


class BatchCluster:
    """A Dask client for a batch: the caller's ``client``, a ``scheduler`` address
    (or ``$DASK_SCHEDULER_ADDRESS``), or else a LocalCluster of ``workers`` processes
    with one thread each (each worker runs one idea at a time, so its memory is the idea's).
    """

    def __init__(self, client: Any = None, scheduler: str | None = None, workers: int | None = None,
                 memory_limit_mb: int = 2048):
        self.state = ClusterState.NEW
        self.scheduler = scheduler or (None if client else os.environ.get("DASK_SCHEDULER_ADDRESS") or None)
        self.workers = workers
        self.memory_limit_mb = memory_limit_mb
        self.client = client
        self._own_client = client is None
        self._cluster = None
        if workers is not None and workers < 1:
            raise BatchError(f"--workers must be at least 1, not {workers}")

    def start(self):
        """Connect or start the cluster; returns the ``distributed.Client``."""
        if self.state is not ClusterState.NEW:
            raise RuntimeError(f"a BatchCluster starts once; this one is {self.state.value}")
        from distributed import Client, LocalCluster

        if self.client is None and self.scheduler:
            try:
                self.client = Client(self.scheduler, timeout=15)
            except (OSError, TimeoutError) as e:
                raise BatchError(f"cannot reach the Dask scheduler at {self.scheduler}: {e}") from None
        elif self.client is None:
            import dask

            n = self.workers or local_size(self.memory_limit_mb)
            # No dashboard; the scheduler's small HTTP server on a free port rather than 8787, so a
            # second cluster on the machine does not print "Port 8787 is already in use". Without a
            # dashboard nobody reads the workers' statistical profiler (a stack sample every 10 ms
            # of every thread), so it is off; the nannies hand this config to their workers.
            with dask.config.set({"distributed.worker.profile.enabled": False}):
                self._cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                                             dashboard_address=None, scheduler_kwargs={"dashboard_address": ":0"},
                                             silence_logs=logging.ERROR)
            self.client = Client(self._cluster)
        self.state = ClusterState.RUNNING
        return self.client

    def threads(self) -> int:
        """Idea tasks the cluster runs at once now (at least 1, so a batch waits for late workers)."""
        return max(1, sum(self.client.nthreads().values()))

    def describe(self) -> dict:
        info = self.client.scheduler_info()
        return {"scheduler": info.get("address"), "workers": len(info.get("workers", {})),
                "threads": self.threads(), "local": self._cluster is not None}

    def close(self) -> None:
        if self.state is ClusterState.RUNNING and self._own_client:
            self.client.close()
            if self._cluster is not None:
                self._cluster.close()
        self.state = ClusterState.CLOSED

    def __enter__(self) -> "BatchCluster":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()
