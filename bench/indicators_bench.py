"""What indicator panels and settled heatmaps cost, side by side with backtesting.py's own, on the BTC data.

    .venv/bin/python bench/indicators_bench.py [--repeat 5] [--combos 9]

* dispatch: a sandboxed run without indicators (every run but the plotted one) vs with
  ``indicators=True`` (the plotted run), on the out-of-sample slice (last 30%) and on all
  31k bars (downsampled to the chart's 10,000 points): time, and the indicators' JSON size.
* plot:     ``Backtest.plot(filename=...)`` with the strategy's indicators (baseline, in-process)
          vs ``BacktestRun.plot().save(...)`` drawing the claimed indicators on the trusted side.
* heatmap:  the 'backtesting' grid engine (a script's ``Backtest.optimize`` in one sandbox task)
          without vs with ``heatmap=`` (every combination's order log sent and settled), and
          ``Backtest.optimize(return_heatmap=True)`` in-process as the baseline.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import warnings
from pathlib import Path

# The results bench's sample strategy, repo paths and median timer (run as a script, bench/ is on sys.path).
from results_bench import CODE, best_of as median_of  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--combos", type=int, default=9, choices=(4, 9, 16), help="grid size of the heatmap part")
    args = ap.parse_args()
    os.environ.setdefault("MOONDEV_LAB_HOME", tempfile.mkdtemp(prefix="indicators-bench-"))
    warnings.filterwarnings("ignore")
    import backtesting.backtesting as btmod

    btmod._tqdm = lambda seq, **_: seq  # backtesting's per-run progress bar, on the baseline side

    from backtesting import Backtest

    from moondev_lab.data import default_pool
    from moondev_lab.results import BacktestRun
    from moondev_lab.sandbox import DataRef, SandboxPool
    from moondev_lab.sandbox.harness import _in_process_optimize
    from moondev_lab.sandbox.settings import BacktestSettings

    full = default_pool().get("BTC/USD", "15m")
    cut = full.index[int(len(full) * 0.7)]
    refs = {"out-of-sample": DataRef("BTC/USD", "15m", start=str(cut)), "all bars": DataRef("BTC/USD", "15m")}
    side = int(round(args.combos ** 0.5))
    grid = {"n1": [5, 8, 10, 12][:side], "n2": [20, 30, 40, 50][:side]}
    driver = f"\n\nfrom backtesting import Backtest as _B\n_B(None, SmaCross).optimize(**{grid!r}, maximize='Return [%]')\n"
    settings = BacktestSettings()
    load = os.getloadavg()[0]
    print(f"bars {len(full):,}, repeat {args.repeat} (median), load average {load:.2f} at start")
    with SandboxPool(2) as pool:
        pool.run(CODE, refs["all bars"], indicators=True)  # warm both paths
        for label, ref in refs.items():
            t_plain, _ = median_of(lambda: pool.run(CODE, ref), args.repeat)
            t_ind, res = median_of(lambda: pool.run(CODE, ref, indicators=True), args.repeat)
            size = len(json.dumps([{**x, "values": x["values"].tolist()} for x in res.indicators]))
            points = res.indicators[0]["values"].shape[1]
            print(f"dispatch [{label}, {len(default_pool().get('BTC/USD', '15m', start=ref.start)):,} bars]: "
                  f"run {t_plain * 1000:7.1f} ms | run(indicators=True) {t_ind * 1000:7.1f} ms | "
                  f"ratio {t_ind / t_plain:.2f}x | {len(res.indicators)} indicators x {points:,} points, "
                  f"{size / 1e6:.2f} MB of JSON")

        ref = refs["out-of-sample"]
        frame = default_pool().get("BTC/USD", "15m", start=ref.start)
        ns: dict = {}
        exec(CODE, ns)
        bt = Backtest(frame, ns["SmaCross"], **settings.kwargs())
        base = bt.run()
        out = Path(tempfile.mkdtemp(prefix="indicators-bench-plots-"))
        t_bplot, _ = median_of(lambda: bt.plot(results=base, filename=str(out / "baseline.html"),
                                               open_browser=False), args.repeat)
        run = BacktestRun.from_result(pool.run(CODE, ref, indicators=True), ref.resolved(), settings.kwargs(), "bench")
        t_oplot, _ = median_of(lambda: run.plot().save(out / "ours.html"), args.repeat)
        print(f"plot [out-of-sample, 2 indicator lines]: Backtest.plot {t_bplot * 1000:7.1f} ms | "
              f"BacktestRun.plot().save {t_oplot * 1000:7.1f} ms | ratio {t_oplot / t_bplot:.2f}x")

        train = DataRef("BTC/USD", "15m", end=str(cut))
        t_nohm, _ = median_of(lambda: pool.run(CODE + driver, train, timeout=600), args.repeat)
        t_hm, res = median_of(lambda: pool.run(CODE + driver, train, timeout=600, heatmap="Return [%]"), args.repeat)
        assert res.ok and len(res.heatmap) == args.combos, res.error
    train_frame = default_pool().get("BTC/USD", "15m", end=str(cut))

    def baseline_grid():
        with _in_process_optimize():
            return Backtest(train_frame, ns["SmaCross"], **settings.kwargs()).optimize(
                **grid, maximize="Return [%]", return_heatmap=True)

    t_base, (_, heatmap) = median_of(baseline_grid, args.repeat)
    same = [round(s, 9) for _, s in res.heatmap] == [round(float(v), 9) for v in heatmap.to_numpy()]
    print(f"heatmap [{args.combos} combinations, {len(train_frame):,} bars]: Backtest.optimize(return_heatmap) "
          f"in-process {t_base * 1000:7.1f} ms | sandboxed script {t_nohm * 1000:7.1f} ms | with heatmap= "
          f"{t_hm * 1000:7.1f} ms | heatmap cost {(t_hm - t_nohm) / args.combos * 1000:.1f} ms/combination, "
          f"ratio to baseline {t_hm / t_base:.2f}x | equal to backtesting's: {same}")
    print(f"load average {os.getloadavg()[0]:.2f} at end")


if __name__ == "__main__":
    main()
