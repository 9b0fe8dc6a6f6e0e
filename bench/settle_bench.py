"""Trusted settlement vs one backtesting.py run on the 31k-bar BTC series, side by side.

    .venv/bin/python bench/settle_bench.py [--repeat 7]

For each strategy: the median time of ``Backtest.run`` (the baseline), of the recording
run (what the sandbox now does), and of ``broker.settle`` on its order log (what the
trusted parent adds), with the ratio settle / run (goal: at most 10%). Then numba's
compile cost in fresh processes: with an empty cache, and loading from the cache.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]


def _median_times(fns: dict, repeat: int) -> dict:
    """Median CPU seconds of each function, interleaved (this machine is shared: wall time is noise).

    Every measured function is single-threaded, so CPU time is its wall time on an idle machine.
    """
    times: dict = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t = time.process_time()
            fn()
            times[name].append(time.process_time() - t)
    return {name: statistics.median(v) for name, v in times.items()}


def _strategies():
    from moondev_lab.models import OfflineModel
    from strategies import SMA_CROSS

    out = []
    ns: dict = {}
    exec(SMA_CROSS, ns)
    out.append(("SMA cross 10/30", ns["SmaCross"]))
    model = OfflineModel()
    for idea in ("Short when MACD crosses below its signal line, 2x ATR trailing stop",
                 "Enter long when the 9 EMA crosses above the 21 EMA, 3% take profit, 1.5% stop loss"):
        code = model.write_code(idea, model.research(idea))
        ns = {}
        exec(code.code, ns)
        out.append((idea[:40], ns[code.strategy_name]))
    return out


_COLD = """
import time, warnings
t = time.perf_counter()
from moondev_lab import _broker_kernel
from moondev_lab.broker import settle, OrderLog
import pandas as pd, numpy as np
idx = pd.date_range("2024-01-01", periods=50, freq="h", tz="UTC")
df = pd.DataFrame({c: np.linspace(100, 110, 50) for c in ("Open", "High", "Low", "Close")}, index=idx)
df["Volume"] = 1.0
nan = float("nan")
settle(OrderLog.from_rows([(5, 0, 1.0, nan, nan, nan, nan, -1, -1)], start=1, index=idx), df)
print(time.perf_counter() - t)
"""


def _fresh_process(cache: str) -> float:
    env = {**os.environ, "NUMBA_CACHE_DIR": cache, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", _COLD], env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    os.environ.setdefault("MOONDEV_LAB_HOME", tempfile.mkdtemp(prefix="settle-bench-"))
    from backtesting import Backtest

    from moondev_lab._bt_compat import RecordingBacktest
    from moondev_lab.broker import settle
    from moondev_lab.data import DataPool
    from moondev_lab.sandbox.harness import silence_progress
    from moondev_lab.sandbox.settings import BacktestSettings

    silence_progress()
    warnings.simplefilter("ignore")
    df = DataPool().get("BTC/USD", "15m")
    settings = BacktestSettings()
    print(f"{len(df):,} bars, {os.cpu_count()} CPUs, median CPU time of {args.repeat} interleaved runs")
    print(f"{'strategy':42} {'decisions':>9} {'run':>8} {'recorded':>9} {'settle':>8} {'settle/run':>10}")
    for name, cls in _strategies():
        bt = RecordingBacktest(df, cls, **settings.kwargs())
        bt.run()
        settle(bt.order_log, df, settings)  # compiled (or loaded from the cache) once
        t = _median_times({"plain": lambda: Backtest(df, cls, **settings.kwargs()).run(), "recorded": bt.run,
                           "settle": lambda: settle(bt.order_log, df, settings)}, args.repeat)
        plain, recorded, settled = t["plain"], t["recorded"], t["settle"]
        print(f"{name:42} {len(bt.order_log):>9,} {plain * 1e3:>6.0f}ms {recorded * 1e3:>7.0f}ms "
              f"{settled * 1e3:>6.1f}ms {settled / plain:>9.1%}")
    with tempfile.TemporaryDirectory() as cache:
        cold = _fresh_process(cache)
        cached = _fresh_process(cache)
    print(f"fresh process, import + first settle: empty numba cache {cold:.1f} s, from the cache {cached:.2f} s")


if __name__ == "__main__":
    main()
