"""The event log of a trading run: every decision, order, fill and risk event, readable as a DataFrame.

SQLite in WAL mode, one committed row per event, so a kill -9 loses at most
the event being written. Values are JSON; text is scrubbed of registered keys.

>>> log = EventLog(tmp_path / "events.sqlite")            # doctest: +SKIP
>>> log.append("order", client_order_id="ml-...", side="buy", amount=0.01)  # doctest: +SKIP
>>> log.frame()                                            # doctest: +SKIP
   id                             time   kind client_order_id side  amount
0   1 2024-01-01 00:00:00.123000+00:00  order          ml-...  buy    0.01
"""
from __future__ import annotations

import enum
import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pandas as pd

from .exchange._scrub import scrub


class EventLog:
    """Append-only events in ``path`` (created on first ``append``; the constructor does no I/O)."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across process kills
            conn.execute("CREATE TABLE IF NOT EXISTS events (id INTEGER PRIMARY KEY, ts_ms INTEGER NOT NULL, "
                         "kind TEXT NOT NULL, data TEXT NOT NULL)")
            self._conn = conn
        return self._conn

    def append(self, kind: str, **data: Any) -> int:
        """Record one event now; returns its id."""
        payload = scrub(json.dumps(data, default=_plain, sort_keys=True))
        with self._lock:
            cur = self._db().execute("INSERT INTO events (ts_ms, kind, data) VALUES (?, ?, ?)",
                                     (int(time.time() * 1000), kind, payload))
            return int(cur.lastrowid)

    def frame(self, kind: str | None = None) -> pd.DataFrame:
        """Events as a DataFrame: ``id``, ``time`` (UTC), ``kind``, then one column per data field."""
        if not self.path.exists():
            return pd.DataFrame(columns=["id", "time", "kind"])
        with sqlite3.connect(f"file:{self.path}?mode=ro", uri=True) as conn:
            where, args = ("WHERE kind = ?", (kind,)) if kind else ("", ())
            rows = conn.execute(f"SELECT id, ts_ms, kind, data FROM events {where} ORDER BY id", args).fetchall()
        base = pd.DataFrame(rows, columns=["id", "ts_ms", "kind", "data"])
        fields = pd.json_normalize([json.loads(d) for d in base["data"]]) if len(base) else pd.DataFrame()
        base.insert(1, "time", pd.to_datetime(base.pop("ts_ms"), unit="ms", utc=True))
        return pd.concat([base.drop(columns="data"), fields], axis=1)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __len__(self) -> int:
        with self._lock:
            return self._db().execute("SELECT COUNT(*) FROM events").fetchone()[0]

    def __repr__(self) -> str:
        return f"EventLog({self.path})"


def _plain(value: Any):
    """JSON for what orders and timestamps carry (enums, Timestamps, dataclasses with to_dict)."""
    if isinstance(value, pd.Timestamp):
        return value.isoformat()
    if isinstance(value, enum.Enum):
        return value.value
    if hasattr(value, "to_dict"):
        return value.to_dict()
    return str(value)
