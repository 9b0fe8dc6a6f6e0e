"""Batches of ideas on Dask vs the ways there are today, side by side.

    .venv/bin/python bench/batch_bench.py                      # 200 sampled ideas for throughput
    .venv/bin/python bench/batch_bench.py --throughput 40      # a smaller sample when time is short

* overhead:   per-idea wall time of the direct mode (RBI loop on the worker) vs the notebook
              mode (a papermill kernel per idea running the same loop), 1 worker, same ideas.
* scaling:    8 understood ideas with ``--workers 1`` vs ``--workers 2`` (goal >= 1.8x).
* memory:     the batch's peak PSS growth (whole process tree: client, scheduler, workers,
              sandboxes; /proc/PID/smaps_rollup every 100 ms) vs the sum of the ideas' own peaks
              (what the leaderboard's peak_mib says each idea added), on the full 31k-bar series.
* throughput: ideas/min on N ideas sampled from strategy_ideas.csv, ``moondev-lab batch`` (LocalCluster
              sized by default) vs ``moondev-lab rbi --ideas`` (run_rbi on one machine's threads).

Every side uses the same short RBI settings (one month of data, no grid, no optimize loop,
no quarters) except the memory part, so the loop itself is cheap and the batch machinery shows.
Each side runs in its own fresh process with its own MOONDEV_LAB_HOME.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
IDEAS_CSV = next((p for p in (REPO.parent / "shared", REPO.parents[1] / "shared") if p.is_dir()),
                 REPO.parent / "shared") / "data" / "strategy_ideas.csv"
NOTEBOOK = REPO / "tests" / "notebooks" / "batch_idea.ipynb"
SHORT = ["--model", "offline", "--start", "2023-03-01", "--end", "2023-03-31", "--no-grid", "--no-quarters",
         "--max-optimize", "0"]
GOOD = ["20/50 SMA crossover, long only", "Buy when RSI(14) < 30, sell when RSI > 70",
        "Bollinger band (20, 2) mean reversion: buy at the lower band, exit at the middle band",
        "MACD signal line cross with a 1.5 ATR stop", "20-bar Donchian breakout",
        "10/30 EMA crossover", "Buy when RSI(7) < 25, sell when RSI > 75", "50/200 SMA golden cross"]


def pss_tree(root: int) -> int:
    import psutil

    total = 0
    try:
        procs = [psutil.Process(root), *psutil.Process(root).children(recursive=True)]
    except psutil.Error:
        return 0
    for p in procs:
        try:
            for line in Path(f"/proc/{p.pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
                    break
        except OSError:
            continue
    return total


def run(cmd: list[str], home: Path, sample_pss: bool = False) -> tuple[float, dict | None, int]:
    """Run one side in a fresh process; wall seconds, its --json output, and its peak tree PSS growth."""
    env = {**os.environ, "MOONDEV_LAB_HOME": str(home)}
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    peak, base, stop = [0], [None], threading.Event()

    def sampler() -> None:
        while not stop.wait(0.1):
            v = pss_tree(p.pid)
            base[0] = v if base[0] is None else min(base[0], v)
            peak[0] = max(peak[0], v)

    t = threading.Thread(target=sampler, daemon=True)
    if sample_pss:
        t.start()
    out, _ = p.communicate()
    stop.set()
    wall = time.perf_counter() - t0
    try:
        data = json.loads(out)
    except ValueError:
        data = None
    return wall, data, peak[0]


def batch_cmd(ideas: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "moondev_lab.cli", "batch", str(ideas), "--out", str(out), "--json", *extra]


def per_idea_wall(data: dict) -> float:
    walls = [r["wall_s"] for r in data["rows"]]
    return sum(walls) / len(walls)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--throughput", type=int, default=200, help="ideas sampled for the throughput part")
    ap.add_argument("--skip", nargs="*", default=[], choices=["overhead", "scaling", "memory", "throughput"])
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="batch-bench-"))
    report: dict = {}

    def ideas_file(name: str, ideas: list[str]) -> Path:
        f = tmp / f"{name}.txt"
        f.write_text("\n".join(ideas))
        return f

    if "overhead" not in a.skip:
        f = ideas_file("overhead", GOOD[:4])
        _, direct, _ = run(batch_cmd(f, tmp / "o-direct", "--workers", "1", *SHORT), tmp / "h-o1")
        _, nb, _ = run(batch_cmd(f, tmp / "o-nb", "--workers", "1", "--notebook", str(NOTEBOOK), *SHORT,
                                 "-p", "start", "2023-03-01", "-p", "end", "2023-03-31"), tmp / "h-o2")
        d, n = per_idea_wall(direct), per_idea_wall(nb)
        report["overhead"] = {"direct_s_per_idea": round(d, 2), "notebook_s_per_idea": round(n, 2),
                              "notebook_extra_s": round(n - d, 2), "ratio": round(n / d, 2),
                              "ok": [direct["totals"]["ok"], nb["totals"]["ok"]]}
        print("overhead", report["overhead"], flush=True)

    if "scaling" not in a.skip:
        f = ideas_file("scaling", GOOD)
        w1, one, _ = run(batch_cmd(f, tmp / "s1", "--workers", "1", *SHORT), tmp / "h-s1")
        w2, two, _ = run(batch_cmd(f, tmp / "s2", "--workers", "2", *SHORT), tmp / "h-s2")
        e1, e2 = one["totals"]["elapsed_s"], two["totals"]["elapsed_s"]
        report["scaling"] = {"serial_s": round(e1, 1), "workers2_s": round(e2, 1), "speedup": round(e1 / e2, 2),
                             "with_startup": {"serial_s": round(w1, 1), "workers2_s": round(w2, 1),
                                              "speedup": round(w1 / w2, 2)},
                             "ok": [one["totals"]["ok"], two["totals"]["ok"]]}
        print("scaling", report["scaling"], flush=True)

    if "memory" not in a.skip:
        f = ideas_file("memory", GOOD[:4])
        full = ["--model", "offline", "--no-grid", "--no-quarters", "--max-optimize", "0"]
        _, mem, peak = run(batch_cmd(f, tmp / "m", "--workers", "2", *full), tmp / "h-m", sample_pss=True)
        sum_ideas = sum((r["peak_mib"] or 0) for r in mem["rows"])
        report["memory"] = {"batch_tree_peak_pss_mib": round(peak / 2**20, 1),
                            "sum_of_idea_peaks_mib": round(sum_ideas, 1),
                            "idea_peaks_mib": [r["peak_mib"] for r in mem["rows"]], "ok": mem["totals"]["ok"]}
        print("memory", report["memory"], flush=True)

    if "throughput" not in a.skip:
        import pandas as pd

        sample = pd.read_csv(IDEAS_CSV)["idea"].dropna().drop_duplicates().sample(a.throughput, random_state=7)
        f = ideas_file("throughput", list(sample))
        wb, b, _ = run(batch_cmd(f, tmp / "t", *SHORT), tmp / "h-t1")
        # Today's command: `moondev-lab rbi --ideas` is run_rbi on one machine's thread pool. It has no
        # --start/--end/--no-grid/--no-quarters, so the same short settings go through its code path directly.
        rbi = [sys.executable, "-c",
               "import sys, json; from moondev_lab import run_rbi; from moondev_lab.rbi import RBIConfig; "
               "from moondev_lab.cli import read_ideas; "
               "r = run_rbi(read_ideas(sys.argv[1]), model='offline', progress=False, cfg=RBIConfig("
               "start='2023-03-01', end='2023-03-31', grid=False, quarters=False, max_optimize=0)); "
               "print(json.dumps({'ok': sum(x.status == 'ok' for x in r.results), 'n': len(r.results)}))", str(f)]
        wr, r, _ = run(rbi, tmp / "h-t2")
        report["throughput"] = {"ideas": a.throughput, "batch_ideas_per_min": round(a.throughput / wb * 60, 1),
                                "rbi_ideas_per_min": round(a.throughput / wr * 60, 1), "ratio": round(wr / wb, 2),
                                "batch_s": round(wb, 1), "rbi_s": round(wr, 1),
                                "ok": [b["totals"]["ok"], r["ok"]], "batch_workers": b["totals"]["cluster"]["workers"]}
        print("throughput", report["throughput"], flush=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
