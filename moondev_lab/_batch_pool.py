"""Each Dask worker's own sandbox pool, shared by every idea the worker runs.

Kept apart from :mod:`moondev_lab._batch_worker` because it imports no pandas: a warming
worker starts the pool's template first, which then imports its libraries while the
worker imports the RBI loop's.

>>> pool = worker_sandbox(1, prime=False)        # doctest: +SKIP
>>> worker_sandbox(1) is pool                    # primed now; the same pool every time  # doctest: +SKIP
True
"""
from __future__ import annotations

import threading

_pool = None
_primed = False
_lock = threading.Lock()


def worker_sandbox(size: int, *, prime: bool = True):
    """This worker process's own sandbox pool, started on first use (closed at exit, dies with the worker).

    ``size`` counts only when the pool starts. ``prime=False`` returns as soon as the pool's
    template process is starting; a call with ``prime=True`` (the default) waits for its warm
    workers. The pool dies with the *thread* that started it (the template's PR_SET_PDEATHSIG),
    so call this from a thread that lives as long as the worker: a Dask task's.
    """
    global _pool, _primed
    from .sandbox import SandboxPool

    with _lock:
        if _pool is None:
            _pool = SandboxPool(size)
        if prime and not _primed:
            # Bring its warm workers and their standby children up now (an empty task fails at
            # once), so they are every idea's memory baseline rather than the first idea's peak.
            for _ in range(min(2, _pool.size)):
                _pool.run("", timeout=30)
            _primed = True
        return _pool
