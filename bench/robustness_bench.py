"""Robustness statistics, side by side with their baselines, on the 31k-bar BTC 15m series.

    .venv/bin/python bench/robustness_bench.py                   # everything (~2 minutes on 2 cores)
    .venv/bin/python bench/robustness_bench.py --only cscv       # CSCV only (seconds)

* cscv:        PBO by CSCV over 100 SMA-cross combinations x 31,066 bars, S = 16 (12,870 splits):
               the vectorised ``robustness.cscv`` vs the per-split Python loop the paper describes
               (timed on ``--loop-splits`` splits and extrapolated to all; ``--loop-splits 12870`` runs
               all of it). Goal: at most 2 s. The two must give identical logits.
* bt-returns:  the same grid through backtesting.py, keeping every combination's per-bar returns
               (``BacktestingEvaluator(keep_returns=True)``: one ``Backtest.run`` per combination,
               sequential), then CSCV on that real matrix; vs ``Backtest.optimize`` (which keeps none).
* walkforward: 6 rolling folds (train 3x test) with ``Backtest.optimize`` on each train slice and
               ``Backtest.run`` of the best on its test slice, vs one ``Backtest.optimize`` over all bars.
               The vectorised-returns evaluator is timed as a stand-in for what a returns-keeping engine costs.
* wf-fast:     ``ml.grid(spec code, 100 combinations, walk_forward=6)`` through the compiled fast path
               (issue 13), vs one ``ml.grid`` of the same 100 combinations over all bars (same engine).
* pool-returns: a non-spec strategy's pool grid (``SandboxPool.optimize(fast=False)``) with
               ``keep_returns=True`` (every combination's per-bar returns from its settled equity) vs
               without; then CSCV on the kept matrix. ``--pool-combos`` combinations (default 16, from the
               100-grid's corners), ``--pool-bars`` bars (default all), ``--pool-size`` workers.
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
from strategies import SMA_CROSS, sma_cross_returns  # noqa: E402 - shared with the tests

GRID = {"n1": list(range(5, 55, 5)), "n2": list(range(60, 160, 10))}  # 10 x 10 = 100, as in sandbox_bench


def _strategy(tmp: str):
    """SmaCross from a real module file, so Backtest.optimize's worker processes can pickle it."""
    path = Path(tmp) / "sma_cross_robustness_bench.py"
    path.write_text(SMA_CROSS)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = mod
    spec.loader.exec_module(mod)
    return mod.SmaCross


def _matrix(frame: pd.DataFrame) -> pd.DataFrame:
    close = frame["Close"].to_numpy(dtype=float)
    return pd.DataFrame({f"{a}/{b}": sma_cross_returns(close, a, b, 0.001) for a in GRID["n1"] for b in GRID["n2"]},
                        index=frame.index)


def bench_cscv(frame: pd.DataFrame, loop_splits: int, repeats: int) -> None:
    from moondev_lab import robustness as rb

    m = _matrix(frame)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        res = rb.cscv(m, 16)
        times.append(time.perf_counter() - t)
    t = time.perf_counter()
    loop = rb._cscv_per_split_loop(m, 16, splits=loop_splits)
    t_loop = time.perf_counter() - t
    per_split = t_loop / loop.n_splits
    full_loop = per_split * res.n_splits
    same = np.array_equal(res.logits[:loop.n_splits], loop.logits) and np.array_equal(res.chosen[:loop.n_splits],
                                                                                       loop.chosen)
    med = statistics.median(times)
    print(f"\n== cscv: {m.shape[1]} combinations x {m.shape[0]:,} bars, S=16, {res.n_splits:,} splits ==")
    print(f"  vectorised cscv      median {med:7.3f} s  (min {min(times):.3f}, max {max(times):.3f}, {repeats} runs)"
          f"   goal <= 2 s: {'met' if med <= 2 else 'NOT met'}")
    extrapolated = "" if loop.n_splits == res.n_splits else f", {loop.n_splits:,} splits timed and extrapolated"
    print(f"  per-split loop       {full_loop:7.1f} s  ({per_split * 1e3:.2f} ms/split{extrapolated})")
    print(f"  speed ratio          {full_loop / med:7.0f}x")
    print(f"  identical logits and choices on the looped splits: {same}")
    slope, _ = res.degradation
    print(f"  result: PBO {res.pbo:.3f}, degradation slope {slope:.3f}, P(OOS loss) {res.prob_oos_loss:.3f}")


def bench_bt_returns(frame: pd.DataFrame, strategy) -> float:
    from backtesting import Backtest

    from moondev_lab import robustness as rb
    from moondev_lab.sandbox.harness import BacktestSettings

    ev = rb.BacktestingEvaluator(frame, strategy, GRID, keep_returns=True)
    t = time.perf_counter()
    g = ev.grid(0, len(frame))
    t_keep = time.perf_counter() - t
    t = time.perf_counter()
    o = rb.assess_overfitting(g.returns)
    t_assess = time.perf_counter() - t
    t = time.perf_counter()
    best = Backtest(frame, strategy, **BacktestSettings().kwargs()).optimize(**GRID, maximize="Return [%]")
    t_opt = time.perf_counter() - t
    same = g.best_params == {k: getattr(best._strategy, k) for k in GRID}
    print(f"\n== bt-returns: {len(ev.combinations)} combinations through backtesting.py, returns kept ==")
    print(f"  keep_returns grid    {t_keep:7.2f} s  (sequential Backtest.run per combination)")
    print(f"  assess_overfitting   {t_assess:7.2f} s  (PSR, DSR, MinTRL, CSCV S=16 on the kept matrix)")
    print(f"  Backtest.optimize    {t_opt:7.2f} s  (2 processes, keeps no returns)   ratio {t_keep / t_opt:.2f}x")
    print(f"  same best params as Backtest.optimize: {same} ({g.best_params})")
    print(f"  result: {o!r}")
    return t_opt


def bench_walkforward(frame: pd.DataFrame, strategy, t_grid: float | None) -> None:
    from backtesting import Backtest

    from moondev_lab import robustness as rb
    from moondev_lab.sandbox.harness import BacktestSettings

    if t_grid is None:
        t = time.perf_counter()
        Backtest(frame, strategy, **BacktestSettings().kwargs()).optimize(**GRID, maximize="Return [%]")
        t_grid = time.perf_counter() - t
    t = time.perf_counter()
    wf = rb.walk_forward(rb.BacktestingEvaluator(frame, strategy, GRID), folds=6)
    t_wf = time.perf_counter() - t
    close = frame["Close"]
    vec = rb.ReturnsEvaluator(frame, lambda df, n1, n2: sma_cross_returns(df.Close.to_numpy(float), n1, n2, 0.001), GRID)
    t = time.perf_counter()
    wf_vec = rb.walk_forward(vec, folds=6)
    t_vec = time.perf_counter() - t
    w = wf.folds[0].window
    print(f"\n== walkforward: 6 rolling folds, train {w.train_stop - w.train_start:,} / test "
          f"{w.test_stop - w.test_start:,} bars, {len(close):,} bars, {wf.trials} combinations ==")
    print(f"  one Backtest.optimize, all bars   {t_grid:7.2f} s")
    print(f"  walk-forward, backtesting.py      {t_wf:7.2f} s   ratio to one grid {t_wf / t_grid:.2f}x")
    print(f"  walk-forward, vectorised returns  {t_vec:7.2f} s   ratio to one grid {t_vec / t_grid:.3f}x"
          "   (stand-in for a fast path; not backtesting.py's fills)")
    print(f"  efficiency {wf.efficiency:.3f}; OOS ann. return {wf.oos_return_ann:.2%}, "
          f"IS ann. return {wf.is_return_ann:.2%}")
    print("  parameters per fold (stability):")
    print("   " + wf.params_table().to_string(float_format=lambda x: f"{x:.4f}").replace("\n", "\n   "))
    eff = wf_vec.efficiency
    print(f"  vectorised evaluator: efficiency {eff:.3f}" if not math.isnan(eff) else
          "  vectorised evaluator: efficiency n/a (IS return <= 0)")


FAST_IDEA = "Buy when the 10/30 SMA cross up, sell on the cross down"
FAST_GRID = {"fast_n": list(range(5, 55, 5)), "slow_n": list(range(60, 160, 10))}  # 100, like GRID


def bench_wf_fast(frame: pd.DataFrame) -> None:
    from moondev_lab import fast

    fast.grid(FAST_IDEA, {"fast_n": [5, 10], "slow_n": [60]}, data=frame.iloc[:2000])  # compile / load the cache
    t = time.perf_counter()
    one = fast.grid(FAST_IDEA, FAST_GRID, data=frame)
    t_grid = time.perf_counter() - t
    t = time.perf_counter()
    g = fast.grid(FAST_IDEA, FAST_GRID, data=frame, walk_forward=6)
    t_wf = time.perf_counter() - t
    wf = g.walk_forward
    w = wf.folds[0].window
    print(f"\n== wf-fast: ml.grid(walk_forward=6), compiled fast path, {len(one.heatmap)} combinations, "
          f"{len(frame):,} bars; train {w.train_stop - w.train_start:,} / test {w.test_stop - w.test_start:,} ==")
    print(f"  one ml.grid (fast), all bars       {t_grid:7.2f} s")
    print(f"  ml.grid + 6-fold walk-forward      {t_wf:7.2f} s   walk-forward alone ~{t_wf - t_grid:.2f} s, "
          f"ratio to one grid {(t_wf - t_grid) / t_grid:.2f}x")
    eff = wf.efficiency
    print(f"  efficiency {'n/a' if math.isnan(eff) else f'{eff:.3f}'}; params per fold: "
          + "; ".join(",".join(f"{k}={v}" for k, v in f.params.items()) for f in wf.folds))


def bench_pool_returns(frame: pd.DataFrame, combos: int, bars: int | None, size: int, repeats: int) -> None:
    from moondev_lab import robustness as rb
    from moondev_lab.sandbox import DataRef, SandboxPool

    side = max(1, int(round(math.sqrt(combos))))
    grid = {"n1": GRID["n1"][::max(1, len(GRID["n1"]) // side)][:side],
            "n2": GRID["n2"][::max(1, len(GRID["n2"]) // side)][:side]}
    sub = frame if bars is None else frame.iloc[-bars:]
    ref = DataRef("BTC/USD", "15m", start=str(sub.index[0]), end=str(sub.index[-1]))
    n = len(grid["n1"]) * len(grid["n2"])
    with SandboxPool(size) as pool:
        pool.run(SMA_CROSS, DataRef("BTC/USD", "15m", start=str(sub.index[0]), end=str(sub.index[min(500, len(sub) - 1)])))
        plain_times, kept_times = [], []
        for _ in range(repeats):  # alternated, so a load change on a shared machine hits both alike
            t = time.perf_counter()
            plain = pool.optimize(SMA_CROSS, grid, ref, maximize="Return [%]", fast=False)
            plain_times.append(time.perf_counter() - t)
            t = time.perf_counter()
            kept = pool.optimize(SMA_CROSS, grid, ref, maximize="Return [%]", fast=False, keep_returns=True)
            kept_times.append(time.perf_counter() - t)
        t_plain, t_kept = min(plain_times), min(kept_times)
    t = time.perf_counter()
    pbo = rb.cscv(kept.returns, 16)
    t_cscv = time.perf_counter() - t
    print(f"\n== pool-returns: non-spec SmaCross, {n} combinations x {len(sub):,} bars, pool of {size} ==")
    print(f"  pool grid, keep_returns=False      {t_plain:7.2f} s   (min of {repeats}, alternated)")
    print(f"  pool grid, keep_returns=True       {t_kept:7.2f} s   ratio {t_kept / t_plain:.3f}x   "
          f"matrix {kept.returns.shape[0]:,} x {kept.returns.shape[1]} float64 = "
          f"{kept.returns.to_numpy().nbytes / 2**20:.1f} MiB")
    print(f"  cscv on the kept matrix (S=16)     {t_cscv:7.3f} s   PBO {pbo.pbo:.3f}")
    print(f"  same heatmap and best: {plain.heatmap == kept.heatmap and plain.best_params == kept.best_params}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["cscv", "bt-returns", "walkforward", "wf-fast", "pool-returns"])
    ap.add_argument("--pool-combos", type=int, default=16)
    ap.add_argument("--pool-bars", type=int, default=None)
    ap.add_argument("--pool-size", type=int, default=2)
    ap.add_argument("--loop-splits", type=int, default=400, help="splits the per-split loop baseline runs")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    warnings.simplefilter("ignore")  # backtesting.py's pandas deprecation chatter
    with tempfile.TemporaryDirectory(prefix="robustness_bench_") as home:
        os.environ["MOONDEV_LAB_HOME"] = home
        from moondev_lab.data import DataPool
        from moondev_lab.sandbox.harness import silence_progress

        silence_progress()
        frame = DataPool(Path(home) / "store").get("BTC/USD", "15m")
        strategy = _strategy(home)
        print(f"robustness bench: {os.cpu_count()} CPUs, python {sys.version.split()[0]}, numpy {np.__version__}")
        t_grid = None
        if args.only in (None, "cscv"):
            bench_cscv(frame, args.loop_splits, args.repeats)
        if args.only in (None, "bt-returns"):
            t_grid = bench_bt_returns(frame, strategy)
        if args.only in (None, "walkforward"):
            bench_walkforward(frame, strategy, t_grid)
        if args.only in (None, "wf-fast"):
            bench_wf_fast(frame)
        if args.only in (None, "pool-returns"):
            bench_pool_returns(frame, args.pool_combos, args.pool_bars, args.pool_size, min(args.repeats, 3))


if __name__ == "__main__":
    main()
