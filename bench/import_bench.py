"""Importing freqtrade's 1-minute JSON (1 MB on one line): moondev-lab vs pandas, side by side.

    .venv/bin/python bench/import_bench.py [--rows 17000] [--repeat 5] [--baseline-timeout 300]

Compares, on the same generated file (the shape of freqtrade's UNITTEST_BTC-1m.json):

* ``read_file``: moondev-lab's reader (format detected from the content, validated), in-process;
* ``moondev-lab data import``: the whole command, in a fresh process (imports, detection, validation, store write);
* ``pd.read_json``: pandas' own JSON reader, no validation (the fair baseline);
* ``pd.read_csv``, the naive read the importer did before (it takes the line for a ~100,000-column
  header and dedupes the names in quadratic time). It runs in a subprocess killed after
  ``--baseline-timeout`` seconds; a killed run is reported as "> timeout", and its ratio as a lower bound.

Prints min/max over ``--repeat`` runs and the ratios (baseline / moondev-lab).
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


def make_file(path: Path, rows: int) -> None:
    t0 = 1_510_704_000_000
    data = [[t0 + i * 60_000, 8000.0 + i % 13, 8010.5 + i % 13, 7990.25 + i % 13, 8005.75 + i % 13, 1.2345678]
            for i in range(rows)]
    path.write_text(json.dumps(data))


def timed(fn, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def in_subprocess(code: str, timeout: float) -> float | None:
    """Seconds the snippet's own clock measured, or None if it was killed at ``timeout``."""
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, cwd=REPO)
    except subprocess.TimeoutExpired:
        return None
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=17_000, help="candles (17,000 make about 1 MB)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--baseline-timeout", type=float, default=300.0)
    a = ap.parse_args()

    import pandas as pd

    from moondev_lab.data.ingest import read_file

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "UNITTEST_BTC-1m.json"
        make_file(path, a.rows)
        size = path.stat().st_size
        lines = path.read_bytes().count(b"\n") + 1
        print(f"file: {path.name}, {size / 1e6:.2f} MB on {lines} line(s), {a.rows:,} candles")

        ours = timed(lambda: read_file(path), a.repeat)
        env = {**os.environ, "MOONDEV_LAB_HOME": str(Path(tmp) / "home")}
        cli = []
        for i in range(a.repeat):
            t = time.perf_counter()
            subprocess.run([sys.executable, "-m", "moondev_lab.cli", "data", "import", str(path), "--symbol",
                            f"B{i}/USD"], check=True, capture_output=True, cwd=REPO, env=env, timeout=120)
            cli.append(time.perf_counter() - t)
        pj = timed(lambda: pd.read_json(path), a.repeat)
        naive = ("import time, pandas as pd\nt = time.perf_counter()\n"
                 f"pd.read_csv({str(path)!r}, skipinitialspace=True, dtype=str, keep_default_na=False, "
                 "na_values=[''])\nprint(time.perf_counter() - t)")
        csv_s = in_subprocess(naive, a.baseline_timeout)

    def row(name, xs):
        print(f"  {name:<38} min {min(xs) * 1e3:9.1f} ms   max {max(xs) * 1e3:9.1f} ms   "
              f"median {statistics.median(xs) * 1e3:9.1f} ms")

    print("results:")
    row("moondev-lab read_file (in-process)", ours)
    row("moondev-lab data import (fresh CLI)", cli)
    row("pd.read_json (no validation)", pj)
    if csv_s is None:
        print(f"  {'pd.read_csv (the old import)':<38} killed after {a.baseline_timeout:g} s")
    else:
        print(f"  {'pd.read_csv (the old import)':<38} {csv_s * 1e3:9.1f} ms (one run)")
    print("ratios (baseline / moondev-lab read_file, min vs min):")
    print(f"  pd.read_json / read_file: {min(pj) / min(ours):8.2f}x")
    bound = a.baseline_timeout if csv_s is None else csv_s
    print(f"  pd.read_csv  / read_file: {'>' if csv_s is None else ' '}{bound / min(ours):8.0f}x")
    print(f"  pd.read_csv  / whole CLI import: {'>' if csv_s is None else ' '}{bound / min(cli):8.0f}x")


if __name__ == "__main__":
    main()
