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

import html
import json
import logging
import math
import re
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import pandas as pd
from tqdm.auto import tqdm

from . import config
from .ledger import Ledger, metric_columns, rank_by_oos
from .models.offline import class_params

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
    grid_engine: str = "pool"  # "pool": spread over the sandbox pool; "backtesting": Backtest.optimize itself
    metric: str = "Return [%]"
    target: float = 20.0  # the optimize loop stops once in-sample reaches this
    save_threshold: float = 0.0  # out-of-sample metric a run must beat to be marked saved
    timeout: float = 120.0
    quarters: bool = True  # multi-dataset test: every calendar quarter of the full series
    runs_dir: Path | None = None


@dataclass
class IdeaResult:
    """What happened to one idea."""

    idea: str
    status: str  # ok | failed | skipped
    idea_id: int | None = None
    run_id: int | None = None
    error_kind: str | None = None
    error: str | None = None
    in_sample: dict = field(default_factory=dict)
    out_of_sample: dict = field(default_factory=dict)
    datasets: list = field(default_factory=list)
    params: dict = field(default_factory=dict)
    debug_iterations: int = 0
    optimize_iterations: int = 0
    saved: bool = False
    run_dir: str | None = None
    code: str | None = None
    findings: list = field(default_factory=list)

    def row(self, metric: str) -> dict:
        return {"idea": self.idea[:50], "status": self.status,
                **metric_columns(self.in_sample, self.out_of_sample, metric),
                "debug": self.debug_iterations, "optimize": self.optimize_iterations,
                "error": (f"{self.error_kind}: {self.error}"[:80] if self.error else ""), "run_dir": self.run_dir}

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


@dataclass
class RBIReport:
    results: list[IdeaResult]
    metric: str
    elapsed_s: float
    usage: dict

    def table(self) -> pd.DataFrame:
        df = pd.DataFrame([r.row(self.metric) for r in self.results])
        return rank_by_oos(df, self.metric) if len(df) else df

    def __repr__(self) -> str:
        ok = sum(r.status == "ok" for r in self.results)
        head = f"RBIReport: {ok}/{len(self.results)} ideas ok in {self.elapsed_s:.1f}s; usage {self.usage}"
        cols = ["idea", "status", f"IS {self.metric}", f"OOS {self.metric}", "OOS trades", "error"]
        t = self.table()
        return head + ("\n" + t[cols].to_string(float_format=lambda x: f"{x:.2f}") if len(t) else "")

    def _repr_html_(self) -> str:
        ok = sum(r.status == "ok" for r in self.results)
        return (f"<b>RBIReport</b>: {ok}/{len(self.results)} ideas ok in {self.elapsed_s:.1f}s; "
                f"usage {html.escape(str(self.usage))}" + self.table().to_html(index=False, na_rep="NaN"))

    def to_json(self) -> dict:
        return {"metric": self.metric, "elapsed_s": self.elapsed_s, "usage": self.usage,
                "results": [{k: v for k, v in r.to_dict().items() if k != "code"} for r in self.results]}


# ----- helpers ------------------------------------------------------------------------
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
class RBI:
    """One configured RBI engine: a model, a sandbox pool, a ledger and a data series."""

    def __init__(self, model: Any = "auto", cfg: RBIConfig | None = None, ledger: Ledger | None = None,
                 sandbox: Any = None, factory: Any = None):
        from .data import default_pool
        from .models import ModelFactory
        from .sandbox import SandboxPool

        self.cfg = cfg or RBIConfig()
        self.factory = factory or ModelFactory()
        self.model = self.factory.get(model) if isinstance(model, str) else model
        self.ledger = ledger or Ledger()
        self._own_sandbox = sandbox is None
        self.sandbox = sandbox or SandboxPool()
        self.runs_dir = Path(self.cfg.runs_dir or config.runs_dir())
        frame = default_pool().get(self.cfg.symbol, self.cfg.timeframe, source=self.cfg.source,
                                   start=self.cfg.start, end=self.cfg.end)
        if len(frame) < 200:
            raise ValueError(f"{self.cfg.symbol} {self.cfg.timeframe} has only {len(frame)} bars in the chosen range; "
                             "the train/test split needs at least 200")
        cut = int(len(frame) * self.cfg.train_fraction)
        self.train = self._ref(start=frame.index[0], end=frame.index[cut - 1])
        self.test = self._ref(start=frame.index[cut], end=frame.index[-1])
        self.quarters = []
        if self.cfg.quarters:
            for q in pd.period_range(frame.index[0].tz_localize(None), frame.index[-1].tz_localize(None), freq="Q"):
                self.quarters.append((str(q), self._ref(start=max(q.start_time.tz_localize("UTC"), frame.index[0]),
                                                       end=min(q.end_time.tz_localize("UTC"), frame.index[-1]))))
        del frame

    def _ref(self, start=None, end=None):
        from .sandbox import DataRef

        return DataRef(self.cfg.symbol, self.cfg.timeframe, source=self.cfg.source, start=start, end=end)

    def close(self) -> None:
        if self._own_sandbox:
            self.sandbox.close()

    def __enter__(self) -> "RBI":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # The model's usage goes into the ledger, per step.
    def _usage(self, run_id: int, step: str, result: Any) -> None:
        u = getattr(result, "usage", None)
        if u is not None:
            self.ledger.add_usage(run_id, getattr(u, "model", self.model.name), step,
                                  getattr(u, "input_tokens", 0), getattr(u, "output_tokens", 0),
                                  getattr(u, "cost_usd", 0.0))

    def run_one(self, text: str) -> IdeaResult:
        idea = self.ledger.add_idea(text)
        res = IdeaResult(text, "skipped", idea_id=idea.id)
        if not self.ledger.may_run(idea):
            res.error_kind = "skipped"
            res.error = f"idea is {idea.status} (failures: {idea.failures}); not run again"
            return res
        res.run_id = run_id = self.ledger.start_run(idea.id, self.model.name)
        try:
            self._run(text, res)
        except Exception as e:  # one idea's crash must never stop the batch
            log.exception("RBI idea crashed: %s", text[:80])
            res.status, res.error_kind, res.error = "failed", "internal", f"{type(e).__name__}: {e}"
        if res.status == "ok":
            self.ledger.record_success(idea.id)
        else:
            self.ledger.record_failure(idea.id, f"{res.error_kind}: {res.error}")
        self.ledger.finish_run(run_id, res.status, error_kind=res.error_kind, error_message=res.error,
                               in_sample=res.in_sample, out_of_sample=res.out_of_sample, datasets=res.datasets,
                               params=res.params, saved=res.saved, run_dir=res.run_dir)
        return res

    def _fail(self, res: IdeaResult, kind: Any, error: str) -> None:
        res.status, res.error_kind, res.error = "failed", getattr(kind, "value", kind), error

    def _run(self, text: str, res: IdeaResult) -> None:
        cfg, run_id = self.cfg, res.run_id
        research = self.model.research(text)
        self._usage(run_id, "research", research)
        if not research.ok:
            missing = ", ".join(getattr(research, "not_understood", []) or []) or research.text
            return self._fail(res, "not_understood", f"could not map the idea to a strategy: {missing}")
        code_res = self.model.write_code(text, research)
        self._usage(run_id, "write_code", code_res)
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
            run = self.sandbox.run(code, self.train, timeout=cfg.timeout)
            err = run.error
            self.ledger.add_code(run_id, "initial" if it == 0 else "debug", it, code,
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
            fix = self.model.fix_code(code, err.type or err.kind, err.message or "", getattr(err, "traceback", "") or "")
            self._usage(run_id, "fix_code", fix)
            res.debug_iterations += 1
            if not fix.ok:
                return self._fail(res, err.kind, f"{err.type}: {err.message} (and no fix: {fix.error})")
            code = fix.code
        best_code, best_stats, best_params = code, run.stats, {}

        # Optimize loop on the training part only.
        for it in range(cfg.max_optimize):
            if _metric(best_stats, cfg.metric) >= cfg.target:
                break
            cand = self.model.improve(best_code, best_stats, {"metric": cfg.metric, "value": cfg.target})
            self._usage(run_id, "improve", cand)
            if not cand.ok:
                break
            res.optimize_iterations += 1
            r = self.sandbox.run(cand.code, self.train, timeout=cfg.timeout)
            self.ledger.add_code(run_id, "optimize", it, cand.code, error=None if r.ok else r.error.message,
                                 stats=r.stats if r.ok else None)
            if r.ok and _metric(r.stats, cfg.metric) > _metric(best_stats, cfg.metric):
                best_code, best_stats = cand.code, r.stats
        if cfg.grid:
            params = class_params(best_code)
            grid = param_grid(params, cfg.max_grid) if params else {}
            if grid and math.prod(len(v) for v in grid.values()) > 1:
                g_stats, g_params = self._grid(best_code, grid)
                if g_stats and _metric(g_stats, cfg.metric) > _metric(best_stats, cfg.metric):
                    best_stats, best_params = g_stats, g_params
                    self.ledger.add_code(run_id, "grid", 0, best_code, stats={**g_stats, "_params": best_params})

        # Held-out and multi-dataset tests.
        res.code, res.params, res.in_sample = best_code, best_params, _slim(best_stats)
        oos = self.sandbox.run(best_code, self.test, params=best_params or None, timeout=cfg.timeout, plot=True)
        if not oos.ok:
            return self._fail(res, oos.error.kind, f"out-of-sample run failed: {oos.error.type}: {oos.error.message}")
        res.out_of_sample = _slim(oos.stats)
        for name, ref in self.quarters:
            q = self.sandbox.run(best_code, ref, params=best_params or None, timeout=cfg.timeout)
            res.datasets.append({"dataset": name, **({k: _slim(q.stats).get(k) for k in
                                 (cfg.metric, "Sharpe Ratio", "# Trades", "Max. Drawdown [%]")} if q.ok
                                 else {"error": q.error.message})})
        res.status = "ok"
        res.saved = _metric(res.out_of_sample, cfg.metric) > cfg.save_threshold
        res.run_dir = str(self._write_run_dir(res, getattr(oos, "plot_html", None)))

    def _grid(self, code: str, grid: dict[str, list]) -> tuple[dict | None, dict]:
        """Best in-sample stats and parameters over ``grid``, on the training data."""
        cfg = self.cfg
        if cfg.grid_engine == "pool":
            g = self.sandbox.optimize(code, grid, self.train, maximize=cfg.metric, timeout=cfg.timeout)
            ok = g.result is not None and g.result.ok
            return (g.stats, dict(g.best_params)) if ok else (None, {})
        if cfg.grid_engine != "backtesting":
            raise ValueError(f"grid_engine must be 'pool' or 'backtesting', not {cfg.grid_engine!r}")
        # backtesting.py's own optimizer, run as a script inside one sandbox task: the
        # harness gives its Backtest the pooled data and the harness's money settings.
        from .codeextract import extract_strategy

        name = extract_strategy(code).strategy_name
        driver = (f"\n\nfrom backtesting import Backtest as _Backtest\n"
                  f"_Backtest(None, {name}).optimize(**{grid!r}, maximize={cfg.metric!r})\n")
        timeout = cfg.timeout * max(1, math.prod(len(v) for v in grid.values()) // 4)
        r = self.sandbox.run(code + driver, self.train, timeout=timeout)
        if not r.ok:
            return None, {}
        chosen = r.stats.get("_strategy") or {}
        return r.stats, {k: chosen[k] for k in grid if k in chosen}

    def _write_run_dir(self, res: IdeaResult, plot_html: str | None) -> Path:
        d = self.runs_dir / f"run-{res.run_id:05d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / "strategy.py").write_text(res.code or "")
        (d / "stats.json").write_text(json.dumps({"idea": res.idea, "params": res.params, "in_sample": res.in_sample,
                                                  "out_of_sample": res.out_of_sample, "datasets": res.datasets,
                                                  "findings": res.findings}, indent=2, default=str, allow_nan=True))
        if plot_html:
            (d / "plot.html").write_text(plot_html)
        return d

    def run_many(self, ideas: Iterable[str], parallel: int | None = None, progress: bool = True) -> RBIReport:
        """Run ideas concurrently; model calls on threads, backtests on the sandbox pool."""
        ideas = [i.strip() for i in ideas if i and i.strip()]
        t0 = time.perf_counter()
        # The pool's configured size: len() counts live workers, which is 0 before the first task.
        slots = parallel or max(2, min(8, getattr(self.sandbox, "size", 2)))
        results: list[IdeaResult | None] = [None] * len(ideas)
        with ThreadPoolExecutor(max_workers=max(1, min(slots, len(ideas) or 1)), thread_name_prefix="rbi") as ex:
            futs = {ex.submit(self.run_one, text): k for k, text in enumerate(ideas)}
            for f in tqdm(as_completed(futs), total=len(futs), desc="RBI", unit="idea", disable=not progress):
                k = futs[f]
                try:
                    results[k] = f.result()
                except Exception as e:  # run_one already guards; this is the last line of defence
                    results[k] = IdeaResult(ideas[k], "failed", error_kind="internal", error=str(e))
        done = [r for r in results if r is not None]
        return RBIReport(done, self.cfg.metric, time.perf_counter() - t0,
                         self.ledger.usage_summary(r.run_id for r in done if r.run_id is not None))


_STAT_KEYS = ("Start", "End", "Duration", "Exposure Time [%]", "Equity Final [$]", "Return [%]",
              "Buy & Hold Return [%]", "Return (Ann.) [%]", "Volatility (Ann.) [%]", "Sharpe Ratio",
              "Sortino Ratio", "Calmar Ratio", "Max. Drawdown [%]", "# Trades", "Win Rate [%]",
              "Profit Factor", "Expectancy [%]", "SQN")


def _slim(stats: dict | None) -> dict:
    """The headline stats (NaN kept), without trade lists or equity curves."""
    return {k: stats[k] for k in _STAT_KEYS if stats and k in stats}


def run_rbi(ideas: str | Iterable[str], model: Any = "auto", cfg: RBIConfig | None = None,
            ledger: Ledger | None = None, sandbox: Any = None, parallel: int | None = None,
            progress: bool = True, executor: Any = None) -> RBIReport:
    """Run the whole RBI loop for one idea or many; see :class:`RBIConfig` for the knobs.

    ``executor``: any ``concurrent.futures.Executor`` (e.g. a Dask ``client.get_executor()``)
    runs each idea as one task there; this process still writes the ledger.
    """
    if isinstance(ideas, str):
        ideas = [ideas]
    if executor is not None:
        from .batch import run_on_executor

        return run_on_executor(ideas, executor, model=model, cfg=cfg, ledger=ledger, progress=progress)
    with RBI(model, cfg, ledger, sandbox) as engine:
        return engine.run_many(ideas, parallel=parallel, progress=progress)
