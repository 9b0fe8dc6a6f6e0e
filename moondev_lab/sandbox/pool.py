"""SandboxPool: warm, recycled worker processes that run strategies in sandboxes.

>>> from moondev_lab.sandbox import SandboxPool, DataRef
>>> with SandboxPool() as pool:                                         # doctest: +SKIP
...     res = pool.run(code, DataRef("BTC/USD", "15m", start="2023-03-01", end="2023-03-31"))
...     res.ok, res.stats["Return [%]"], len(res.trades)
...     best = pool.optimize(code, {"n1": [5, 10], "n2": [20, 40]}, DataRef("BTC/USD", "15m"))

See :mod:`moondev_lab.sandbox._worker` for the process layout.
"""
from __future__ import annotations

import atexit
import html
import itertools
import json
import math
import os
import pickle
import socket
import subprocess
import sys
import threading
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import psutil

from .. import _registry, config
from . import _isolation, _limits
from ._limits import Limits
from ._settle import (confirm_score, data_frame, early_settlement, flag_grid, grid_chunk, settle_grid, settled_batch,
                      settled_result)
from ._wire import EARLY_TAG, decode_reply, recv_msg, send_msg
from .errors import ErrorKind, SandboxError, SandboxPoolClosed
from .settings import BacktestSettings

#: Rough footprint of one worker plus its task child, used to size the pool.
WORKER_BUDGET_MB = 400
_GRACE_S = 15.0  # on top of a task's timeout before the parent gives up on a worker


@dataclass(frozen=True)
class DataRef:
    """Which market data a task runs on; workers open it from the store by memory-mapping.

    ``root`` defaults to the store of the *calling* process (``$MOONDEV_LAB_HOME``).
    """

    symbol: str = "BTC/USD"
    timeframe: str = "15m"
    source: str | None = None
    start: str | None = None
    end: str | None = None
    root: str | None = None

    def resolved(self) -> dict:
        d = asdict(self)
        d["root"] = str(self.root or config.store_dir())
        for key in ("start", "end"):
            d[key] = None if d[key] is None else str(d[key])
        return d


@dataclass
class BacktestResult:
    """What one sandboxed run returns. ``ok`` is False when ``error`` is set.

    ``stats`` is backtesting.py's stats as a dict (floats keep NaN; times are ISO
    strings; ``_strategy`` holds the parameters). ``equity`` is the equity curve
    downsampled to at most 2,000 points (``time``, ``equity``, ``drawdown_pct``).
    Stats, trades and equity are the trusted broker's settlement of the strategy's
    order log, never the sandbox's own claims (see :mod:`moondev_lab.sandbox._settle`);
    ``settled`` is that :class:`~moondev_lab.broker.Settlement` in full precision.
    """

    settled = None  # not a field: the Settlement (pandas objects) stays out of to_dict()/repr
    #: Not a field either: the strategy's claimed ``Strategy.I`` indicators, when ``run(..., indicators=True)``
    #: (dicts of :func:`~moondev_lab.sandbox._wire.decode_indicators`): for the plot only, never stats or ranking.
    indicators = ()
    #: Not a field: ``run(..., heatmap=key)``: ``[(params, settled score or None), ...]`` of every combination
    #: the code's own ``Backtest.optimize`` ran, in its order, as its ``return_heatmap=True`` Series lists them.
    heatmap = None
    #: Not a field: run()'s {"round_trip_s", "settle_s", "settle_ahead_s", "settled_ahead"} in the parent, for benches
    timings = None

    ok: bool
    stats: dict = field(default_factory=dict)
    trades: list = field(default_factory=list)
    equity: list = field(default_factory=list)
    error: SandboxError | None = None
    stdout: str = ""
    stderr: str = ""
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    duration_s: float = 0.0
    worker_pid: int | None = None
    strategy: str | None = None
    size_adjustments: int = 0
    skipped_orders: int = 0
    plot_html: str | None = None  # backtesting.py's HTML plot, when run(..., plot=True)
    plot_error: str | None = None
    layers: dict = field(default_factory=dict)      # sandbox layer -> "on ..." / "off: why"
    violations: list = field(default_factory=list)  # refused attempts, even those the strategy caught
    indicators_error: SandboxError | None = None  # a refused indicator payload (result_invalid); the run stands
    # run(..., report_optimize=True): a script's own Backtest.optimize call, described instead of run
    # (untrusted: see sandbox/_script_optimize.parse), or why it ran inside the task after all
    optimize_call: dict | None = None
    optimize_note: str = ""

    @classmethod
    def _from_reply(cls, reply: dict) -> "BacktestResult":
        payload = reply.get("payload") or {}
        error = reply.get("error")
        return cls(ok=error is None and bool(payload.get("ok")),
                   stats=payload.get("stats") or {}, trades=payload.get("trades") or [],
                   equity=payload.get("equity") or [],
                   error=SandboxError.from_dict(error) if error else None,
                   stdout=reply.get("stdout", ""), stderr=reply.get("stderr", ""),
                   stdout_truncated=bool(reply.get("stdout_truncated")),
                   stderr_truncated=bool(reply.get("stderr_truncated")),
                   duration_s=float(reply.get("duration_s") or 0.0), worker_pid=reply.get("worker_pid"),
                   strategy=payload.get("strategy"), size_adjustments=int(payload.get("size_adjustments", 0)),
                   skipped_orders=int(payload.get("skipped_orders", 0)),
                   plot_html=payload.get("plot_html"), plot_error=payload.get("plot_error"),
                   layers=dict(reply.get("layers") or {}), violations=list(reply.get("violations") or []),
                   optimize_note=str(payload.get("optimize_note") or "")[:300])

    @classmethod
    def _failure(cls, kind: ErrorKind, type_: str, message: str, **kw) -> "BacktestResult":
        return cls(ok=False, error=SandboxError(kind, type_, message), **kw)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["error"] = self.error.to_dict() if self.error else None
        d["indicators_error"] = self.indicators_error.to_dict() if self.indicators_error else None
        return d

    def stats_series(self):
        """``stats`` as a pandas Series (imports pandas)."""
        import pandas as pd

        return pd.Series(self.stats, dtype=object)

    def __repr__(self) -> str:
        if not self.ok:
            return f"BacktestResult(error={self.error}, duration={self.duration_s:.2f}s)"
        keys = ("Return [%]", "Sharpe Ratio", "Max. Drawdown [%]", "# Trades")
        shown = ", ".join(f"{k}={self.stats.get(k)!r}" for k in keys if k in self.stats)
        return f"BacktestResult({self.strategy}: {shown}, duration={self.duration_s:.2f}s)"

    def _repr_html_(self) -> str:
        if not self.ok:
            return f"<b>Backtest failed</b>: <code>{html.escape(str(self.error))}</code>"
        rows = "".join(f"<tr><th style='text-align:left'>{html.escape(k)}</th><td>{html.escape(repr(v))}</td></tr>"
                       for k, v in self.stats.items() if not k.startswith("_"))
        return f"<table><caption>{html.escape(str(self.strategy))}</caption>{rows}</table>"


@dataclass
class OptimizeResult:
    """Best parameters of a grid, the full run at them, and every combination's score.

    ``returns`` (``optimize(..., keep_returns=True)``): a ``pd.DataFrame`` of every combination's
    per-bar returns (bars x combinations, in grid order), from the equity the trusted side settled;
    a combination that failed or could not be settled has a column of NaN (None: no chunk settled).
    """

    best_params: dict
    result: BacktestResult
    heatmap: list[tuple[dict, float | None]]
    errors: list[SandboxError]
    duration_s: float
    returns: object = None

    @property
    def stats(self) -> dict:
        return self.result.stats


@dataclass(frozen=True)
class PoolStats:
    workers: int
    busy: int
    size: int
    tasks: int
    failures: int
    recycles: int
    worker_rss_mb: dict
    template_rss_mb: float

    def to_dict(self) -> dict:
        return asdict(self)


class _WorkerHandle:
    def __init__(self, pid: int, sock: socket.socket, slot: int):
        self.pid, self.sock, self.slot = pid, sock, slot
        self.tasks_done = 0
        self.rss = 0

    def exchange(self, task: dict, timeout: float, early: Callable | None = None) -> bytearray:
        """Send a task, and return the raw reply; the watchdog: all of it within ``timeout``.

        ``early(raw)`` is called with the task's order log if it comes ahead of the reply
        (tasks with ``early``: see :func:`~moondev_lab.sandbox._settle.early_settlement`).
        """
        deadline = time.monotonic() + timeout
        self.sock.settimeout(timeout)
        send_msg(self.sock, pickle.dumps(task))
        while True:
            raw = recv_msg(self.sock, deadline)
            if raw is None:
                raise ConnectionError("the worker closed its connection")
            if raw[:1] != EARLY_TAG:
                return raw
            if early is not None:
                early(memoryview(raw)[1:])
                early = None  # one per task

    def note(self, reply: dict) -> None:
        tasks_done, rss = reply.get("tasks_done"), reply.get("worker_rss")
        self.tasks_done = tasks_done if isinstance(tasks_done, int) else self.tasks_done + 1
        self.rss = rss if isinstance(rss, int) else 0

    def stop(self, force: bool = False) -> None:
        try:
            self.sock.close()  # the worker cleans up and exits on EOF
        finally:
            if force:
                try:
                    os.kill(self.pid, 9)
                except ProcessLookupError:
                    pass


def default_size(memory_budget_mb: float | None = None) -> int:
    """Workers for this machine: one per CPU, 2..16, capped by the memory budget."""
    if memory_budget_mb is None:
        memory_budget_mb = psutil.virtual_memory().available / 2**20 / 2
    by_memory = int(memory_budget_mb // WORKER_BUDGET_MB)
    return max(2, min(16, os.cpu_count() or 2, by_memory))


class SandboxPool:
    """A thread-safe pool of warm, sandboxing worker processes.

    Parameters: ``size`` workers (default from CPUs and memory), recycled after
    ``max_tasks_per_worker`` tasks or when a worker's RSS passes ``max_rss_mb``.
    ``limits`` and ``settings`` are defaults for every task.
    """

    def __init__(self, size: int | None = None, *, max_tasks_per_worker: int = 200,
                 max_rss_mb: float = 1024, memory_budget_mb: float | None = None,
                 limits: Limits | None = None, settings: BacktestSettings | None = None,
                 prewarm: bool = True, python: str | None = None):
        self.size = int(size) if size else default_size(memory_budget_mb)
        if not 1 <= self.size <= 64:
            raise ValueError(f"size must be between 1 and 64, not {self.size}")
        self.max_tasks_per_worker = max_tasks_per_worker
        self.max_rss_mb = max_rss_mb
        self.limits = limits or Limits()
        self.settings = settings or BacktestSettings()
        self.prewarm = prewarm
        self._python = python or sys.executable
        self._cond = threading.Condition()
        self._idle: list[_WorkerHandle] = []
        self._busy: set[_WorkerHandle] = set()
        self._free_slots = list(range(self.size))[::-1]
        self._spawn_lock = threading.Lock()
        self._template: subprocess.Popen | None = None
        self._ctrl: socket.socket | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._closed = False
        self._retired: list[int] = []  # stopped workers still cleaning up (waited for at close)
        self._tasks = self._failures = self._recycles = 0
        self._sandbox_config = _sandbox_config(self.limits, self.prewarm)
        #: Sandbox layer -> "on ..." / "off: why", as the template probed them (see ``doctor``).
        self.layers: dict[str, str] = {}
        self._start_template()
        _registry.register_pool(self)
        _live_pools.add(self)

    # ------------------------------------------------------------------ lifecycle
    def _start_template(self) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = _limits.scrubbed_env()
        pkg_root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = pkg_root  # the worker imports this very moondev_lab
        env["MOONDEV_LAB_SANDBOX_CONFIG"] = json.dumps(self._sandbox_config)
        self._template = subprocess.Popen(
            [self._python, "-m", "moondev_lab.sandbox._worker", str(child.fileno())],
            pass_fds=[child.fileno()], env=env, cwd="/", stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, start_new_session=True)
        child.close()
        self._ctrl = parent
        self._template_ready = False

    def _spawn(self, slot: int) -> _WorkerHandle:
        with self._spawn_lock:
            if self._template is None or self._template.poll() is not None:
                self._start_template()
            if not self._template_ready:
                self._ctrl.settimeout(120)
                ready = recv_msg(self._ctrl)
                if ready is None:
                    raise RuntimeError("the sandbox template process failed to start "
                                       f"(exit code {self._template.poll()})")
                ready = json.loads(ready)
                if not ready.get("ready"):
                    raise RuntimeError(f"the sandbox template could not probe its layers: {ready.get('error')}")
                self.layers = dict(ready.get("layers") or {})
                _isolation.warn_if_degraded(self.layers)
                self._template_ready = True
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            request = {"slot": slot, "config": self._sandbox_config}
            socket.send_fds(self._ctrl, [json.dumps(request).encode()], [theirs.fileno()])
            theirs.close()
            self._ctrl.settimeout(30)
            line = b""
            while not line.endswith(b"\n"):
                chunk = self._ctrl.recv(256)
                if not chunk:
                    raise RuntimeError("the sandbox template process died")
                line += chunk
            return _WorkerHandle(json.loads(line)["pid"], ours, slot)

    def close(self) -> None:
        """Stop every worker and the template. Safe to call twice."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            workers = self._idle + list(self._busy)
            self._idle, self._busy = [], set()
            self._cond.notify_all()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        for w in workers:
            w.stop()
        _wait_gone([w.pid for w in workers] + self._retired, 2.0)  # let them remove their temp dirs and cgroups
        for w in workers:
            w.stop(force=True)
        if self._ctrl is not None:
            self._ctrl.close()
        if self._template is not None:
            self._template.kill()
            self._template.wait()
        _live_pools.discard(self)

    def __enter__(self) -> "SandboxPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter teardown
            pass

    def __len__(self) -> int:
        with self._cond:
            return len(self._idle) + len(self._busy)

    def __bool__(self) -> bool:
        # len() counts live workers, 0 before the first task: without this a pool would be falsy then,
        # and ``pool or default_pool()`` would quietly use another pool.
        return True

    def shrink(self) -> int:
        """Stop every idle worker (memory pressure); they restart on demand."""
        with self._cond:
            idle, self._idle = self._idle, []
            for w in idle:
                self._free_slots.append(w.slot)
        for w in idle:
            w.stop()
        with self._cond:
            self._retired += [w.pid for w in idle]
        return len(idle)

    # ------------------------------------------------------------- acquire/release
    def _acquire(self) -> _WorkerHandle:
        with self._cond:
            while True:
                if self._closed:
                    raise SandboxPoolClosed("the sandbox pool is closed")
                # Keep at least two workers once the pool is used, even for one sequential caller:
                # tasks then alternate, and each worker's standby child has a whole task's time
                # to pre-warm instead of being handed the next task the moment it was forked.
                grow = self._free_slots and len(self._idle) + len(self._busy) < min(2, self.size)
                if self._idle and not grow:
                    w = self._idle.pop(0)  # round-robin: gives each worker's standby child time to pre-warm
                    self._busy.add(w)
                    return w
                if self._free_slots:
                    slot = self._free_slots.pop()
                    break
                self._cond.wait()
        try:
            w = self._spawn(slot)
        except BaseException:
            with self._cond:
                self._free_slots.append(slot)
                self._cond.notify()
            raise
        with self._cond:
            self._busy.add(w)
        return w

    def _release(self, w: _WorkerHandle, broken: bool = False) -> None:
        recycle = (broken or w.tasks_done >= self.max_tasks_per_worker
                   or w.rss > self.max_rss_mb * 2**20)
        with self._cond:
            self._busy.discard(w)
            if self._closed:
                recycle = True
            elif recycle:
                self._free_slots.append(w.slot)
                self._recycles += not broken
            else:
                self._idle.append(w)
            self._cond.notify()
        if recycle:
            w.stop(force=broken)
            with self._cond:
                self._retired = [p for p in self._retired if Path(f"/proc/{p}").exists()] + [w.pid]

    def _request(self, task: dict, early: Callable | None = None) -> dict:
        """One task on one worker. Never raises for anything a worker or task sends back:
        a dead or silent worker is ``worker_crashed``, a reply that cannot be handled is
        ``result_invalid``; either way the worker is released and replaced.
        ``early``: see :meth:`_WorkerHandle.exchange`."""
        w = self._acquire()
        stage = "exchange"
        try:
            raw = w.exchange(task, task["timeout"] + _GRACE_S, early)
            stage = "decode"
            reply = decode_reply(raw)
            del raw
            w.note(reply)
        except BaseException as exc:  # noqa: BLE001 - e.g. KeyboardInterrupt: the worker is still busy
            self._release(w, broken=True)
            with self._cond:
                self._failures += 1
            if not isinstance(exc, Exception):
                raise
            kind = ErrorKind.WORKER_CRASHED if stage == "exchange" else ErrorKind.RESULT_INVALID
            what = "failed and was replaced" if stage == "exchange" else "sent a reply that could not be handled; " \
                "it was replaced"
            return {"error": {"kind": kind.value, "type": type(exc).__name__,
                              "message": f"worker {w.pid} {what}: {str(exc)[:500]}"}, "worker_pid": w.pid}
        self._release(w)
        with self._cond:
            self._tasks += 1
            self._failures += reply.get("error") is not None
        return reply

    # ----------------------------------------------------------------- the API
    def _task(self, op: str, code: str, data: DataRef, timeout: float, limits: Limits | None,
              settings: BacktestSettings | None, **extra) -> dict:
        if not isinstance(code, str):
            raise TypeError("code must be a str of Python source")
        limits = (limits or self.limits).with_timeout(timeout)
        # claims="stats": the task sends its claimed stats and its order log, not trade records or an
        # equity curve: the parent settles those itself (sandbox/_settle.py) and would discard the task's.
        return {"op": op, "code": code, "data": (data or DataRef()).resolved(), "timeout": float(timeout),
                "limits": asdict(limits), "settings": asdict(settings or self.settings), "claims": "stats",
                **extra}

    def run(self, code: str, data: DataRef | None = None, params: dict | None = None, *,
            timeout: float = 60, limits: Limits | None = None,
            settings: BacktestSettings | None = None, plot: bool = False,
            indicators: bool = False, heatmap: str | None = None, report_optimize: bool = False) -> BacktestResult:
        """Run ``code`` (a Strategy, an LLM reply, or a whole script) on ``data`` in a sandbox.

        ``plot=True`` also returns backtesting.py's HTML plot in ``.plot_html``.
        ``indicators=True`` (for a run that will be plotted): the strategy's ``Strategy.I``
        indicators in ``.indicators``, downsampled to the chart's resolution; the strategy's
        claims, drawn only. A payload that breaks the wire's bounds sets ``.indicators_error``.
        ``heatmap`` (a stats key, for code that calls ``Backtest.optimize`` itself): every
        combination it runs comes back with its order log, settled here and scored by that key
        into ``.heatmap``; a claimed score that differs flags the result ``result_mismatch``.
        ``report_optimize=True``: a script that calls ``Backtest.optimize`` itself stops there, and
        ``.optimize_call`` describes the call, for :meth:`optimize` to spread over the pool.
        """
        extra: dict = {"indicators": True} if indicators else {}  # other runs' tasks stay as small as before
        if heatmap is not None:
            if not isinstance(heatmap, str):
                raise TypeError("heatmap must be the name of a stats field, e.g. 'Return [%]'")
            extra["heatmap"] = heatmap
        if report_optimize:
            extra["optimize"] = "report"
        # early: the task sends its order log as soon as its decisions are final, and it is settled here
        # while the task child computes its claimed stats (the result's own log must have its decisions).
        task = self._task("run", code, data, timeout, limits, settings, params=dict(params or {}), plot=plot,
                          early=True, **extra)
        ahead: dict = {}

        def settle_ahead(raw) -> None:
            t = time.perf_counter()
            ahead["known"] = early_settlement(task, raw)
            ahead["s"] = time.perf_counter() - t

        started = time.perf_counter()
        reply = self._request(task, settle_ahead)
        replied = time.perf_counter()
        known = ahead.get("known")
        result = settled_result(task, reply, known=known)
        result.timings = {"round_trip_s": replied - started, "settle_s": time.perf_counter() - replied,
                          "settle_ahead_s": ahead.get("s", 0.0),  # (within the round trip)
                          "settled_ahead": known is not None and result.settled is known[1]}
        return result

    def run_batch(self, runs: list[tuple[str, DataRef, dict | None]], *, timeout: float = 60,
                  limits: Limits | None = None, settings: BacktestSettings | None = None,
                  known: list | None = None, indicators: list | None = None) -> list[BacktestResult]:
        """Several ``(code, data, params)`` runs as ONE sandbox task: one dispatch, the series mapped once.

        Every run's result is what :meth:`run` would give (settled by the trusted broker, its
        claims checked); ``timeout`` is per run. All runs must be on one series (symbol,
        timeframe, source and store; any start/end). ``known[i]``: ``(order_log, settlement)``
        already made for run ``i`` (see :func:`~moondev_lab.sandbox._settle.settled_result`).
        ``indicators[i]``: run ``i`` reports its strategy's indicators, as :meth:`run`'s ``indicators``.
        The runs share one task process, one after the other: batch only code of one origin (one
        idea's variants), since a run can change what the later ones decide. Their results stay
        honest either way (each is settled from its own decisions), not independent.

        >>> a, b = pool.run_batch([(code, DataRef(end="2023-03-01"), None),
        ...                        (code, DataRef(start="2023-03-01"), {"n": 20})])   # doctest: +SKIP
        """
        if not runs:
            return []
        refs = [(data or DataRef()).resolved() for _, data, _ in runs]
        base = {k: v for k, v in refs[0].items() if k not in ("start", "end")}
        for ref in refs[1:]:
            if {k: v for k, v in ref.items() if k not in ("start", "end")} != base:
                raise ValueError(f"a batch runs on one series, not on {base} and {ref}")
        wants = indicators or [False] * len(runs)
        batch = [{"code": code, "params": dict(params or {}), "start": ref["start"], "end": ref["end"],
                  "indicators": bool(ind)} for (code, _, params), ref, ind in zip(runs, refs, wants)]
        for b in batch:
            if not isinstance(b["code"], str):
                raise TypeError("code must be a str of Python source")
        task = self._task("runs", "", DataRef(**{**base, "start": None, "end": None}), timeout * len(runs), limits,
                          settings, runs=batch)
        return settled_batch(task, self._request(task), known)

    def submit(self, code: str, data: DataRef | None = None, params: dict | None = None,
               **kwargs) -> "Future[BacktestResult]":
        """Like :meth:`run`, but returns a Future at once; many can run concurrently."""
        with self._cond:
            if self._closed:
                raise SandboxPoolClosed("the sandbox pool is closed")
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self.size, thread_name_prefix="sandbox")
        return self._executor.submit(self.run, code, data, params, **kwargs)

    def map(self, codes: Iterable[str], data: DataRef | None = None, **kwargs) -> Iterator[BacktestResult]:
        """Run many codes on the same data across the pool; results in input order."""
        futures = [self.submit(code, data, **kwargs) for code in codes]
        for f in futures:
            yield f.result()

    def optimize(self, code: str, grid: dict[str, list], data: DataRef | None = None, *,
                 maximize: str = "SQN", constraint: Callable[[dict], bool] | None = None,
                 timeout: float = 60, limits: Limits | None = None,
                 settings: BacktestSettings | None = None, chunks_per_worker: int = 1,
                 fast: bool = True, keep_returns: bool = False) -> OptimizeResult:
        """Grid search across the workers, scored like ``Backtest.optimize(method="grid")``.

        Same admissible combinations (product order, ``constraint``), same scoring
        (runs without trades are skipped, NaN ignored), same tie-break (first best),
        and the returned stats are those of the best run, equal to ``Backtest.optimize``'s.
        ``timeout`` is per combination. ``maximize`` must be a stats key (callables
        cannot cross into the sandbox). The grid is cut into ``size * chunks_per_worker``
        chunks, one task child each; one chunk per worker is how backtesting.py batches
        too (``len // cpu_count``), and each extra chunk costs a fork and a result to parse.
        ``fast``: for the offline model's spec strategies, score the grid in compiled code
        (:func:`moondev_lab.fast.pool_grid`) and run only the best combination here, which
        must match it trade for trade; otherwise (or on a mismatch) every combination runs here.
        ``keep_returns``: also keep each combination's per-bar returns (``.returns``, one float64
        column per combination), computed here from the settled equity, never from the sandbox's claims.
        """
        started = time.perf_counter()
        if not isinstance(maximize, str):
            raise TypeError("maximize must be the name of a stats field, e.g. 'Return [%]'")
        from .._exact_stats import check_stat

        check_stat(maximize)  # before any task: else every combination's settlement fails on it
        if not grid:
            raise ValueError("Need some strategy parameters to optimize")
        names = list(grid)
        values = [v if isinstance(v, (list, tuple, range)) else [v] for v in grid.values()]
        combos = [dict(zip(names, combo)) for combo in itertools.product(*values)]
        if constraint is not None:
            combos = [c for c in combos if constraint(_AttrDict(c))]
        if not combos:
            raise ValueError("No admissible parameter combinations to test")
        if fast:
            from .. import fast as fast_grid

            quick = fast_grid.pool_grid(self, code, grid, combos, data, maximize, timeout=timeout, limits=limits,
                                        settings=settings, keep_returns=keep_returns)
            if quick is not None:
                return quick
        n_chunks = min(len(combos), self.size * max(1, chunks_per_worker))
        step = math.ceil(len(combos) / n_chunks)
        chunks = [combos[i:i + step] for i in range(0, len(combos), step)]
        with self._cond:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self.size, thread_name_prefix="sandbox")
        tasks = [self._task("grid", code, data, timeout * len(chunk), limits, settings, combos=chunk,
                            maximize=maximize) for chunk in chunks]
        futures = [self._executor.submit(self._request, task) for task in tasks]
        returns = None  # keep_returns: bars x combinations, allocated when the first chunk settles
        scores: list = []  # settled scores only: a claimed score never ranks
        errors: list[SandboxError] = []
        false_claims: list[str] = []
        # The full result of the best run so far (grid index, reply): each chunk sends its own
        # best run, and it is kept only while it is the settled grid's first best, so losers are dropped.
        best_run: tuple[int, dict] | None = None
        for chunk, task, fut in zip(chunks, tasks, futures):
            reply = fut.result()  # settling this chunk overlaps the chunks still running
            if not reply.get("error"):
                try:
                    claimed, best_index, best, logs = grid_chunk(reply.pop("payload", None), len(chunk))
                except ValueError as exc:
                    reply["error"] = {"kind": ErrorKind.RESULT_INVALID.value, "type": "ValueError",
                                      "message": f"malformed grid result from the sandbox: {exc}"}
            if reply.get("error"):
                errors.append(SandboxError.from_dict(reply["error"]))
                scores += [None] * len(chunk)
                continue
            if keep_returns and returns is None:
                # Bounded: one float column per combination, filled as each chunk settles (no stats kept).
                returns = _returns_matrix(task, len(combos))
            settled, problems = settle_grid(task, logs, claimed, maximize, first=len(scores), returns=returns)
            false_claims += problems
            i = len(scores) + best_index
            scores += settled
            if best is not None and _first_best(scores) == i:
                best_run = (i, {**reply, "payload": best})
            del reply, best, logs
        if errors and len(errors) == len(chunks):
            result = BacktestResult(ok=False, error=errors[0])
            return OptimizeResult({}, result, list(zip(combos, scores)), errors, time.perf_counter() - started,
                                  _returns_frame(returns, tasks[0], combos))
        best_i = _first_best(scores)
        best = combos[best_i]
        if best_run is not None and best_run[0] == best_i:  # already run: same stats as a fresh run
            result = settled_result(tasks[0], best_run[1])  # the chunks share data and settings
            confirm_score(result, maximize, scores[best_i])
        else:  # (a chunk whose claimed best is not its settled best)
            result = self.run(code, data, best, timeout=timeout, limits=limits, settings=settings)
        if false_claims:
            flag_grid(result, maximize, false_claims)
        return OptimizeResult(best, result, list(zip(combos, scores)), errors, time.perf_counter() - started,
                              _returns_frame(returns, tasks[0], combos))

    # ----------------------------------------------------------------- inspection
    def stats(self) -> PoolStats:
        with self._cond:
            workers = self._idle + list(self._busy)
            busy = len(self._busy)
            stats = (self._tasks, self._failures, self._recycles)
        try:
            template_rss = psutil.Process(self._template.pid).memory_info().rss / 2**20
        except (psutil.Error, AttributeError):
            template_rss = 0.0
        return PoolStats(len(workers), busy, self.size, *stats,
                         {w.pid: round(w.rss / 2**20, 1) for w in workers}, round(template_rss, 1))

    def pids(self) -> list[int]:
        """Process ids of the template and live workers (for memory accounting)."""
        with self._cond:
            workers = self._idle + list(self._busy)
        return ([self._template.pid] if self._template else []) + [w.pid for w in workers]

    def __repr__(self) -> str:
        s = self.stats()
        return (f"SandboxPool(size={self.size}, workers={s.workers}, busy={s.busy}, tasks={s.tasks}, "
                f"failures={s.failures}, recycles={s.recycles}{', closed' if self._closed else ''})")


def _sandbox_config(limits: Limits, prewarm: bool) -> dict:
    """What the template and its workers need to build each task's sandbox (JSON)."""
    hide = _isolation.host_hidden(str(config.home()))
    return {"base_uid": limits.uid or _limits.BASE_UID, "prewarm": prewarm, "disk_mb": limits.disk_mb,
            "disabled": sorted(_isolation.disabled_layers()), "hide": hide}


def _to_result(reply: dict) -> BacktestResult:
    """The result of a reply; a payload with fields of the wrong kind is ``result_invalid``, not a crash."""
    try:
        return BacktestResult._from_reply(reply)
    except Exception as exc:  # noqa: BLE001 - anything the task child managed to put in its payload
        return BacktestResult._failure(ErrorKind.RESULT_INVALID, type(exc).__name__,
                                       f"malformed result from the sandbox: {str(exc)[:300]}",
                                       worker_pid=reply.get("worker_pid") if isinstance(reply, dict) else None)


def _returns_matrix(task: dict, n_combos: int):
    """NaN-filled bars x combinations for :func:`~moondev_lab.sandbox._settle.settle_grid` to fill."""
    import numpy as np

    return np.full((len(data_frame(task["data"])), n_combos), np.nan)


def _returns_frame(returns, task: dict, combos: list[dict]):
    """The kept returns as a DataFrame on the task's bars, one column per combination (``k=v,...``)."""
    if returns is None:
        return None
    from ..fast import returns_frame

    return returns_frame(returns, data_frame(task["data"]).index, combos)


def _first_best(scores: list) -> int:
    """Index of the first highest score, NaN and None skipped; 0 if there is none (as backtesting.py)."""
    valid = [(i, s) for i, s in enumerate(scores) if s is not None and not math.isnan(s)]
    return max(valid, key=lambda t: t[1])[0] if valid else 0  # max() keeps the first of ties


class _AttrDict(dict):
    def __getattr__(self, item):
        try:
            return self[item]
        except KeyError:
            raise AttributeError(item) from None


def _wait_gone(pids: list[int], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if Path(f"/proc/{p}").exists() and not _is_zombie(p)]
        if pids:
            time.sleep(0.02)


def _is_zombie(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True


_live_pools: "weakref.WeakSet[SandboxPool]" = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for pool in list(_live_pools):
        pool.close()
