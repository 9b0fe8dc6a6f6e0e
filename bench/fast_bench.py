"""Bench of moondev_lab.fast against backtesting.py, side by side in one run.

    .venv/bin/python bench/fast_bench.py [--skip-baselines] [--big 10000]

1. The 100-combination SMA-cross grid on the 31k bundled BTC bars:
   fast path cold compile (empty numba cache, fresh process), cached compile (fresh
   process, warm cache), warm (same process); backtesting.py's Backtest.optimize; our
   sandbox pool grid (SandboxPool.optimize). Same best parameters and stats checked.
2. A large grid (default 10,000 combinations): time and peak RSS (one equity buffer).
3. The physical limit: bars x combinations / s of the compiled loop alone.
4. ``--ideas N``: ideas/minute through the whole RBI loop (offline model), N ideas sampled with a
   fixed seed from strategy_ideas.csv: RBIConfig(grid_engine="auto") with confirm="kept" and
   confirm="all" (the fast runs confirmed in one batched sandbox task per idea), plot="saved" and
   plot="all", against today's loop, grid_engine="pool" (plot="all" as it ran, and plot="saved");
   same process, same sandbox pool, same ideas, one run each (only this part runs then; ``--runs`` picks
   sides). Each run prints the parent's and the sandbox's CPU seconds and the floor they set on this many
   cores; with confirm="kept", the runs it confirmed are then timed as plain ``Backtest.run`` in-process:
   backtesting.py's own share, the least a loop confirming them can spend. ``--start``/``--end`` set the
   data range (default Jan-Apr 2023, to keep today's loop short; the RBI loop's own default is the whole series).
5. vectorbt (bench-only extra: ``pip install -e '.[bench]'``), when it imports: the same 100-combination
   SMA grid with its ``Portfolio.from_signals`` in a fresh process with an empty numba cache (first
   compile) and again warm; skipped with a message when it is absent. Its fills follow its own
   rules (fractional size, no whole units), so only its best parameters and return are shown.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
IDEA = "Buy when the 10/30 SMA cross up, sell on the cross down"
GRID = {"fast_n": [5, 8, 10, 12, 15, 20, 25, 30, 40, 50], "slow_n": [60, 80, 100, 120, 150, 180, 200, 250, 300, 400]}


def load_btc():
    import pandas as pd

    df = pd.read_csv(ROOT / "data" / "BTC-USD-15m.csv")
    df.columns = [c.strip().capitalize() for c in df.columns]
    df.index = pd.to_datetime(df["Datetime"], utc=True)
    return df[["Open", "High", "Low", "Close", "Volume"]].astype(float)


def _child(mode: str) -> None:
    """One fresh process: import, grid once (compile or cache load), and once more warm."""
    t0 = time.perf_counter()
    from moondev_lab.fast import grid

    df = load_btc()
    t1 = time.perf_counter()
    g = grid(IDEA, GRID, data=df)
    t2 = time.perf_counter()
    g2 = grid(IDEA, GRID, data=df)
    t3 = time.perf_counter()
    print(json.dumps({"mode": mode, "import_s": t1 - t0, "first_s": t2 - t1, "warm_s": t3 - t2,
                      "best": g.best_params, "ret": float(g.best_stats["Return [%]"]),
                      "same": g2.best_params == g.best_params}))


def _vectorbt_child() -> None:
    """A fresh process: import vectorbt, the 100-combination grid once (compiles), then warm."""
    t0 = time.perf_counter()
    import numpy as np
    import pandas as pd
    import vectorbt as vbt

    from moondev_lab.sandbox.settings import BacktestSettings

    df = load_btc()
    t1 = time.perf_counter()
    settings = BacktestSettings()

    def run():
        # the offline model's SMA cross, long only: signal on a bar's close, market order at the next open
        fast_w = [f for f in GRID["fast_n"] for _ in GRID["slow_n"]]
        slow_w = [s for _ in GRID["fast_n"] for s in GRID["slow_n"]]
        fast = vbt.MA.run(df["Close"], GRID["fast_n"]).ma.to_numpy()  # each window once
        slow = vbt.MA.run(df["Close"], GRID["slow_n"]).ma.to_numpy()
        nf, ns = len(GRID["fast_n"]), len(GRID["slow_n"])
        f = np.repeat(fast, ns, axis=1)
        s_ = np.tile(slow, (1, nf))
        above = f > s_
        cross_up = np.zeros_like(above)
        cross_dn = np.zeros_like(above)
        cross_up[2:] = above[1:-1] & ~above[:-2]  # crossed on bar i-1's close, filled at bar i's open
        cross_dn[2:] = ~above[1:-1] & above[:-2] & ~np.isnan(s_[:-2])
        pf = vbt.Portfolio.from_signals(df["Close"], cross_up, cross_dn, price=df["Open"],
                                        size=0.95, size_type="percent", fees=settings.commission,
                                        init_cash=settings.cash, freq="15min")
        ret = np.asarray(pf.total_return()) * 100
        return ret, fast_w, slow_w

    ret, fast_w, slow_w = run()
    t2 = time.perf_counter()
    ret2, _, _ = run()
    t3 = time.perf_counter()
    best = int(np.nanargmax(ret))
    print(json.dumps({"import_s": t1 - t0, "first_s": t2 - t1, "warm_s": t3 - t2, "version": vbt.__version__,
                      "best": {"fast_n": fast_w[best], "slow_n": slow_w[best]}, "ret": float(ret[best]),
                      "same": bool(np.array_equal(ret, ret2, equal_nan=True)), "combos": len(ret),
                      "pandas": pd.__version__}))


def vectorbt_numbers() -> dict | None:
    """vectorbt's cold (empty numba cache) and warm grid times, or None (with a message) when it is absent."""
    import importlib.util

    if importlib.util.find_spec("vectorbt") is None:
        print("vectorbt: not installed, skipped (bench-only extra: pip install -e '.[bench]')")
        return None
    with tempfile.TemporaryDirectory() as cache:
        try:
            return fresh("vectorbt", cache)
        except subprocess.CalledProcessError as e:
            print(f"vectorbt: failed, skipped: {e.stderr.strip().splitlines()[-1] if e.stderr else e}")
            return None


def fresh(mode: str, cache: str) -> dict:
    env = {**os.environ, "NUMBA_CACHE_DIR": cache}
    out = subprocess.run([sys.executable, __file__, "--child", mode], env=env, capture_output=True, text=True,
                         check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


IDEAS_CSV = next((p for p in (ROOT.parent / "shared", ROOT.parents[1] / "shared") if p.is_dir()),
                 ROOT.parent / "shared") / "data" / "strategy_ideas.csv"  # a checkout or a worktree beside shared/


#: ``--runs`` names -> (grid engine, confirm, plot): "kept" confirms what the issue lists as shown; plot "saved"
#: draws plot.html for the saved ideas only (the rest on demand); "pool" is today's loop (the pool grid, every run
#: sandboxed) as it ran ("pool-all") and with the same chart option ("pool-saved")
RUNS = {"kept-saved": ("auto", "kept", "saved"), "all-saved": ("auto", "all", "saved"), "all-all": ("auto", "all", "all"),
        "pool-all": ("pool", "all", "all"), "pool-saved": ("pool", "all", "saved")}


def ideas_per_minute(n: int, start: str, end: str, seed: int, names: list[str] | None = None) -> None:
    """Both grid engines on the same sampled ideas, in a scratch MOONDEV_LAB_HOME; compile paid before timing."""
    import pandas as pd

    home = tempfile.mkdtemp(prefix="fast-bench-home-")
    os.environ["MOONDEV_LAB_HOME"] = home
    warnings.filterwarnings("ignore")
    import logging

    logging.disable(logging.WARNING)  # ideas the offline model cannot map log their failures
    from moondev_lab.fast import grid
    from moondev_lab.rbi import RBI, RBIConfig
    from moondev_lab.sandbox import SandboxPool

    ideas = pd.read_csv(IDEAS_CSV)["idea"].dropna().sample(n, random_state=seed).tolist()
    t = time.perf_counter()
    grid(IDEA, {"fast_n": [5, 10]}, start=start, end=end, confirm=False)  # numba compile or cache load
    for idea in ideas:  # each signal family's own kernel signatures, so no timed run compiles one
        try:
            grid(idea, start=start, end=end, confirm=False)
        except Exception:  # noqa: BLE001 - not understood, or not a fast-path strategy: nothing to compile
            pass
    print(f"compile (fresh home, once per install): {time.perf_counter() - t:.1f} s; "
          f"load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    from moondev_lab.models._outage import outage_reason

    outage_reason(None)  # its registry imports anthropic once per process: paid here, not by the first side timed
    rates, floors, cores = {}, {}, os.cpu_count() or 2
    runs = [RUNS[k] for k in (names or RUNS)]
    confirmed: list = []  # the backtesting.py runs confirm="kept" asks of the sandbox: timed in-process at the end
    with SandboxPool() as pool:
        for engine, confirm, plot in runs:
            label = (f"grid_engine={engine!r}" + (f", confirm={confirm!r}" if engine == "auto" else " (today's loop)")
                     + f", plot={plot!r}")
            cfg = RBIConfig(start=start, end=end, grid_engine=engine, confirm=confirm, plot=plot, force=True)
            tasks = pool.stats().tasks
            with RBI("offline", cfg, sandbox=pool) as rbi, _recording(pool, confirmed if confirm == "kept" else None):
                cpu0, t = _machine_cpu(), time.perf_counter()
                own0 = time.process_time()
                report = rbi.run_many(ideas, progress=False, force=True)
                dt = time.perf_counter() - t
                own = time.process_time() - own0
                box = _machine_cpu() - cpu0 - own
            results = list(report.results) if hasattr(report, "results") else list(report)
            engines = pd.Series([getattr(r, "grid_engine", None) for r in results]).value_counts(dropna=False)
            ok = sum(getattr(r, "status", None) == "ok" for r in results)
            saved = sum(bool(getattr(r, "saved", False)) for r in results)
            mismatches = sum(any("fast path mismatch" in f for f in (r.findings or [])) for r in results)
            rates[label] = n / dt * 60
            print(f"{label}: {n} ideas in {dt:.1f} s -> {rates[label]:.2f} ideas/min; {ok} ok ({saved} saved); grids "
                  f"by engine {engines.to_dict()}; {pool.stats().tasks - tasks} sandbox tasks; {mismatches} "
                  f"mismatches; load {os.getloadavg()[0]:.1f}")
            if box > 0:
                floors[label] = n / (box / cores) * 60
                print(f"  CPU: parent {own:.1f} s, sandbox (the machine less the parent) {box:.1f} s; floor on "
                      f"{cores} cores: sandbox alone {box / cores:.1f} s ({floors[label]:.0f} ideas/min), "
                      f"parent + sandbox {(own + box) / cores:.1f} s ({n / ((own + box) / cores) * 60:.0f} ideas/min)")
    for base_label in (k for k in rates if "today" in k):
        base = rates[base_label]
        for label, rate in rates.items():
            if "today" not in label:
                print(f"{label} is {rate / base:.2f}x the ideas/minute of {base_label}")
                if label in floors:  # the sandbox's backtesting.py runs alone, with a parent that cost nothing
                    print(f"  (its sandbox work alone allows at most {floors[label] / base:.2f}x)")
    if confirmed:
        cpu = _plain_backtests(confirmed)
        rate = n / (cpu / cores) * 60
        print(f"the {len(confirmed)} runs confirm='kept' confirmed, as plain Backtest.run in this process (no sandbox): "
              f"{cpu:.1f} CPU-s -> at most {rate:.0f} ideas/min on {cores} cores with nothing else to do"
              + "".join(f"; {rate / rates[k]:.2f}x {k}" for k in rates if "today" in k))


@contextlib.contextmanager
def _recording(pool, into: list | None):
    """Record ``(code, DataRef, params, settings)`` of every run ``pool`` is asked to confirm (``into`` None: nothing).

    The fast session's confirmations are the only batches the RBI loop sends (``SandboxPool.run_batch``), so
    this records exactly what was confirmed, on this one pool object.
    """
    if into is None:
        yield
        return
    real = pool.run_batch

    def run_batch(runs, **kwargs):
        into.extend((code, ref, params, kwargs.get("settings") or pool.settings) for code, ref, params in runs)
        return real(runs, **kwargs)

    pool.run_batch = run_batch
    try:
        yield
    finally:
        del pool.run_batch  # the class's method again


def _plain_backtests(runs: list) -> float:
    """CPU seconds of ``Backtest(frame, Strategy, **settings).run(**params)`` for each recorded run, in this process:
    backtesting.py's own work, the least any loop confirming those runs must spend."""
    from backtesting import Backtest

    from moondev_lab.sandbox._settle import data_frame
    from moondev_lab.sandbox.harness import find_strategy, silence_progress

    silence_progress()
    total = 0.0
    for code, ref, params, settings in runs:
        namespace = {"__name__": "bench_strategy"}
        exec(compile(code, "<strategy>", "exec"), namespace)
        bt = Backtest(data_frame(ref.resolved()), find_strategy(namespace, "bench_strategy"), **settings.kwargs())
        t = time.process_time()
        bt.run(**(params or {}))
        total += time.process_time() - t
    return total


def _machine_cpu() -> float:
    """The machine's busy CPU seconds so far (all cores, /proc/stat). The sandbox's share of a run is this
    less the parent's own: its template reaps workers with SIGCHLD ignored, so a worker that ends (recycled)
    takes its CPU seconds with it from every per-process count. Run the bench on a quiet machine."""
    import psutil

    t = psutil.cpu_times()
    return t.user + t.nice + t.system + t.irq + t.softirq


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child")
    ap.add_argument("--skip-baselines", action="store_true")
    ap.add_argument("--big", type=int, default=10_000)
    ap.add_argument("--vectorbt-only", action="store_true", help="only the fast path's fresh-process numbers and "
                    "vectorbt's, then stop")
    ap.add_argument("--ideas", type=int, default=0, help="only measure ideas/minute through RBI on N sampled ideas")
    ap.add_argument("--start", default="2023-01-01", help="the RBI part's data range")
    ap.add_argument("--end", default="2023-04-30")
    ap.add_argument("--seed", type=int, default=13)
    ap.add_argument("--runs", default=",".join(RUNS), help=f"with --ideas, which sides to run: any of {', '.join(RUNS)}")
    a = ap.parse_args()
    if a.child == "vectorbt":
        return _vectorbt_child()
    if a.child:
        return _child(a.child)
    if a.ideas:
        names = [r.strip() for r in a.runs.split(",") if r.strip()]
        unknown = [r for r in names if r not in RUNS]
        if unknown:
            ap.error(f"unknown --runs {', '.join(unknown)}; choose from {', '.join(RUNS)}")
        return ideas_per_minute(a.ideas, a.start, a.end, a.seed, names)
    warnings.filterwarnings("ignore")
    with tempfile.TemporaryDirectory() as cache:
        cold = fresh("cold", cache)
        cached = fresh("cached", cache)
    print(f"fast, fresh process, empty numba cache: first grid {cold['first_s']:.2f} s (import {cold['import_s']:.2f} s)")
    print(f"fast, fresh process, cached compile:    first grid {cached['first_s']:.2f} s (import {cached['import_s']:.2f} s)"
          f"  -> fresh process total {cached['import_s'] + cached['first_s']:.2f} s")
    print(f"fast, warm:                             {cached['warm_s']:.3f} s  best {cached['best']} "
          f"return {cached['ret']:.4f}%")
    warm = cached["warm_s"]
    vbt = vectorbt_numbers()
    if vbt is not None:
        print(f"vectorbt {vbt['version']}, fresh process, empty numba cache: first grid {vbt['first_s']:.2f} s "
              f"(import {vbt['import_s']:.2f} s); warm {vbt['warm_s']:.3f} s; best {vbt['best']} "
              f"return {vbt['ret']:.4f}% (its own fill rules)")
        print(f"  fast warm is {vbt['warm_s'] / warm:.1f}x faster than vectorbt warm; fast cold compile "
              f"{cold['first_s']:.1f} s vs vectorbt's {vbt['first_s']:.1f} s")
    if a.vectorbt_only:
        return

    from moondev_lab.fast import FastGrid, grid, plan_of

    df = load_btc()
    g = grid(IDEA, GRID, data=df)
    results = {"fast warm": warm}
    if not a.skip_baselines:
        from backtesting import Backtest

        from moondev_lab.sandbox.harness import stats_to_dict, trades_to_records
        from moondev_lab.fast import compare

        import importlib

        mod_dir = tempfile.mkdtemp()  # an importable module, so Backtest.optimize's processes can pickle the class
        Path(mod_dir, "bench_sma_strategy.py").write_text(g.code)
        sys.path.insert(0, mod_dir)
        cls = getattr(importlib.import_module("bench_sma_strategy"), plan_of(g.code).name)
        t = time.perf_counter()
        stats, heat = Backtest(df, cls, **g.settings).optimize(**g.params, maximize=g.maximize, return_heatmap=True)
        results["Backtest.optimize"] = time.perf_counter() - t
        same = compare(g.best_stats, stats_to_dict(stats), trades_to_records(stats["_trades"])) is None
        print(f"Backtest.optimize:                      {results['Backtest.optimize']:.2f} s  "
              f"same best/stats/trades: {same and heat.equals(g.heatmap)}")
        from moondev_lab.sandbox import DataRef, SandboxPool

        with SandboxPool() as pool:
            pool.run("from backtesting import Strategy\nclass S(Strategy):\n    def init(self): pass\n"
                     "    def next(self): pass\n", DataRef())  # warm the pool first
            t = time.perf_counter()
            out = pool.optimize(g.code, g.params, DataRef(), maximize=g.maximize, timeout=120, fast=False)
            results["sandbox pool grid"] = time.perf_counter() - t
        print(f"sandbox pool grid ({pool.size} workers):          {results['sandbox pool grid']:.2f} s  "
              f"same best: {dict(out.best_params) == g.best_params}")
        for k in ("Backtest.optimize", "sandbox pool grid"):
            print(f"  fast warm is {results[k] / warm:.1f}x faster than {k}")

    # the physical limit: the compiled loop alone, signals precomputed
    plan = plan_of(g.code)
    fg = FastGrid(plan, df)
    combos = [dict(zip(GRID, (f, s))) for f in GRID["fast_n"] for s in GRID["slow_n"]]
    for c in combos:
        fg.metrics(c)  # fills the indicator cache
    t = time.perf_counter()
    for c in combos:
        fg.metrics(c)
    per = (time.perf_counter() - t) / len(combos)
    print(f"per combination (cached indicators, signals + compiled loop): {per * 1e3:.2f} ms -> "
          f"{len(df) / per / 1e6:.1f} M bars x combinations / s")

    # a large grid: streaming, one equity buffer
    n_f = int(round(a.big ** 0.5))
    big = {"fast_n": list(range(2, 2 + n_f)), "slow_n": list(range(50, 50 + a.big // n_f))}
    rss0 = peak_rss_mib()
    t = time.perf_counter()
    gb = grid(IDEA, big, data=df)
    dt = time.perf_counter() - t
    print(f"{len(gb.heatmap)}-combination grid: {dt:.1f} s, peak RSS {peak_rss_mib():.0f} MiB "
          f"(before: {rss0:.0f} MiB; one curve is {len(df) * 8 / 2**20:.2f} MiB, all would be "
          f"{len(gb.heatmap) * len(df) * 8 / 2**30:.1f} GiB)")


if __name__ == "__main__":
    main()
