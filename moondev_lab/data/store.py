"""The OHLCV store: one memory-mappable Arrow IPC file per series.

Layout under the store root (``~/.moondev_lab/store`` or ``$MOONDEV_LAB_HOME/store``)::

    <source>/<quoted symbol>/<timeframe>/
        manifest.json          # committed state: file, rows, first/last ts, checksums
        data-000003.arrow      # uncompressed Arrow IPC, ONE record batch of `capacity` rows
        .lock                  # flock held by writers only

Why this shape (see shared notes, data-layer.md):

* One record batch, uncompressed, no nulls: each column is one contiguous
  buffer in the file, so a read is a zero-copy view over the memory map.
  The manifest records each buffer's byte offset (taken from pyarrow's own
  parse of the file when it is written), so readers need only ``mmap`` and
  numpy: pyarrow is imported to write, never to read. That keeps ~34 MiB of
  libarrow out of every sandbox process (see bench/README.md, grid memory).
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
import mmap
import os
import sys
import time
import urllib.parse
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Literal

import numpy as np
import pandas as pd

from .. import config
from ..errors import MoondevError
from ._timeframes import timeframe_ns
from .validate import COLUMNS, Mode, ValidationReport

#: Conflicting timestamps kept in ``WriteResult.conflicts`` (the count is always exact).
CONFLICT_SAMPLE = 100
FORMAT_VERSION = 2  # 2 added ``offsets``; format-1 manifests are still read (offsets found with pyarrow)
_ALL = ["ts", *COLUMNS]
_ARROW_MAGIC = b"ARROW1"
_ROW_BYTES = 8 * len(_ALL)


class StoreError(MoondevError, RuntimeError):
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
    offsets: dict | None = None  # column -> byte offset of its value buffer in ``file``

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
    """What a write did: ``mode`` is create, append, rewrite or unchanged.

    ``conflict_count`` candles were already stored with *different* values and
    were kept as stored; ``conflicts`` holds the first :data:`CONFLICT_SAMPLE`
    of their timestamps. ``ok`` is False when there was any conflict (e.g. the
    losing side of two imports of different content racing for one series).
    """

    mode: Literal["create", "append", "rewrite", "unchanged"]
    rows_added: int
    rows_skipped: int
    manifest: Manifest
    conflicts: list[str] = field(default_factory=list)
    report: ValidationReport | None = None
    conflict_count: int = 0

    @property
    def ok(self) -> bool:
        return self.conflict_count == 0

    def __repr__(self) -> str:
        m = self.manifest
        s = (f"WriteResult({self.mode}: +{self.rows_added} rows, {self.rows_skipped} already stored; "
             f"{m.symbol} {m.timeframe} now {m.rows} rows {m.first} .. {m.last})")
        if self.conflict_count:
            s += f"\n  {self.conflict_count} conflicting candles kept as stored, e.g. {self.conflicts[0]}"
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


def _schema():
    import pyarrow as pa  # writers only: readers never load libarrow

    return pa.schema([("ts", pa.timestamp("ns", tz="UTC"))] + [(c, pa.float64()) for c in COLUMNS])


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
        if m.format not in (1, FORMAT_VERSION) or not 0 < m.rows <= m.capacity:
            raise CorruptStoreError(f"manifest {p} is inconsistent (rows={m.rows}, capacity={m.capacity})")
        if m.format == 1 and "pyarrow" in sys.modules:
            self._upgrade(d, m, raw)
        return m

    def _upgrade(self, d: Path, m: Manifest, raw: bytes) -> None:
        """Format 1 -> 2: record the column offsets, so that readers stop needing pyarrow.

        Best effort, and only where pyarrow is loaded anyway (a sandbox never loads it
        for this): skipped if a writer holds the lock, the manifest changed meanwhile,
        or the store is not writable by this process; the next reader tries again.
        """
        try:
            with open(d / ".lock", "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                try:
                    if (d / "manifest.json").read_bytes() == raw:  # no writer moved on meanwhile
                        self._commit(d, Manifest(**{**asdict(m), "format": FORMAT_VERSION,
                                                    "offsets": _buffer_offsets(d / m.file)}))
                finally:
                    fcntl.flock(lock, fcntl.LOCK_UN)
        except OSError:  # EWOULDBLOCK (a writer is busy), EACCES, EROFS: leave it for later
            pass

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
    def map_columns(self, manifest: Manifest) -> dict[str, np.ndarray]:
        """Zero-copy, read-only numpy views of a series' committed rows (``ts`` as int64 ns).

        The file is memory-mapped; pages are read only when touched, and every
        process mapping the same file shares them in the page cache.
        """
        path = self.series_dir(manifest.source, manifest.symbol, manifest.timeframe) / manifest.file
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            offsets = manifest.offsets or _buffer_offsets(path)
            need = max(offsets.values(), default=0) + manifest.capacity * 8
            if size < need or set(offsets) != set(_ALL):
                raise CorruptStoreError(f"{path}: {size} bytes, too short for {manifest.capacity} rows "
                                        f"(needs {need}); restore it or re-import the series")
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        if mm[:6] != _ARROW_MAGIC or mm[-6:] != _ARROW_MAGIC:
            raise CorruptStoreError(f"{path} is not an Arrow IPC file; restore it or re-import the series")
        return {name: np.frombuffer(mm, dtype="int64" if name == "ts" else "float64",
                                    count=manifest.rows, offset=offsets[name]) for name in _ALL}

    def open_latest(self, manifest: Manifest) -> tuple[Manifest, dict[str, np.ndarray]]:
        """Map ``manifest``'s file; if a writer replaced it meanwhile, re-read the manifest and retry."""
        for attempt in range(20):
            try:
                return manifest, self.map_columns(manifest)
            except FileNotFoundError:
                time.sleep(0.005 * attempt)  # a rewrite replaced the file: re-read the manifest
                manifest = self.find(manifest.symbol, manifest.timeframe, manifest.source)
        raise StoreError(f"{manifest.symbol} {manifest.timeframe}: data file keeps changing; is a writer looping?")

    def read(self, symbol: str, timeframe: str, source: str | None = None) -> pd.DataFrame:
        """A zero-copy DataFrame (prefer :class:`~moondev_lab.data.DataPool`, which also caches)."""
        return columns_to_frame(self.open_latest(self.find(symbol, timeframe, source))[1])

    def verify(self, symbol: str, timeframe: str, source: str | None = None) -> Manifest:
        """Recompute the checksums of the committed rows; raise :class:`CorruptStoreError` on mismatch."""
        m, cols = self.open_latest(self.find(symbol, timeframe, source))
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
            old = self.map_columns(m)
            is_new = ~np.isin(ts, old["ts"])
            conflicts, n_conflicts = [], 0
            if (~is_new).any():
                pos = np.searchsorted(old["ts"], ts[~is_new])
                differs = np.zeros(len(pos), dtype=bool)
                for c in COLUMNS:
                    differs |= old[c][pos] != new[c][~is_new]
                n_conflicts = int(differs.sum())
                for p in pos[differs][:CONFLICT_SAMPLE]:
                    conflicts.append(f"{pd.Timestamp(old['ts'][p], tz='UTC')}")
            add = {k: v[is_new] for k, v in new.items()}
            k = len(add["ts"])
            if k == 0:
                return WriteResult("unchanged", 0, len(ts), m, conflicts, report, n_conflicts)
            if add["ts"][0] > m.last_ts and m.rows + k <= m.capacity:
                man = self._append_in_place(d, m, add)
                return WriteResult("append", k, len(ts) - k, man, conflicts, report, n_conflicts)
            merged_ts = np.concatenate([old["ts"], add["ts"]])
            order = np.argsort(merged_ts, kind="stable")
            merged = {c: np.concatenate([old[c], add[c]])[order] for c in _ALL}
            man = self._write_full(d, source, symbol, timeframe, merged, generation=m.generation + 1)
            return WriteResult("rewrite", k, len(ts) - k, man, conflicts, report, n_conflicts)

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
        import pyarrow as pa

        n = len(cols["ts"])
        capacity = n + max(4096, n // 16)  # room for appends without rewriting history
        schema = _schema()
        arrays = []
        for name, typ in zip(_ALL, schema.types):
            padded = np.zeros(capacity, dtype="int64" if name == "ts" else "float64")
            padded[:n] = cols[name]
            arrays.append(pa.array(padded, type=typ))
        batch = pa.RecordBatch.from_arrays(arrays, schema=schema)
        final = d / f"data-{generation:06d}.arrow"
        with _atomic_file(final) as f, pa.ipc.new_file(f, schema) as writer:
            writer.write_batch(batch)
        checksum = {name: zlib.crc32(np.ascontiguousarray(cols[name]).data) for name in _ALL}
        man = self._commit(d, Manifest(source, symbol, timeframe, final.name, n, capacity,
                                       int(cols["ts"][0]), int(cols["ts"][-1]), checksum, generation,
                                       offsets=_buffer_offsets(final)))
        self._remove_orphans(d)
        return man

    def _append_in_place(self, d: Path, m: Manifest, add: dict[str, np.ndarray]) -> Manifest:
        path = d / m.file
        offsets = m.offsets or _buffer_offsets(path)
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
                                           "checksum": checksum, "offsets": offsets,
                                           "format": FORMAT_VERSION}))


def _buffer_offsets(path: Path) -> dict[str, int]:
    """Byte offset of each column's value buffer, read by pyarrow from the file's own footer."""
    import pyarrow as pa

    whole = pa.memory_map(str(path), "r").read_buffer()
    reader = pa.ipc.open_file(whole)
    if reader.num_record_batches != 1 or not reader.schema.equals(_schema()):
        raise CorruptStoreError(f"{path}: expected one record batch with schema {_schema()}, got "
                                f"{reader.num_record_batches} batches, {reader.schema}")
    batch = reader.get_batch(0)
    return {name: batch.column(i).buffers()[1].address - whole.address for i, name in enumerate(_ALL)}


def columns_to_frame(cols: dict[str, np.ndarray]) -> pd.DataFrame:
    """Mapped columns -> backtesting.py-ready DataFrame (UTC DatetimeIndex ``ts``), sharing their memory.

    >>> cols = {"ts": np.array([0], "int64"), **{c: np.ones(1) for c in COLUMNS}}
    >>> columns_to_frame(cols).index.tz
    datetime.timezone.utc
    """
    # pandas has no public zero-copy way to wrap int64 ns as a tz-aware index (every public
    # constructor copies); pyarrow's to_pandas uses the same internal constructor.
    ts = pd.arrays.DatetimeArray._simple_new(cols["ts"].view("M8[ns]"), dtype=pd.DatetimeTZDtype("ns", "UTC"))
    index = pd.DatetimeIndex(ts, name="ts", copy=False)
    return pd.DataFrame({c: cols[c] for c in COLUMNS}, index=index, copy=False)
