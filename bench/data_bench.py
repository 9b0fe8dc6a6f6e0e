"""Data layer benchmark: DataPool.get against pd.read_csv and pd.read_parquet, side by side.

    .venv/bin/python bench/data_bench.py [--rows 10000000] [--repeat 5] [--keep DIR]

Measures on one synthetic OHLCV series (default 10 M rows):

1. time to a usable DataFrame, in a fresh process (min/max over runs; each
   loader first loads a tiny file of its own format, so one-time library
   initialisation is not counted for any of them) and repeated in one
   process (steady state), with the memory it adds:
   VmRSS, RssAnon and the Rss of the data file's own mappings (smaps), since
   VmRSS also counts library code and pandas objects (notes/data-layer.md #3);
2. the time of ``close.mean()`` right after loading (first touch of mapped
   pages vs data already in RAM);
3. four processes holding the same series: total PSS growth
   (/proc/PID/smaps_rollup) for DataPool vs four ``read_parquet`` loads;
4. the machine's memory bandwidth (a large numpy copy) and fresh-page rate,
   the physical limits behind every copying loader.

Goals (issue #2): get >= 100x faster than read_parquet; data pages < 1% of
the data size until touched; 4 processes <= 1.3x one copy.
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

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SYMBOL, TF = "SYN/USD", "1m"
MIB = 2**20


# ----- helpers used inside child processes -------------------------------------------
def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _file_rss(marker: str) -> int:
    """Rss of the mappings whose path contains ``marker`` (the store's data files)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if head and "-" in head[0] and len(head) >= 5 and ":" in head[3]:
                inside = len(head) >= 6 and marker in head[-1]
            elif inside and line.startswith("Rss:"):
                total += int(head[1]) * 1024
    return total


#: Where each loader's tiny warm-up file lives, next to the big one.
TINY = {"csv": lambda p: p.replace("syn.csv", "tiny.csv"), "parquet": lambda p: p.replace("syn.parquet", "tiny.parquet"),
        "pool": lambda p: p.replace("store", "tiny-store")}


def _load(kind: str, path: str):
    import pandas as pd

    if kind == "csv":
        return pd.read_csv(path, index_col=0, parse_dates=[0])
    if kind == "parquet":
        return pd.read_parquet(path)
    from moondev_lab.data import DataPool

    return DataPool(path).get(SYMBOL, TF)


def child(kind: str, path: str, repeat: int) -> None:
    # Every loader gets the same libraries imported before the clock starts,
    # so "fresh" measures loading, not pyarrow's one-time lazy imports.
    import pandas as pd  # noqa: F401
    import pyarrow.pandas_compat  # noqa: F401
    import pyarrow.parquet  # noqa: F401

    if kind == "pool":
        import moondev_lab.data  # noqa: F401
    # Same warm-up for every loader: one load of a tiny file of the same format, so that
    # "fresh" times the first load of the big series, not one-time library initialisation.
    _load(kind, TINY[kind](path))
    rss0, anon0, file0 = _status("VmRSS"), _status("RssAnon"), _file_rss(".arrow")
    t = time.perf_counter()
    df = _load(kind, path)
    t_first = time.perf_counter() - t
    rss1, anon1, file1 = _status("VmRSS"), _status("RssAnon"), _file_rss(".arrow")
    t = time.perf_counter()
    m = float(df["Close"].mean())
    t_mean_first = time.perf_counter() - t
    t = time.perf_counter()
    float(df["Close"].mean())
    t_mean_warm = time.perf_counter() - t
    steady = []
    for _ in range(repeat):
        del df
        t = time.perf_counter()
        df = _load(kind, path)
        steady.append(time.perf_counter() - t)
    print(json.dumps({"t_first": t_first, "rss": rss1 - rss0, "anon": anon1 - anon0, "file": file1 - file0,
                      "t_mean_first": t_mean_first, "t_mean_warm": t_mean_warm, "steady": steady,
                      "rows": len(df), "mean": m}))


def holder(kind: str, path: str) -> None:
    """Wait for 'go', load and touch every column, report, then wait for EOF."""
    import pandas as pd  # noqa: F401

    if kind == "pool":
        import moondev_lab.data  # noqa: F401
    print("ready", flush=True)
    sys.stdin.readline()
    df = _load(kind, path)
    s = sum(float(df[c].sum()) for c in df.columns) + float(df.index.asi8.sum())
    print("loaded", s, flush=True)
    sys.stdin.readline()


# ----- the parent ----------------------------------------------------------------------
def pss(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    return 0


def run_child(kind: str, path: str, repeat: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", kind, path, "--repeat", str(repeat)],
                         capture_output=True, text=True, cwd=REPO, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def four_processes(kind: str, path: str) -> int:
    procs = [subprocess.Popen([sys.executable, __file__, "--holder", kind, path], cwd=REPO, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE) for _ in range(4)]
    try:
        for p in procs:
            assert p.stdout.readline().startswith("ready")
        base = sum(pss(p.pid) for p in procs)
        for p in procs:  # one after another, like four notebooks opened in turn
            p.stdin.write("go\n")
            p.stdin.flush()
            assert p.stdout.readline().startswith("loaded")
        return sum(pss(p.pid) for p in procs) - base
    finally:
        for p in procs:
            p.stdin.close()
            p.wait(timeout=60)


def bandwidth() -> tuple[float, float]:
    a = np.ones(2**27)  # 1 GiB, touched
    b = np.empty_like(a)
    b[:] = 0
    best = min(_timed(lambda: np.copyto(b, a)) for _ in range(3))
    fresh = _timed(lambda: np.ones(2**27))  # first touch of new anonymous pages
    return 2 * a.nbytes / best / 1e9, a.nbytes / fresh / 1e9


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def make_data(rows: int, d: Path) -> dict:
    import pandas as pd

    sys.path.insert(0, str(REPO))
    from moondev_lab.data import Store

    rng = np.random.default_rng(7)
    close = 30000 + np.cumsum(rng.normal(0, 5, rows))
    close = np.abs(close) + 100
    opn = np.r_[close[0], close[:-1]]
    idx = pd.date_range("2000-01-01", periods=rows, freq="1min", tz="UTC", unit="ns", name="ts")
    df = pd.DataFrame({"Open": opn, "High": np.maximum(opn, close) + 1, "Low": np.minimum(opn, close) - 1,
                       "Close": close, "Volume": rng.uniform(0, 10, rows)}, index=idx)
    paths = {"csv": d / "syn.csv", "parquet": d / "syn.parquet", "pool": d / "store"}
    t = time.perf_counter()
    Store(paths["pool"]).write(df, SYMBOL, TF)
    print(f"  store write {time.perf_counter() - t:.1f}s", flush=True)
    df.to_parquet(paths["parquet"])
    df.to_csv(paths["csv"])
    tiny = df.iloc[:1000]
    Store(d / "tiny-store").write(tiny, SYMBOL, TF)
    tiny.to_parquet(d / "tiny.parquet")
    tiny.to_csv(d / "tiny.csv")
    return {k: str(v) for k, v in paths.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--runs", type=int, default=3, help="fresh-process runs per loader")
    ap.add_argument("--no-csv", action="store_true", help="skip read_csv (slow at 10M rows)")
    ap.add_argument("--child", nargs=2)
    ap.add_argument("--holder", nargs=2)
    a = ap.parse_args()
    if a.child:
        return child(*a.child, a.repeat)
    if a.holder:
        return holder(*a.holder)

    data_bytes = a.rows * 48
    gbs, fresh = bandwidth()
    print(f"machine: memcpy {gbs:.1f} GB/s (read+write), fresh-page first touch {fresh:.2f} GB/s")
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        print(f"building {a.rows:,} rows ({data_bytes / MIB:.0f} MiB of columns) ...", flush=True)
        paths = make_data(a.rows, Path(tmp))
        kinds = ["pool", "parquet"] + ([] if a.no_csv else ["csv"])
        res = {}
        for kind in kinds:
            runs = [run_child(kind, paths[kind], a.repeat if kind != "csv" else 1) for _ in range(a.runs if kind != "csv" else 1)]
            res[kind] = runs
        print(f"\n{'loader':<10}{'fresh ms (min/max)':>22}{'steady ms (min/max)':>22}{'VmRSS +MiB':>12}"
              f"{'anon +MiB':>11}{'data pages':>12}{'mean 1st ms':>13}{'mean warm ms':>14}")
        summary = {}
        for kind, runs in res.items():
            fresh_t = [r["t_first"] * 1e3 for r in runs]
            steady = [s * 1e3 for r in runs for s in r["steady"]] or fresh_t
            r0 = runs[0]
            summary[kind] = {"fresh_min": min(fresh_t), "fresh_max": max(fresh_t), "steady_min": min(steady),
                             "steady_med": statistics.median(steady), "steady_max": max(steady),
                             "rss": statistics.median(r["rss"] for r in runs),
                             "anon": statistics.median(r["anon"] for r in runs),
                             "file": statistics.median(r["file"] for r in runs),
                             "mean_first": statistics.median(r["t_mean_first"] for r in runs) * 1e3,
                             "mean_warm": statistics.median(r["t_mean_warm"] for r in runs) * 1e3}
            s = summary[kind]
            print(f"{kind:<10}{s['fresh_min']:>10.1f} / {s['fresh_max']:<9.1f}{s['steady_min']:>10.2f} / "
                  f"{s['steady_max']:<9.2f}{s['rss'] / MIB:>12.1f}{s['anon'] / MIB:>11.1f}"
                  f"{s['file'] / MIB:>10.2f}Mi{s['mean_first']:>13.1f}{s['mean_warm']:>14.1f}")
        print("\nfour processes holding the series (every column touched):")
        pss_pool = four_processes("pool", paths["pool"])
        pss_pq = four_processes("parquet", paths["parquet"])
        print(f"  DataPool      total PSS +{pss_pool / MIB:8.0f} MiB = {pss_pool / data_bytes:5.2f}x one copy")
        print(f"  read_parquet  total PSS +{pss_pq / MIB:8.0f} MiB = {pss_pq / data_bytes:5.2f}x one copy")

        p, q = summary["pool"], summary["parquet"]
        print("\nratios (goal in brackets):")
        print(f"  read_parquet / DataPool.get, fresh process (min): {q['fresh_min'] / p['fresh_min']:8.0f}x  [>= 100x]")
        print(f"  read_parquet / DataPool.get, steady state (median): {q['steady_med'] / p['steady_med']:6.0f}x  [>= 100x]")
        if "csv" in summary:
            print(f"  read_csv / DataPool.get, fresh process: {summary['csv']['fresh_min'] / p['fresh_min']:18.0f}x")
        print(f"  DataPool data pages touched by get: {p['file'] / data_bytes:.4%} of the data  [< 1%]"
              f" (VmRSS +{p['rss'] / MIB:.1f} MiB = {p['rss'] / data_bytes:.2%}, mostly code and objects)")
        print(f"  4 processes, DataPool: {pss_pool / data_bytes:.2f}x one copy  [<= 1.3x];"
              f" read_parquet: {pss_pq / data_bytes:.2f}x")


if __name__ == "__main__":
    main()
