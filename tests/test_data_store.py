"""The store and the pool: zero-copy, LRU under a budget, threads, appends, corruption, readers."""
from __future__ import annotations

import gc
import json
import subprocess
import sys
import threading
import time

import numpy as np
import pandas as pd
import pytest

from conftest import BTC_CSV, REPO
from moondev_lab.data import CorruptStoreError, DataPool, SeriesNotFound, Store


def synthetic(n: int, start="2020-01-01", freq="1min", seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    close = 100 + np.cumsum(rng.normal(0, 0.1, n))
    close = np.abs(close) + 1
    opn = np.r_[close[0], close[:-1]]
    idx = pd.date_range(start, periods=n, freq=freq, tz="UTC", unit="ns", name="ts")
    return pd.DataFrame({"Open": opn, "High": np.maximum(opn, close) + 0.05,
                         "Low": np.minimum(opn, close) - 0.05, "Close": close,
                         "Volume": rng.uniform(1, 10, n)}, index=idx)


def mapped_ranges(path) -> list[tuple[int, int]]:
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            if line.rstrip().endswith(str(path)):
                a, b = line.split()[0].split("-")
                out.append((int(a, 16), int(b, 16)))
    return out


def data_file(store: Store, symbol="BTC/USD", tf="15m", source="local"):
    m = store.find(symbol, tf, source)
    return store.series_dir(source, symbol, tf) / m.file


@pytest.fixture
def btc_store(tmp_path) -> Store:
    store = Store(tmp_path / "store")
    store.import_csv(BTC_CSV, "BTC/USD", "15m")
    return store


def test_get_is_zero_copy_over_the_file_mapping(btc_store):
    pool = DataPool(btc_store)
    df = pool.get("BTC/USD", "15m")
    assert list(df.columns) == ["Open", "High", "Low", "Close", "Volume"]
    assert str(df.index.dtype) == "datetime64[ns, UTC]"
    ranges = mapped_ranges(data_file(btc_store))
    assert ranges, "data file is not memory-mapped"
    for arr in [df[c].to_numpy() for c in df.columns] + [df.index.asi8]:
        addr = arr.__array_interface__["data"][0]
        assert any(a <= addr < b for a, b in ranges), "a column was copied out of the mapping"
    again = pool.get("BTC/USD", "15m")
    assert np.shares_memory(df["Close"].to_numpy(), again["Close"].to_numpy())
    # The buffers are read-only; writing copies the column instead of corrupting the store.
    df.loc[df.index[0], "Close"] = -1.0
    assert again["Close"].iloc[0] > 0 and btc_store.verify("BTC/USD", "15m")


def test_date_slice_does_not_copy(btc_store):
    pool = DataPool(btc_store)
    full = pool.get("BTC/USD", "15m")
    march = pool.get("BTC/USD", "15m", start="2023-03-01", end="2023-03-31 23:45")
    assert march.index[0] == pd.Timestamp("2023-03-01", tz="UTC")
    assert march.index[-1] == pd.Timestamp("2023-03-31 23:45", tz="UTC")
    assert np.shares_memory(march["Close"].to_numpy(), full["Close"].to_numpy())
    assert np.shares_memory(march.index.asi8, full.index.asi8)
    loc = full.loc["2023-06-01":"2023-06-02"]
    assert np.shares_memory(loc["Open"].to_numpy(), full["Open"].to_numpy())


def test_rss_does_not_grow_by_the_data_size(tmp_path):
    store = Store(tmp_path / "store")
    big = synthetic(2_000_000)  # ~92 MiB of columns
    store.write(big, "SYN/USD", "1m")
    del big
    gc.collect()
    code = f"""
import psutil, json
from moondev_lab.data import DataPool
p = psutil.Process(); before = p.memory_full_info().uss
df = DataPool({str(store.root)!r}).get("SYN/USD", "1m")
mid = p.memory_full_info().uss
total = float(df["Close"].sum())   # touches one column's pages (file-backed, shared)
print(json.dumps({{"open": mid - before, "rows": len(df)}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["rows"] == 2_000_000
    assert r["open"] < 0.05 * 2_000_000 * 48, f"opening grew USS by {r['open'] / 2**20:.1f} MiB"


def test_lru_eviction_under_budget(tmp_path):
    store = Store(tmp_path / "store")
    for i in range(4):
        store.write(synthetic(10_000, seed=i), f"S{i}/USD", "1m")
    one = store.find("S0/USD", "1m").nbytes
    pool = DataPool(store, budget_bytes=int(2.5 * one))
    held = pool.get("S0/USD", "1m")  # held by the test: must never be evicted
    for i in (1, 2, 3):
        pool.get(f"S{i}/USD", "1m")  # dropped immediately: evictable
        gc.collect()
    st = pool.stats()
    assert st.bytes_mapped <= 2.5 * one and st.evictions == 2 and st.entries == 2
    assert st.held == 1 and held["Close"].iloc[-1] > 0
    pool.get("S0/USD", "1m")
    assert pool.stats().hits == 1  # the held series stayed cached
    del held
    gc.collect()
    assert pool.evict_unused() > 0 and pool.stats().entries == 0
    assert "DataPool" in st._repr_html_() and "hit_rate" in repr(st)


def test_concurrent_gets_share_one_mapping(btc_store):
    pool = DataPool(btc_store)
    frames, errors = [], []
    barrier = threading.Barrier(8)

    def worker():
        try:
            barrier.wait()
            for _ in range(25):
                f = pool.get("BTC/USD", "15m", start="2023-02-01", end="2023-02-10")
                assert len(f) == 9 * 96 + 1  # end is inclusive
                frames.append(f)
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    st = pool.stats()
    assert st.misses == 1 and st.hits == 199 and st.entries == 1
    base = frames[0]["Close"].to_numpy()
    assert all(np.shares_memory(f["Close"].to_numpy(), base) for f in frames)


def test_append_in_place_and_new_versions(tmp_path):
    store = Store(tmp_path / "store")
    data = synthetic(5000)
    first = store.write(data.iloc[:4000], "S/USD", "1m")
    pool = DataPool(store)
    old = pool.get("S/USD", "1m")
    res = store.write(data.iloc[3990:], "S/USD", "1m")  # 10 overlap, identical
    assert res.mode == "append" and res.rows_added == 1000 and res.rows_skipped == 10
    assert res.manifest.file == first.manifest.file  # history was not rewritten
    assert len(old) == 4000  # an existing reader keeps its consistent view
    new = pool.get("S/USD", "1m")
    assert new.equals(data) and pool.stats().misses == 2
    store.verify("S/USD", "1m")
    # Conflicting values for stored candles are kept as stored, and reported.
    changed = data.iloc[100:102].copy()
    changed["Close"] = changed["High"]
    res = store.write(changed, "S/USD", "1m")
    assert res.mode == "unchanged" and len(res.conflicts) == 2
    # Filling a hole in history rewrites into a new file; mapped readers are unaffected.
    holey = data.drop(data.index[2000:2010])
    store.delete("S/USD", "1m", "local")
    store.write(holey, "S/USD", "1m")
    res = store.write(data.iloc[2000:2010], "S/USD", "1m")
    assert res.mode == "rewrite" and store.read("S/USD", "1m").equals(data)
    assert new.equals(data)
    # Capacity runs out: a bigger file is written.
    more = synthetic(5000 + 9000).iloc[5000:]
    res = store.write(more, "S/USD", "1m")
    assert res.mode == "rewrite" and res.manifest.rows == 14000
    store.verify("S/USD", "1m")


def test_corruption_is_an_error_never_empty(btc_store):
    d = btc_store.series_dir("local", "BTC/USD", "15m")
    m = btc_store.find("BTC/USD", "15m")
    (d / "manifest.json").write_text("{ truncated")
    with pytest.raises(CorruptStoreError, match="damaged manifest"):
        DataPool(btc_store).get("BTC/USD", "15m")
    (d / "manifest.json").write_text(json.dumps({**m.__dict__}))
    with open(d / m.file, "r+b") as f:  # flip a byte inside the Close column
        f.seek(m.capacity * 8 * 4 + 1000)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(CorruptStoreError, match="checksum"):
        btc_store.verify("BTC/USD", "15m")
    with pytest.raises(SeriesNotFound, match="data import"):
        btc_store.find("ETH/USD", "15m")


def test_sample_is_imported_on_first_use(lab_home):
    pool = DataPool()
    df = pool.get("BTC/USD", "15m")
    assert len(df) == 31066
    assert (lab_home / "store" / "local").is_dir()


READER = """
import sys, time
from moondev_lab.data import Store, DataPool
store = Store(sys.argv[1]); n_prev = 0; reads = 0
deadline = time.time() + float(sys.argv[2])
while time.time() < deadline:
    df = DataPool(store).get("S/USD", "1m")
    close = df["Close"].to_numpy()
    assert len(df) >= n_prev and df.index.is_monotonic_increasing
    assert (close > 0).all()
    assert (df["High"].to_numpy() >= close).all(), "torn read"
    n_prev = len(df); reads += 1
print(reads, n_prev)
"""


def test_readers_in_other_processes_survive_writers(tmp_path):
    store = Store(tmp_path / "store")
    data = synthetic(60_000)
    store.write(data.iloc[:10_000], "S/USD", "1m")
    readers = [subprocess.Popen([sys.executable, "-c", READER, str(store.root), "4"], cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    deadline = time.time() + 3
    i = 10_000
    while time.time() < deadline and i < 60_000:
        store.write(data.iloc[i:i + 500], "S/USD", "1m")  # appends, and capacity rewrites
        i += 500
    for r in readers:
        out, err = r.communicate(timeout=60)
        assert r.returncode == 0, err
        reads, last_n = map(int, out.split())
        assert reads > 5
    store.verify("S/USD", "1m")


def test_reading_needs_no_pyarrow(btc_store):
    """Readers map the file with numpy alone (the sandbox keeps libarrow out of its processes)."""
    code = ("import sys; sys.modules['pyarrow'] = None\n"
            "from moondev_lab.data import DataPool, Store\n"
            f"df = DataPool(Store({str(btc_store.root)!r})).get('BTC/USD', '15m', start='2023-06-01', end='2023-06-02')\n"
            "print(len(df), df['Close'].iloc[0], df.index[0])")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    frame = DataPool(btc_store).get("BTC/USD", "15m", start="2023-06-01", end="2023-06-02")
    assert out.stdout.split()[:2] == [str(len(frame)), str(frame["Close"].iloc[0])]


def test_format_1_manifest_without_offsets_still_reads_and_is_upgraded(tmp_path):
    store = Store(tmp_path / "store")
    data = synthetic(5_000)
    m = store.write(data.iloc[:4_000], "S/USD", "1m").manifest
    assert m.format == 2 and set(m.offsets) == {"ts", "Open", "High", "Low", "Close", "Volume"}
    path = store.series_dir("local", "S/USD", "1m") / "manifest.json"
    v1 = json.dumps({**{k: v for k, v in json.loads(path.read_text()).items() if k != "offsets"}, "format": 1})

    # A sandbox task (pandas imported without pyarrow) reads it, and leaves the file alone.
    path.write_text(v1)
    code = ("from moondev_lab.sandbox._lean import without_pyarrow\n"
            "with without_pyarrow():\n    import pandas\n"
            "from moondev_lab.data import Store\n"
            f"print(len(Store({str(store.root)!r}).read('S/USD', '1m')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "4000", out.stderr
    assert json.loads(path.read_text())["format"] == 1

    # A reader with pyarrow loaded upgrades the manifest once; the data read is the same.
    df = DataPool(store).get("S/USD", "1m")
    pd.testing.assert_series_equal(df["Close"], data["Close"].iloc[:4_000], check_names=False, check_freq=False,
                                   check_index_type=False)
    upgraded = json.loads(path.read_text())
    assert upgraded["format"] == 2 and upgraded["offsets"] == m.offsets

    # ... and a writer upgrades it too (here: an append to a format-1 manifest).
    path.write_text(v1)
    m2 = store.write(data.iloc[4_000:], "S/USD", "1m").manifest
    assert m2.format == 2 and m2.offsets == m.offsets and m2.rows == 5_000
    store.verify("S/USD", "1m")


def test_truncated_or_foreign_data_file_is_a_clear_error(btc_store):
    m = btc_store.find("BTC/USD", "15m")
    path = data_file(btc_store)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])  # a half-copied file
    with pytest.raises(CorruptStoreError, match="too short"):
        DataPool(btc_store).get("BTC/USD", "15m")
    path.write_bytes(b"PAR1" + raw[4:])  # right size, wrong format
    with pytest.raises(CorruptStoreError, match="not an Arrow IPC file"):
        DataPool(btc_store).get("BTC/USD", "15m")
    path.write_bytes(raw)
    assert len(DataPool(btc_store).get("BTC/USD", "15m")) == m.rows
