"""Result objects and offline plots vs backtesting.py's own, side by side, on the 31k-bar BTC data.

    .venv/bin/python bench/results_bench.py [--repeat 5]

* stats:  ``Backtest.run()`` in-process (baseline: stats Series with ``_equity_curve``/``_trades``)
          vs a sandboxed run through the warm pool + ``BacktestRun.stats`` (the full equity curve
          rebuilt in the trusted parent from the trades), equal to the baseline bar for bar.
* plot:   ``Backtest.plot(filename=...)`` (baseline: BokehJS from a CDN, blank offline)
          vs ``BacktestRun.plot().save(...)`` (BokehJS inline): time and file size.
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
from strategies import sma_cross  # noqa: E402 - the sample strategy the tests use too

CODE = sma_cross("self.buy(size=0.5)")


def best_of(fn, repeat: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    os.environ.setdefault("MOONDEV_LAB_HOME", tempfile.mkdtemp(prefix="results-bench-"))
    warnings.filterwarnings("ignore")
    os.environ["TQDM_DISABLE"] = "1"
    import backtesting.backtesting as btmod  # mute backtesting's per-run progress bar on the baseline side

    btmod._tqdm = lambda seq, **_: seq

    import numpy as np
    from backtesting import Backtest

    from moondev_lab.data import default_pool
    from moondev_lab.results import BacktestRun
    from moondev_lab.sandbox import DataRef, SandboxPool

    frame = default_pool().get("BTC/USD", "15m")
    ns: dict = {}
    exec(CODE, ns)
    settings = {"cash": 1_000_000, "commission": 0.001}
    bt = Backtest(frame, ns["SmaCross"], finalize_trades=True, **settings)
    t_base, base = best_of(bt.run, args.repeat)

    with SandboxPool(2) as pool:
        pool.run(CODE, DataRef("BTC/USD", "15m"))  # warm

        def ours():
            res = pool.run(CODE, DataRef("BTC/USD", "15m"))
            run = BacktestRun.from_result(res, {"symbol": "BTC/USD", "timeframe": "15m"}, settings, "bench")
            return run, run.stats

        t_ours, (run, stats) = best_of(ours, args.repeat)
    t_rebuild, _ = best_of(lambda: BacktestRun(run.stats_dict, run.trade_records, run.equity_points, run.data,
                                               settings, "SmaCross").equity, args.repeat)
    same = np.allclose(stats["_equity_curve"]["Equity"], base["_equity_curve"]["Equity"], rtol=1e-12)

    out = Path(tempfile.mkdtemp(prefix="results-bench-plots-"))
    t_bplot, _ = best_of(lambda: bt.plot(results=base, filename=str(out / "baseline.html"), open_browser=False),
                         args.repeat)
    t_oplot, _ = best_of(lambda: run.plot().save(out / "ours.html"), args.repeat)
    size_b, size_o = (out / "baseline.html").stat().st_size, (out / "ours.html").stat().st_size
    tag = re.compile(r"<script[^>]*\ssrc=[\"']https?:")
    remote_b = len(tag.findall((out / "baseline.html").read_text()))
    remote_o = len(tag.findall((out / "ours.html").read_text()))

    print(f"bars {len(frame):,}, trades {len(stats['_trades'])}, repeat {args.repeat} (median)")
    print(f"stats:  Backtest.run in-process {t_base * 1000:8.1f} ms | sandboxed run + BacktestRun.stats "
          f"{t_ours * 1000:8.1f} ms | ratio {t_ours / t_base:.2f}x | equity rebuild alone {t_rebuild * 1000:.1f} ms"
          f" | equity equal bar for bar: {same}")
    print(f"plot:   Backtest.plot (CDN) {t_bplot * 1000:8.1f} ms, {size_b / 1e6:.2f} MB, {remote_b} remote scripts | "
          f"Plot.save (inline) {t_oplot * 1000:8.1f} ms, {size_o / 1e6:.2f} MB, {remote_o} remote scripts | "
          f"ratio {t_oplot / t_bplot:.2f}x time, {size_o / size_b:.1f}x size")


if __name__ == "__main__":
    main()
