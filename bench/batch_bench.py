"""Batches of ideas on Dask vs the ways there are today, side by side.

    .venv/bin/python bench/batch_bench.py                       # all four parts, 200 sampled ideas
    .venv/bin/python bench/batch_bench.py --throughput 40       # a smaller sample when time is short
    .venv/bin/python bench/batch_bench.py --only scaling --repeat 3

* overhead:   per-idea wall time of the direct mode (RBI loop on the worker) vs the notebook
              mode (a papermill kernel per idea running the same loop), 1 worker, same ideas.
* scaling:    the issue's comparison: 8 understood ideas serially (``--workers 1``) vs
              ``--workers 2`` (goal >= 1.8x). The ratio is of the batch loop (first submit to last
              result); cluster start-up, which now includes warming each worker up (its sandbox
              pool, imports, compiled broker; all workers at once), is excluded as the issue's
              bench excludes it, and is printed beside it with the whole command's ratio, and
              each side's loop CPU (its CPU less the same command's on one idea refused at once),
              and the CPUs this session could use before and after (two busy loops side by side).
* memory:     the peak PSS of the whole batch (every process of its tree: client, scheduler,
              workers, sandboxes; /proc/PID/smaps_rollup every 100 ms) vs the sum of the ideas'
              own peaks, each measured the same way with that idea alone in a batch; plus the
              store file's mapping summed over the tree as RSS (every process counts its pages)
              and as PSS (shared pages split between the processes that map them).
* throughput: ideas/min on N ideas sampled from strategy_ideas.csv (seed 7): ``moondev-lab batch``
              (LocalCluster sized by default) vs ``moondev-lab rbi --ideas``'s code path (run_rbi
              on one machine's threads), both whole commands from a fresh process.

Every side is a fresh process with its own MOONDEV_LAB_HOME and the same short RBI settings (one
month of data, no grid, no optimize loop, no quarters; the memory part uses all 31k bars). numba's
compiled broker is paid once per install, so every side shares one cache compiled before any side
is timed (``--cold-numba``: each side compiles its own, as a first run after installing would).
Each side's CPU seconds (the cgroup-v1 cpuacct of its whole tree, where writable) and the load
average before it are printed too: on a shared machine the CPU seconds are the stable figure.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's moondev_lab, also when run from elsewhere
IDEAS_CSV = next((p for p in (REPO.parent / "shared", REPO.parents[1] / "shared") if p.is_dir()),
                 REPO.parent / "shared") / "data" / "strategy_ideas.csv"
NOTEBOOK = REPO / "tests" / "notebooks" / "batch_idea.ipynb"
SHORT = ["--model", "offline", "--start", "2023-03-01", "--end", "2023-03-31", "--no-grid", "--no-quarters",
         "--max-optimize", "0"]
FULL = ["--model", "offline", "--no-grid", "--no-quarters", "--max-optimize", "0"]
GOOD = ["20/50 SMA crossover, long only", "Buy when RSI(14) < 30, sell when RSI > 70",
        "Bollinger band (20, 2) mean reversion: buy at the lower band, exit at the middle band",
        "MACD signal line cross with a 1.5 ATR stop", "20-bar Donchian breakout",
        "10/30 EMA crossover", "Buy when RSI(7) < 25, sell when RSI > 75", "50/200 SMA golden cross"]
PARTS = ["overhead", "scaling", "memory", "throughput"]
CPUACCT = Path("/sys/fs/cgroup/cpuacct")


def tree(root: int) -> list[int]:
    """``root`` and every process below it (whichever thread forked them)."""
    from moondev_lab._batch_memory import descendants

    return [root, *descendants(root)]


def pss_tree(root: int) -> int:
    total = 0
    for pid in tree(root):
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
                    break
        except OSError:
            continue
    return total


def store_mapping(root: int) -> tuple[int, int, int]:
    """(RSS, PSS, processes) of the store's data files (``*.arrow``) mapped anywhere in the tree."""
    rss = pss = procs = 0
    for pid in tree(root):
        try:
            text = Path(f"/proc/{pid}/smaps").read_text()
        except OSError:
            continue
        inside, mapped = False, False
        for line in text.splitlines():
            head = line.split(None, 1)[0]
            if "-" in head and not head.endswith(":"):  # a mapping's header line: "addr-addr perms ... path"
                inside = line.rstrip().endswith(".arrow")
                mapped |= inside
            elif inside and head == "Rss:":
                rss += int(line.split()[1]) * 1024
            elif inside and head == "Pss:":
                pss += int(line.split()[1]) * 1024
        procs += mapped
    return rss, pss, procs


class CPUMeter:
    """CPU seconds of one command's whole process tree, from a cgroup-v1 cpuacct group (None where not writable)."""

    def __init__(self, name: str):
        self.path = CPUACCT / f"moondev-batch-bench-{os.getpid()}-{name}"
        try:
            self.path.mkdir()
        except OSError:
            self.path = None

    def join(self) -> None:  # runs in the child between fork and exec
        if self.path is not None:
            (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def seconds(self) -> float | None:
        return None if self.path is None else int((self.path / "cpuacct.usage").read_text()) / 1e9

    def close(self) -> None:
        if self.path is None:
            return
        for _ in range(50):  # sandbox processes may take a moment to go
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.2)


class Side:
    """One command run in a fresh process: wall seconds, CPU seconds, its --json output, memory peaks."""

    def __init__(self, cmd: list[str], home: Path, env: dict, *, sample_memory: bool = False):
        self.cmd, self.home, self.env, self.sample_memory = cmd, home, env, sample_memory
        self.peak_pss = 0
        self.store_rss = self.store_pss = self.store_procs = 0

    def run(self) -> "Side":
        meter = CPUMeter(self.home.name)
        self.load = round(os.getloadavg()[0], 2)
        t0 = time.perf_counter()
        p = subprocess.Popen(self.cmd, env={**self.env, "MOONDEV_LAB_HOME": str(self.home)}, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True, preexec_fn=meter.join)
        stop = threading.Event()

        def sampler() -> None:
            n = 0
            while not stop.wait(0.1):
                self.peak_pss = max(self.peak_pss, pss_tree(p.pid))
                if n % 5 == 0:  # smaps in full is dearer: twice a second
                    rss, pss, procs = store_mapping(p.pid)
                    if rss > self.store_rss:
                        self.store_rss, self.store_pss, self.store_procs = rss, pss, procs
                n += 1

        t = threading.Thread(target=sampler, daemon=True)
        if self.sample_memory:
            t.start()
        out, _ = p.communicate()
        stop.set()
        self.wall = time.perf_counter() - t0
        self.cpu = meter.seconds()
        meter.close()
        try:
            self.data = json.loads(out)
        except ValueError:
            raise SystemExit(f"{' '.join(self.cmd[:6])} ... printed no JSON (exit {p.returncode})") from None
        return self

    def brief(self) -> dict:
        return {"wall_s": round(self.wall, 1), "cpu_s": None if self.cpu is None else round(self.cpu, 1),
                "load_before": self.load}


SPIN = "import time\nt = time.process_time()\nwhile time.process_time() - t < {s}:\n    pass\n"


def cores_available(n: int = 2, cpu_s: float = 1.5) -> float:
    """CPUs this session gets now: ``n`` busy loops side by side, their CPU over the wall time.

    On a machine whose kernel shares the CPUs between sessions (autogroup), a session gets its
    slice however many processes it runs: below ~1.8 here, no 2-worker speed-up can show.
    """
    t0 = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-c", SPIN.format(s=cpu_s)]) for _ in range(n)]
    for p in procs:
        p.wait()
    return round(n * cpu_s / (time.perf_counter() - t0), 2)


def batch_cmd(ideas: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "moondev_lab.cli", "batch", str(ideas), "--out", str(out), "--json", *extra]


def per_idea_wall(data: dict) -> float:
    walls = [r["wall_s"] for r in data["rows"]]
    return sum(walls) / len(walls)


def mib(n: float) -> float:
    return round(n / 2**20, 1)


def shared_numba_cache(tmp: Path, env: dict) -> dict:
    """Compile the broker once into a cache every side then uses (what any install after its first run has)."""
    from moondev_lab._numba_cache import kernel_key, keyed_cache_dir

    folder = keyed_cache_dir(tmp / "numba-cache", kernel_key())
    env = {**env, "NUMBA_CACHE_DIR": str(folder)}
    warm = ("from moondev_lab._batch_warmup import WarmUpPlan, warm_up; import json; "
            "print(json.dumps(warm_up(WarmUpPlan('BTC/USD', '15m', start='2023-03-01', end='2023-03-31'))))")
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", warm], env={**env, "MOONDEV_LAB_HOME": str(tmp / "h-numba")},
                         capture_output=True, text=True, timeout=900)
    print(f"numba cache compiled in {time.perf_counter() - t0:.1f} s: {out.stdout.strip()[-200:]}", flush=True)
    return env


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--throughput", type=int, default=200, help="ideas sampled for the throughput part")
    ap.add_argument("--only", nargs="*", choices=PARTS, help="run only these parts")
    ap.add_argument("--skip", nargs="*", default=[], choices=PARTS)
    ap.add_argument("--repeat", type=int, default=1, help="scaling: run both sides this many times, alternating")
    ap.add_argument("--cold-numba", action="store_true", help="every side compiles the broker itself")
    a = ap.parse_args()
    parts = [p for p in (a.only or PARTS) if p not in a.skip]
    tmp = Path(tempfile.mkdtemp(prefix="batch-bench-"))
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    if not a.cold_numba:
        env = shared_numba_cache(tmp, env)
    report: dict = {"cpus": os.cpu_count(), "numba_cache": "cold per side" if a.cold_numba else "shared, warm"}
    homes = iter(range(10**6))

    def home() -> Path:
        return tmp / f"h{next(homes)}"

    def ideas_file(name: str, ideas: list[str]) -> Path:
        f = tmp / f"{name}.txt"
        f.write_text("\n".join(ideas))
        return f

    if "overhead" in parts:
        f = ideas_file("overhead", GOOD[:4])
        direct = Side(batch_cmd(f, tmp / "o-direct", "--workers", "1", *SHORT), home(), env).run()
        nb = Side(batch_cmd(f, tmp / "o-nb", "--workers", "1", "--notebook", str(NOTEBOOK), *SHORT,
                            "-p", "start", "2023-03-01", "-p", "end", "2023-03-31"), home(), env).run()
        d, n = per_idea_wall(direct.data), per_idea_wall(nb.data)
        report["overhead"] = {"direct_s_per_idea": round(d, 2), "notebook_s_per_idea": round(n, 2),
                              "notebook_extra_s": round(n - d, 2), "ratio": round(n / d, 2),
                              "ok": [direct.data["totals"]["ok"], nb.data["totals"]["ok"]],
                              "direct": direct.brief(), "notebook": nb.brief()}
        print("overhead", report["overhead"], flush=True)

    if "scaling" in parts:
        f = ideas_file("scaling", GOOD)
        runs: dict[int, list[Side]] = {1: [], 2: []}
        cores = [cores_available()]
        for i in range(a.repeat):
            for w in ((1, 2) if i % 2 == 0 else (2, 1)):  # alternate, so a load spike hits both sides
                runs[w].append(Side(batch_cmd(f, tmp / f"s{w}-{i}", "--workers", str(w), *SHORT), home(), env).run())
        # The same command on one idea the model refuses at once: its CPU is the command's start-up and
        # close, so what the 8 ideas add (the loop's CPU) shows apart from start-up even under load.
        cores.append(cores_available())
        nothing = ideas_file("scaling-nothing", ["purple elephants dancing on the moon"])
        empty = {w: Side(batch_cmd(nothing, tmp / f"s{w}-empty", "--workers", str(w), *SHORT), home(), env).run()
                 for w in runs}

        def med(w: int, key) -> float:
            return statistics.median(key(s) for s in runs[w])

        loop = {w: med(w, lambda s: s.data["totals"]["elapsed_s"]) for w in runs}
        start = {w: med(w, lambda s: s.data["totals"].get("startup_s", 0.0)) for w in runs}
        wall = {w: med(w, lambda s: s.wall) for w in runs}
        cpu = {w: (med(w, lambda s: s.cpu) if all(s.cpu is not None for s in runs[w]) else None) for w in runs}
        report["scaling"] = {
            "ideas": len(GOOD), "repeat": a.repeat, "cores_available_before_after": cores,
            "serial_loop_s": round(loop[1], 2), "workers2_loop_s": round(loop[2], 2),
            "speedup": round(loop[1] / loop[2], 2),
            "startup_s": {"serial": round(start[1], 1), "workers2": round(start[2], 1)},
            "whole_command": {"serial_s": round(wall[1], 1), "workers2_s": round(wall[2], 1),
                              "speedup": round(wall[1] / wall[2], 2)},
            "cpu_s": {"serial": cpu[1] and round(cpu[1], 1), "workers2": cpu[2] and round(cpu[2], 1)},
            "loop_cpu_s": {w_name: (round(cpu[w] - empty[w].cpu, 1) if cpu[w] is not None and empty[w].cpu is not None
                                    else None) for w, w_name in ((1, "serial"), (2, "workers2"))},
            "load_before": [s.load for w in runs for s in runs[w]],
            "ok": [s.data["totals"]["ok"] for w in runs for s in runs[w]],
            "warm_up_max_s": [s.data["totals"].get("warm_up", {}).get("max_s") for w in runs for s in runs[w]]}
        print("scaling", report["scaling"], flush=True)

    if "memory" in parts:
        ideas = GOOD[:4]
        batch = Side(batch_cmd(ideas_file("memory", ideas), tmp / "m", "--workers", "2", *FULL), home(), env,
                     sample_memory=True).run()
        alone = [Side(batch_cmd(ideas_file(f"memory-{i}", [idea]), tmp / f"m-{i}", "--workers", "1", *FULL),
                      home(), env, sample_memory=True).run() for i, idea in enumerate(ideas)]
        total_alone = sum(s.peak_pss for s in alone)
        report["memory"] = {
            "batch_workers": 2, "ideas": len(ideas),
            "batch_tree_peak_pss_mib": mib(batch.peak_pss),
            "sum_of_alone_tree_peaks_pss_mib": mib(total_alone),
            "alone_tree_peaks_pss_mib": [mib(s.peak_pss) for s in alone],
            "ratio_sum_over_batch": round(total_alone / batch.peak_pss, 2) if batch.peak_pss else None,
            "store_mapping_in_batch": {"rss_mib": mib(batch.store_rss), "pss_mib": mib(batch.store_pss),
                                       "processes": batch.store_procs},
            "idea_peaks_above_idle_pool_mib": [r["peak_mib"] for r in batch.data["rows"]],
            "ok": [batch.data["totals"]["ok"], sum(s.data["totals"]["ok"] for s in alone)]}
        print("memory", report["memory"], flush=True)

    if "throughput" in parts:
        import pandas as pd

        n = a.throughput
        sample = pd.read_csv(IDEAS_CSV)["idea"].dropna().drop_duplicates().sample(n, random_state=7)
        f = ideas_file("throughput", list(sample))
        b = Side(batch_cmd(f, tmp / "t", *SHORT), home(), env).run()
        # Today's command: `moondev-lab rbi --ideas` is run_rbi on one machine's thread pool. It has no
        # --no-grid/--no-quarters, so the same short settings go through its code path directly.
        rbi = [sys.executable, "-c",
               "import sys, json; from moondev_lab import run_rbi; from moondev_lab.rbi import RBIConfig; "
               "from moondev_lab.cli import read_ideas; "
               "r = run_rbi(read_ideas(sys.argv[1]), model='offline', progress=False, cfg=RBIConfig("
               "start='2023-03-01', end='2023-03-31', grid=False, quarters=False, max_optimize=0)); "
               "print(json.dumps({'ok': sum(x.status == 'ok' for x in r.results), 'n': len(r.results)}))", str(f)]
        r = Side(rbi, home(), env).run()
        t = b.data["totals"]
        report["throughput"] = {
            "ideas": n, "batch_ideas_per_min": round(n / b.wall * 60, 1), "rbi_ideas_per_min": round(n / r.wall * 60, 1),
            "ratio": round(r.wall / b.wall, 2), "batch": b.brief(), "rbi": r.brief(),
            "batch_startup_s": t.get("startup_s"), "batch_loop_ideas_per_min": t.get("ideas_per_min"),
            "ok": [t["ok"], r.data["ok"]], "batch_workers": t["cluster"]["workers"]}
        print("throughput", report["throughput"], flush=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
