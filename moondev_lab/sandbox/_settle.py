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

import numpy as np

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


def settled_result(task: dict, reply: dict, known=None):
    """The :class:`~moondev_lab.sandbox.pool.BacktestResult` of ``reply``, with settled stats, trades and equity.

    ``known``: ``(order_log, settlement)`` the caller already settled on this task's data and
    settings (the fast path's, :mod:`moondev_lab._fast_session`), or :func:`early_settlement`'s
    ``(order_log, settlement, shown)``. When the reply's decisions are exactly that log's, settling
    them again would give that settlement, so it is used as is (``result.settled is known[1]``);
    the claimed stats are checked against it all the same.
    """
    from .pool import _to_result

    result = _to_result(reply)  # a malformed payload is already result_invalid here
    if not result.ok:
        return result  # a failed run claims nothing to rank
    payload = reply.get("payload") or {}
    if task.get("optimize") == "report" and payload.get("optimize_call") is not None:
        result.optimize_call, result.stats = payload["optimize_call"], {}  # nothing ran: nothing to settle
        return result
    claimed = result.stats
    result.stats, result.trades, result.equity = {}, [], []
    if payload.get("order_log") is None:
        return _mismatch(result, "the reply carries no order log, so its results cannot be settled")
    from moondev_lab.broker import OrderLog, SettlementError, settle

    shown = None
    try:
        log = OrderLog.from_dict(payload["order_log"])
        if known is not None and same_decisions(log, known[0]):
            settlement, shown = known[1], (known[2] if len(known) > 2 else None)
        else:
            settlement = settle(log, data_frame(task["data"]), BacktestSettings(**task["settings"]))
    except SettlementError as exc:
        return _mismatch(result, f"the order log cannot be settled: {exc}")
    except Exception as exc:  # noqa: BLE001 - whatever the task child put in its log must not crash the pool
        return _mismatch(result, f"the order log is malformed: {type(exc).__name__}: {str(exc)[:300]}")
    stats, result.trades, result.equity = shown or _shown(settlement, task)
    stats = {**stats, "_strategy": claimed.get("_strategy")}  # the parameters it ran with: shown, never ranked
    result.stats = stats
    result.settled = settlement
    if task.get("indicators"):  # display-only claims; a bad payload costs the plot its indicators, not the run
        from ._wire import decode_indicators

        result.indicators, refused = decode_indicators(payload.get("indicators"), len(settlement.equity))
        if refused:
            result.indicators_error = SandboxError(ErrorKind.RESULT_INVALID, "IndicatorPayload",
                                                   f"indicators refused, plotted without them: {refused}")
    if task.get("heatmap"):
        try:
            params, scores, logs = grid_runs(payload.get("grid_runs"))
        except ValueError as exc:
            result.ok = False
            result.error = SandboxError(ErrorKind.RESULT_INVALID, "ValueError",
                                        f"malformed Backtest.optimize runs from the sandbox: {exc}"[:4000])
            return result
        settled, false_claims = settle_grid(task, logs, scores, task["heatmap"])
        result.heatmap = list(zip(params, settled))  # settled scores only: a claimed score never fills it
        if false_claims:
            flag_grid(result, task["heatmap"], false_claims)
            return result
    differences = [k for k in dict.fromkeys([*stats, *claimed]) if k != "_strategy"
                   and not _same(claimed.get(k, _MISSING), stats.get(k, _MISSING))]
    differences.sort(key=lambda k: k not in claimed)  # the false claims first, then what it left out
    if differences:
        shown = "; ".join(f"{k}: claimed {claimed.get(k, _MISSING)!r}, settled {stats.get(k, _MISSING)!r}"
                          for k in differences[:_SHOWN_DIFFERENCES])
        more = f" (and {len(differences) - _SHOWN_DIFFERENCES} more)" if len(differences) > _SHOWN_DIFFERENCES else ""
        return _mismatch(result, f"the strategy's own stats differ from the settled ones: {shown}{more}")
    return result


def _shown(settlement, task: dict) -> tuple[dict, list, list]:
    """A settlement as a result shows it: ``(stats, trades, equity)`` as JSON-able dicts and lists."""
    from .harness import EQUITY_POINTS, equity_points, stats_to_dict, trades_to_records

    return (stats_to_dict(settlement.stats), trades_to_records(settlement.trades),
            equity_points(settlement.equity, task.get("equity_points", EQUITY_POINTS)))


def early_settlement(task: dict, raw: bytes | bytearray):
    """``(order_log, settlement, shown)`` of an order log the task sent ahead of its result, or None.

    Settled (and converted for showing, :func:`_shown`) while the task child still computes its
    claimed stats. It is only a head start:
    :func:`settled_result` uses it (as ``known``) only when the result's own order log has
    exactly its decisions, and settles the result's log itself otherwise. Never raises.
    """
    from moondev_lab.broker import OrderLog, settle

    from ._wire import parse_early

    try:
        d = parse_early(raw)
        if d is None:
            return None
        log = OrderLog.from_dict(d)
        settlement = settle(log, data_frame(task["data"]), BacktestSettings(**task["settings"]))
        return log, settlement, _shown(settlement, task)
    except Exception:  # noqa: BLE001 - whatever the task child sent: the result's log is settled instead
        return None


def same_decisions(a, b) -> bool:
    """Two order logs with the same decisions, on the same bars (their labels aside: strategy name, params).

    Settlement is a function of these fields, the data and the settings alone.
    """
    from moondev_lab.broker import _COLUMNS

    if (a.start, a.n_bars, a.first_time, a.last_time, tuple(a.tags)) != \
            (b.start, b.n_bars, b.first_time, b.last_time, tuple(b.tags)) or len(a) != len(b):
        return False
    for name in _COLUMNS:
        x, y = getattr(a, name), getattr(b, name)
        floats = x.dtype.kind == "f" or y.dtype.kind == "f"
        if not np.array_equal(x, y, equal_nan=floats):
            return False
    return True


def settled_batch(task: dict, reply: dict, known: list | None = None) -> list:
    """One settled result per run of a ``"runs"`` task (see :func:`settled_result`; ``known`` per run)."""
    from .pool import BacktestResult, _to_result

    runs = task["runs"]
    known = known or [None] * len(runs)
    payload = reply.get("payload")
    subs = payload.get("runs") if isinstance(payload, dict) and not reply.get("error") else None
    if not isinstance(subs, list) or len(subs) != len(runs):
        failed = _to_result(reply)
        if failed.ok:  # a payload without one result per run
            failed = _mismatch(BacktestResult(ok=False), f"the batch sent {type(subs).__name__} results "
                                                         f"for its {len(runs)} runs")
        return [failed] * len(runs)
    from ._wire import check_payload

    out = []
    for run, sub, k in zip(runs, subs, known):
        one = {**task, "op": "run", "data": {**task["data"], "start": run.get("start"), "end": run.get("end")},
               "indicators": bool(run.get("indicators"))}
        sub, error = check_payload(sub)  # each run's result is checked as a task's is
        out.append(settled_result(one, {**reply, "payload": sub, "error": error, "duration_s": 0.0}, known=k))
    return out


def confirm_score(result, maximize: str, claimed_score) -> None:
    """A grid's best combination was chosen by its claimed score: the settled run must have it too."""
    if not result.ok or claimed_score is None:
        return
    settled = result.stats.get(maximize, _MISSING)
    if not _same(float(claimed_score), settled):
        _mismatch(result, f"the grid ranked this combination by a claimed {maximize} of {claimed_score!r}, "
                          f"but it settles at {settled!r}")


def grid_chunk(payload, n: int) -> tuple[list, int, dict | None, list]:
    """``(claimed scores, best index, best run, order logs)`` of a grid chunk's payload, all checked.

    The payload is the task child's: anything missing, of the wrong type or of the
    wrong length raises ``ValueError`` (the pool makes it a ``result_invalid`` chunk).

    >>> grid_chunk({"values": [1.0, None], "best_index": 0, "best": None, "logs": [None, None]}, 2)[:2]
    ([1.0, None], 0)
    >>> grid_chunk({"values": [1.0, "x"], "best_index": 0, "logs": [None, None]}, 2)
    Traceback (most recent call last):
    ValueError: the grid chunk's score 1 is a str, not a number
    """
    if not isinstance(payload, dict):
        raise ValueError(f"the grid chunk's result is a {type(payload).__name__}, not an object")
    values, best_index, best, logs = (payload.get(k) for k in ("values", "best_index", "best", "logs"))
    for name, value in (("values", values), ("logs", logs)):
        if not isinstance(value, list) or len(value) != n:
            what = f"{len(value)} entries" if isinstance(value, list) else type(value).__name__
            raise ValueError(f"the grid chunk's {name!r} should list its {n} combinations, not {what}")
    for i, v in enumerate(values):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise ValueError(f"the grid chunk's score {i} is a {type(v).__name__}, not a number")
    if isinstance(best_index, bool) or not isinstance(best_index, int) or not 0 <= best_index < n:
        raise ValueError(f"the grid chunk's best_index {best_index!r} is not one of its {n} combinations")
    if best is not None and not isinstance(best, dict):
        raise ValueError(f"the grid chunk's best run is a {type(best).__name__}")
    return [None if v is None else float(v) for v in values], best_index, best, logs


def per_bar_returns(equity) -> "np.ndarray":
    """Per-bar returns of an equity curve: 0 on the first bar, and where the equity is 0 or undefined.

    >>> per_bar_returns([100.0, 110.0, 99.0]).round(3).tolist()
    [0.0, 0.1, -0.1]
    """
    eq = np.asarray(equity, dtype=float)
    out = np.zeros(len(eq))
    with np.errstate(divide="ignore", invalid="ignore"):
        out[1:] = eq[1:] / eq[:-1] - 1
    return np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)


def grid_runs(value) -> tuple[list[dict], list, list]:
    """``(params, claimed scores, order logs)`` of the combinations a script's ``Backtest.optimize`` ran.

    The task child's claim, all checked: anything of the wrong type raises ``ValueError``.

    >>> grid_runs([{"params": {"n": 5}, "score": 1.5, "log": None}])
    ([{'n': 5}], [1.5], [None])
    >>> grid_runs([{"params": {"n": [5]}, "score": 1.5, "log": None}])
    Traceback (most recent call last):
    ValueError: combination 0's parameters must be a flat object of numbers, strings or booleans
    """
    from .harness import MAX_GRID_RUNS

    if not isinstance(value, list):  # (empty: the code never called Backtest.optimize)
        raise ValueError(f"expected a list of combinations, got {type(value).__name__}")
    if len(value) > MAX_GRID_RUNS:
        raise ValueError(f"{len(value)} combinations, over the limit of {MAX_GRID_RUNS}")
    params, scores, logs = [], [], []
    for i, run in enumerate(value):
        if not isinstance(run, dict):
            raise ValueError(f"combination {i} is a {type(run).__name__}, not an object")
        p, score = run.get("params"), run.get("score")
        if not isinstance(p, dict) or not p or not all(isinstance(v, (int, float, str, bool)) for v in p.values()):
            raise ValueError(f"combination {i}'s parameters must be a flat object of numbers, strings or booleans")
        if params and list(p) != list(params[0]):
            raise ValueError(f"combination {i} names other parameters than combination 0")
        if score is not None and (isinstance(score, bool) or not isinstance(score, (int, float))):
            raise ValueError(f"combination {i}'s score is a {type(score).__name__}, not a number")
        params.append(p)
        scores.append(None if score is None else float(score))
        logs.append(run.get("log"))
    return params, scores, logs


def settle_grid(task: dict, logs: list, claimed: list, maximize: str, first: int = 0,
                returns=None) -> tuple[list, list[str]]:
    """Each combination's settled score (``None``: no trades, or unsettleable), and every false claim.

    Scored as the sandbox's grid scores: the ``maximize`` stat, or ``None`` for a run
    without trades. Only these settled scores rank the grid and fill its heatmap.
    ``first``: the grid index of the chunk's first combination (for the messages).
    ``returns`` (bars x grid combinations, optional): column ``first + i`` receives combination
    ``i``'s per-bar returns from its *settled* equity (an unsettleable one's column is left as it is).
    """
    from moondev_lab.broker import OrderLog, settle, settled_score

    frame, settings = data_frame(task["data"]), BacktestSettings(**task["settings"])
    scores: list = []
    problems: list[str] = []
    for i, (log, claim) in enumerate(zip(logs, claimed)):
        try:
            if log is None:
                raise ValueError("no order log")
            if returns is not None:  # the whole settlement: its equity gives the column
                stats = settle(OrderLog.from_dict(log), frame, settings).stats
                score = float(stats[maximize]) if stats["# Trades"] else None
                returns[:, first + i] = per_bar_returns(stats["_equity_curve"]["Equity"].to_numpy())
            else:
                score = settled_score(OrderLog.from_dict(log), frame, settings, maximize)
        except Exception as exc:  # noqa: BLE001 - whatever the task child sent must not crash the pool
            scores.append(None)
            problems.append(f"combination {first + i} cannot be settled: {type(exc).__name__}: {str(exc)[:200]}")
            continue
        scores.append(score)
        if not (claim is None and score is None or claim is not None and score is not None and _same(claim, score)):
            problems.append(f"combination {first + i}: claimed {maximize} {claim!r}, settled {score!r}")
    return scores, problems


def flag_grid(result, maximize: str, false_claims: list[str]) -> None:
    """A grid whose code claimed any score its decisions do not settle at: its best is flagged too."""
    shown = "; ".join(false_claims[:_SHOWN_DIFFERENCES])
    more = f" (and {len(false_claims) - _SHOWN_DIFFERENCES} more)" if len(false_claims) > _SHOWN_DIFFERENCES else ""
    if result.ok or result.error.kind != ErrorKind.RESULT_MISMATCH:
        result.ok = False
        result.error = SandboxError(ErrorKind.RESULT_MISMATCH, "ResultMismatch",
                                    f"the grid's claimed {maximize} scores differ from the settled ones: "
                                    f"{shown}{more}"[:4000])


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
