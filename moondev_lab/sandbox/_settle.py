"""The trusted side of a run: settle the strategy's order log, and believe nothing else it says.

A task child reports its strategy's decisions (the order log) and its own stats. Here,
in the parent, the log is settled against the real data with backtesting.py's fill
rules (:func:`moondev_lab.broker.settle`); the result's stats, trades and equity are the
settled ones. If the claimed stats differ, the result becomes a ``result_mismatch``
failure that still shows the true, settled stats.

>>> result = settled_result(task, reply)       # doctest: +SKIP
>>> result.ok, result.error.kind               # doctest: +SKIP
(False, <ErrorKind.RESULT_MISMATCH: 'result_mismatch'>)
"""
from __future__ import annotations

import math
import threading

from .errors import ErrorKind, SandboxError
from .settings import BacktestSettings

_pools: dict = {}
_pools_lock = threading.Lock()
_SHOWN_DIFFERENCES = 5


def data_frame(ref: dict):
    """The task's data, mapped by the parent itself from the store (never taken from the child)."""
    from moondev_lab.data import DataPool

    with _pools_lock:
        pool = _pools.get(ref["root"])
        if pool is None:
            pool = _pools[ref["root"]] = DataPool(ref["root"])
    return pool.get(ref["symbol"], ref["timeframe"], source=ref.get("source"), start=ref.get("start"),
                    end=ref.get("end"))


def settled_result(task: dict, reply: dict):
    """The :class:`~moondev_lab.sandbox.pool.BacktestResult` of ``reply``, with settled stats, trades and equity."""
    from .pool import BacktestResult

    result = BacktestResult._from_reply(reply)
    if not result.ok:
        return result  # a failed run claims nothing to rank
    payload = reply.get("payload") or {}
    claimed = result.stats
    result.stats, result.trades, result.equity = {}, [], []
    if payload.get("order_log") is None:
        return _mismatch(result, "the reply carries no order log, so its results cannot be settled")
    from moondev_lab.broker import OrderLog, SettlementError, settle

    from .harness import EQUITY_POINTS, equity_points, stats_to_dict, trades_to_records

    try:
        log = OrderLog.from_dict(payload["order_log"])
        settlement = settle(log, data_frame(task["data"]), BacktestSettings(**task["settings"]))
    except SettlementError as exc:
        return _mismatch(result, f"the order log cannot be settled: {exc}")
    stats = stats_to_dict(settlement.stats)
    stats["_strategy"] = claimed.get("_strategy")  # the parameters it ran with: shown, never ranked
    result.stats = stats
    result.trades = trades_to_records(settlement.trades)
    result.equity = equity_points(settlement.equity, task.get("equity_points", EQUITY_POINTS))
    result.settled = settlement
    differences = [k for k in dict.fromkeys([*stats, *claimed]) if k != "_strategy"
                   and not _same(claimed.get(k, _MISSING), stats.get(k, _MISSING))]
    differences.sort(key=lambda k: k not in claimed)  # the false claims first, then what it left out
    if differences:
        shown = "; ".join(f"{k}: claimed {claimed.get(k, _MISSING)!r}, settled {stats.get(k, _MISSING)!r}"
                          for k in differences[:_SHOWN_DIFFERENCES])
        more = f" (and {len(differences) - _SHOWN_DIFFERENCES} more)" if len(differences) > _SHOWN_DIFFERENCES else ""
        return _mismatch(result, f"the strategy's own stats differ from the settled ones: {shown}{more}")
    return result


def confirm_score(result, maximize: str, claimed_score) -> None:
    """A grid's best combination was chosen by its claimed score: the settled run must have it too."""
    if not result.ok or claimed_score is None:
        return
    settled = result.stats.get(maximize, _MISSING)
    if not _same(float(claimed_score), settled):
        _mismatch(result, f"the grid ranked this combination by a claimed {maximize} of {claimed_score!r}, "
                          f"but it settles at {settled!r}")


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


_MISSING = _Missing()


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b or (isinstance(a, (int, float)) and isinstance(b, (int, float))
                                             and not isinstance(a, bool) and not isinstance(b, bool) and a == b)


def _mismatch(result, message: str):
    result.ok = False
    result.error = SandboxError(ErrorKind.RESULT_MISMATCH, "ResultMismatch", message[:4000])
    return result
