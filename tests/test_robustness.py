"""moondev_lab.robustness: known answers from the papers, Monte Carlo checks, noise vs edge, walk-forward.

The SMA-cross grids of the noise and edge tests are computed vectorised (tests/strategies.py), not with
backtesting.py: 100 combinations x 6 datasets x 20k bars through ``Backtest.run`` would take minutes. The
backtesting.py evaluator is tested on small grids and slices below.
"""
from __future__ import annotations

import json
import math
import re

import numpy as np
import pandas as pd
import pytest
from backtesting import Backtest

from moondev_lab import robustness as rb
from moondev_lab.errors import MoondevError
from strategies import SMA_CROSS, sma_cross_returns

FAST = range(5, 55, 5)
SLOW = range(60, 260, 20)  # 10 x 10 = 100 combinations, every fast below every slow


# ----- helpers: SMA-cross grids and synthetic series -------------------------------------
def sma_grid(close: np.ndarray, commission: float) -> pd.DataFrame:
    return pd.DataFrame({f"{a}/{b}": sma_cross_returns(close, a, b, commission) for a in FAST for b in SLOW})


def random_walk(n: int, seed: int) -> np.ndarray:
    return 100 * np.exp(np.cumsum(np.random.default_rng(seed).normal(0, 0.002, n)))


def planted_edge(n: int, seed: int, drift: float = 0.0004, fast: int = 20, slow: int = 100) -> np.ndarray:
    """A random walk that drifts up on the bars after SMA(fast) > SMA(slow), both computed from past closes."""
    eps = np.random.default_rng(seed).normal(0, 0.002, n)
    close, csum = np.empty(n), np.zeros(n + 1)
    close[0] = 100.0
    for t in range(1, n):
        csum[t] = csum[t - 1] + close[t - 1]  # sum of closes before bar t: the rule sees only the past
        on = t > slow and (csum[t] - csum[t - fast]) / fast > (csum[t] - csum[t - slow]) / slow
        close[t] = close[t - 1] * math.exp(eps[t] + (drift if on else 0.0))
    return close


def ohlc(close: np.ndarray) -> pd.DataFrame:
    """backtesting.py-ready bars around a close series, on a 15-minute UTC index."""
    open_ = np.insert(close[:-1], 0, close[0])
    return pd.DataFrame({"Open": open_, "High": np.maximum(open_, close) * 1.001,
                         "Low": np.minimum(open_, close) * 0.999, "Close": close, "Volume": 1_000.0},
                        index=pd.date_range("2023-01-01", periods=len(close), freq="15min", tz="UTC"))


def _load_sma_cross() -> type:
    """The shared test strategy (talib SMA crossover), defined in this module so that
    Backtest.optimize's worker processes can pickle it by reference."""
    ns: dict = {"__name__": __name__}
    exec(SMA_CROSS, ns)
    return ns["SmaCross"]


SmaCross = _load_sma_cross()


def sma_strategy() -> type:
    return SmaCross


# ----- known answers ------------------------------------------------------------------------------------
def test_dsr_paper_worked_example():
    """Bailey & López de Prado (2014), "The Deflated Sharpe Ratio", numerical example.

    Best of N = 100 trials: annualised SR 2.5 on T = 1250 daily returns (250 a year), skewness -3,
    kurtosis 10, variance of the trials' annualised Sharpe ratios 0.5. The paper: SR0 = 0.1132 per day,
    DSR = 0.9004; with only N = 46 trials the DSR would reach 0.9505.
    """
    sr, var = 2.5 / math.sqrt(250), 0.5 / 250
    assert rb.expected_max_sharpe(100, var) == pytest.approx(0.1132, abs=1e-3)
    assert rb.deflated_sharpe_ratio(sr, 1250, 100, var, skew=-3, kurtosis=10) == pytest.approx(0.9004, abs=1e-3)
    assert rb.deflated_sharpe_ratio(sr, 1250, 46, var, skew=-3, kurtosis=10) == pytest.approx(0.9505, abs=1e-3)
    # The DSR is the PSR against that benchmark.
    assert rb.probabilistic_sharpe_ratio(sr, 1250, -3, 10, benchmark=rb.expected_max_sharpe(100, var)) == \
        pytest.approx(0.9004, abs=1e-3)


def test_expected_max_sharpe_pseudo_mathematics_paper():
    """Bailey, Borwein, López de Prado & Zhu (2014), "Pseudo-Mathematics and Financial Charlatanism".

    With V = 1, E[max] of N = 10 trials is "about 1.57" (the paper gives two decimals, hence 5e-3);
    on 5 years of data, 45 trials are enough to expect an annualised Sharpe of 1 from noise (MinBTL).
    """
    assert rb.expected_max_sharpe(10, 1.0) == pytest.approx(1.57, abs=5e-3)
    assert rb.expected_max_sharpe(45, 1.0) / math.sqrt(5) == pytest.approx(1.0, abs=1e-3)
    assert rb.expected_max_sharpe(1, 0.3, mean=0.2) == 0.2  # one trial: nothing selected


def test_psr_and_min_track_record_identities():
    """PSR and MinTRL (Bailey & López de Prado 2012) agree with each other and with Lo (2002) for normal returns."""
    sr, skew, kurt = 0.08, -0.7, 6.0
    n = rb.min_track_record_length(sr, skew, kurt, benchmark=0.02, confidence=0.95)
    assert rb.probabilistic_sharpe_ratio(sr, n, skew, kurt, benchmark=0.02) == pytest.approx(0.95, abs=1e-9)
    # Normal returns: the Sharpe estimate's standard error is sqrt((1 + SR^2 / 2) / (T - 1)) (Lo 2002).
    z = 0.1 * math.sqrt(499) / math.sqrt(1 + 0.1 ** 2 / 2)
    assert rb.probabilistic_sharpe_ratio(0.1, 500) == pytest.approx(rb._NORMAL.cdf(z), abs=1e-12)
    assert rb.probabilistic_sharpe_ratio(0.05, 300, benchmark=0.05) == pytest.approx(0.5)
    # Negative skew and fat tails widen the uncertainty: lower PSR, longer track record.
    assert rb.probabilistic_sharpe_ratio(0.1, 500, -2, 9) < rb.probabilistic_sharpe_ratio(0.1, 500)
    assert rb.min_track_record_length(0.1, -2, 9) > rb.min_track_record_length(0.1)
    assert rb.min_track_record_length(0.01, benchmark=0.02) == math.inf


def test_expected_max_sharpe_matches_monte_carlo():
    """N noise strategies with no skill: the mean of their best Sharpe matches the closed form."""
    rng = np.random.default_rng(7)
    n_trials, bars, reps = 100, 500, 300
    maxima, variances = [], []
    for _ in range(reps):
        srs = rb.sharpe_ratio(rng.normal(0, 0.01, (bars, n_trials)))
        maxima.append(srs.max())
        variances.append(srs.var(ddof=1))
    closed = rb.expected_max_sharpe(n_trials, float(np.mean(variances)))
    assert np.mean(maxima) == pytest.approx(closed, rel=0.02)  # MC standard error here is ~0.4%


def test_moments_and_assess_overfitting_use_the_same_formulas():
    r = np.random.default_rng(1).standard_t(5, 3000) * 0.01 + 0.0008
    m = rb.return_moments(r)
    assert m.sharpe == pytest.approx(r.mean() / r.std(ddof=1))
    assert m.skew == pytest.approx(pd.Series(r).skew(), abs=5e-3)  # pandas' is bias-corrected
    assert m.kurtosis - 3 == pytest.approx(pd.Series(r).kurt(), abs=0.05)
    trial_sharpes = [0.01, 0.03, -0.02, 0.02]
    o = rb.assess_overfitting(r, trial_sharpes=trial_sharpes, trials=10)
    bench = rb.expected_max_sharpe(10, float(np.var(trial_sharpes, ddof=1)))
    assert o.sharpe_benchmark == pytest.approx(bench)
    assert o.dsr == pytest.approx(rb.probabilistic_sharpe_ratio(m.sharpe, 3000, m.skew, m.kurtosis, bench))
    assert o.psr == pytest.approx(rb.probabilistic_sharpe_ratio(m.sharpe, 3000, m.skew, m.kurtosis))
    assert o.min_track_record == pytest.approx(rb.min_track_record_length(m.sharpe, m.skew, m.kurtosis, bench))
    assert o.trials == 10 and o.pbo is None


# ----- CSCV -------------------------------------------------------------------------------------------
def test_cscv_vectorised_equals_the_per_split_loop():
    rng = np.random.default_rng(3)
    m = rng.normal(0.0002, 0.01, (803, 12))  # 803 bars: blocks of unequal length
    m[:, 5] = m[:, 4]  # a tie
    m[:, 7] = 0.0  # a strategy that never trades
    for partitions in (4, 8, 10):
        vec, loop = rb.cscv(m, partitions, chunk=7), rb._cscv_per_split_loop(m, partitions)
        assert vec.n_splits == loop.n_splits == math.comb(partitions, partitions // 2)
        np.testing.assert_array_equal(vec.chosen, loop.chosen)
        np.testing.assert_allclose(vec.logits, loop.logits, atol=1e-12)
        np.testing.assert_allclose(vec.oos_sharpe, loop.oos_sharpe, atol=1e-12)
        assert vec.pbo == loop.pbo
    big = rb.cscv(m[:, :6], 16)
    assert big.n_splits == 12_870
    sample = rb._cscv_per_split_loop(m[:, :6], 16, splits=300)
    np.testing.assert_allclose(big.logits[:300], sample.logits, atol=1e-12)


def test_cscv_statistics():
    rng = np.random.default_rng(5)
    m = rng.normal(0, 0.01, (1600, 20))
    res = rb.cscv(pd.DataFrame(m, columns=[f"c{k}" for k in range(20)]), 8)
    slope, intercept = res.degradation
    expect_slope, expect_icpt = np.polyfit(res.is_sharpe, res.oos_sharpe, 1)
    assert (slope, intercept) == pytest.approx((expect_slope, expect_icpt))
    assert res.prob_oos_loss == pytest.approx(np.mean(res.oos_sharpe < 0))
    assert res.pbo == pytest.approx(np.mean(res.logits <= 0))
    assert res.most_chosen(3).sum() <= res.n_splits and res.most_chosen(1).index[0].startswith("c")
    # Over many datasets of pure noise, PBO averages about 0.5 (one dataset alone varies widely).
    pbos = [rb.cscv(np.random.default_rng(s).normal(0, 0.01, (800, 20)), 8).pbo for s in range(40)]
    assert np.mean(pbos) == pytest.approx(0.5, abs=0.1)


# ----- noise is flagged, a real edge is not --------------------------------------------------------------
SEEDS = range(6)  # PBO of one dataset is itself noisy, so the PBO claims are about the mean over 6 datasets


def test_noise_is_flagged():
    """Random walk, 100 SMA crosses: PBO >= 0.3 without costs; with the default costs the best DSR < 0.95."""
    pbos = []
    for seed in SEEDS:
        close = random_walk(8_000, seed)
        pbos.append(rb.assess_overfitting(sma_grid(close, 0.0)).pbo.pbo)
        with_costs = rb.assess_overfitting(sma_grid(close, 0.001))  # BacktestSettings' default commission
        assert with_costs.trials == 100
        assert with_costs.dsr < 0.95, (seed, with_costs)
        assert with_costs.probably_overfit
    assert np.mean(pbos) >= 0.3, pbos


def test_real_edge_is_not_flagged():
    """A drift planted while SMA(20) > SMA(100): DSR >= 0.95 for every dataset, PBO < 0.2 on average."""
    pbos = []
    for seed in SEEDS:
        o = rb.assess_overfitting(sma_grid(planted_edge(20_000, seed), 0.001))
        assert o.dsr >= 0.95, (seed, o)
        pbos.append(o.pbo.pbo)
    assert np.mean(pbos) < 0.2, pbos


# ----- walk-forward -------------------------------------------------------------------------------------
@pytest.mark.parametrize("anchored", [False, True])
@pytest.mark.parametrize("n_bars,folds,train,test", [(1000, 6, None, None), (1000, 4, 300, None),
                                                     (997, 5, None, 90), (500, 1, 100, 50)])
def test_walk_forward_windows(n_bars, folds, train, test, anchored):
    ws = rb.walk_forward_windows(n_bars, folds, train=train, test=test, anchored=anchored)
    assert len(ws) == folds
    assert ws[-1].test_stop == n_bars
    for a, b in zip(ws, ws[1:]):
        assert a.test_stop == b.test_start  # test windows tile, never overlap
    for w in ws:
        assert 0 <= w.train_start < w.train_stop <= w.test_start < w.test_stop  # test strictly after train
        if anchored:
            assert w.train_start == 0
    lengths = {w.train_stop - w.train_start for w in ws}
    assert len(lengths) == 1 or anchored
    if train is not None and not anchored:
        assert lengths == {train}


def test_walk_forward_window_errors():
    for kw in ({"folds": 0}, {"folds": 5, "train": 900, "test": 100}, {"folds": 3, "test": 1}, {"folds": 2.5}):
        with pytest.raises(rb.RobustnessError):
            rb.walk_forward_windows(1000, **kw)


def test_walk_forward_with_backtesting_py_stitches_the_fold_runs():
    """Each fold: Backtest.optimize on the train slice, Backtest.run of the best on the test slice."""
    data = ohlc(random_walk(1_500, 11))
    strategy, params = sma_strategy(), {"n1": [5, 10], "n2": [20, 40]}
    settings = {"cash": 100_000, "commission": 0.001, "finalize_trades": True}
    ev = rb.BacktestingEvaluator(data, strategy, params, **settings)
    wf = rb.walk_forward(ev, folds=3, train=600, test=300)
    assert [(f.window.train_start, f.window.test_start, f.window.test_stop) for f in wf.folds] == \
        [(0, 600, 900), (300, 900, 1200), (600, 1200, 1500)]
    pieces = []
    for f in wf.folds:
        w = f.window
        train_best = Backtest(data.iloc[w.train_start:w.train_stop], strategy, **settings).optimize(
            **params, maximize="Return [%]")
        assert f.params == {k: getattr(train_best._strategy, k) for k in params}
        oos = Backtest(data.iloc[w.test_start:w.test_stop], strategy, **settings).run(**f.params)
        eq = oos._equity_curve["Equity"]
        pd.testing.assert_series_equal(f.oos_equity, eq)
        assert f.oos_return_ann == pytest.approx(rb.annualised_return(eq, 35_064))
        assert f.is_return_ann == pytest.approx(rb.annualised_return(train_best._equity_curve["Equity"], 35_064))
        pieces.append(eq)
    # The stitched equity is the concatenated fold runs, each scaled to start where the last one ended.
    stitched, level = [], pieces[0].iloc[0]
    for eq in pieces:
        stitched.append(eq / eq.iloc[0] * level)
        level = stitched[-1].iloc[-1]
    pd.testing.assert_series_equal(wf.equity, pd.concat(stitched), check_names=False)
    np.testing.assert_allclose(wf.returns.to_numpy()[1:300], pieces[0].pct_change().to_numpy()[1:300])
    assert wf.periods_per_year == 35_064
    expect = rb.annualised_return(wf.equity, 35_064) / np.mean([f.is_return_ann for f in wf.folds])
    assert wf.efficiency == pytest.approx(expect) if wf.is_return_ann > 0 else math.isnan(wf.efficiency)
    assert wf.trials == 4 and list(wf.params_table().columns[:2]) == ["n1", "n2"]


def test_backtesting_evaluator_keeps_each_combination_returns():
    data = ohlc(random_walk(900, 4))
    strategy, params = sma_strategy(), {"n1": [5, 10], "n2": [20, 40]}
    settings = {"cash": 100_000, "commission": 0.001, "finalize_trades": True}
    ev = rb.BacktestingEvaluator(data, strategy, params, keep_returns=True, **settings)
    g = ev.grid(100, 700)
    assert g.returns.shape == (600, 4) and g.returns.index.equals(data.index[100:700])
    for p, col in zip(g.params, g.returns.columns):
        run = Backtest(data.iloc[100:700], strategy, **settings).run(**p)
        assert np.prod(1 + g.returns[col]) == pytest.approx(run["Equity Final [$]"] / 100_000)
    best = Backtest(data.iloc[100:700], strategy, **settings).optimize(**params)
    assert g.best_params == {k: getattr(best._strategy, k) for k in params}
    o = rb.assess_overfitting(g.returns, partitions=4)
    assert o.trials == 4 and o.pbo.n_splits == 6


def test_walk_forward_with_a_returns_evaluator_and_the_full_result():
    close = planted_edge(6_000, 2)
    data = pd.DataFrame({"Close": close}, index=pd.date_range("2024-01-01", periods=len(close), freq="h"))
    params = {"fast": [10, 20, 40], "slow": [100, 160]}
    ev = rb.ReturnsEvaluator(data, lambda df, fast, slow: sma_cross_returns(df.Close.to_numpy(), fast, slow, 0.001),
                             params, cash=10_000)
    wf = rb.walk_forward(ev, folds=4, anchored=True)
    assert wf.periods_per_year == pytest.approx(8766)
    for f in wf.folds:
        w = f.window
        expect = ev.run(w.test_start, w.test_stop, f.params)
        seg = wf.equity.loc[expect.index]
        np.testing.assert_allclose(seg.to_numpy() / seg.iloc[0], expect.to_numpy() / expect.iloc[0])
    g = ev.grid(0, len(data))
    o = rb.assess_overfitting(g.returns, trials=8, partitions=8, walk_forward=wf)
    d = o.to_dict()
    json.dumps(d, allow_nan=False)  # strictly valid JSON: no NaN, no inf
    assert {"trials", "dsr", "psr", "pbo", "min_track_record"} <= d.keys()
    assert d["trials"] == 8 and 0 <= d["dsr"] <= 1 and 0 <= d["pbo"] <= 1
    assert len(d["walk_forward"]["folds"]) == 4 and "efficiency" in d["walk_forward"]
    assert d["walk_forward"]["folds"][0]["train"][0].startswith("2024-01-01")
    text = repr(o)
    assert "dsr=" in text and "pbo=" in text and "wf_efficiency=" in text
    assert all(len(decimals) <= 4 for decimals in re.findall(r"\d\.(\d+)", text))  # rounded numbers
    page = o._repr_html_()
    assert page.count("<img src=\"data:image/png;base64,") == 2  # the logit histogram and the equity


@pytest.mark.timeout(180)
def test_walk_forward_through_the_sandbox_matches_backtesting_py_in_process():
    """Untrusted code walks forward inside the sandbox pool, with the same folds as an in-process run."""
    from moondev_lab.data import DataPool
    from moondev_lab.sandbox import DataRef, SandboxPool

    frame = DataPool().get("BTC/USD", "15m", start="2023-03-01", end="2023-03-19")
    params = {"n1": [5, 10], "n2": [20, 40]}
    trusted = rb.walk_forward(rb.BacktestingEvaluator(frame, SmaCross, params), folds=2, train=600, test=300)
    with SandboxPool(2) as pool:
        ev = rb.SandboxEvaluator(pool, SMA_CROSS, params, DataRef("BTC/USD", "15m"), frame.index)
        boxed = rb.walk_forward(ev, folds=2, train=600, test=300)
    assert [f.params for f in boxed.folds] == [f.params for f in trusted.folds]
    assert [f.window for f in boxed.folds] == [f.window for f in trusted.folds]
    # The pool's curves are downsampled; every point they keep is the in-process curve's value there.
    np.testing.assert_allclose(boxed.equity.to_numpy(), trusted.equity.loc[boxed.equity.index].to_numpy(), rtol=1e-9)
    assert boxed.efficiency == pytest.approx(trusted.efficiency, rel=1e-9, nan_ok=True)
    assert [f.oos_return_ann for f in boxed.folds] == pytest.approx([f.oos_return_ann for f in trusted.folds])


def test_batch_deflation_counts_every_idea_trials():
    rng = np.random.default_rng(9)
    ideas = [rb.assess_overfitting(rng.normal(0.0003 * k, 0.01, (1500, 8)), partitions=None) for k in range(4)]
    batch = rb.deflate_batch(ideas)
    best = max(ideas, key=lambda o: o.sharpe)
    pooled = np.concatenate([o.trial_sharpes for o in ideas])
    assert batch.trials == 32 and batch.sharpe == best.sharpe and batch.n_obs == best.n_obs
    assert batch.sharpe_benchmark == pytest.approx(rb.expected_max_sharpe(32, float(np.var(pooled, ddof=1))))
    assert batch.dsr == pytest.approx(rb.probabilistic_sharpe_ratio(best.sharpe, 1500, best.skew, best.kurtosis,
                                                                    batch.sharpe_benchmark))
    single = rb.assess_overfitting(rng.normal(0, 0.01, 500))  # an idea with one trial and no grid
    assert rb.deflate_batch([single]).trials == 1
    with pytest.raises(rb.RobustnessError):
        rb.deflate_batch([])


def test_bad_input_gets_a_clear_error():
    ok = np.random.default_rng(0).normal(0, 0.01, (200, 5))
    cases = [
        lambda: rb.cscv(ok, 7),  # odd partitions
        lambda: rb.cscv(ok[:20], 16),  # too short
        lambda: rb.cscv(ok[:, :1], 4),  # nothing to choose from
        lambda: rb.cscv(np.where(ok > 0.02, np.nan, ok), 4),
        lambda: rb.assess_overfitting(ok[:, 0], trials=5),  # trials but no Sharpe ratios for the variance
        lambda: rb.assess_overfitting([0.01, 0.02]),
        lambda: rb.expected_max_sharpe(0, 1.0),
        lambda: rb.min_track_record_length(0.1, confidence=1.5),
        lambda: rb.ReturnsEvaluator(pd.DataFrame({"Close": [1.0] * 9}), lambda df: [0.0], {"a": [1]}, maximize="x"),
        lambda: rb.ReturnsEvaluator(pd.DataFrame({"Close": [1.0] * 9}), lambda df, a: [0.0], {"a": [1]}).grid(0, 9),
        lambda: rb.walk_forward(rb.ReturnsEvaluator(pd.DataFrame({"Close": [1.0] * 99}),
                                                    lambda df, a: np.zeros(len(df)), {"a": [1]}), folds=2),
        lambda: rb.ReturnsEvaluator(pd.DataFrame({"Close": [1.0]}), lambda df, a: [0.0], {"a": [1]},
                                    constraint=lambda p: p.a > 5),
    ]
    for case in cases:
        with pytest.raises(rb.RobustnessError) as e:
            case()
        assert isinstance(e.value, MoondevError) and isinstance(e.value, ValueError) and str(e.value)


def test_public_names():
    import moondev_lab as ml

    assert ml.deflated_sharpe_ratio is rb.deflated_sharpe_ratio and ml.Overfitting is rb.Overfitting
    assert ml.cscv is rb.cscv and ml.walk_forward is rb.walk_forward
