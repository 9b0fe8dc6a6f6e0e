"""Sandbox pool vs the usual ways, side by side: dispatch, stability, grids.

    .venv/bin/python bench/sandbox_bench.py            # full: 1,000-run stability
    .venv/bin/python bench/sandbox_bench.py --quick    # 200-run stability, fewer repeats

* dispatch:  one small backtest through the warm pool vs a cold ``python strategy.py``
             subprocess that reads the CSV and runs ``Backtest`` (goal >= 20x).
* layers:    the same dispatch with each sandbox layer (namespaces, Landlock, seccomp) off in turn:
             the cost of each layer, and all of them on vs the cold process (goal >= 20x).
* stability: RSS of the parent and of the pool over N backtests (goal <= 5% growth after warm-up).
* grids:     a 100-combination SMA-cross grid on the 31k-bar BTC data, ``SandboxPool.optimize``
             vs ``Backtest.optimize``; identical best params and stats; goals: >= same speed,
             <= 0.7x peak PSS of the whole process tree (each side runs in its own fresh
             process, sampled from /proc/PID/smaps_rollup every 20 ms).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
CSV = REPO / "data" / "BTC-USD-15m.csv"

sys.path.insert(0, str(REPO / "tests"))
from strategies import SMA_CROSS  # noqa: E402 - the sample strategy the tests use too
COLD_SCRIPT = SMA_CROSS + '''
import pandas as pd
from backtesting import Backtest
data = pd.read_csv({csv!r})
data.columns = data.columns.str.strip().str.lower()
data = data.drop(columns=[c for c in data.columns if 'unnamed' in c])
data = data.rename(columns={{'open': 'Open', 'high': 'High', 'low': 'Low', 'close': 'Close', 'volume': 'Volume'}})
data['datetime'] = pd.to_datetime(data['datetime'], utc=True)
data = data.set_index('datetime').loc['2023-03-01':'2023-03-02']
print(Backtest(data, SmaCross, cash=1_000_000, commission=0.001, finalize_trades=True).run()['Return [%]'])
'''
GRID = {"n1": list(range(5, 55, 5)), "n2": list(range(60, 160, 10))}  # 10 x 10 = 100 combinations


def _pss_tree_mb(pid: int) -> float:
    try:
        procs = [psutil.Process(pid)] + psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return 0.0
    total = 0
    for p in procs:
        try:
            with open(f"/proc/{p.pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            pass
    return total / 1024


def _rss_mb(pids) -> float:
    total = 0
    for pid in pids:
        try:
            total += psutil.Process(pid).memory_info().rss
        except psutil.Error:
            pass
    return total / 2**20


# ------------------------------------------------------------------------- dispatch
def bench_dispatch(home: str, repeats: int) -> dict:
    from moondev_lab.sandbox import DataRef, SandboxPool

    ref = DataRef(start="2023-03-01", end="2023-03-02", root=str(Path(home) / "store"))
    with SandboxPool(2) as pool:
        pool.run(SMA_CROSS, ref)  # start the template and a worker
        warm, timings = [], []
        for _ in range(repeats * 4):
            t = time.perf_counter()
            res = pool.run(SMA_CROSS, ref)
            warm.append(time.perf_counter() - t)
            assert res.ok, res.error
            timings.append(res.timings)
    with tempfile.TemporaryDirectory() as d:
        script = Path(d) / "strategy.py"
        script.write_text(COLD_SCRIPT.format(csv=str(CSV)))
        cold = []
        for _ in range(repeats):
            t = time.perf_counter()
            out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True)
            cold.append(time.perf_counter() - t)
    warm_s, cold_s = statistics.median(warm), statistics.median(cold)
    print(f"\n== dispatch: one backtest of 193 bars (median) ==")
    print(f"  warm pool      {warm_s * 1000:8.1f} ms  (min {min(warm) * 1000:.1f}, max {max(warm) * 1000:.1f}, n={len(warm)})")
    print(f"  cold process   {cold_s * 1000:8.1f} ms  (min {min(cold) * 1000:.1f}, max {max(cold) * 1000:.1f}, n={len(cold)})")
    print(f"  ratio          {cold_s / warm_s:8.1f}x faster   (goal >= 20x)   [cold stdout: {out.stdout.strip()}]")
    split = {k: statistics.median(t[k] for t in timings) * 1000 for k in ("round_trip_s", "settle_ahead_s", "settle_s")}
    ahead = sum(bool(t["settled_ahead"]) for t in timings)
    print(f"  where it goes  round trip {split['round_trip_s']:.1f} ms (of which the trusted settlement made while the "
          f"task child computes its claims: {split['settle_ahead_s']:.1f}), then settlement {split['settle_s']:.1f} ms "
          f"(medians; settled ahead: {ahead}/{len(timings)})   load {os.getloadavg()[0]:.1f}")
    return {"warm_ms": warm_s * 1000, "cold_ms": cold_s * 1000, "ratio": cold_s / warm_s, "split_ms": split}


# --------------------------------------------------------------------------- layers
LAYER_CONFIGS = {"all layers": "", "no seccomp": "seccomp", "no Landlock": "landlock",
                 "no namespaces": "userns", "none of the three": "userns,landlock,seccomp"}


def bench_layers(home: str, runs: int) -> dict:
    """Dispatch latency with each sandbox layer switched off in turn (MOONDEV_LAB_SANDBOX_DISABLE),
    and the cold ``python strategy.py`` baseline, in one run. One pool per configuration, all alive
    at once, their runs interleaved."""
    from moondev_lab.sandbox import DataRef, SandboxPool

    ref = DataRef(start="2023-03-01", end="2023-03-02", root=str(Path(home) / "store"))
    times: dict[str, list] = {label: [] for label in LAYER_CONFIGS}
    pools = {}
    with warnings.catch_warnings(), contextlib.ExitStack() as stack:
        warnings.simplefilter("ignore")  # the degraded configurations warn, by design
        for label, disabled in LAYER_CONFIGS.items():
            os.environ["MOONDEV_LAB_SANDBOX_DISABLE"] = disabled  # read when the pool starts
            pools[label] = stack.enter_context(SandboxPool(2))
            pools[label].run(SMA_CROSS, ref)
        os.environ.pop("MOONDEV_LAB_SANDBOX_DISABLE", None)
        # Interleaved in blocks of 5 sequential runs, so that the machine's load drifts over every
        # configuration alike (one configuration after the other measured the drift, not the layers).
        block = 5
        for _ in range(max(1, runs // block)):
            for label, pool in pools.items():
                for _ in range(block):
                    t = time.perf_counter()
                    res = pool.run(SMA_CROSS, ref)
                    times[label].append(time.perf_counter() - t)
                    assert res.ok, res.error
    medians = {label: statistics.median(v) for label, v in times.items()}
    with tempfile.TemporaryDirectory() as d:
        script = Path(d) / "strategy.py"
        script.write_text(COLD_SCRIPT.format(csv=str(CSV)))
        cold = []
        for _ in range(max(3, runs // 5)):
            t = time.perf_counter()
            subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True)
            cold.append(time.perf_counter() - t)
    cold_s = statistics.median(cold)
    full = medians["all layers"]
    print(f"\n== sandbox layers: dispatch of one 193-bar backtest (median of {runs}) ==")
    for label, m in medians.items():
        cost = "" if label == "all layers" else f"   layer cost {(full - m) * 1000:+6.2f} ms"
        print(f"  {label:<18} {m * 1000:7.1f} ms   {cold_s / m:5.1f}x faster than cold{cost}")
    print(f"  cold process       {cold_s * 1000:7.1f} ms   (goal: all layers >= 20x faster: {cold_s / full:.1f}x)"
          f"   load {os.getloadavg()[0]:.1f}")
    return {"medians_ms": {k: v * 1000 for k, v in medians.items()}, "cold_ms": cold_s * 1000,
            "ratio_all_layers": cold_s / full}


def _timed_in_child(step) -> float:
    """Run ``step`` in a fresh fork (layers are one-way) and return its wall time in seconds."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            t = time.perf_counter()
            step(w)
            os.write(w, repr(time.perf_counter() - t).encode())
        finally:
            os._exit(0)
    os.close(w)
    out = os.read(r, 64)
    os.close(r)
    os.waitpid(pid, 0)
    return float(out) if out else float("nan")


def bench_layer_steps(repeats: int) -> dict:
    """Each layer's own set-up cost, timed alone in a fresh fork (no scheduler noise from a pool)."""
    import ctypes

    from moondev_lab.sandbox import _isolation, _landlock, _limits, _seccomp

    libc = ctypes.CDLL(None)
    caps = _isolation.probe()
    plan = _isolation.MountPlan.for_host()
    read_dirs = _isolation.python_dirs()
    uid = _limits.BASE_UID + os.getpid() if os.geteuid() == 0 else None

    def namespaces(_w):  # at standby time, before the task exists
        if uid is not None:
            _limits.expose_python_install()
            _isolation.drop_uid(uid)
        _isolation.enter_namespaces(plan, 256)

    def landlock(_w):  # on the task's critical path
        libc.prctl(38, 1, 0, 0, 0)
        rules = _landlock.Ruleset(caps.landlock_abi)
        for d in read_dirs:
            rules.allow(d, _landlock.READ_EXEC)
        for d in _isolation.SYSTEM_READ:
            rules.allow(d, _landlock.READ)
        rules.allow("/tmp", _landlock.READ_WRITE)
        rules.restrict()

    def seccomp_build(_w):  # at standby time: rules + the compiled BPF program
        _seccomp.Filter(notify=caps.seccomp_notify).release()

    def seccomp_load(_w):  # on the task's critical path: one seccomp(2) call of the precompiled program
        fd = prebuilt.load()
        if fd is not None:
            os.close(fd)

    def blank_fds(w):
        _limits._blank_other_fds({0, 1, 2, w})

    steps = {"namespaces + mounts (standby, off the critical path)": namespaces,
             "Landlock ruleset + restrict (per task)": landlock,
             "seccomp filter build + compile (standby, off the critical path)": seccomp_build,
             "seccomp filter load (per task)": seccomp_load,
             "descriptor sweep (per task)": blank_fds}
    out = {}
    print(f"\n== sandbox layers: set-up cost of each, alone in a fresh fork (median of {repeats}) ==")
    for label, step in steps.items():
        samples = []
        for _ in range(repeats):
            prebuilt = _seccomp.Filter(notify=caps.seccomp_notify)  # built before the fork, as the standby does
            samples.append(_timed_in_child(step))
            prebuilt.release()
        out[label] = statistics.median(samples) * 1000
        print(f"  {label:<55} {out[label]:7.2f} ms")
    return out


# ------------------------------------------------------------------------ stability
def bench_stability(home: str, n: int) -> dict:
    from moondev_lab.sandbox import DataRef, SandboxPool

    code = "from backtesting import Strategy\nclass Hold(Strategy):\n    def init(self): pass\n" \
           "    def next(self):\n        if not self.position: self.buy()\n"
    ref = DataRef(start="2023-03-01", end="2023-03-02", root=str(Path(home) / "store"))
    me = os.getpid()
    samples = []
    t0 = time.perf_counter()
    with SandboxPool(2) as pool:
        done = 0
        batch = 50
        while done < n:
            results = list(pool.map([code] * batch, ref))
            assert all(r.ok for r in results), [r.error for r in results if not r.ok][:1]
            done += batch
            samples.append((done, _rss_mb([me]), _rss_mb(pool.pids()), _pss_tree_mb(me)))
        recycles = pool.stats().recycles
    elapsed = time.perf_counter() - t0
    warm_i = max(0, len(samples) // 10 - 1)  # after the first 10% of runs
    _, p0, w0, t0_ = samples[warm_i]
    _, p1, w1, t1 = samples[-1]
    print(f"\n== stability: {n} backtests, 2 workers, {elapsed:.1f} s ({n / elapsed:.0f} runs/s), {recycles} recycles ==")
    print(f"  parent RSS     {p0:7.1f} -> {p1:7.1f} MiB  growth {100 * (p1 - p0) / p0:+.2f}%  (after {samples[warm_i][0]} runs)")
    print(f"  pool RSS       {w0:7.1f} -> {w1:7.1f} MiB  growth {100 * (w1 - w0) / w0:+.2f}%  (template + workers)")
    print(f"  tree PSS       {t0_:7.1f} -> {t1:7.1f} MiB  growth {100 * (t1 - t0_) / t0_:+.2f}%")
    print(f"  max pool RSS over the run {max(s[2] for s in samples[warm_i:]):.1f} MiB   (goal <= 5% growth)")
    return {"parent_growth_pct": 100 * (p1 - p0) / p0, "pool_growth_pct": 100 * (w1 - w0) / w0}


# ---------------------------------------------------------------------------- grids
def _grid_side(side: str, home: str) -> None:
    """Runs in a fresh process; prints one JSON line."""
    warnings.simplefilter("ignore")
    store = str(Path(home) / "store")
    if side == "pool":
        from moondev_lab.sandbox import DataRef, SandboxPool

        t_start = time.perf_counter()
        with SandboxPool(2) as pool:
            pool.run(SMA_CROSS, DataRef(start="2023-03-01", end="2023-03-02", root=store))  # warm
            t = time.perf_counter()
            res = pool.optimize(SMA_CROSS, GRID, DataRef(root=store), maximize="Return [%]")
            elapsed = time.perf_counter() - t
            assert res.result.ok and not res.errors, (res.result.error, res.errors)
            stats = res.stats
        total = time.perf_counter() - t_start
    else:
        from backtesting import Backtest

        from moondev_lab.data import DataPool
        from moondev_lab.sandbox.harness import BacktestSettings, silence_progress, stats_to_dict

        silence_progress()
        d = tempfile.mkdtemp()
        (Path(d) / "sma_cross_bench.py").write_text(SMA_CROSS)
        spec = importlib.util.spec_from_file_location("sma_cross_bench", Path(d) / "sma_cross_bench.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules["sma_cross_bench"] = mod
        spec.loader.exec_module(mod)
        frame = DataPool(store).get("BTC/USD", "15m")
        t_start = t = time.perf_counter()
        bt = Backtest(frame, mod.SmaCross, **BacktestSettings().kwargs())
        stats = stats_to_dict(bt.optimize(**GRID, maximize="Return [%]"))
        elapsed = total = time.perf_counter() - t
    print(json.dumps({"elapsed": elapsed, "total": total, "stats": stats}))


def bench_grids(home: str) -> dict:
    out = {}
    for side in ("baseline", "pool"):
        env = dict(os.environ, MOONDEV_LAB_HOME=home)
        proc = subprocess.Popen([sys.executable, __file__, "--_grid-side", side, "--home", home],
                                stdout=subprocess.PIPE, text=True, env=env)
        peak = 0.0
        sampler_done = threading.Event()

        def sample():
            nonlocal peak
            while not sampler_done.is_set():
                peak = max(peak, _pss_tree_mb(proc.pid))
                time.sleep(0.02)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        stdout, _ = proc.communicate()
        sampler_done.set()
        th.join()
        if proc.returncode != 0:
            raise SystemExit(f"grid side {side} failed")
        out[side] = {**json.loads(stdout.strip().splitlines()[-1]), "peak_pss_mb": peak}
    a, b = out["baseline"], out["pool"]
    same_params = a["stats"]["_strategy"] == b["stats"]["_strategy"]
    diffs = [k for k, v in a["stats"].items()
             if not (v == b["stats"].get(k) or (isinstance(v, float) and math.isnan(v) and math.isnan(b["stats"][k])))]
    print(f"\n== grids: {len(GRID['n1']) * len(GRID['n2'])} SMA-cross combinations on 31,066 bars, 2 processes each ==")
    print(f"  Backtest.optimize   {a['elapsed']:6.2f} s   peak tree PSS {a['peak_pss_mb']:7.1f} MiB")
    print(f"  SandboxPool.optimize{b['elapsed']:6.2f} s   peak tree PSS {b['peak_pss_mb']:7.1f} MiB"
          f"   ({b['total']:.2f} s including pool start)")
    print(f"  speed ratio         {a['elapsed'] / b['elapsed']:6.2f}x   (goal >= 1.0x)")
    print(f"  memory ratio        {b['peak_pss_mb'] / a['peak_pss_mb']:6.2f}x   (goal <= 0.7x)")
    print(f"  best params         {b['stats']['_strategy']} vs {a['stats']['_strategy']}   same: {same_params}")
    print(f"  stats identical     {not diffs}  ({len(a['stats'])} fields{'; differ: ' + ', '.join(diffs) if diffs else ''})")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="200 stability runs and fewer dispatch repeats")
    ap.add_argument("--only", choices=["dispatch", "layers", "stability", "grids"])
    ap.add_argument("--_grid-side", dest="grid_side", help=argparse.SUPPRESS)
    ap.add_argument("--home", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.grid_side:
        _grid_side(args.grid_side, args.home)
        return
    with tempfile.TemporaryDirectory(prefix="sandbox_bench_") as home:
        os.environ["MOONDEV_LAB_HOME"] = home
        from moondev_lab.data import DataPool

        DataPool(Path(home) / "store").get("BTC/USD", "15m")  # import the bundled sample once
        print(f"sandbox bench: {os.cpu_count()} CPUs, python {sys.version.split()[0]}")
        if args.only in (None, "dispatch"):
            bench_dispatch(home, 5 if args.quick else 10)
        if args.only in (None, "layers"):
            bench_layer_steps(10 if args.quick else 30)
            bench_layers(home, 20 if args.quick else 40)
        if args.only in (None, "stability"):
            bench_stability(home, 200 if args.quick else 1000)
        if args.only in (None, "grids"):
            bench_grids(home)


if __name__ == "__main__":
    main()
