"""Sandboxed, pooled backtests: run untrusted strategy code safely and fast.

>>> from moondev_lab.sandbox import SandboxPool, DataRef
>>> with SandboxPool() as pool:                                        # doctest: +SKIP
...     res = pool.run(open("my_strategy.py").read(), DataRef("BTC/USD", "15m"))
>>> res.ok, res.stats["Sharpe Ratio"], res.error                       # doctest: +SKIP

Every task runs in a fresh fork of a warm worker (numpy, pandas, backtesting,
talib and pandas_ta already imported), with a scrubbed environment, a temporary
working directory, rlimits, an unprivileged uid, no network, and a wall timeout
that kills its whole process group. Failures come back classified
(``res.error.kind``: ``"timeout"``, ``"memory_limit"``, ``"strategy_error"`` ...).
"""
from __future__ import annotations

import threading
from pathlib import Path

from ._limits import Limits
from .errors import ErrorKind, SandboxError, SandboxPoolClosed
from .settings import BacktestSettings
from .pool import BacktestResult, DataRef, OptimizeResult, PoolStats, SandboxPool, default_size

__all__ = ["BacktestResult", "BacktestSettings", "DataRef", "ErrorKind", "Limits", "OptimizeResult",
           "PoolStats", "SandboxError", "SandboxPool", "SandboxPoolClosed", "default_pool", "default_size",
           "run_file"]

_default: SandboxPool | None = None
_default_lock = threading.Lock()


def default_pool() -> SandboxPool:
    """The process-wide pool, started on first use and closed at exit."""
    global _default
    with _default_lock:
        if _default is None or _default._closed:
            _default = SandboxPool()
        return _default


def run_file(path: str | Path, data: DataRef | None = None, params: dict | None = None, *,
             timeout: float = 60, limits: Limits | None = None, settings: BacktestSettings | None = None,
             pool: SandboxPool | None = None, indicators: bool = False) -> BacktestResult:
    """Run a strategy file (hand-written, an LLM reply, or a self-running script) in the sandbox.

    >>> res = run_file("strategy.py", DataRef("BTC/USD", "15m"))       # doctest: +SKIP
    """
    code = Path(path).read_text(encoding="utf-8", errors="replace")
    pool = pool if pool is not None else default_pool()
    return pool.run(code, data, params, timeout=timeout, limits=limits, settings=settings, indicators=indicators)
