"""Overfitting statistics for the RBI loop: trial accounting, DSR/PSR/MinTRL, PBO and walk-forward per idea.

The statistics themselves live in :mod:`moondev_lab.robustness`; this module only gathers what one
idea's RBI run tried and produced, and turns it into the ``overfitting`` object every result carries:

>>> o = assess_idea_returns(np.random.default_rng(0).normal(0, 0.01, 500), trials=12,
...                         trial_sharpes=None, periods=35064.0)
>>> o.trials, o.dsr < 0.95
(12, True)

* **trials**: every configuration tried for the idea: the debug-loop and optimize-loop variants
  that produced a result, plus the grid's combinations;
* **dsr / psr / min_track_record** from the out-of-sample run's per-bar returns (the settled equity
  when the broker provides it, else the curve rebuilt from the trades and the bars). The variance of
  the trials' Sharpe ratios comes from the grid's per-combination returns when kept (fast path),
  else from the Sharpe ratios of the runs the loop made; with fewer than two of those it is the
  no-skill estimation variance of a per-bar Sharpe ratio, ``1 / n_obs`` (Lo 2002), and it says so;
* **pbo** by CSCV over the training grid's per-combination returns: the compiled fast path's for
  the offline model's spec strategies, the pool grid's for any other code (each combination's equity
  as the trusted side settled it; the notes say so); the ``backtesting`` grid engine keeps none
  (pbo None, and the notes say that too);
* **walk_forward** (``RBIConfig.walk_forward = K``): K rolling folds, grids on each train window
  through the fast path (spec strategies, trusted kernel) or :class:`~moondev_lab.robustness.SandboxEvaluator`
  (any other code: it never runs in this process).
"""
from __future__ import annotations

import logging
import math
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from . import robustness as rb

log = logging.getLogger(__name__)

PROBABLY_OVERFIT = "probably overfit"
NO_GRID_RETURNS = "grid engine {engine!r}: no per-combination returns kept, no PBO"
POOL_RETURNS = "pbo from the pool grid (each combination's settled equity)"
DSR_THRESHOLD, PBO_THRESHOLD = 0.95, 0.5
#: The stage under which the ledger keeps a run's overfitting object (stats JSON of code_versions).
LEDGER_STAGE = "overfitting"


# ----- trial accounting ------------------------------------------------------------------------------
def count_trials(code_versions: Sequence[Mapping], grid_size: int) -> int:
    """Configurations tried: debug/optimize variants that produced a result, plus the grid's combinations.

    >>> count_trials([{"stage": "initial", "stats": None}, {"stage": "debug", "stats": {"x": 1}},
    ...               {"stage": "optimize", "stats": {"x": 2}}, {"stage": "grid", "stats": {}}], 9)
    11
    """
    tried = sum(1 for c in code_versions if c.get("stage") in ("initial", "debug", "optimize")
                and c.get("stats") is not None)
    return tried + int(grid_size)


def _per_bar(stats_sharpe: Any, periods: float | None) -> float | None:
    """backtesting.py's annualised Sharpe ratio as a per-bar one (approximate: it annualises daily returns)."""
    try:
        v = float(stats_sharpe)
    except (TypeError, ValueError):
        return None
    return v / math.sqrt(periods) if periods and math.isfinite(v) else None


# ----- per-bar returns of a run -------------------------------------------------------------------------
def run_returns(run: Any) -> pd.Series:
    """Per-bar returns of a :class:`~moondev_lab.results.BacktestRun`: settled equity, else the rebuilt curve."""
    settled = getattr(run, "settled", None)
    if settled is not None:
        equity = settled.stats["_equity_curve"]["Equity"]
    else:
        try:
            equity = run.equity["Equity"]
        except Exception as e:  # noqa: BLE001 - the sandbox's downsampled points are still a measurement
            log.info("full equity not rebuilt (%s); using the downsampled points", e)
            pts = pd.DataFrame(run.equity_points)
            equity = pd.Series(pts["equity"].to_numpy(float), index=pd.DatetimeIndex(pts["time"]))
    return equity.astype(float).pct_change().fillna(0.0)


def assess_idea_returns(returns: Any, *, trials: int, trial_sharpes: Sequence[float] | None,
                        periods: float | None, pbo: rb.PBOResult | None = None,
                        walk_forward: rb.WalkForwardResult | None = None) -> rb.Overfitting:
    """PSR, DSR and MinTRL of one run's per-bar ``returns`` selected among ``trials`` configurations."""
    r = np.asarray(returns, dtype=float)
    mom = rb.return_moments(r)
    sharpes = None if trial_sharpes is None else np.asarray([s for s in trial_sharpes if np.isfinite(s)], float)
    if sharpes is not None and len(sharpes) >= 2:
        variance = float(np.var(sharpes, ddof=1))
    else:  # no dispersion measured: the estimation variance of a no-skill per-bar Sharpe ratio
        variance, sharpes = 1.0 / mom.n_obs, None
    trials = max(1, int(trials))
    bench = rb.expected_max_sharpe(trials, variance)
    return rb.Overfitting(
        trials=trials, n_obs=mom.n_obs, sharpe=mom.sharpe, sharpe_benchmark=bench, sharpe_variance=variance,
        skew=mom.skew, kurtosis=mom.kurtosis,
        psr=rb.probabilistic_sharpe_ratio(mom.sharpe, mom.n_obs, mom.skew, mom.kurtosis),
        dsr=rb.probabilistic_sharpe_ratio(mom.sharpe, mom.n_obs, mom.skew, mom.kurtosis, benchmark=bench),
        min_track_record=rb.min_track_record_length(mom.sharpe, mom.skew, mom.kurtosis, benchmark=bench),
        periods_per_year=periods, pbo=pbo, walk_forward=walk_forward, trial_sharpes=sharpes)


# ----- the fast path: per-combination returns and a trusted evaluator ------------------------------------
def _plan(code: str):
    from .fast import plan_of

    return plan_of(code)


def fast_grid_returns(code: str, grid: Mapping[str, Sequence], data: pd.DataFrame) -> pd.DataFrame | None:
    """Each grid combination's per-bar returns on ``data`` through the compiled fast path, or None.

    Only for the offline model's spec strategies (``plan_of`` proves the code is the generator's,
    so nothing untrusted runs here); any other code gets None.
    """
    plan = _plan(code)
    if plan is None or not grid:
        return None
    from . import fast

    try:
        return fast.grid(code, dict(grid), data=data, keep_returns=True, confirm=False).returns
    except Exception as e:  # noqa: BLE001 - PBO is advisory; the run itself stands
        log.warning("fast-path grid returns failed (%s: %s); no PBO", type(e).__name__, e)
        return None


class FastEvaluator:
    """A :class:`~moondev_lab.robustness.Evaluator` over the compiled fast path (spec strategies only)."""

    def __init__(self, code: str, params: Mapping[str, Sequence], data: pd.DataFrame, maximize: str):
        self.plan = _plan(code)
        if self.plan is None:
            raise rb.RobustnessError("not a spec strategy: the fast path cannot evaluate it")
        from .fast import _combos

        self.code, self.data, self.maximize = code, data, maximize
        self.params = {k: list(v) if isinstance(v, (list, tuple, range, np.ndarray)) else [v] for k, v in params.items()}
        self.combos = _combos(self.params)
        self.index = data.index

    def grid(self, start: int, stop: int) -> rb.GridOutcome:
        from . import fast
        from .sandbox.settings import BacktestSettings

        # The plan is proved once (plan_of regenerates the code): each fold only runs the compiled grid.
        g = fast._fast_grid(self.plan, self.data.iloc[start:stop], BacktestSettings(), self.params, self.combos,
                            self.maximize, False)
        return rb.GridOutcome(list(self.combos), g.heatmap.to_numpy(float), dict(g.best_params),
                              g.best_stats["_equity_curve"]["Equity"])

    def run(self, start: int, stop: int, params: Mapping[str, Any]) -> pd.Series:
        from .fast import FastGrid
        from .sandbox.settings import BacktestSettings

        fg = FastGrid(self.plan, self.data.iloc[start:stop], BacktestSettings())
        return fg.settle(dict(params)).stats["_equity_curve"]["Equity"]


def walk_forward_idea(engine: Any, code: str, grid: Mapping[str, Sequence], folds: int) -> rb.WalkForwardResult:
    """``folds`` rolling walk-forward folds over the engine's whole date range, fast path where it applies."""
    from .data import default_pool

    cfg = engine.cfg
    data = default_pool().get(cfg.symbol, cfg.timeframe, source=cfg.source, start=cfg.start, end=cfg.end)
    params = dict(grid) or {}
    if not params:
        raise rb.RobustnessError("the strategy has no numeric parameters to optimise per fold")
    if _plan(code) is not None:
        ev: Any = FastEvaluator(code, params, data, cfg.metric)
    else:
        ev = rb.SandboxEvaluator(engine.sandbox, code, params, engine._ref(), data.index, maximize=cfg.metric,
                                 timeout=cfg.timeout)
    return rb.walk_forward(ev, folds=folds)


def grid_returns(res: Any, code: str, grid: Mapping[str, Sequence], train: pd.DataFrame | None,
                 notes: list) -> tuple[pd.DataFrame | None, str | None]:
    """The training grid's per-combination returns and where they came from, or ``(None, None)``.

    The grid engine's own (``res._grid_returns``: the fast path's, or the pool grid's settled ones,
    dropped from ``res`` here so a batch's results do not keep them), else the fast path's for a spec
    strategy. Pool-grid combinations without a settled run (NaN columns) are left out, and noted.
    """
    kept = res.__dict__.pop("_grid_returns", None)
    if kept is not None and res.grid_engine != "fast":
        usable = kept.columns[np.isfinite(kept.to_numpy()).all(axis=0)]
        if len(usable) < kept.shape[1]:
            notes.append(f"pbo: {kept.shape[1] - len(usable)} grid combination(s) without a settled run left out")
        notes.append(POOL_RETURNS)
        return kept[usable], "pool grid"
    if kept is not None:
        return kept, "fast path"
    matrix = fast_grid_returns(code, grid, train) if train is not None else None
    return matrix, ("fast path" if matrix is not None else None)


# ----- display: the same picture for a fresh run and one loaded from the ledger ------------------------------
def overfitting_html(obj: Mapping | None) -> str:
    """An ``overfitting`` object as HTML: the summary table, the CSCV logit histogram, the walk-forward equity.

    Drawn from the JSON object alone (``cscv.logit_hist``, ``walk_forward.equity``), so a run loaded
    from the ledger shows what the fresh one did.
    """
    import html

    if not obj:
        return ""
    wf = obj.get("walk_forward") or {}
    mtr = obj.get("min_track_record")
    rows = {"trials": obj.get("trials"), "dsr": obj.get("dsr"), "psr": obj.get("psr"), "pbo": obj.get("pbo"),
            "min track record (bars)": "inf" if mtr is None and obj.get("dsr") is not None else mtr,
            "of bars": obj.get("n_obs")}
    if wf:
        eff = wf.get("efficiency")
        rows.update({"wf folds": _fold_count(wf),
                     "wf efficiency": "n/a (in-sample return not positive)" if eff is None else eff})
    flag = PROBABLY_OVERFIT if obj.get("probably_overfit") else ("not flagged" if obj.get("dsr") is not None
                                                                 else "not assessed")
    cells = "".join(f"<tr><th style='text-align:left'>{html.escape(k)}</th><td>{html.escape(_shown(v))}</td></tr>"
                    for k, v in rows.items())
    out = [f"<div class='moondev-overfitting'><b>overfitting: {html.escape(flag)}</b><table>{cells}</table>"]
    hist = (obj.get("cscv") or {}).get("logit_hist")
    if hist:
        out.append(rb._figure_html(rb.plot_logit_histogram(hist, obj.get("pbo"))))
    eq = wf.get("equity") if wf else None
    if eq and len(eq.get("equity", ())) >= 2:
        starts = [f["test"][0] for f in (wf.get("fold_details") or wf.get("folds") or [])[1:]
                  if isinstance(f, Mapping) and f.get("test")]
        out.append(rb._figure_html(rb.plot_walk_forward_equity(eq["time"], eq["equity"], starts,
                                                               wf.get("efficiency"))))
    notes = obj.get("notes") or []
    if notes:
        out.append("<ul>" + "".join(f"<li>{html.escape(str(n))}</li>" for n in notes) + "</ul>")
    return "".join(out) + "</div>"


class OverfittingSummary:
    """An ``overfitting`` object for reading: one line of text, or in a notebook the table and both pictures.

    >>> OverfittingSummary({"trials": 12, "dsr": 0.41, "psr": 0.9, "pbo": 0.62, "probably_overfit": True})
    OverfittingSummary(probably overfit: trials=12, dsr=0.410, psr=0.900, pbo=0.620)
    """

    def __init__(self, obj: Mapping | None):
        self.obj = dict(obj or {})

    def __repr__(self) -> str:
        o = self.obj
        if o.get("dsr") is None:
            return f"OverfittingSummary(not assessed: {'; '.join(map(str, o.get('notes') or [])) or 'no object'})"
        shown = ", ".join(f"{k}={_shown(o.get(k)) or 'n/a'}" for k in ("trials", "dsr", "psr", "pbo"))
        wf = o.get("walk_forward")
        if wf:
            shown += f", wf_folds={_fold_count(wf)}, wf_efficiency={_shown(wf.get('efficiency')) or 'n/a'}"
        flag = PROBABLY_OVERFIT if o.get("probably_overfit") else "not flagged"
        return f"OverfittingSummary({flag}: {shown})"

    def _repr_html_(self) -> str:
        return overfitting_html(self.obj) or "<i>overfitting not assessed</i>"


def _fold_count(wf: Mapping) -> int | None:
    folds = wf.get("folds") if wf else None  # a count in the RBI object, the fold list in a bare to_dict()
    return folds if isinstance(folds, int) or folds is None else len(folds)


def _shown(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3f}"
    return str(v)


# ----- one idea, end to end --------------------------------------------------------------------------------
def assess_idea(engine: Any, res: Any, code: str, grid: Mapping[str, Sequence]) -> rb.Overfitting | None:
    """The idea's :class:`~moondev_lab.robustness.Overfitting`, stored on ``res`` and in the ledger.

    Never fails the idea: a statistic that cannot be computed is None, with the reason in ``notes``.
    """
    try:
        return _assess_idea(engine, res, code, grid)
    except Exception as e:  # noqa: BLE001 - the run stands; say why it has no assessment
        log.exception("run %s: overfitting not assessed", res.run_id)
        res.overfitting = {**dict.fromkeys(("trials", "dsr", "psr", "pbo", "min_track_record")),
                           "notes": [f"not assessed: {type(e).__name__}: {e}"]}
        return None


def _assess_idea(engine: Any, res: Any, code: str, grid: Mapping[str, Sequence]) -> rb.Overfitting | None:
    cfg, notes = engine.cfg, []
    grid_size = len(res.grid) or (math.prod(len(v) for v in grid.values()) if grid else 0)
    trials = count_trials(engine.ledger.code_versions(res.run_id), grid_size)
    oos = res.backtests["out_of_sample"]
    returns = run_returns(oos)
    periods = rb.periods_per_year(returns.index)
    train = None
    if grid:
        from .data import default_pool

        ref = engine.train
        train = default_pool().get(cfg.symbol, cfg.timeframe, source=cfg.source, start=ref.start, end=ref.end)
    # (the data is mapped, not copied: cheap even when the grid kept its returns)
    matrix, source = grid_returns(res, code, grid, train, notes)
    pbo = None
    if matrix is not None:
        try:
            pbo = rb.cscv(matrix, 16)
        except rb.RobustnessError as e:
            notes.append(f"pbo: {e}")
        sharpes = list(rb.sharpe_ratio(matrix.to_numpy()))
        variance_source = f"grid returns ({source})"
    else:
        if grid:
            notes.append(NO_GRID_RETURNS.format(engine=res.grid_engine or "none"))
        sharpes = [s for s in (_per_bar(c["stats"].get("Sharpe Ratio"), periods)
                               for c in engine.ledger.code_versions(res.run_id)
                               if c.get("stats") and c.get("stage") in ("initial", "debug", "optimize", "grid"))
                   if s is not None]
        variance_source = "the loop's runs (annualised Sharpe / sqrt(bars a year))"
    wf = None
    if getattr(cfg, "walk_forward", 0):
        try:
            wf = walk_forward_idea(engine, code, grid, int(cfg.walk_forward))
        except Exception as e:  # noqa: BLE001 - a walk-forward that cannot run is reported, not fatal
            notes.append(f"walk_forward: {type(e).__name__}: {e}")
    try:
        o = assess_idea_returns(returns, trials=trials, trial_sharpes=sharpes, periods=periods, pbo=pbo,
                                walk_forward=wf)
    except rb.RobustnessError as e:
        notes.append(f"dsr: {e}")
        res.overfitting = {"trials": trials, "dsr": None, "psr": None, "pbo": None, "min_track_record": None,
                           "notes": notes}
        return None
    if o.trial_sharpes is None:
        variance_source = "no-skill estimation variance 1/n_obs (fewer than 2 trial Sharpe ratios)"
    out = o.to_dict()
    out["sharpe_variance_source"] = variance_source
    out["notes"] = notes
    if wf is not None:
        out["walk_forward"]["folds"] = len(wf.folds)
        out["walk_forward"]["fold_details"] = [f.to_dict() for f in wf.folds]
    res.overfitting, res._overfitting = out, o
    engine.ledger.add_code(res.run_id, LEDGER_STAGE, 0, code, stats={"_overfitting": out})
    return o


# ----- tables -----------------------------------------------------------------------------------------
def overfit_columns(obj: Mapping | None) -> dict:
    """The leaderboard's overfitting columns from an ``overfitting`` object (blank when not assessed).

    >>> overfit_columns({"trials": 12, "dsr": 0.4, "pbo": None, "walk_forward": {"efficiency": 0.5}})
    {'trials': 12, 'dsr': 0.4, 'pbo': None, 'wf eff': 0.5}
    """
    obj = obj or {}
    return {"trials": obj.get("trials"), "dsr": obj.get("dsr"), "pbo": obj.get("pbo"),
            "wf eff": (obj.get("walk_forward") or {}).get("efficiency")}


def probably_overfit(dsr: pd.Series, pbo: pd.Series) -> pd.Series:
    """DSR below 0.95 or PBO above 0.5 (unknown values flag nothing)."""
    d, p = pd.to_numeric(dsr, errors="coerce"), pd.to_numeric(pbo, errors="coerce")
    return (d < DSR_THRESHOLD).fillna(False) | (p > PBO_THRESHOLD).fillna(False)


def ledger_overfitting(code_versions_stats: str | None) -> dict | None:
    """The overfitting object kept in a code_versions stats JSON (see :data:`LEDGER_STAGE`)."""
    import json

    if not code_versions_stats:
        return None
    return (json.loads(code_versions_stats) or {}).get("_overfitting")


def batch_overfitting(results: Sequence[Any]) -> dict:
    """The batch view: ideas tried, trials over all of them, and the best idea deflated by all trials."""
    assessed = [r._overfitting for r in results if getattr(r, "_overfitting", None) is not None]
    ran = [r for r in results if getattr(r, "status", None) != "skipped"]
    out: dict = {"ideas": len(ran), "ideas_assessed": len(assessed),
                 "trials": sum((getattr(r, "overfitting", None) or {}).get("trials") or 0 for r in ran)}
    if assessed:
        b = rb.deflate_batch(assessed)
        out.update({"dsr": rb._num(b.dsr), "min_track_record": rb._num(b.min_track_record),
                    "sharpe_benchmark": rb._num(b.sharpe_benchmark)})
    return out
