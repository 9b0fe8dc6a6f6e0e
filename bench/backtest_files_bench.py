"""60 strategy files through ONE ``moondev-lab backtest DIR`` call vs separate ``python file.py`` runs.

    .venv/bin/python bench/backtest_files_bench.py                 # 60 files; baseline on 12 of them
    .venv/bin/python bench/backtest_files_bench.py --baseline 60   # every file as its own process too
    .venv/bin/python bench/backtest_files_bench.py --optimize-combos 30   # a bigger own-optimize grid (0: skip it)

Half the files fail (syntax errors, a missing import, a NameError in the strategy), half are runnable
wild scripts that read the bundled CSV and call ``Backtest(...).run()`` themselves (in the sandbox
their CSV is redirected to the pooled data). Each script times its own ``bt.run()`` and prints it, so
for both sides "overhead" is the file's wall time minus the backtest itself:

* baseline: ``python file.py`` wall time minus the ``bt.run()`` time the script prints.
* project:  the ``seconds`` column of ``backtest DIR --json`` (per file, measured in the bulk runner)
            minus the ``bt.run()`` time the same script printed in its sandbox (its ``stdout`` in the
            row): the backtest timed the same way on both sides. The script's ``bt.run()`` there is the
            harness's recording ``Backtest``, so the recording's own cost counts as backtest on this row;
            the second row subtracts instead the same backtest timed here in-process with backtesting.py
            (warm, median of 3), which counts the recording, a fresh task child's first-run costs and
            the other files' contention for the 2 cores as overhead (stricter than the baseline's own).
            Also the whole call's wall time (pool start-up included) divided by the files.

Goals: a failing file <= 50 ms; a runnable file's overhead <= 50 ms above its backtest.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CSV = REPO / "data" / "BTC-USD-15m.csv"
START, END = "2023-05-01", "2023-06-01"
sys.path.insert(0, str(REPO / "tests"))
from strategies import sma_cross  # noqa: E402

# A wild script's own data loading and Backtest, as the runnable and optimizing files share it.
_SCRIPT = '''
import time
import pandas as pd
from backtesting import Backtest

df = pd.read_csv({csv!r}, parse_dates=["datetime"], index_col="datetime")
df.columns = [c.strip().capitalize() for c in df.columns]
df = df[["Open", "High", "Low", "Close", "Volume"]].loc["{start}":"{end}"]
bt = Backtest(df, SmaCross, cash=1_000_000, commission=0.001, finalize_trades=True)
t = time.perf_counter()
'''
_WILD = _SCRIPT + '''stats = bt.run(n1={n1}, n2={n2})
print("BT_SECONDS", time.perf_counter() - t)
'''
_FAILING = {
    "syntax": "from backtesting import Strategy\nclass Broken(Strategy)\n    pass\n",
    "import": "import backtesting\nimport no_such_indicator_lib\n",
    "name": sma_cross().replace("self.I(talib.SMA, self.data.Close, self.n1)", "self.I(undefined_fn, self.data.Close)")
    + _WILD.replace("n1={n1}, n2={n2}", ""),
}


def make_files(folder: Path, n: int) -> dict[str, str]:
    """``n`` files, half failing, half runnable; returns name -> kind."""
    kinds = {}
    for i in range(n):
        if i % 2:
            name, n1, n2 = f"run_{i:02d}.py", 5 + i % 7, 20 + i % 11
            (folder / name).write_text(sma_cross() + _WILD.format(csv=str(CSV), start=START, end=END, n1=n1, n2=n2))
            kinds[name] = "runnable"
        else:
            kind = list(_FAILING)[(i // 2) % len(_FAILING)]
            name = f"fail_{kind}_{i:02d}.py"
            code = _FAILING[kind]
            if kind == "name":
                code = code.format(csv=str(CSV), start=START, end=END)
            (folder / name).write_text(code)
            kinds[name] = "failing"
    return kinds


def backtest_seconds(files: list[Path]) -> dict[str, float]:
    """Each runnable file's ``bt.run()`` alone, here with backtesting.py on the same frame (median of 3)."""
    import re

    import backtesting.backtesting as btmod
    from backtesting import Backtest

    from moondev_lab.data import DataPool

    btmod._tqdm = lambda seq, **_: seq  # noqa: SLF001 - no progress bar in the timings
    frame = DataPool().get("BTC/USD", "15m", start=START, end=END)
    out = {}
    for f in files:
        text = f.read_text()
        namespace: dict = {}
        exec(text[: text.index("\nimport time")], namespace)  # the strategy class only
        n1, n2 = map(int, re.search(r"n1=(\d+), n2=(\d+)", text).groups())
        bt = Backtest(frame, namespace["SmaCross"], cash=1_000_000, commission=0.001, finalize_trades=True)
        times = []
        for _ in range(3):
            t = time.perf_counter()
            bt.run(n1=n1, n2=n2)
            times.append(time.perf_counter() - t)
        out[f.name] = statistics.median(times)
    return out


def project(folder: Path, env: dict) -> tuple[float, dict[str, float], dict[str, dict], dict[str, float]]:
    """Wall time of one ``backtest DIR --json`` call; each file's seconds, its stages (see run_one), and the
    ``bt.run()`` seconds each runnable script printed in its sandbox."""
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "moondev_lab.cli", "backtest", str(folder), "--start", START,
                          "--end", END, "--json", "--out", str(folder.parent / "out")],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=900)
    wall = time.perf_counter() - t
    rows = json.loads(out.stdout)
    own = {Path(r["file"]).name: _printed(r["stdout"] or "", "BT_SECONDS") for r in rows}
    return (wall, {Path(r["file"]).name: r["seconds"] for r in rows},
            {Path(r["file"]).name: r["stages"] for r in rows}, {k: v for k, v in own.items() if v is not None})


def _printed(stdout: str, label: str) -> float | None:
    """The seconds a script printed after ``label`` (None if it printed none)."""
    found = [float(line.split()[1]) for line in stdout.splitlines() if line.startswith(label)]
    return found[0] if found else None


#: A file's stages, as ``backtest --json`` reports them: read/extract/compile/settings in the parent, the
#: sandbox round trip, and inside it the worker's handling of the task (the standby child's sandbox, the data
#: mapped, the script's run, its reply), the trusted settlement; "rest" is the remainder.
STAGES = ("prepare", "round_trip", "worker", "transport", "settle", "rest")


def stage_medians(names: list[str], seconds: dict[str, float], stages: dict[str, dict]) -> dict[str, float]:
    """Median ms of each stage over ``names``; ``transport`` = round trip less the worker's own time."""
    rows = []
    for n in names:
        st = dict(stages[n])
        st.setdefault("round_trip", 0.0)
        st.setdefault("worker", 0.0)
        st.setdefault("settle", 0.0)
        st["transport"] = st["round_trip"] - st["worker"]
        st["rest"] = seconds[n] - st.get("prepare", 0.0) - st["round_trip"] - st["settle"]
        rows.append(st)
    return {k: statistics.median(r.get(k, 0.0) for r in rows) * 1000 if rows else float("nan") for k in STAGES}


def baseline(files: list[Path], env: dict) -> dict[str, tuple[float, float]]:
    """name -> (wall seconds of ``python file.py``, its bt.run() seconds or 0)."""
    out = {}
    for f in files:
        t = time.perf_counter()
        res = subprocess.run([sys.executable, str(f)], capture_output=True, text=True, env=env, timeout=300)
        wall = time.perf_counter() - t
        out[f.name] = (wall, _printed(res.stdout, "BT_SECONDS") or 0.0)
    return out


_OPTIMIZE = _SCRIPT + '''stats = bt.optimize(n1={n1}, n2={n2}, maximize={maximize})
print("OPT_SECONDS", time.perf_counter() - t, stats._strategy)
'''


def own_optimize(folder: Path, env: dict, combos: int) -> dict:
    """A script's own ``bt.optimize`` of ``combos`` combinations: spread over the pool, in one task, and
    ``python file.py`` (backtesting.py's own process pool); seconds each, and the best params each found."""
    from moondev_lab.backtest_files import backtest_files
    from moondev_lab.sandbox import DataRef, SandboxPool

    grid = {"n1": list(range(5, 5 + 5 * max(1, combos // 3), 5)), "n2": [30, 40, 50]}
    files = {}
    for name, maximize in (("spread", "'Return [%]'"), ("in_task", "lambda s: s['Return [%]']")):
        f = folder / f"optimize_{name}.py"  # a function as maximize cannot leave the sandbox: runs in its task
        f.write_text(sma_cross() + _OPTIMIZE.format(csv=str(CSV), start=START, end=END, maximize=maximize, **grid))
        files[name] = f
    out = {"combos": len(grid["n1"]) * len(grid["n2"])}
    ref = DataRef("BTC/USD", "15m", start=START, end=END)
    with SandboxPool() as pool:
        backtest_files([files["spread"]], ref, pool=pool, progress=False)  # warm the workers
        for name, f in files.items():
            t = time.perf_counter()
            (row,) = backtest_files([f], ref, pool=pool, progress=False, timeout=600).results
            out[name] = (time.perf_counter() - t, row.result.stats.get("_strategy") if row.ok else row.error)
        out["workers"] = pool.size
    t = time.perf_counter()
    res = subprocess.run([sys.executable, str(files["spread"])], capture_output=True, text=True, env=env, timeout=900)
    out["python"] = (time.perf_counter() - t, (res.stdout.strip().splitlines() or [res.stderr[-300:]])[-1])
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=60)
    ap.add_argument("--baseline", type=int, default=12, help="how many files also run as `python file.py`")
    ap.add_argument("--optimize-combos", type=int, default=12,
                    help="a script's own bt.optimize of about this many combinations (0: skip)")
    a = ap.parse_args()
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "MOONDEV_LAB_HOME": str(Path(tmp) / "home"), "PYTHONWARNINGS": "ignore"}
        os.environ["MOONDEV_LAB_HOME"] = env["MOONDEV_LAB_HOME"]
        folder = Path(tmp) / "strategies"
        folder.mkdir()
        kinds = make_files(folder, a.files)
        files = sorted(folder.iterdir())
        runnable = [f for f in files if kinds[f.name] == "runnable"]
        bt_alone = backtest_seconds(runnable)  # also imports the sample into the store, outside the timings
        # A fresh home compiles the trusted broker's numba kernels on first use (cached in the home after):
        # a one-time cost, timed apart so it does not blur the per-file numbers.
        warm = Path(tmp) / "warm"
        warm.mkdir()
        (warm / runnable[0].name).write_text(runnable[0].read_text())
        first_wall, _, _, _ = project(warm, env)
        wall, per_file, stages, own_bt = project(folder, env)
        failing = [f for f in files if kinds[f.name] == "failing"]
        sample = failing[: a.baseline // 2] + runnable[: a.baseline - a.baseline // 2]
        base = baseline(sample, env)
        opt = own_optimize(Path(tmp), env, a.optimize_combos) if a.optimize_combos > 0 else None

    def med(values):
        return statistics.median(values) * 1000 if values else float("nan")

    fail_p = med([s for n, s in per_file.items() if kinds[n] == "failing"])
    runnable_names = [n for n in per_file if kinds[n] == "runnable"]
    silent = [n for n in runnable_names if n not in own_bt]  # a runnable file that failed prints no time
    if silent:
        print(f"warning: {len(silent)} runnable files printed no bt.run() time (failed?): {silent[:3]}")
    over_p = med([per_file[n] - own_bt[n] for n in runnable_names if n in own_bt])
    over_p_here = med([per_file[n] - bt_alone[n] for n in runnable_names])
    fail_b = med([w for n, (w, _) in base.items() if kinds[n] == "failing"])
    over_b = med([w - b for n, (w, b) in base.items() if kinds[n] == "runnable"])
    bt_ms = med(list(bt_alone.values()))
    print(f"{a.files} files ({len(runnable)} runnable, {a.files - len(runnable)} failing), "
          f"{START}..{END} (15m bars); baseline on {len(sample)} of them")
    print(f"backtest itself, median: {med(list(own_bt.values())):.1f} ms as the scripts timed it in their sandboxes, "
          f"{med([b for n, (_, b) in base.items() if kinds[n] == 'runnable']):.1f} ms in `python file.py`, "
          f"{bt_ms:.1f} ms backtesting.py in-process here (warm)")
    print(f"first call in a fresh home (1 file, numba compiles the broker once): {first_wall:.1f} s")
    print(f"one `backtest DIR` call: {wall:.2f} s wall, {wall / a.files * 1000:.0f} ms per file amortised "
          "(pool start-up included)")
    print(f"{'':28}{'backtest DIR':>14}{'python file.py':>16}{'ratio':>8}   goal")
    print(f"{'failing file, median ms':28}{fail_p:>14.1f}{fail_b:>16.1f}{fail_b / fail_p:>7.1f}x   <= 50")
    print(f"{'runnable overhead, median ms':28}{over_p:>14.1f}{over_b:>16.1f}{over_b / over_p:>7.1f}x   <= 50")
    print(f"{'  - above in-process bt.run':28}{over_p_here:>14.1f}{'':>16}{over_b / over_p_here:>7.1f}x   "
          "(stricter: see the docstring)")
    by_kind = {k: med([s for n, s in per_file.items() if n.startswith(f"fail_{k}_")]) for k in _FAILING}
    print("failing files by kind, median ms (syntax errors never reach a sandbox): "
          + ", ".join(f"{k} {v:.1f}" for k, v in by_kind.items()))
    print("per-file stages, median ms (prepare: read/extract/compile in the parent; worker: the sandbox worker's "
          "whole task, its sandboxed run included; transport: the round trip less that; settle: the trusted "
          "broker's stats, trades, equity):")
    print(f"  {'':22}" + "".join(f"{k:>11}" for k in STAGES))
    groups = {"runnable": [n for n in per_file if kinds[n] == "runnable"],
              **{f"failing: {k}": [n for n in per_file if n.startswith(f"fail_{k}_")] for k in _FAILING}}
    for label, names in groups.items():
        med_stage = stage_medians(names, per_file, stages)
        print(f"  {label:22}" + "".join(f"{med_stage[k]:>11.1f}" for k in STAGES))
    if opt is not None:
        (spread, best), (in_task, best_in_task), (python, line) = opt["spread"], opt["in_task"], opt["python"]
        print(f"a script's own bt.optimize, {opt['combos']} combinations: spread over the pool of {opt['workers']} "
              f"{spread:.2f} s, in one task {in_task:.2f} s ({in_task / spread:.1f}x), `python file.py` "
              f"{python:.2f} s ({python / spread:.1f}x)")
        print(f"  best: spread {best}; in one task {best_in_task}; python: {line}")
    print(f"load average (1 min) at start / end: {load_start:.2f} / {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
