"""Issue 15 for grids: the pool grid keeps settled per-combination returns (PBO for any code), and
``ml.grid(..., walk_forward=K)`` walks forward through the fast path or the sandbox pool."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from backtesting import Backtest

from moondev_lab import fast
from moondev_lab import robustness as rb
from moondev_lab.data import DataPool
from moondev_lab.fast import FastGrid, FastGridError, plan_of
from moondev_lab.sandbox import DataRef, SandboxPool
from moondev_lab.sandbox.settings import BacktestSettings
from strategies import SMA_CROSS

PARAMS = {"n1": [5, 10], "n2": [20, 40]}
START, END = "2023-03-01", "2023-03-12"
CROSS = "Buy when the 10/30 SMA cross up, sell on the cross down"

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def pool():
    with SandboxPool(2) as p:
        yield p


def _load_sma_cross() -> type:
    """The tests' own strategy in-process (the reference), defined in this module so that
    Backtest.optimize's worker processes can pickle it by reference."""
    ns: dict = {"__name__": __name__}
    exec(SMA_CROSS, ns)  # noqa: S102 - trusted test code
    return ns["SmaCross"]


SmaCross = _load_sma_cross()


def _sma_cross_class() -> type:
    return SmaCross


def _frame() -> pd.DataFrame:
    return DataPool().get("BTC/USD", "15m", start=START, end=END)


# ----- 1. the pool grid keeps each combination's settled returns -------------------------------------------
@pytest.mark.timeout(240)
def test_pool_grid_keeps_each_combination_settled_returns(pool):
    frame = _frame()
    opt = pool.optimize(SMA_CROSS, PARAMS, DataRef(start=START, end=END), maximize="Return [%]",
                        keep_returns=True)
    assert opt.result.ok, opt.result.error
    r = opt.returns
    assert r.shape == (len(frame), 4) and r.index.equals(frame.index) and r.dtypes.eq(np.float64).all()
    assert list(r.columns) == ["n1=5,n2=20", "n1=5,n2=40", "n1=10,n2=20", "n1=10,n2=40"]
    settings = BacktestSettings().kwargs()
    strategy = _sma_cross_class()
    for (combo, _), col in zip(opt.heatmap, r.columns):  # each column is that combination's true equity
        eq = Backtest(frame, strategy, **settings).run(**combo)["_equity_curve"]["Equity"]
        np.testing.assert_allclose((1 + r[col]).cumprod().to_numpy() * eq.iloc[0], eq.to_numpy(), rtol=1e-9)
    # Without the option nothing is kept.
    assert pool.optimize(SMA_CROSS, PARAMS, DataRef(start=START, end=END), maximize="Return [%]").returns is None


@pytest.mark.timeout(240)
def test_pool_grid_returns_come_from_the_settled_equity_not_the_claims(pool):
    """A strategy that lies about every score still gets the returns its decisions settle at."""
    forged = SMA_CROSS + ("\nfrom moondev_lab.sandbox import harness as _h\n_real = _h._run_grid\n"
                          "def _forge(*a):\n    p = _real(*a)\n"
                          "    return {**p, 'values': [1e9 if v is not None else None for v in p['values']]}\n"
                          "_h._run_grid = _forge\n")
    ref = DataRef(start=START, end=END)
    honest = pool.optimize(SMA_CROSS, PARAMS, ref, maximize="Return [%]", keep_returns=True)
    lying = pool.optimize(forged, PARAMS, ref, maximize="Return [%]", keep_returns=True)
    assert not lying.result.ok  # flagged as a mismatch, and ...
    pd.testing.assert_frame_equal(lying.returns, honest.returns)  # ... its returns are the settled ones


@pytest.mark.timeout(240)
def test_ml_grid_keeps_returns_for_non_spec_code_and_says_where_from(pool):
    g = fast.grid(SMA_CROSS, PARAMS, start=START, end=END, pool=pool, keep_returns=True, maximize="Return [%]")
    assert g.engine == "backtesting" and g.returns.shape == (len(_frame()), 4)
    assert any("pool grid" in n for n in g.notes)
    o = rb.assess_overfitting(g.returns, partitions=4)
    assert o.trials == 4 and o.pbo.n_splits == 6 and 0 <= o.pbo.pbo <= 1


# ----- 2. walk-forward for ml.grid ----------------------------------------------------------------------
def _check_folds(wf: rb.WalkForwardResult, n_folds: int, anchored: bool) -> None:
    assert len(wf.folds) == n_folds and wf.anchored is anchored
    for f in wf.folds:
        w = f.window
        assert w.train_start < w.train_stop <= w.test_start < w.test_stop  # test strictly after train
        assert pd.Timestamp(f.span["train"][1]) < pd.Timestamp(f.span["test"][0])
        assert (w.train_start == 0) if anchored else True
    for a, b in zip(wf.folds, wf.folds[1:]):
        assert a.window.test_stop <= b.window.test_start  # test windows never overlap


def _stitched(pieces: list[pd.Series]) -> pd.Series:
    out, level = [], pieces[0].iloc[0]
    for eq in pieces:
        out.append(eq / eq.iloc[0] * level)
        level = out[-1].iloc[-1]
    return pd.concat(out)


@pytest.mark.parametrize("anchored", [False, True])
def test_ml_grid_walk_forward_through_the_fast_path(anchored):
    df = _frame()
    params = {"fast_n": [5, 10], "slow_n": [30, 60]}
    g = fast.grid(CROSS, params, data=df, walk_forward=3, anchored=anchored, maximize="Return [%]")
    assert g.engine == "fast"
    wf = g.walk_forward
    _check_folds(wf, 3, anchored)
    plan = plan_of(g.code)
    pieces = []
    for f in wf.folds:
        w = f.window
        train_best = fast.grid(g.code, params, data=df.iloc[w.train_start:w.train_stop], maximize="Return [%]")
        assert f.params == train_best.best_params
        eq = FastGrid(plan, df.iloc[w.test_start:w.test_stop]).settle(f.params).stats["_equity_curve"]["Equity"]
        pd.testing.assert_series_equal(f.oos_equity, eq)
        pieces.append(eq)
    pd.testing.assert_series_equal(wf.equity, _stitched(pieces), check_names=False)
    assert f"walk-forward 3 {'anchored' if anchored else 'rolling'} folds" in repr(g)
    page = g._repr_html_()
    assert page.count("<img") == 2  # the grid's heatmap and the walk-forward equity
    assert "OOS ann. return" in page


@pytest.mark.timeout(300)
def test_ml_grid_walk_forward_of_non_spec_code_runs_in_the_sandbox(pool):
    frame = _frame()
    g = fast.grid(SMA_CROSS, PARAMS, start=START, end=END, pool=pool, walk_forward=2, train_bars=400,
                  test_bars=200, maximize="Return [%]")
    wf = g.walk_forward
    _check_folds(wf, 2, False)
    assert [(f.window.train_start, f.window.test_start, f.window.test_stop) for f in wf.folds] == \
        [(len(frame) - 800, len(frame) - 400, len(frame) - 200), (len(frame) - 600, len(frame) - 200, len(frame))]
    strategy, settings = _sma_cross_class(), BacktestSettings().kwargs()
    pieces = []
    for f in wf.folds:  # the in-process reference of what the sandbox ran
        w = f.window
        best = Backtest(frame.iloc[w.train_start:w.train_stop], strategy, **settings).optimize(
            **PARAMS, maximize="Return [%]")
        assert f.params == {k: getattr(best._strategy, k) for k in PARAMS}
        eq = Backtest(frame.iloc[w.test_start:w.test_stop], strategy, **settings).run(**f.params)
        pieces.append(eq["_equity_curve"]["Equity"])
    full = _stitched(pieces)
    # The pool's curves are downsampled; every point they keep is the stitched reference's value there.
    np.testing.assert_allclose(wf.equity.to_numpy(), full.loc[wf.equity.index].to_numpy(), rtol=1e-9)
    assert "walk-forward 2 rolling folds" in repr(g) and "<img" in g._repr_html_()


def test_ml_grid_walk_forward_bad_input_is_a_clear_error():
    df = _frame()
    for bad in (-1, 1.5, True, "3"):
        with pytest.raises(FastGridError, match="walk_forward needs a number of folds >= 1"):
            fast.grid(CROSS, {"fast_n": [5, 10]}, data=df, walk_forward=bad)
    with pytest.raises(FastGridError, match="walk-forward: .* cannot hold 200 folds"):
        fast.grid(CROSS, {"fast_n": [5, 10]}, data=df.iloc[:300], walk_forward=200)


# ----- 3. the JSON of a walk-forward draws again ----------------------------------------------------------
def test_walk_forward_and_cscv_json_carry_what_the_plots_need():
    rng = np.random.default_rng(1)
    idx = pd.date_range("2024-01-01", periods=3000, freq="h")
    data = pd.DataFrame({"Close": 100 * np.exp(np.cumsum(rng.normal(0, 0.01, 3000)))}, index=idx)
    ev = rb.ReturnsEvaluator(data, lambda df, lag: df.Close.pct_change().fillna(0).to_numpy() *
                             (np.arange(len(df)) % lag == 0), {"lag": [1, 2, 3]})
    wf = rb.walk_forward(ev, folds=3)
    d = wf.to_dict()
    assert len(d["equity"]["equity"]) <= 200 and d["equity"]["equity"][-1] == pytest.approx(wf.equity.iloc[-1])
    assert d["equity"]["time"][0] == wf.equity.index[0].isoformat()
    pbo = rb.cscv(ev.grid(0, 3000).returns, 8)
    hist = pbo.to_dict()["logit_hist"]
    assert sum(hist["counts"]) == pbo.n_splits and len(hist["edges"]) == len(hist["counts"]) + 1
    assert math.isclose(hist["edges"][0], pbo.logits.min(), abs_tol=1e-5)


@pytest.mark.timeout(240)
def test_sandbox_evaluator_keeps_the_pool_grid_returns_on_request(pool):
    frame = _frame()
    ev = rb.SandboxEvaluator(pool, SMA_CROSS, PARAMS, DataRef(), frame.index, keep_returns=True)
    g = ev.grid(0, 600)
    assert g.returns.shape == (600, 4) and g.returns.index.equals(frame.index[:600])
    assert list(g.returns.columns) == [f"n1={p['n1']},n2={p['n2']}" for p in g.params]
    assert rb.SandboxEvaluator(pool, SMA_CROSS, PARAMS, DataRef(), frame.index).grid(0, 600).returns is None


@pytest.mark.timeout(300)
def test_a_fold_the_fast_path_cannot_reproduce_walks_forward_in_the_sandbox(pool, monkeypatch):
    from moondev_lab import _overfit
    from moondev_lab.fast import _NotExact

    real = _overfit.FastEvaluator.grid

    def second_fold_not_exact(self, start, stop):
        if start > 0:
            raise _NotExact("an injected inexact fold")
        return real(self, start, stop)

    monkeypatch.setattr(_overfit.FastEvaluator, "grid", second_fold_not_exact)
    params = {"fast_n": [5, 10], "slow_n": [30]}
    with pytest.raises(FastGridError, match="pass symbol/timeframe instead of data="):
        fast.grid(CROSS, params, data=_frame(), walk_forward=2, anchored=False)
    g = fast.grid(CROSS, params, start=START, end=END, pool=pool, walk_forward=2, confirm=False)
    assert g.engine == "fast" and len(g.walk_forward.folds) == 2
    assert any("fast path not exact on a fold" in n for n in g.notes)
    assert isinstance(g.walk_forward.folds[0].oos_equity.index, pd.DatetimeIndex)


@pytest.mark.timeout(240)
def test_a_failing_grid_keeps_no_returns_and_a_failed_chunk_keeps_nan(pool):
    """Nothing is made up for runs that never settled: NaN columns, or no matrix when no chunk settled."""
    def strategy(condition: str) -> str:
        return (SMA_CROSS.replace("    def init(self):\n", f"    def init(self):\n        if {condition}:\n"
                                  "            raise RuntimeError('boom')\n", 1))

    grid = {"n1": [5, 10], "n2": [20]}  # a pool of 2: one chunk per combination
    ref = DataRef(start=START, end=END)
    opt = pool.optimize(strategy("True"), grid, ref, maximize="Return [%]", keep_returns=True)
    assert not opt.result.ok and opt.returns is None
    opt = pool.optimize(strategy("self.n1 == 10"), grid, ref, maximize="Return [%]", keep_returns=True)
    assert opt.returns["n1=10,n2=20"].isna().all() and np.isfinite(opt.returns["n1=5,n2=20"]).all()


def test_pool_grid_returns_feed_cscv_without_the_unsettled_combinations():
    from types import SimpleNamespace

    from moondev_lab._overfit import POOL_RETURNS, grid_returns

    m = pd.DataFrame(np.random.default_rng(0).normal(0, 0.01, (400, 4)), columns=list("abcd"))
    m["c"] = np.nan
    res = SimpleNamespace(grid_engine="pool", _grid_returns=m)
    notes: list = []
    matrix, source = grid_returns(res, "code", {"n": [1, 2, 3, 4]}, None, notes)
    assert list(matrix.columns) == ["a", "b", "d"] and source == "pool grid"
    assert notes == ["pbo: 1 grid combination(s) without a settled run left out", POOL_RETURNS]
    assert not hasattr(res, "_grid_returns")  # dropped from the result once used
    assert rb.cscv(matrix, 4).n_combinations == 3
