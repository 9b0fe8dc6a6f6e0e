"""The RBI loop: research -> code -> checks -> run -> debug loop -> optimize loop -> multi-dataset test -> ledger.

>>> from moondev_lab import run_rbi
>>> report = run_rbi(["Buy when RSI(14) < 30, sell when RSI > 70, 2% stop"])   # doctest: +SKIP
>>> report.table()                                                              # doctest: +SKIP

Design points, each answering a known failure of ad-hoc scripts:

* the model writes only the strategy class; the sandbox harness owns data,
  columns, sizing and the ``Backtest`` call, and runs it with no secrets;
* results are structured (NaN stays NaN), never scraped from stdout;
* a truncated reply is refused, never saved as final code;
* the debug loop is bounded, feeds back the real exception, and stops on a
  repeated error (compared on exception type and normalised message);
* the optimize loop tunes on the first part of the data only and reports
  the held-out part, so in-sample target chasing shows as an IS/OOS gap;
* ideas are deduplicated and carry a failure budget in the ledger;
* many ideas run at once; one idea's crash never stops the others.
"""
from __future__ import annotations

import copy
import enum
import json
import logging
import math
import os
import re
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, NamedTuple

import pandas as pd
from tqdm.auto import tqdm

from . import config
from .errors import MoondevError
from .ledger import Experiment, Ledger
from .models._outage import outage_reason
from .models.offline import class_params
from .results import RESULT_FILE, STAT_KEYS, BacktestRun, IdeaResult, RBIReport, StrategyCode, load_run

__all__ = ["RBI", "RBIConfig", "IdeaResult", "RBIReport", "run_rbi", "param_grid"]

log = logging.getLogger(__name__)


@dataclass
class RBIConfig:
    """Knobs of one RBI batch. Defaults suit the bundled BTC 15m sample."""

    symbol: str = "BTC/USD"
    timeframe: str = "15m"
    source: str | None = None
    start: str | None = None  # restrict research to a date range (anything pd.Timestamp takes)
    end: str | None = None
    train_fraction: float = 0.7  # tune on the first 70%, report the last 30%
    max_debug: int = 3
    max_optimize: int = 2
    grid: bool = True  # also grid-search the strategy's numeric class parameters
    max_grid: int = 36
    # "auto": the compiled fast path for the offline model's code (confirmed in the sandbox), else "pool":
    # spread over the sandbox pool; "backtesting": Backtest.optimize itself, in one sandbox task
    grid_engine: str = "auto"
    # with grid_engine "auto", which fast runs backtesting.py confirms (one sandbox task per idea): "all": every
    # run the loop made (first run, each candidate, the grid's best, out-of-sample, each quarter); "kept": only
    # the results kept and shown (the in-sample run kept, out-of-sample, each quarter), the searched-over losers
    # scored by the kernel like a grid's other cells (with --charts saved, the fastest sweep: bench/README.md)
    confirm: str = "all"
    metric: str = "Return [%]"
    target: float = 20.0  # the optimize loop stops once in-sample reaches this
    save_threshold: float = 0.0  # out-of-sample metric a run must beat to be marked saved
    timeout: float = 120.0
    quarters: bool = True  # multi-dataset test: every calendar quarter of the full series
    runs_dir: Path | None = None
    force: bool = False  # run ideas again even when done or given up on this symbol/timeframe/model
    min_trades: int = 10  # fewer out-of-sample trades than this: flagged "too few trades", ranked below
    walk_forward: int = 0  # issue 15: K rolling walk-forward folds over the whole range (0: none)
    # which ok ideas get plot.html in their run folder (see PLOT_CHOICES): the chart is most of the parent's
    # time per idea; without it, `runs show --plot` and IdeaResult.plot() draw it on demand from the same run
    plot: str = "all"


# ----- helpers ------------------------------------------------------------------------
def check_config(cfg: RBIConfig) -> RBIConfig:
    """``cfg`` if every knob has a value the loop can run with, else ``ValueError`` naming the first that has not.

    Called before any work (by :class:`RBI` and by a batch, before its workers start): a bad value
    found inside an idea's run would fail every idea the same way.

    >>> check_config(RBIConfig(max_debug=-1))
    Traceback (most recent call last):
    ValueError: max_debug must be a whole number >= 0, not -1
    """
    if cfg.plot not in PLOT_CHOICES:  # not in the run folder's write, which never fails a run
        raise ValueError(f"plot must be one of {', '.join(map(repr, PLOT_CHOICES))}, not {cfg.plot!r}")
    if cfg.confirm not in ("kept", "all"):  # likewise: inside an idea's run it would fail every idea
        raise ValueError(f"confirm must be 'kept' or 'all', not {cfg.confirm!r}")
    from ._exact_stats import check_stat

    check_stat(cfg.metric)  # likewise: an unknown metric would rank every run as NaN
    for name, least in (("max_debug", 0), ("max_optimize", 0), ("max_grid", 1), ("min_trades", 0),
                        ("walk_forward", 0)):  # a negative loop bound would end every idea in a crash
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be a whole number >= {least}, not {value!r}")
    if not 0 < cfg.train_fraction < 1 or not cfg.timeout > 0:
        raise ValueError(f"train_fraction must be between 0 and 1 and timeout above 0, not "
                         f"{cfg.train_fraction!r} and {cfg.timeout!r}")
    return cfg


def _error_signature(kind: str | None, etype: str | None, message: str | None) -> tuple:
    """Identity of an error for the repeated-error check: numbers and quotes normalised away."""
    kind = getattr(kind, "value", kind)
    msg = re.sub(r"0x[0-9a-f]+|\d+(\.\d+)?", "#", message or "")
    msg = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", msg)
    return (kind, etype, msg.strip()[:300])


def _metric(stats: dict, metric: str) -> float:
    v = (stats or {}).get(metric)
    try:
        v = float(v)
    except (TypeError, ValueError):
        return -math.inf
    return -math.inf if math.isnan(v) else v


# Oscillator thresholds (RSI, stochastic, Williams %R ...) live on a 0-100 scale.
_BOUNDED = re.compile(r"(rsi|stoch|mfi|cci|willr|adx).*(low|high|level|threshold|over|under|buy|sell)|"
                      r"(low|high|level|threshold|over|under)_?(rsi|stoch|mfi)", re.I)


def param_grid(params: dict[str, int | float], max_size: int) -> dict[str, list]:
    """A neighbourhood grid around the current parameters, at most ``max_size`` combinations.

    Oscillator thresholds are kept inside 5..95.

    >>> param_grid({"n1": 10, "n2": 30}, 25)
    {'n1': [6, 8, 10, 12, 15], 'n2': [18, 24, 30, 38, 45]}
    >>> param_grid({"rsi_low": 30, "rsi_high": 70}, 9)
    {'rsi_high': [56, 70, 88], 'rsi_low': [24, 30, 38]}
    """
    names = sorted(params, key=lambda k: (not isinstance(params[k], int), k))[:3]

    def values(k: str, factors) -> list:
        v = params[k]
        out = {max(1, int(round(v * f))) if isinstance(v, int) else round(v * f, 6) for f in factors}
        if _BOUNDED.search(k):
            out = {min(95, max(5, x)) for x in out}
        return sorted(out)

    for factors in ((0.6, 0.8, 1.0, 1.25, 1.5), (0.8, 1.0, 1.25), (0.8, 1.0)):
        grid = {k: values(k, factors) for k in names}
        if math.prod(len(v) for v in grid.values()) <= max_size:
            return grid
    return {k: [params[k]] for k in names}


# ----- the loop ------------------------------------------------------------------------
class RBIState(enum.Enum):
    NEW = "new"  # configured; no data read yet
    STARTED = "started"  # the data range read and split
    CLOSED = "closed"


class RBI:
    """One configured RBI engine: a model, a sandbox pool, a ledger and a data series.

    The constructor checks the settings and reads nothing; :meth:`start` (``with RBI(...)``, or the
    first run) reads the data range, :meth:`close` closes a sandbox pool it made.

    >>> rbi = RBI("offline", RBIConfig(), sandbox=object())    # no data read, no worker started
    >>> rbi.state.value
    'new'
    """

    def __init__(self, model: Any = "auto", cfg: RBIConfig | None = None, ledger: Ledger | None = None,
                 sandbox: Any = None, factory: Any = None):
        from .models import ModelFactory
        from .sandbox import SandboxPool

        self.cfg = cfg or RBIConfig()
        check_config(self.cfg)
        self.factory = factory or ModelFactory()
        self.model = self.factory.get(model) if isinstance(model, str) else model
        self.ledger = ledger or Ledger()
        self._own_sandbox = sandbox is None
        self.sandbox = SandboxPool() if sandbox is None else sandbox
        self.runs_dir = Path(self.cfg.runs_dir or config.runs_dir())
        self.train = self.test = None
        self.quarters: list = []
        self.state = RBIState.NEW
        self._start_lock = threading.Lock()

    def start(self) -> "RBI":
        """Read the data range and split it (train, held-out test, quarters); a no-op once started.

        ``with RBI(...) as rbi`` and the first :meth:`run_one` / :meth:`run_many` call it.
        """
        from .data import default_pool

        with self._start_lock:
            if self.state is RBIState.STARTED:
                return self
            if self.state is RBIState.CLOSED:
                raise ValueError("this RBI was closed; make a new one")
            frame = default_pool().get(self.cfg.symbol, self.cfg.timeframe, source=self.cfg.source,
                                       start=self.cfg.start, end=self.cfg.end)
            if len(frame) < 200:
                raise ValueError(f"{self.cfg.symbol} {self.cfg.timeframe} has only {len(frame)} bars in the chosen "
                                 "range; the train/test split needs at least 200")
            cut = int(len(frame) * self.cfg.train_fraction)
            self.train = self._ref(start=frame.index[0], end=frame.index[cut - 1])
            self.test = self._ref(start=frame.index[cut], end=frame.index[-1])
            self.quarters = []
            if self.cfg.quarters:
                for q in pd.period_range(frame.index[0].tz_localize(None), frame.index[-1].tz_localize(None), freq="Q"):
                    self.quarters.append((str(q), self._ref(start=max(q.start_time.tz_localize("UTC"), frame.index[0]),
                                                           end=min(q.end_time.tz_localize("UTC"), frame.index[-1]))))
            self.state = RBIState.STARTED
            return self

    def _ref(self, start=None, end=None):
        from .sandbox import DataRef

        return DataRef(self.cfg.symbol, self.cfg.timeframe, source=self.cfg.source, start=start, end=end)

    def close(self) -> None:
        self.state = RBIState.CLOSED
        if self._own_sandbox:
            self.sandbox.close()

    def __enter__(self) -> "RBI":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # The model's usage goes into the ledger, per step.
    def _usage(self, run_id: int, step: str, result: Any) -> None:
        u = getattr(result, "usage", None)
        if u is not None:
            self.ledger.add_usage(run_id, getattr(u, "model", self.model.name), step,
                                  getattr(u, "input_tokens", 0), getattr(u, "output_tokens", 0),
                                  getattr(u, "cost_usd", 0.0))

    def run_one(self, text: str, force: bool | None = None) -> IdeaResult:
        """One idea through the whole loop; ``force`` runs it again even when done or given up."""
        force = self.cfg.force if force is None else force
        self.start()
        exp = self.ledger.experiment(text, self.cfg.symbol, self.cfg.timeframe, self.model.name)
        if not force and not self.ledger.may_run(exp):
            return self._skipped(text, exp)
        res = IdeaResult(text, "failed", idea_id=exp.idea_id, experiment_id=exp.id, symbol=self.cfg.symbol,
                         timeframe=self.cfg.timeframe, model=self.model.name, metric=self.cfg.metric)
        res.run_id = run_id = self.ledger.start_run(exp, settings=asdict(self.sandbox.settings))
        try:
            self._run_confirmed(text, res)
        except ModelOutage as e:  # only model calls raise it (_ask): a failed file write is never an outage
            self._fail(res, MODEL_UNAVAILABLE, str(e))
        except Exception as e:  # one idea's crash must never stop the batch
            log.exception("RBI idea crashed: %s", text[:80])
            self._fail(res, "internal", f"{type(e).__name__}: {e}")
        if res.status == "ok":
            self.ledger.record_success(exp.id)
        else:
            # A model outage is not the idea's fault: retried later, never charged to its failure budget.
            self.ledger.record_failure(exp.id, f"{res.error_kind}: {res.error}",
                                       charge=res.error_kind != MODEL_UNAVAILABLE)
        self.ledger.finish_run(run_id, res.status, error_kind=res.error_kind, error_message=res.error,
                               in_sample=res.in_sample, out_of_sample=res.out_of_sample, datasets=res.datasets,
                               params=res.params, saved=res.saved, run_dir=res.run_dir)
        return res

    def _skipped(self, text: str, exp: Experiment) -> IdeaResult:
        """A skipped idea still shows its last successful run, when it has one."""
        last = self.ledger.last_ok_run(exp.id)
        res = load_run(last, self.ledger) if last is not None else IdeaResult(
            text, "skipped", idea_id=exp.idea_id, experiment_id=exp.id, symbol=exp.symbol,
            timeframe=exp.timeframe, model=exp.model, metric=self.cfg.metric)
        res.status, res.error_kind = "skipped", "skipped"
        res.error = exp.why_not_run() + (f" (results of run {last} shown)" if last is not None else "")
        return res

    def _fail(self, res: IdeaResult, kind: Any, error: str) -> None:
        res.status, res.error_kind, res.error = "failed", getattr(kind, "value", kind), error

    def _ask(self, step: str, run_id: int, call, *args):
        """One model call: usage recorded, an outage raised as :class:`ModelOutage`.

        An outage is told by the exception's type (:func:`~moondev_lab.models._outage.outage_reason`),
        whether the model raised it or caught it and returned a failed result carrying it.
        """
        try:
            result = call(*args)
        except Exception as e:
            reason = outage_reason(e)
            if reason:
                raise ModelOutage(f"{step}: {reason}: {e}") from e
            raise
        self._usage(run_id, step, result)
        reason = None if getattr(result, "ok", True) else outage_reason(getattr(result, "failure", None))
        if reason:
            said = getattr(result, "error", None) or getattr(result, "text", None) or ""
            raise ModelOutage(f"{step}: {reason}: {said}")
        return result

    def _run_confirmed(self, text: str, res: IdeaResult) -> None:
        """The loop, its spec-strategy runs on the fast path and confirmed in one sandbox task (engine "auto").

        On a mismatch (logged with both trade lists) the idea runs again without the fast
        path, so every result kept is backtesting.py's, and the result says so in ``findings``.
        """
        from ._fast_session import FastMismatch, FastSession

        if self.cfg.grid_engine != "auto":
            return self._run(text, res)
        blank = copy.deepcopy(res)
        session = FastSession(self.sandbox, self.ledger, timeout=self.cfg.timeout)
        try:
            self._run(text, res, session)
            session.confirm()  # an idea that stopped early (a failed run) may still hold runs and ledger writes
            return session.flush()
        except FastMismatch as e:
            res.__dict__.update(copy.deepcopy(blank).__dict__)
            note = f"fast path mismatch, backtesting.py results kept (the idea ran again in the sandbox): {e}"
        self._run(text, res)
        res.findings.append(note[:2000])

    def _run(self, text: str, res: IdeaResult, fast: Any = None) -> None:
        """``fast``: a :class:`~moondev_lab._fast_session.FastSession` that makes (and holds the ledger
        writes of) the spec-strategy runs until its confirmation, or None: every run in the sandbox."""
        cfg, run_id = self.cfg, res.run_id
        sandbox = fast or self.sandbox
        add_code = fast.add_code if fast is not None else self.ledger.add_code
        research = self._ask("research", run_id, self.model.research, text)
        if not research.ok:
            missing = ", ".join(getattr(research, "not_understood", []) or []) or research.text
            return self._fail(res, "not_understood", f"could not map the idea to a strategy: {missing}")
        code_res = self._ask("write_code", run_id, self.model.write_code, text, research)
        if not code_res.ok:
            return self._fail(res, "codegen", code_res.error or "no code")
        code = code_res.code
        try:
            from .codeextract import static_check

            res.findings = [str(f) for f in static_check(code)]
        except Exception as e:  # advisory only: the sandbox enforces
            res.findings = [f"static check failed: {e}"]

        # Debug loop: bounded, real exception fed back, repeated errors detected.
        seen: set[tuple] = set()
        for it in range(cfg.max_debug + 1):
            run = sandbox.run(code, self.train, timeout=cfg.timeout)
            err = run.error
            add_code(run_id, "initial" if it == 0 else "debug", it, code,
                                 error=None if run.ok else str(err),
                                 stats=run.stats if run.ok else None)
            if run.ok:
                break
            sig = _error_signature(err.kind, err.type, err.message)
            if sig in seen:
                return self._fail(res, "repeated_error", f"same error again after a fix: {err.type}: {err.message}")
            seen.add(sig)
            if it == cfg.max_debug:
                return self._fail(res, err.kind, f"still failing after {cfg.max_debug} fixes: {err.type}: {err.message}")
            fix = self._ask("fix_code", run_id, self.model.fix_code, code, err.type or err.kind, err.message or "",
                            getattr(err, "traceback", "") or "")
            res.debug_iterations += 1
            if not fix.ok:
                return self._fail(res, err.kind, f"{err.type}: {err.message} (and no fix: {fix.error})")
            code = fix.code
        best_code, best_run, best_params, grid = code, run, {}, {}

        # Optimize loop on the training part only.
        for it in range(cfg.max_optimize):
            if _metric(best_run.stats, cfg.metric) >= cfg.target:
                break
            cand = self._ask("improve", run_id, self.model.improve, best_code, best_run.stats,
                             {"metric": cfg.metric, "value": cfg.target})
            if not cand.ok:
                break
            res.optimize_iterations += 1
            r = sandbox.run(cand.code, self.train, timeout=cfg.timeout)
            add_code(run_id, "optimize", it, cand.code, error=None if r.ok else r.error.message,
                                 stats=r.stats if r.ok else None)
            if r.ok and _metric(r.stats, cfg.metric) > _metric(best_run.stats, cfg.metric):
                best_code, best_run = cand.code, r
        if cfg.grid:
            params = class_params(best_code)
            grid = param_grid(params, cfg.max_grid) if params else {}
            if grid and math.prod(len(v) for v in grid.values()) > 1:
                quick = fast.grid(best_code, grid, self.train, cfg.metric) if fast is not None else None
                if quick is not None:
                    g_run, g_params, res.grid, res._grid_returns = quick  # the returns: for PBO, as the pool's
                    res.grid_engine = "fast"
                else:
                    g_run, g_params, res.grid, res.grid_engine, res._grid_returns = self._grid(best_code, grid)
                if g_run is not None and _metric(g_run.stats, cfg.metric) > _metric(best_run.stats, cfg.metric):
                    best_run, best_params = g_run, g_params
                    add_code(run_id, "grid", 0, best_code, stats={**g_run.stats, "_params": best_params})

        # Held-out and multi-dataset tests.
        res.code, res.params, res.in_sample = StrategyCode(best_code), best_params, _slim(best_run.stats)
        # The held-out run is the one plotted (plot.html, IdeaResult.plot()): only it reports its indicators.
        oos = sandbox.run(best_code, self.test, params=best_params or None, timeout=cfg.timeout, indicators=True)
        quarters = [(name, sandbox.run(best_code, ref, params=best_params or None, timeout=cfg.timeout))
                    for name, ref in self.quarters] if oos.ok else []
        if fast is not None:  # this idea's fast runs, confirmed by backtesting.py in one sandbox task
            # The chart waits for it: only the sandbox run reports the strategy's indicators for the plot.
            fast.confirm(None if cfg.confirm == "all" else [best_run, oos, *(q for _, q in quarters)])
            fast.flush()
        if not oos.ok:
            return self._fail(res, oos.error.kind, f"out-of-sample run failed: {oos.error.type}: {oos.error.message}")
        res.out_of_sample = _slim(oos.stats)
        for name, q in quarters:
            res.datasets.append({"dataset": name, **({k: _slim(q.stats).get(k) for k in
                                 (cfg.metric, "Sharpe Ratio", "# Trades", "Max. Drawdown [%]")} if q.ok
                                 else {"error": q.error.message})})
        for segment, result in (("in_sample", best_run), ("out_of_sample", oos)):
            res.backtests[segment] = self._backtest_run(segment, result, text, run_id)
        from ._overfit import assess_idea  # issue 15: trials, DSR/PSR, PBO, walk-forward; never fails the idea

        assess_idea(self, res, best_code, grid)
        res.status = "ok"
        res.saved = _metric(res.out_of_sample, cfg.metric) > cfg.save_threshold
        res.run_dir = str(self._write_run_dir(res))

    def _backtest_run(self, segment: str, result: Any, text: str, run_id: int) -> BacktestRun:
        """The :class:`BacktestRun` of the in-sample or out-of-sample result, titled for the run."""
        label, ref = segment.replace("_", "-"), self.train if segment == "in_sample" else self.test
        title = f"{result.strategy} - run {run_id} ({label}, {self.cfg.symbol} {self.cfg.timeframe}): {text[:60]}"
        return BacktestRun.from_result(result, _ref_fields(ref), asdict(self.sandbox.settings), title)

    def _grid(self, code: str, grid: dict[str, list]) -> "GridOutcome":
        """The best in-sample run, its parameters and every combination's score over ``grid`` (training data)."""
        engine = _GRID_ENGINES.get(self.cfg.grid_engine)
        if engine is None:
            raise ValueError(f"grid_engine must be one of {', '.join(map(repr, _GRID_ENGINES))}, "
                             f"not {self.cfg.grid_engine!r}")
        return engine(self, code, grid)

    def _grid_auto(self, code: str, grid: dict[str, list]) -> "GridOutcome":
        # The fast path where it is exact (the offline model's own code, confirmed), else the pool.
        return self._grid_fast(code, grid) or self._grid_pool(code, grid)

    def _grid_fast(self, code: str, grid: dict[str, list]) -> "GridOutcome | None":
        """The compiled grid (:mod:`moondev_lab.fast`) for code it recognises as its own, else None.

        Its best combination is run once in the sandbox and compared trade for trade and stat
        for stat; that sandbox run is the one kept. On a mismatch (logged with both trade
        lists by :mod:`~moondev_lab.fast`) this returns None and the pool grid decides.
        """
        from . import fast

        g = fast.pool_grid(self.sandbox, code, grid, fast._combos(grid), self.train, self.cfg.metric,
                           timeout=self.cfg.timeout, keep_returns=True)
        return None if g is None else GridOutcome(g.result, dict(g.best_params), g.heatmap, "fast", g.returns)

    def _grid_pool(self, code: str, grid: dict[str, list]) -> "GridOutcome":
        """Every combination as a sandbox task, spread over the pool (any code)."""
        g = self.sandbox.optimize(code, grid, self.train, maximize=self.cfg.metric, timeout=self.cfg.timeout,
                                  fast=False, keep_returns=True)  # issue 15: PBO needs every combination's returns
        ok = g.result is not None and g.result.ok
        scores = [(dict(p), s) for p, s in g.heatmap]
        return GridOutcome(g.result, dict(g.best_params), scores, "pool", g.returns) if ok else \
            GridOutcome(None, {}, scores, "pool", g.returns)

    def _grid_backtesting(self, code: str, grid: dict[str, list]) -> "GridOutcome":
        """backtesting.py's own optimizer, run as a script inside one sandbox task.

        The harness gives its Backtest the pooled data and the harness's money settings, and
        sends every combination's order log back (``heatmap=``): the heatmap holds their
        settled scores, as ``Backtest.optimize(return_heatmap=True)`` lists them.
        """
        from .codeextract import extract_strategy

        cfg = self.cfg
        name = extract_strategy(code).strategy_name
        driver = (f"\n\nfrom backtesting import Backtest as _Backtest\n"
                  f"_Backtest(None, {name}).optimize(**{grid!r}, maximize={cfg.metric!r})\n")
        timeout = cfg.timeout * max(1, math.prod(len(v) for v in grid.values()) // 4)
        r = self.sandbox.run(code + driver, self.train, timeout=timeout, heatmap=cfg.metric)
        scores = [(dict(p), s) for p, s in (r.heatmap or [])]
        if not r.ok:
            return GridOutcome(None, {}, scores, "backtesting")
        chosen = r.stats.get("_strategy") or {}
        return GridOutcome(r, {k: chosen[k] for k in grid if k in chosen}, scores, "backtesting")

    def _write_run_dir(self, res: IdeaResult) -> Path:
        """The run's folder, written in a temp folder and renamed into place: complete or absent, never reused.

        Named by run id *and* ledger id, so two ledgers (the demo's, a test's, yours)
        sharing one ``runs/`` never write into each other's folders.
        """
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        final = self.runs_dir / f"run-{res.run_id:05d}-{self.ledger.ledger_id[:8]}"
        tmp = self.runs_dir / f".tmp-{final.name}-{os.getpid()}-{time.monotonic_ns()}"
        tmp.mkdir()
        try:
            (tmp / "strategy.py").write_text(res.code or "")
            meta = {"idea": res.idea, "run_id": res.run_id, "ledger": self.ledger.path,
                    "ledger_id": self.ledger.ledger_id, "symbol": res.symbol, "timeframe": res.timeframe,
                    "model": res.model, "metric": res.metric, "params": res.params, "in_sample": res.in_sample,
                    "out_of_sample": res.out_of_sample, "datasets": res.datasets, "findings": res.findings,
                    "overfitting": res.overfitting,
                    "settings": res.backtests["out_of_sample"].settings}
            (tmp / "stats.json").write_text(json.dumps(meta, indent=2, default=str, allow_nan=True))
            full = {"metric": res.metric, "grid": res.grid, "grid_engine": res.grid_engine, "findings": res.findings,
                    "backtests": {k: v.to_json() for k, v in res.backtests.items()}}
            (tmp / RESULT_FILE).write_text(json.dumps(full, default=str, allow_nan=True))
            try:
                if PLOT_CHOICES[self.cfg.plot](res):
                    res.plot().save(tmp / "plot.html")
            except Exception as e:  # a plot must never lose a run: say why it is missing
                log.warning("run %s: no plot.html (%s: %s)", res.run_id, type(e).__name__, e)
                (tmp / "plot_error.txt").write_text(f"{type(e).__name__}: {e}\n")
            if final.exists():
                raise FileExistsError(f"run folder {final} already exists; refusing to overwrite it")
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final

    def run_many(self, ideas: Iterable[str], parallel: int | None = None, progress: bool = True,
                 force: bool | None = None) -> RBIReport:
        """Run ideas concurrently; model calls on threads, backtests on the sandbox pool."""
        ideas = [i.strip() for i in ideas if i and i.strip()]
        self.start()  # here, not in each idea's thread: a data range too short is one error, not one per idea
        t0 = time.perf_counter()
        # The pool's configured size: len() counts live workers, which is 0 before the first task.
        # One more idea than workers: while every worker confirms (or runs) one idea's backtests, this process
        # does the next idea's own work (fast runs, settlements, run folder) instead of waiting.
        slots = parallel or max(2, min(8, getattr(self.sandbox, "size", 2) + 1))
        results: list[IdeaResult | None] = [None] * len(ideas)
        with ThreadPoolExecutor(max_workers=max(1, min(slots, len(ideas) or 1)), thread_name_prefix="rbi") as ex:
            futs = {ex.submit(self.run_one, text, force): k for k, text in enumerate(ideas)}
            for f in tqdm(as_completed(futs), total=len(futs), desc="RBI", unit="idea", disable=not progress):
                k = futs[f]
                try:
                    results[k] = f.result()
                except Exception as e:  # run_one already guards; this is the last line of defence
                    results[k] = IdeaResult(ideas[k], "failed", error_kind="internal", error=str(e))
        done = [r for r in results if r is not None]
        return RBIReport(done, self.cfg.metric, time.perf_counter() - t0,
                         self.ledger.usage_summary(r.run_id for r in done if r.run_id is not None),
                         min_trades=self.cfg.min_trades, runs_dir=str(self.runs_dir), ledger_path=self.ledger.path)


MODEL_UNAVAILABLE = "model_unavailable"

#: ``RBIConfig.plot`` -> which ok ideas get ``plot.html`` written into their run folder. "all": every one;
#: "saved": only those marked saved (out-of-sample above ``save_threshold``); "none": no chart. A run folder
#: without one still has everything the chart is drawn from: ``runs show N --plot`` and ``IdeaResult.plot()``
#: draw it on demand (the same chart, indicator panels included).
PLOT_CHOICES = {"all": lambda res: True, "saved": lambda res: bool(res.saved), "none": lambda res: False}


class ModelOutage(MoondevError, RuntimeError):
    """The model could not be reached (network, HTTP 5xx/429 after retries): not the idea's fault."""


def _ref_fields(ref: Any) -> dict:
    return ref.resolved()  # with the store's root: a run loads its bars from the store it ran on


def _slim(stats: dict | None) -> dict:
    """The headline stats (NaN kept), without trade lists or equity curves."""
    return {k: stats[k] for k in STAT_KEYS if stats and k in stats}



class GridOutcome(NamedTuple):
    """What an RBI grid engine found on the training data."""

    run: Any  # the best combination's sandbox run (settled by the trusted broker), or None
    params: dict  # the best combination
    scores: list  # [(params, settled score or None), ...] in grid order (every engine)
    engine: str  # the engine that ran: "fast", "pool" or "backtesting"
    returns: Any = None  # bars x combinations per-bar returns (trusted: compiled or settled), or None


#: ``RBIConfig.grid_engine`` -> how the grid runs. "auto": the fast path where it is exact, else the pool.
_GRID_ENGINES = {"auto": RBI._grid_auto, "pool": RBI._grid_pool, "backtesting": RBI._grid_backtesting}


def run_rbi(ideas: str | Iterable[str] | None = None, model: Any = "auto", cfg: RBIConfig | None = None,
            ledger: Ledger | None = None, sandbox: Any = None, parallel: int | None = None,
            progress: bool = True, force: bool = False, executor: Any = None,
            sources: Iterable[str] | None = None, *, fetcher: Any = None) -> RBIReport:
    """Run the whole RBI loop for one idea or many; see :class:`RBIConfig` for the knobs.

    ``force=True`` runs ideas again that are done (or were given up) on this symbol, timeframe and model.
    ``executor``: any ``concurrent.futures.Executor`` (e.g. a Dask ``client.get_executor()``)
    runs each idea as one task there; this process still writes the ledger.
    ``sources``: article URLs, PDF files or URLs, YouTube URLs, ``.txt``/``.md`` files, as ``rbi --from``
    (:func:`moondev_lab.sources.extract_idea`, with ``model``). Every source is read before anything
    runs (a bad one raises its :class:`~moondev_lab.sources.SourceError`); its rules are the idea, and
    the ledger keeps the extracted text with its source (``Ledger.idea_sources``, ``IdeaResult.sources``).
    ``fetcher``: the :class:`~moondev_lab.sources.Fetcher` that reads them (its timeout, size cap, and an
    injectable ``requests`` session, e.g. a proxy's); a default one if None.

    >>> report = run_rbi(sources=["https://example.com/rsi-article"])        # doctest: +SKIP
    >>> report.results[0].sources[0]["kind"], report.results[0].sources[0]["sentences_used"][0]  # doctest: +SKIP
    """
    ideas = [ideas] if isinstance(ideas, str) else list(ideas or [])
    sources = [sources] if isinstance(sources, str) else list(sources or [])
    if sources:
        from .sources import ideas_from_sources

        ledger = ledger if ledger is not None else Ledger()
        ideas += [found.rules for found in ideas_from_sources(sources, ledger, model=model, fetcher=fetcher)]
    if not ideas:
        raise ValueError("give run_rbi an idea, or sources=[URL or file, ...]")
    if executor is not None:
        from .batch import run_on_executor

        report = run_on_executor(ideas, executor, model=model, cfg=cfg, ledger=ledger, progress=progress)
    else:
        with RBI(model, cfg, ledger, sandbox) as engine:
            report = engine.run_many(ideas, parallel=parallel, progress=progress, force=force or None)
            ledger = engine.ledger
    if sources and ledger is not None:
        for result in report.results:
            if result.idea_id is not None:
                result.sources = ledger.idea_sources(result.idea_id)
    return report
