"""Live runner bench: parity replay vs the backtest, decision latency on paper, RSS over a long replay.

    python bench/live_bench.py [--only replay|latency|rss] [--rss-bars 200000]

1. **Parity replay time**: the SMA cross over the 31,066 bundled BTC 15m bars through the
   live runner (sandboxed session, causal indicators, paper exchange in memory, event log
   on disk) against backtesting.py's own ``Backtest.run`` on the same data, in one run.
   Goal: <= 10x.
2. **Decision latency**: a closed candle handed to the runner -> its order accepted by the
   paper exchange (one bar per step, as when trading live), for bars with an order.
   Goal: median <= 5 ms. Baseline printed next to it: the session round trip of a bar
   without an order.
3. **Stability**: RSS of the runner process and of the session child over a 200,000-bar
   synthetic replay (random walk), sampled every 10,000 bars; growth after the warm-up
   (first 20,000 bars). Goal: <= 5%.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from moondev_lab.data import DataPool  # noqa: E402
from moondev_lab.live import LiveRunner, StrategySource  # noqa: E402
from moondev_lab.paper import PaperExchange  # noqa: E402
from moondev_lab.sandbox.harness import silence_progress  # noqa: E402
from moondev_lab.sandbox.settings import BacktestSettings  # noqa: E402
from strategies import SMA_CROSS  # noqa: E402


def rss_mb(pid: int | None = None) -> float:
    with open(f"/proc/{pid or 'self'}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def tree_rss_mb(pid: int) -> float:
    """RSS of ``pid`` and all its descendants: the session's first process is its pid namespace's
    init, and the strategy runs in its child."""
    import psutil

    procs = [psutil.Process(pid)]
    procs += procs[0].children(recursive=True)
    return sum(p.memory_info().rss for p in procs) / 2**20


def _paper_replay(frame: pd.DataFrame, settings: BacktestSettings) -> tuple[float, float, float, PaperExchange]:
    """The SMA cross replayed on a fresh paper exchange: (seconds, before replay(), in replay(), the exchange)."""
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        paper = PaperExchange(None, symbol="BTC/USD", settings=settings).start()
        with LiveRunner(StrategySource(SMA_CROSS, {}, "SmaCross"), paper, symbol="BTC/USD", state_dir=tmp,
                        settings=settings, warmup_bars=0) as runner:
            t_open = time.perf_counter()
            runner.replay(frame)
            t_feed = time.perf_counter()
        return time.perf_counter() - t, t_open - t, t_feed - t_open, paper


def bench_replay(btc: pd.DataFrame) -> dict:
    from backtesting import Backtest

    ns: dict = {}
    exec(SMA_CROSS, ns)
    settings = BacktestSettings()
    t = time.perf_counter()
    Backtest(btc, ns["SmaCross"], **settings.kwargs()).run()
    bt = time.perf_counter() - t
    # The paper broker's compiled kernel is built once per install (numba's on-disk cache under
    # $MOONDEV_LAB_HOME, fresh here): pay that on a short replay first, and time it apart.
    first, *_ = _paper_replay(btc.iloc[:500], settings)
    live, t_start, t_bars, paper = _paper_replay(btc, settings)
    trades = len(paper.trades())
    print(f"replay: backtest {bt:.3f} s, live replay {live:.3f} s (runner built {t_start:.2f} s, "
          f"replay() with the session's start {t_bars:.2f} s), ratio {live / bt:.1f}x (goal <= 10x); {trades} trades; "
          f"first 500-bar replay of this install (kernel compile) {first:.1f} s")
    return {"backtest_s": bt, "replay_s": live, "ratio": live / bt, "trades": trades, "first_use_s": first}


def bench_latency(btc: pd.DataFrame, bars: int = 3000) -> dict:
    code = SMA_CROSS.replace("n1 = 10", "n1 = 3").replace("n2 = 30", "n2 = 8")
    data = btc.iloc[:bars]
    with tempfile.TemporaryDirectory() as tmp:
        paper = PaperExchange(Path(tmp) / "paper.sqlite", symbol="BTC/USD").start()  # durable, as when trading
        with LiveRunner(StrategySource(code, {}, "SmaCross"), paper, symbol="BTC/USD", state_dir=tmp,
                        warmup_bars=0) as runner:
            runner.start(data.iloc[:200])
            with_order, without = [], []
            for i in range(200, bars):
                before = runner.counts["orders"]
                t = time.perf_counter()
                runner.feed(data.iloc[i:i + 1], chunk=1)
                dt = (time.perf_counter() - t) * 1000
                (with_order if runner.counts["orders"] > before else without).append(dt)
        paper.close()
    med, p95 = statistics.median(with_order), float(np.percentile(with_order, 95))
    base = statistics.median(without)
    print(f"latency: closed candle -> order accepted on paper: median {med:.2f} ms, p95 {p95:.2f} ms over "
          f"{len(with_order)} orders (goal median <= 5 ms); a bar without an order {base:.2f} ms")
    return {"median_ms": med, "p95_ms": p95, "orders": len(with_order), "no_order_median_ms": base}


def synthetic(n: int, seed: int = 1) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    close = 30000 * np.exp(np.cumsum(rng.normal(0, 0.002, n)))
    open_ = np.concatenate([[close[0]], close[:-1]])
    high = np.maximum(open_, close) * (1 + rng.uniform(0, 0.001, n))
    low = np.minimum(open_, close) * (1 - rng.uniform(0, 0.001, n))
    idx = pd.date_range("2015-01-01", periods=n, freq="15min", tz="UTC")
    return pd.DataFrame({"Open": open_, "High": high, "Low": low, "Close": close, "Volume": 1.0}, index=idx)


def bench_rss(n: int) -> dict:
    data = synthetic(n)
    samples = []
    with tempfile.TemporaryDirectory() as tmp:
        paper = PaperExchange(None, symbol="BTC/USD").start()
        with LiveRunner(StrategySource(SMA_CROSS, {}, "SmaCross"), paper, symbol="BTC/USD", state_dir=tmp,
                        warmup_bars=0) as runner:
            runner.start(data.iloc[:1])
            child = runner.session._proc.pid
            step = 10_000
            for end in range(step, n + 1, step):
                runner.feed(data.iloc[:end])
                samples.append((end, rss_mb(), tree_rss_mb(child)))
    warm = [s for s in samples if s[0] >= 20_000]
    first, last = warm[0], warm[-1]
    total = [(p + c) for _, p, c in warm]
    growth = (total[-1] - total[0]) / total[0] * 100
    print(f"rss over {n:,} bars: runner {first[1]:.0f} -> {last[1]:.0f} MB, session {first[2]:.0f} -> "
          f"{last[2]:.0f} MB, growth after warm-up {growth:+.1f}% (goal <= 5%); trades {len(paper.trades())}")
    for end, p, c in samples:
        print(f"  {end:>7,} bars: runner {p:7.1f} MB, session {c:7.1f} MB")
    return {"growth_pct": growth, "samples": samples}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=["replay", "latency", "rss"])
    ap.add_argument("--rss-bars", type=int, default=200_000)
    a = ap.parse_args()
    silence_progress()
    os.environ.setdefault("MOONDEV_LAB_HOME", tempfile.mkdtemp(prefix="live_bench_"))
    btc = DataPool().get("BTC/USD", "15m")
    if a.only in (None, "replay"):
        bench_replay(btc)
    if a.only in (None, "latency"):
        bench_latency(btc)
    if a.only in (None, "rss"):
        bench_rss(a.rss_bars)


if __name__ == "__main__":
    main()
