"""Per-idea memory: sample the RSS of a process tree on a thread, keep the peak, enforce a limit.

Dask's memory limits see only the worker process, never the papermill kernel or the
sandbox's task processes an idea really runs in, so a batch watches those itself.

>>> import os
>>> with TreeWatch(lambda: [os.getpid()], include_roots=True) as watch:
...     block = bytearray(64 * 2**20)
>>> watch.peak >= 64 * 2**20
True

Reading ``/proc/PID/task/*/children`` and ``statm`` costs tens of microseconds per
process, so the watch stays cheap at 20 samples a second (psutil's ``children()``
scans all of ``/proc`` each time instead).
"""
from __future__ import annotations

import enum
import os
import signal
import threading
from pathlib import Path
from typing import Callable

_PAGE = os.sysconf("SC_PAGE_SIZE")


def children(pid: int) -> list[int]:
    """Direct children of ``pid``, whichever of its threads forked them."""
    out: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                out += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
    except OSError:
        pass
    return out


def descendants(pid: int) -> list[int]:
    found, todo = [], children(pid)
    while todo:
        p = todo.pop()
        found.append(p)
        todo += children(p)
    return found


def rss(pid: int) -> int:
    """Resident bytes of one process, 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0


def parent_of(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and everything below it (children first, so none is re-parented and missed)."""
    for p in [*reversed(descendants(pid)), pid]:
        try:
            os.kill(p, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


class WatchState(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    STOPPED = "stopped"


class TreeWatch:
    """Samples the summed RSS of the processes below ``roots()`` (and the roots with ``include_roots``).

    ``roots`` is called at every sample, so processes that appear later (a kernel that
    is still starting) are picked up. When the sum passes ``limit`` bytes, ``on_limit``
    is called once with the peak; ``exceeded`` stays True.
    """

    def __init__(self, roots: Callable[[], list[int]], *, limit: int | None = None,
                 on_limit: Callable[[int], None] | None = None, include_roots: bool = False,
                 interval: float = 0.05):
        self._roots = roots
        self.limit = limit
        self._on_limit = on_limit
        self.include_roots = include_roots
        self.interval = interval
        self.peak = 0
        self.baseline: int | None = None  # the first sample: what was there before the watched work
        self.exceeded = False
        self.state = WatchState.NEW
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> int:
        roots = set(self._roots())
        pids: set[int] = set()
        for root in roots:
            pids.update(descendants(root))
        pids = pids | roots if self.include_roots else pids - roots  # a root below another root counts once
        total = sum(rss(p) for p in pids)
        if self.baseline is None:
            self.baseline = total
        self.peak = max(self.peak, total)
        if self.limit is not None and total > self.limit and not self.exceeded:
            self.exceeded = True
            if self._on_limit is not None:
                self._on_limit(total)
        return total

    @property
    def peak_above_baseline(self) -> int:
        return max(0, self.peak - (self.baseline or 0))

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def start(self) -> "TreeWatch":
        if self.state is not WatchState.NEW:
            raise RuntimeError(f"a TreeWatch starts once; this one is {self.state.value}")
        self.state = WatchState.RUNNING
        self.sample()
        self._thread = threading.Thread(target=self._loop, name="moondev-treewatch", daemon=True)
        self._thread.start()
        return self

    def close(self) -> int:
        """Stop sampling (one last sample first); returns the peak in bytes."""
        if self.state is WatchState.RUNNING:
            self.sample()
            self._stop.set()
            self._thread.join()
        self.state = WatchState.STOPPED
        return self.peak

    def __enter__(self) -> "TreeWatch":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
