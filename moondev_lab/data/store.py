"""The OHLCV store: one memory-mappable Arrow IPC file per series.

Layout under the store root (``~/.moondev_lab/store`` or ``$MOONDEV_LAB_HOME/store``)::

    <source>/<quoted symbol>/<timeframe>/
        manifest.json          # committed state: file, rows, first/last ts, checksums
        data-000003.arrow      # uncompressed Arrow IPC, ONE record batch of `capacity` rows
        .lock                  # flock held by writers only

Why this shape (see shared notes, data-layer.md):

* One record batch, uncompressed, no nulls: ``to_pandas(split_blocks=True)``
  is then zero-copy over the memory map. Appending record batches would
  silently make every read copy.
* The batch is written with spare *capacity* (zero padding). An append
  writes the new rows into that padding with ``pwrite`` + ``fsync`` and then
  atomically replaces the manifest with the new row count. Readers only look
  at ``rows``, so a writer killed at any instant leaves the old or the new
  state, never a partial one; history is never rewritten for an append.
* When capacity runs out, or history changes, the series is written to a
  *new* file (temp name, fsync, ``os.replace``, fsync dir) and the manifest
  is switched to it. Mapped files are never truncated or rewritten in place,
  so readers in other processes keep a consistent view.

>>> store = Store("/tmp/example-store")                     # doctest: +SKIP
>>> store.import_csv("data/BTC-USD-15m.csv", "BTC/USD", "15m")  # doctest: +SKIP
>>> store.list()                                             # doctest: +SKIP
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
import urllib.parse
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Literal

import numpy as np
import pandas as pd
import pyarrow as pa

from .. import config
from ._timeframes import timeframe_ns
from .validate import COLUMNS, Mode, ValidationReport

FORMAT_VERSION = 1
SCHEMA = pa.schema([("ts", pa.timestamp("ns", tz="UTC"))] + [(c, pa.float64()) for c in COLUMNS])
_ALL = ["ts", *COLUMNS]
_ROW_BYTES = 8 * len(_ALL)


class StoreError(RuntimeError):
    """Base class for store problems."""


class SeriesNotFound(StoreError, KeyError):
    def __str__(self) -> str:  # KeyError would repr-quote the message
        return str(self.args[0])


class CorruptStoreError(StoreError):
    """A manifest or data file is damaged. The store never treats that as 'empty'."""


@dataclass(frozen=True)
class Manifest:
    """The committed state of one series."""

    source: str
    symbol: str
    timeframe: str
    file: str
    rows: int
    capacity: int
    first_ts: int  # int64 ns since the epoch, UTC
    last_ts: int
    checksum: dict  # column -> crc32 of its committed bytes
    generation: int = 1
    updated: str = ""
    format: int = FORMAT_VERSION

    @property
    def first(self) -> pd.Timestamp:
        return pd.Timestamp(self.first_ts, unit="ns", tz="UTC")

    @property
    def last(self) -> pd.Timestamp:
        return pd.Timestamp(self.last_ts, unit="ns", tz="UTC")

    @property
    def nbytes(self) -> int:
        """Bytes of committed data (what a full read would touch)."""
        return self.rows * _ROW_BYTES

    @property
    def checksum_hex(self) -> str:
        combined = zlib.crc32(json.dumps(self.checksum, sort_keys=True).encode())
        return f"crc32:{combined:08x}"

    def summary(self) -> dict:
        return {"source": self.source, "symbol": self.symbol, "timeframe": self.timeframe,
                "first": str(self.first), "last": str(self.last), "rows": self.rows,
                "size_mb": round(self.nbytes / 2**20, 2), "checksum": self.checksum_hex}


@dataclass
class WriteResult:
    """What a write did: ``mode`` is create, append, rewrite or unchanged."""

    mode: Literal["create", "append", "rewrite", "unchanged"]
    rows_added: int
    rows_skipped: int
    manifest: Manifest
    conflicts: list[str] = field(default_factory=list)
    report: ValidationReport | None = None

    def __repr__(self) -> str:
        m = self.manifest
        s = (f"WriteResult({self.mode}: +{self.rows_added} rows, {self.rows_skipped} already stored; "
             f"{m.symbol} {m.timeframe} now {m.rows} rows {m.first} .. {m.last})")
        if self.conflicts:
            s += f"\n  {len(self.conflicts)} conflicting candles kept as stored, e.g. {self.conflicts[0]}"
        return s


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _atomic_file(path: Path) -> Iterator:
    """Write to a per-writer temp file; on success fsync it, rename it over ``path``, fsync the dir.

    A writer killed at any point leaves either the old ``path`` or the new
    one, plus at worst a temp file that the next writer removes.
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # readable by sandbox workers running as another uid
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    _fsync_dir(path.parent)


def _column_arrays(table: pa.Table) -> dict[str, np.ndarray]:
    """Zero-copy numpy views of a single-chunk table's columns (ts as int64 ns)."""
    out = {}
    for name in _ALL:
        chunks = table.column(name).chunks
        arr = chunks[0] if len(chunks) == 1 else pa.concat_arrays(chunks)
        if name == "ts":
            arr = arr.view(pa.int64())
        out[name] = arr.to_numpy(zero_copy_only=True)
    return out


class Store:
    """A directory of OHLCV series. Safe for one writer and any number of readers per series."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else config.store_dir()

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r})"

    # ----- paths and manifests -------------------------------------------------
    def series_dir(self, source: str, symbol: str, timeframe: str) -> Path:
        timeframe_ns(timeframe)  # validates the spelling early
        return self.root / urllib.parse.quote(source, safe="") / urllib.parse.quote(symbol, safe="") / timeframe

    def _read_manifest(self, d: Path) -> Manifest | None:
        p = d / "manifest.json"
        try:
            raw = p.read_bytes()
        except FileNotFoundError:
            return None
        try:
            m = Manifest(**json.loads(raw))
        except (ValueError, TypeError) as e:
            raise CorruptStoreError(f"damaged manifest {p}: {e}; restore it or re-import the series") from e
        if m.format != FORMAT_VERSION or not 0 < m.rows <= m.capacity:
            raise CorruptStoreError(f"manifest {p} is inconsistent (rows={m.rows}, capacity={m.capacity})")
        return m

    def manifest(self, symbol: str, timeframe: str, source: str | None = None) -> Manifest:
        """The committed manifest of a series; see :meth:`find` for ``source=None``."""
        return self.find(symbol, timeframe, source)

    def list(self) -> list[Manifest]:
        """All series in the store, sorted by (symbol, timeframe, source)."""
        out = []
        for p in self.root.glob("*/*/*/manifest.json"):
            m = self._read_manifest(p.parent)
            if m is not None:
                out.append(m)
        return sorted(out, key=lambda m: (m.symbol, timeframe_ns(m.timeframe), m.source))

    def find(self, symbol: str, timeframe: str, source: str | None = None) -> Manifest:
        """Locate a series. With ``source=None`` the symbol must be unambiguous."""
        if source is not None:
            m = self._read_manifest(self.series_dir(source, symbol, timeframe))
            if m is None:
                raise SeriesNotFound(f"no {symbol} {timeframe} series from {source!r} in {self.root}")
            return m
        q_sym = urllib.parse.quote(symbol, safe="")
        found = [m for p in sorted(self.root.glob(f"*/{q_sym}/{timeframe}/manifest.json"))
                 if (m := self._read_manifest(p.parent)) is not None]
        if not found:
            have = sorted({f"{m.symbol} {m.timeframe}" for m in self.list()})
            raise SeriesNotFound(
                f"no {symbol} {timeframe} series in {self.root}; stored: {have or 'nothing yet'}. "
                f"Use `moondev-lab data import` or `moondev-lab data fetch`.")
        if len(found) > 1:
            raise StoreError(f"{symbol} {timeframe} exists from several sources {[m.source for m in found]}; pass source=")
        return found[0]

    # ----- reading -------------------------------------------------------------
    def open_table(self, manifest: Manifest) -> pa.Table:
        """Memory-map a series' committed rows as a single-chunk Arrow table (no copy)."""
        d = self.series_dir(manifest.source, manifest.symbol, manifest.timeframe)
        path = d / manifest.file
        source = pa.memory_map(str(path), "r")
        reader = pa.ipc.open_file(source)
        if reader.num_record_batches != 1 or not reader.schema.equals(SCHEMA):
            raise CorruptStoreError(f"{path}: expected one record batch with schema {SCHEMA}, got "
                                    f"{reader.num_record_batches} batches, {reader.schema}")
        batch = reader.get_batch(0)
        if batch.num_rows != manifest.capacity:
            raise CorruptStoreError(f"{path}: holds {batch.num_rows} rows, manifest says capacity {manifest.capacity}")
        return pa.Table.from_batches([batch]).slice(0, manifest.rows)

    def read_table(self, symbol: str, timeframe: str, source: str | None = None) -> tuple[Manifest, pa.Table]:
        """Manifest and mapped table of the latest committed state."""
        return self.open_latest(self.find(symbol, timeframe, source))

    def open_latest(self, manifest: Manifest) -> tuple[Manifest, pa.Table]:
        """Map ``manifest``'s file; if a writer replaced it meanwhile, re-read the manifest and retry."""
        for attempt in range(20):
            try:
                return manifest, self.open_table(manifest)
            except FileNotFoundError:
                time.sleep(0.005 * attempt)  # a rewrite replaced the file: re-read the manifest
                manifest = self.find(manifest.symbol, manifest.timeframe, manifest.source)
        raise StoreError(f"{manifest.symbol} {manifest.timeframe}: data file keeps changing; is a writer looping?")

    def read(self, symbol: str, timeframe: str, source: str | None = None) -> pd.DataFrame:
        """A zero-copy DataFrame (prefer :class:`~moondev_lab.data.DataPool`, which also caches)."""
        return table_to_frame(self.read_table(symbol, timeframe, source)[1])

    def verify(self, symbol: str, timeframe: str, source: str | None = None) -> Manifest:
        """Recompute the checksums of the committed rows; raise :class:`CorruptStoreError` on mismatch."""
        m, table = self.read_table(symbol, timeframe, source)
        cols = _column_arrays(table)
        for name in _ALL:
            crc = zlib.crc32(cols[name].data)
            if crc != m.checksum.get(name):
                raise CorruptStoreError(f"{m.symbol} {m.timeframe}: checksum mismatch in column {name}")
        ts = cols["ts"]
        if len(ts) and (ts[0] != m.first_ts or ts[-1] != m.last_ts or (np.diff(ts) <= 0).any()):
            raise CorruptStoreError(f"{m.symbol} {m.timeframe}: timestamps disagree with the manifest")
        return m

    # ----- writing -------------------------------------------------------------
    @contextlib.contextmanager
    def _lock(self, d: Path) -> Iterator[None]:
        d.mkdir(parents=True, exist_ok=True, mode=0o755)
        with open(d / ".lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def write(self, candles: pd.DataFrame, symbol: str, timeframe: str, source: str = "local",
              report: ValidationReport | None = None) -> WriteResult:
        """Merge clean candles (from :mod:`~moondev_lab.data.ingest`) into the store.

        New candles after the last stored one are appended in place. Candles
        already stored with the same values are skipped; different values
        are kept as stored and listed in ``conflicts`` (never changed
        silently). Candles that fill holes in history cause a rewrite.
        """
        if not len(candles):
            raise ValueError("no candles to write")
        ts = candles.index.as_unit("ns").asi8 if isinstance(candles.index, pd.DatetimeIndex) else None
        if ts is None or candles.index.tz is None or (np.diff(ts) <= 0).any():
            raise ValueError("candles must be validated first: a sorted, unique, UTC DatetimeIndex")
        new = {"ts": ts, **{c: candles[c].to_numpy(dtype="float64") for c in COLUMNS}}
        d = self.series_dir(source, symbol, timeframe)
        with self._lock(d):
            self._remove_orphans(d)
            m = self._read_manifest(d)
            if m is None:
                man = self._write_full(d, source, symbol, timeframe, new, generation=1)
                return WriteResult("create", len(ts), 0, man, report=report)
            old = _column_arrays(self.open_table(m))
            is_new = ~np.isin(ts, old["ts"])
            conflicts = []
            if (~is_new).any():
                pos = np.searchsorted(old["ts"], ts[~is_new])
                differs = np.zeros(len(pos), dtype=bool)
                for c in COLUMNS:
                    differs |= old[c][pos] != new[c][~is_new]
                for p in pos[differs][:1000]:
                    conflicts.append(f"{pd.Timestamp(old['ts'][p], tz='UTC')}")
            add = {k: v[is_new] for k, v in new.items()}
            k = len(add["ts"])
            if k == 0:
                return WriteResult("unchanged", 0, len(ts), m, conflicts, report)
            if add["ts"][0] > m.last_ts and m.rows + k <= m.capacity:
                man = self._append_in_place(d, m, add)
                return WriteResult("append", k, len(ts) - k, man, conflicts, report)
            merged_ts = np.concatenate([old["ts"], add["ts"]])
            order = np.argsort(merged_ts, kind="stable")
            merged = {c: np.concatenate([old[c], add[c]])[order] for c in _ALL}
            man = self._write_full(d, source, symbol, timeframe, merged, generation=m.generation + 1)
            return WriteResult("rewrite", k, len(ts) - k, man, conflicts, report)

    def import_csv(self, path: str | Path, symbol: str, timeframe: str, source: str = "local",
                   mode: Mode = "strict") -> WriteResult:
        """Validate a CSV file and merge it into the store."""
        from .ingest import read_csv

        candles, report = read_csv(path, timeframe, mode)
        return self.write(candles, symbol, timeframe, source, report=report)

    def delete(self, symbol: str, timeframe: str, source: str) -> None:
        d = self.series_dir(source, symbol, timeframe)
        with self._lock(d):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(d / "manifest.json")
            _fsync_dir(d)
            self._remove_orphans(d)

    @staticmethod
    def _remove_orphans(d: Path) -> None:
        """Under the lock, any temp file or unreferenced data file is a dead writer's leftover."""
        try:
            current = json.loads((d / "manifest.json").read_bytes()).get("file")
        except (FileNotFoundError, ValueError):
            current = None
        for p in list(d.glob(".*.tmp-*")) + list(d.glob("data-*.arrow")):
            if p.name != current:
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()  # readers that mapped it keep their pages

    def _commit(self, d: Path, man: Manifest) -> Manifest:
        man = Manifest(**{**asdict(man), "updated": pd.Timestamp.now(tz="UTC").isoformat()})
        with _atomic_file(d / "manifest.json") as f:
            f.write(json.dumps(asdict(man), indent=1).encode())
        return man

    def _write_full(self, d: Path, source: str, symbol: str, timeframe: str,
                    cols: dict[str, np.ndarray], generation: int) -> Manifest:
        n = len(cols["ts"])
        capacity = n + max(4096, n // 16)  # room for appends without rewriting history
        arrays = []
        for name, typ in zip(_ALL, SCHEMA.types):
            padded = np.zeros(capacity, dtype="int64" if name == "ts" else "float64")
            padded[:n] = cols[name]
            arrays.append(pa.array(padded, type=typ))
        batch = pa.RecordBatch.from_arrays(arrays, schema=SCHEMA)
        final = d / f"data-{generation:06d}.arrow"
        with _atomic_file(final) as f, pa.ipc.new_file(f, SCHEMA) as writer:
            writer.write_batch(batch)
        checksum = {name: zlib.crc32(np.ascontiguousarray(cols[name]).data) for name in _ALL}
        man = self._commit(d, Manifest(source, symbol, timeframe, final.name, n, capacity,
                                       int(cols["ts"][0]), int(cols["ts"][-1]), checksum, generation))
        self._remove_orphans(d)
        return man

    def _append_in_place(self, d: Path, m: Manifest, add: dict[str, np.ndarray]) -> Manifest:
        path = d / m.file
        offsets = _buffer_offsets(path)
        k = len(add["ts"])
        fd = os.open(path, os.O_WRONLY)
        try:
            for name in _ALL:
                data = np.ascontiguousarray(add[name], dtype="int64" if name == "ts" else "float64")
                os.pwrite(fd, data.tobytes(), offsets[name] + m.rows * 8)
            os.fsync(fd)  # data durable before the manifest says it exists
        finally:
            os.close(fd)
        checksum = {name: zlib.crc32(np.ascontiguousarray(add[name]).data, m.checksum[name]) for name in _ALL}
        return self._commit(d, Manifest(**{**asdict(m), "rows": m.rows + k, "last_ts": int(add["ts"][-1]),
                                           "checksum": checksum}))


def _buffer_offsets(path: Path) -> dict[str, int]:
    """Byte offset of each column's value buffer, read from the file's own footer."""
    source = pa.memory_map(str(path), "r")
    whole = source.read_buffer()
    batch = pa.ipc.open_file(whole).get_batch(0)
    return {name: batch.column(i).buffers()[1].address - whole.address for i, name in enumerate(_ALL)}


def table_to_frame(table: pa.Table) -> pd.DataFrame:
    """Arrow table -> backtesting.py-ready DataFrame, sharing the table's memory.

    ``split_blocks=True`` keeps one block per column, so pandas wraps the
    mapped buffers instead of consolidating them into a copy.
    """
    df = table.to_pandas(split_blocks=True)
    return df.set_index("ts")
