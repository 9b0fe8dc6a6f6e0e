"""DataPool: one shared, memory-mapped copy of each series, with a byte budget.

>>> from moondev_lab import DataPool
>>> pool = DataPool()                                   # doctest: +SKIP
>>> df = pool.get("BTC/USD", "15m")                     # doctest: +SKIP
>>> march = pool.get("BTC/USD", "15m", start="2023-03-01", end="2023-03-31")  # doctest: +SKIP
>>> pool.stats()                                        # doctest: +SKIP
PoolStats(hits=1, misses=1, ...)

How it stays cheap:

* ``get`` maps the store's Arrow file; the OS pages data in only when it is
  touched, and every process mapping the same file shares the page cache.
* Identical requests share one mapping: the pool keeps one *owner* frame per
  (series, committed version) and hands out shallow copies of it. It tracks
  those copies in a weak-reference registry, so it knows whether anyone
  still holds a series.
* An LRU with a byte budget evicts entries no one holds. Evicting never
  breaks a user: frames keep their buffers (and the mapping) alive.
* A new append makes a new committed version; the next ``get`` sees it and
  the old version is evicted once unheld.
"""
from __future__ import annotations

import html
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .. import _registry, config
from .store import Manifest, SeriesNotFound, Store, columns_to_frame

DEFAULT_BUDGET = 4 * 2**30

#: The sample shipped in the repository, imported into a store on first use.
SAMPLE = {"symbol": "BTC/USD", "timeframe": "15m", "source": "local", "file": "BTC-USD-15m.csv"}


@dataclass(frozen=True)
class PoolStats:
    hits: int
    misses: int
    evictions: int
    entries: int
    held: int
    bytes_mapped: int
    budget_bytes: int

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def to_dict(self) -> dict:
        return {**self.__dict__, "hit_rate": round(self.hit_rate, 4)}

    def __repr__(self) -> str:
        return (f"PoolStats(hits={self.hits}, misses={self.misses}, hit_rate={self.hit_rate:.0%}, "
                f"evictions={self.evictions}, entries={self.entries} ({self.held} held), "
                f"mapped={self.bytes_mapped / 2**20:.1f} MiB of {self.budget_bytes / 2**20:.0f} MiB budget)")

    def _repr_html_(self) -> str:
        rows = [("hits", self.hits), ("misses", self.misses), ("hit rate", f"{self.hit_rate:.0%}"),
                ("evictions", self.evictions), ("entries (held)", f"{self.entries} ({self.held})"),
                ("mapped", f"{self.bytes_mapped / 2**20:.1f} MiB"),
                ("budget", f"{self.budget_bytes / 2**20:.0f} MiB")]
        body = "".join(f"<tr><th style='text-align:left'>{k}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
        return f"<table><caption>DataPool</caption>{body}</table>"


class _Entry:
    __slots__ = ("manifest", "owner", "handed", "nbytes")

    def __init__(self, manifest: Manifest, owner: pd.DataFrame):
        self.manifest = manifest
        self.owner = owner  # keeps the mapping alive while cached
        self.handed: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # id -> frame
        self.nbytes = manifest.nbytes

    @property
    def held(self) -> bool:
        return len(self.handed) > 0


class DataPool:
    """Thread-safe pool of memory-mapped OHLCV frames from a :class:`Store`."""

    def __init__(self, root: str | Path | Store | None = None, budget_bytes: int = DEFAULT_BUDGET,
                 import_sample: bool = True):
        self.store = root if isinstance(root, Store) else Store(root)
        self.budget_bytes = int(budget_bytes)
        self.import_sample = import_sample
        self._lock = threading.RLock()
        self._entries: OrderedDict[tuple, _Entry] = OrderedDict()
        self._hits = self._misses = self._evictions = 0
        _registry.register_cache(self)

    def __repr__(self) -> str:
        return f"DataPool({str(self.store.root)!r}, {self.stats()!r})"

    def __len__(self) -> int:
        return len(self._entries)

    # ----- the one method most users need ---------------------------------------
    def get(self, symbol: str, timeframe: str, *, source: str | None = None,
            start=None, end=None) -> pd.DataFrame:
        """A backtesting.py-ready frame (DatetimeIndex, Open/High/Low/Close/Volume), zero-copy.

        ``start``/``end`` (anything ``pd.Timestamp`` takes; UTC if naive)
        slice by time, inclusive, still without copying. The frame is
        read-only underneath: writing to a column copies that column first.
        """
        manifest = self._find(symbol, timeframe, source)
        key = _key(manifest)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._hits += 1
                self._entries.move_to_end(key)
            else:
                self._misses += 1
                current, cols = self.store.open_latest(manifest)  # a writer may have moved on meanwhile
                key = _key(current)
                entry = self._entries.get(key) or _Entry(current, columns_to_frame(cols))
                self._entries[key] = entry
                self._evict(keep=key)
            frame = entry.owner
            if start is not None or end is not None:
                frame = frame.iloc[_time_slice(frame.index, start, end)]
            view = frame.copy(deep=False)
            entry.handed[id(view)] = view
            return view

    def manifest(self, symbol: str, timeframe: str, *, source: str | None = None) -> Manifest:
        """What :meth:`get` would map, without mapping it (imports the bundled sample if needed).

        >>> DataPool().manifest("BTC/USD", "15m").rows             # doctest: +SKIP
        31066
        """
        return self._find(symbol, timeframe, source)

    def _find(self, symbol: str, timeframe: str, source: str | None) -> Manifest:
        try:
            return self.store.find(symbol, timeframe, source)
        except SeriesNotFound:
            if not self._maybe_import_sample(symbol, timeframe, source):
                raise
            return self.store.find(symbol, timeframe, source)

    def _maybe_import_sample(self, symbol: str, timeframe: str, source: str | None) -> bool:
        if not (self.import_sample and symbol == SAMPLE["symbol"] and timeframe == SAMPLE["timeframe"]
                and source in (None, SAMPLE["source"])):
            return False
        path = config.BUNDLED_DATA_DIR / SAMPLE["file"]
        if not path.exists():
            return False
        ensure_sample(self.store)
        return True

    # ----- memory management ------------------------------------------------------
    def _evict(self, keep: tuple | None = None) -> int:
        """Drop least-recently-used unheld entries until under budget."""
        freed = 0
        total = sum(e.nbytes for e in self._entries.values())
        for key in list(self._entries):
            if total <= self.budget_bytes:
                break
            e = self._entries[key]
            if key == keep or e.held:
                continue
            del self._entries[key]
            total -= e.nbytes
            freed += e.nbytes
            self._evictions += 1
        return freed

    def evict_unused(self) -> int:
        """Drop every entry no one holds; returns the bytes unmapped from the pool."""
        with self._lock:
            freed = 0
            for key in [k for k, e in self._entries.items() if not e.held]:
                freed += self._entries.pop(key).nbytes
                self._evictions += 1
            return freed

    def clear(self) -> None:
        """Forget every entry (frames already handed out stay valid)."""
        with self._lock:
            self._evictions += len(self._entries)
            self._entries.clear()

    def stats(self) -> PoolStats:
        with self._lock:
            entries = list(self._entries.values())
            return PoolStats(self._hits, self._misses, self._evictions, len(entries),
                             sum(e.held for e in entries), sum(e.nbytes for e in entries), self.budget_bytes)


def _key(m: Manifest) -> tuple:
    """One cache entry per committed version of a series."""
    return (m.source, m.symbol, m.timeframe, m.file, m.rows)


def _time_slice(index: pd.DatetimeIndex, start, end) -> slice:
    def ts(x):
        t = pd.Timestamp(x)
        return t.tz_localize("UTC") if t.tzinfo is None else t.tz_convert("UTC")

    i8 = index.asi8
    lo = 0 if start is None else int(np.searchsorted(i8, ts(start).as_unit("ns").value, "left"))
    hi = len(i8) if end is None else int(np.searchsorted(i8, ts(end).as_unit("ns").value, "right"))
    return slice(lo, max(lo, hi))


def ensure_sample(store: Store | None = None) -> Manifest:
    """Import the bundled BTC sample into ``store`` unless it is already there."""
    store = store or Store()
    try:
        return store.find(SAMPLE["symbol"], SAMPLE["timeframe"], SAMPLE["source"])
    except SeriesNotFound:
        path = config.BUNDLED_DATA_DIR / SAMPLE["file"]
        return store.import_csv(path, SAMPLE["symbol"], SAMPLE["timeframe"], SAMPLE["source"]).manifest


_defaults: dict[Path, DataPool] = {}
_defaults_lock = threading.Lock()


def default_pool() -> DataPool:
    """The process-wide pool for the current store root (``$MOONDEV_LAB_HOME``)."""
    root = config.store_dir()
    with _defaults_lock:
        pool = _defaults.get(root)
        if pool is None:
            pool = _defaults[root] = DataPool(root)
        return pool
