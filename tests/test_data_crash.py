"""Crash safety: a writer killed (SIGKILL) at random instants leaves the old or the new state."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd

from conftest import REPO
from moondev_lab.data import Store

TRIALS = 50

WRITER = """
import sys, numpy as np, pandas as pd
from moondev_lab.data import Store
root, seed = sys.argv[1], int(sys.argv[2])
def series(n):
    i = np.arange(n, dtype="float64")
    close = 100 + np.sin(i / 50) * 10 + i * 1e-3
    idx = pd.date_range("2021-01-01", periods=n, freq="1min", tz="UTC", unit="ns", name="ts")
    return pd.DataFrame({"Open": close, "High": close + 1, "Low": close - 1, "Close": close, "Volume": i + 1}, index=idx)
data = series(400_000)
store = Store(root)
try:
    n = store.find("S/USD", "1m").rows
except KeyError:
    n = 0
print("ready", n, flush=True)
step = 1500 + seed % 7 * 300      # varied sizes: in-place appends and capacity rewrites
while n < len(data):
    store.write(data.iloc[n:n + step], "S/USD", "1m")
    n = min(n + step, len(data))
    print("committed", n, flush=True)
"""


def expected(n: int) -> pd.DataFrame:
    i = np.arange(n, dtype="float64")
    close = 100 + np.sin(i / 50) * 10 + i * 1e-3
    idx = pd.date_range("2021-01-01", periods=n, freq="1min", tz="UTC", unit="ns", name="ts")
    return pd.DataFrame({"Open": close, "High": close + 1, "Low": close - 1, "Close": close, "Volume": i + 1}, index=idx)


def one_trial(root: str, seed: int) -> int:
    """Run a writer, SIGKILL it at a random moment; return the last row count it reported committed."""
    rnd = random.Random(seed)
    p = subprocess.Popen([sys.executable, "-c", WRITER, root, str(seed)], cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = p.stdout.readline()
    assert first.startswith("ready"), p.stderr.read()
    time.sleep(rnd.uniform(0.0, 0.15))
    os.kill(p.pid, signal.SIGKILL)
    out, _ = p.communicate(timeout=30)
    # Only whole lines count: the kill can cut the last print anywhere, even inside "committed".
    whole = out.split("\n")[:-1]
    committed = [int(line.split()[1]) for line in whole if line.startswith("committed ")]
    return committed[-1] if committed else int(first.split()[1])


def test_writer_killed_at_random_points_loses_nothing(tmp_path):
    stats = {"appends_seen": 0}
    # Two trials at a time, each on its own series root, keeps the suite fast on 2 cores.
    roots = [tmp_path / f"r{k}" for k in range(2)]
    for r in roots:
        Store(r).write(expected(2000), "S/USD", "1m")

    def run(k: int) -> None:
        root = roots[k % 2]
        s = Store(root)
        before = s.find("S/USD", "1m").rows
        reported = one_trial(str(root), k)
        m = s.verify("S/USD", "1m")  # checksums and timestamps agree: nothing corrupt or partial
        assert m.rows >= max(before, reported), "a committed candle was lost"
        got = s.read("S/USD", "1m")
        assert got.equals(expected(m.rows)), "stored candles differ from what was written"
        stats["appends_seen"] += m.rows > before

    for batch in range(0, TRIALS, 2):
        with ThreadPoolExecutor(2) as ex:
            list(ex.map(run, range(batch, min(batch + 2, TRIALS))))
    assert stats["appends_seen"] >= TRIALS // 2  # most kills landed while writes were happening
    # After all that, the stores still accept writes and leave no temp files behind.
    for r in roots:
        s = Store(r)
        n = s.find("S/USD", "1m").rows
        s.write(expected(n + 10).iloc[n:], "S/USD", "1m")
        d = s.series_dir("local", "S/USD", "1m")
        assert not list(d.glob(".*.tmp-*")) and len(list(d.glob("data-*.arrow"))) == 1
