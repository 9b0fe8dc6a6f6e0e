"""One RBI idea's runs through the compiled fast path, confirmed by backtesting.py in ONE sandbox task.

For the offline model's spec strategies (:func:`moondev_lab.fast.plan_of`), every run the RBI
loop makes (the first run, the optimize loop's candidates, the grid's best combination, the
out-of-sample run, each quarter) is computed in this process by the trusted fast kernel and
settled once (stats only: the trade records and equity points come with the confirmation, which builds
them from that settlement). :meth:`FastSession.confirm` then runs the kept ones (or all) with backtesting.py in one
sandbox task (one dispatch, the series mapped once, several runs) and compares each, decision
for decision (:func:`~moondev_lab.sandbox._settle.same_decisions`; equal decisions settle to
the same trades, equity and stats) and claimed stat for stat; a run whose decisions differ is
settled from the sandbox's own log and compared trade for trade (:func:`moondev_lab.fast.compare`).
A mismatch is logged with both trade lists and raised as :class:`FastMismatch`; the RBI loop
then runs the idea again in the sandbox, so the backtesting.py results are the ones kept.

Ledger writes wait for the confirmation (:meth:`FastSession.add_code`, :meth:`FastSession.flush`),
so nothing is stored before the confirmation, nor at all after a mismatch (with ``kept``, the rows
of the runs searched over and not kept are stored unconfirmed, as a grid's other cells are). A run repeated with the same strategy, parameters and data
is made (and confirmed) once. Any other code runs in the sandbox at once, as without a session.

>>> s = FastSession(pool, ledger, timeout=60)                  # doctest: +SKIP
>>> r = s.run(code, train_ref)                 # fast, settled, pending  # doctest: +SKIP
>>> s.confirm(); s.flush()                                     # doctest: +SKIP
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import pandas as pd

from . import config
from .errors import MoondevError

log = logging.getLogger(__name__)

__all__ = ["FastSession", "FastMismatch"]


class FastMismatch(MoondevError):
    """A confirmation run disagreed with the fast path (a bug): what differed, for each such run."""


@dataclass
class _Pending:
    code: str
    ref: Any
    params: dict
    order_log: Any
    result: Any  # the BacktestResult handed to the loop (updated in place on confirmation)
    indicators: bool = False  # the confirmation run reports the strategy's indicators (for the plot)


class FastSession:
    """The fast runs of one idea, waiting for their one batched confirmation (not thread-safe: one idea)."""

    def __init__(self, sandbox: Any, ledger: Any, *, timeout: float, settings: Any = None):
        self.sandbox, self.ledger, self.timeout = sandbox, ledger, timeout
        self.settings = settings or sandbox.settings
        self.pending: list[_Pending] = []
        self.fast_runs = 0  # runs made here (repeats not counted)
        self.repeats = 0  # runs answered from an identical earlier one
        self.unconfirmed = 0  # runs searched over and not kept (confirm(kept=...))
        self._plans: dict[str, Any] = {}
        self._params: dict[str, dict] = {}
        self._grids: dict[tuple, Any] = {}
        self._done: dict[tuple, Any] = {}
        self._writes: list[tuple] = []

    # ------------------------------------------------------------------ runs
    def plan(self, code: str):
        if code not in self._plans:
            from .fast import plan_of

            self._plans[code] = plan_of(code)
        return self._plans[code]

    def _class_params(self, code: str) -> dict:
        if code not in self._params:
            from .models.offline import class_params

            self._params[code] = class_params(code)
        return self._params[code]

    def _fast_grid(self, plan, ref):
        """One :class:`~moondev_lab.fast.FastGrid` per strategy and data range (indicators shared)."""
        key = (plan.spec.idea, plan.name, ref)
        fg = self._grids.get(key)
        if fg is None:
            from .data import default_pool
            from .fast import FastGrid

            data = default_pool().get(ref.symbol, ref.timeframe, source=ref.source, start=ref.start, end=ref.end)
            fg = self._grids[key] = FastGrid(plan, data, self.settings)
        return fg

    def _local(self, ref) -> bool:
        from pathlib import Path

        return ref.root is None or Path(ref.root) == config.store_dir()

    def run(self, code: str, ref: Any, params: Mapping | None = None, *, timeout: float | None = None,
            indicators: bool = False):
        """The run's :class:`~moondev_lab.sandbox.pool.BacktestResult`: fast and pending, or from the sandbox.

        ``indicators``: as :meth:`SandboxPool.run`'s; a fast run gets them with its confirmation.
        """
        plan = self.plan(code) if self._local(ref) else None
        if plan is None:
            return self.sandbox.run(code, ref, params=dict(params) if params else None,
                                    timeout=timeout or self.timeout, indicators=indicators)
        full = {**plan.defaults, **dict(params or {})}
        key = (plan.spec.idea, plan.name, ref, tuple(sorted(full.items())))
        if key in self._done:
            self.repeats += 1
            for p in self.pending:  # the same run asked again, now for its indicators too
                if p.result is self._done[key]:
                    p.indicators = p.indicators or indicators
            return self._done[key]
        from .broker import SettlementError
        from .fast import _NotExact

        try:
            fg = self._fast_grid(plan, ref)
            order_log = fg.order_log(full)
            result = _fast_result(order_log, fg, self.settings, self._class_params(code), full, plan.name)
        except (_NotExact, SettlementError) as e:  # backtesting.py would fail here, or the kernel cannot say
            (log.error if isinstance(e, SettlementError) else log.info)(
                "fast path not exact for %s (%s); sandbox run", plan.name, e)
            return self.sandbox.run(code, ref, params=dict(params) if params else None,
                                    timeout=timeout or self.timeout, indicators=indicators)
        self.pending.append(_Pending(code, ref, dict(params or {}), order_log, result, indicators))
        self._done[key] = result
        self.fast_runs += 1
        return result

    def grid(self, code: str, grid: Mapping[str, Sequence], ref: Any, maximize: str):
        """``(best run, best params, [(params, score or None)], returns)`` of ``grid`` on ``ref``, or None
        (not a spec). ``returns``: every combination's per-bar returns (bars x combinations, from the same
        pass over the bars that scored it), for the overfitting pass's PBO."""
        import math

        import numpy as np

        from .fast import _NotExact, _combos, _first_best, iter_scores, returns_frame

        plan = self.plan(code) if self._local(ref) else None
        if plan is None:
            return None
        combos = _combos(grid)
        try:
            fg = self._fast_grid(plan, ref)
            returns = np.zeros((len(fg.data), len(combos)))
            # full parameters: the FastGrid may have been built for a sibling code with other class defaults
            scores = list(iter_scores(fg, [{**plan.defaults, **c} for c in combos], maximize, returns))
        except _NotExact as e:
            log.info("fast grid not exact for %s (%s)", plan.name, e)
            return None
        best = _first_best(scores)
        best_params = dict(combos[0 if best is None else best])
        run = self.run(code, ref, best_params)
        return (run, best_params, [(dict(c), None if math.isnan(v) else float(v)) for c, v in zip(combos, scores)],
                returns_frame(returns, fg.data.index, combos))

    # ------------------------------------------------------------------ confirmation
    def confirm(self, kept: Sequence | None = None) -> None:
        """Run the pending runs with backtesting.py in ONE sandbox task; raise :class:`FastMismatch` on any difference.

        ``kept``: only the pending runs whose results are among these (by identity) are confirmed,
        the rest (searched over and not kept, like a grid's other cells) are dropped; None: all.
        """
        pending, self.pending = self.pending, []
        if kept is not None:
            self.unconfirmed += sum(not any(p.result is k for k in kept) for p in pending)
            pending = [p for p in pending if any(p.result is k for k in kept)]
        if not pending:
            return
        from .fast import compare

        by_series: dict[tuple, list[_Pending]] = {}
        for p in pending:  # one series per task (RBI's runs all share one)
            by_series.setdefault((p.ref.symbol, p.ref.timeframe, p.ref.source, p.ref.root), []).append(p)
        problems = []
        for group in by_series.values():
            confirmed = self.sandbox.run_batch([(p.code, p.ref, p.params or None) for p in group],
                                               timeout=self.timeout, settings=self.settings,
                                               known=[(p.order_log, p.result.settled) for p in group],
                                               indicators=[p.indicators for p in group])
            for p, c in zip(group, confirmed):
                if c.ok and c.settled is p.result.settled:  # the same decisions: the same settlement
                    _take_labels(p.result, c)
                    continue
                diff = (f"the confirmation run failed: {c.error}" if not c.ok
                        else compare(p.result.settled.stats, c.stats, c.trades))
                if diff is None:  # other decisions, same trades and stats
                    _take_labels(p.result, c)
                    continue
                what = f"{p.order_log.strategy} {p.params or 'defaults'} on {p.ref.start}..{p.ref.end}"
                log.error("fast path MISMATCH for %s: %s\nfast trades:\n%s\nbacktesting.py trades:\n%s", what, diff,
                          p.result.settled.trades.to_string(), pd.DataFrame(c.trades).to_string())
                problems.append(f"{what}: {diff}")
        if problems:
            raise FastMismatch("; ".join(problems))

    # ------------------------------------------------------------------ the ledger, after confirmation
    def add_code(self, *args, **kwargs) -> None:
        """``Ledger.add_code``, held until :meth:`flush` (after :meth:`confirm`)."""
        self._writes.append((args, kwargs))

    def flush(self) -> None:
        writes, self._writes = self._writes, []
        if not writes:
            return
        with self.ledger.transaction():  # one commit for the idea's rows, not one each
            for args, kwargs in writes:
                self.ledger.add_code(*args, **kwargs)


def _fast_result(order_log, fg, settings, class_params: dict, params: dict, name: str):
    """A :class:`~moondev_lab.sandbox.pool.BacktestResult` with the stats of the sandbox's settled one."""
    from .broker import settle
    from .sandbox.harness import stats_to_dict, to_jsonable
    from .sandbox.pool import BacktestResult

    settlement = settle(order_log, fg.data, settings)
    stats = stats_to_dict(settlement.stats)
    # what the harness reports: the class's parameters overridden by the run's (strategy_params)
    stats["_strategy"] = to_jsonable({**class_params, **params})
    # trades and equity points come with the confirmation (its settled result builds them from this
    # settlement): the loop reads only stats, and the runs searched over and not kept never need them
    result = BacktestResult(ok=True, stats=stats, strategy=name)
    result.settled = settlement
    return result


def _take_labels(result, confirmed) -> None:
    """The confirmed run's trade records and equity points (equal to the fast run's), and what only the
    sandbox run knows (its strategy's own parameter report, where and how long it ran)."""
    result.trades, result.equity = confirmed.trades, confirmed.equity
    result.indicators, result.indicators_error = confirmed.indicators, confirmed.indicators_error
    result.stats["_strategy"] = confirmed.stats.get("_strategy")
    result.worker_pid, result.duration_s, result.layers = confirmed.worker_pid, confirmed.duration_s, confirmed.layers
    result.stdout, result.stderr = confirmed.stdout, confirmed.stderr
