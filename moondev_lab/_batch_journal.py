"""The batch journal: one row per (batch, idea key) in the ledger, written with the idea's ledger records.

An idea's runs, code versions and usage (replayed from its worker) and its journal row go
into the ledger in one transaction, so a client killed at any instant leaves an idea
either wholly recorded or not at all: a resumed batch repeats nothing and loses nothing.

>>> from moondev_lab.ledger import Ledger
>>> journal = BatchJournal(Ledger(":memory:"))
>>> journal.record("b1", "k1", {"idea": "20/50 SMA crossover", "status": "ok"}, calls=[])
>>> journal.finished("b1")["k1"]["status"], journal.finished_experiments("BTC/USD", "15m", "offline")
('ok', set())
"""
from __future__ import annotations

import json

from ._batch_worker import replay
from .ledger import _FINAL as FINAL, Ledger, normalise_idea

SCHEMA = """
CREATE TABLE IF NOT EXISTS batch_items (
    batch TEXT NOT NULL, key TEXT NOT NULL, idea TEXT NOT NULL, status TEXT NOT NULL, run_id INTEGER,
    row TEXT NOT NULL, finished TEXT NOT NULL DEFAULT (datetime('now')), PRIMARY KEY (batch, key));
"""


class BatchJournal:
    """Which ideas of which batch finished, and their leaderboard rows. Lives in the ledger's file."""

    def __init__(self, ledger: Ledger):
        self.ledger = ledger
        self._ready = False

    def _ensure(self, db) -> None:
        if not self._ready:
            db.execute(SCHEMA)
            self._ready = True

    def _query(self, sql: str, args: tuple = ()) -> list:
        with self.ledger.transaction() as db:
            self._ensure(db)
            return db.execute(sql, args).fetchall()

    def record(self, batch: str, key: str, row: dict, calls: list, run_dir: str | None = None) -> int | None:
        """Replay the idea's ledger ``calls`` and journal its ``row``, atomically; returns the ledger run id."""
        with self.ledger.transaction() as db:
            self._ensure(db)
            run_id = replay(self.ledger, calls, run_dir) if calls else None
            db.execute("INSERT OR REPLACE INTO batch_items(batch, key, idea, status, run_id, row) VALUES (?,?,?,?,?,?)",
                       (batch, key, row["idea"], row["status"], run_id,
                        json.dumps({**row, "run_id": run_id}, default=str, allow_nan=True)))
        return run_id

    def finished(self, batch: str) -> dict[str, dict]:
        """Rows of the ideas of ``batch`` that finished (ok or failed), by key."""
        rows = self._query("SELECT key, row FROM batch_items WHERE batch=?", (batch,))
        return {k: json.loads(r) for k, r in rows}

    def finished_experiments(self, symbol: str, timeframe: str, model: str) -> set[str]:
        """Normalised texts of the ideas whose experiment on ``symbol``/``timeframe``/``model`` is done or given up.

        The ledger's own rule (:meth:`Ledger.may_run`), read for a whole batch in one query.
        """
        rows = self._query("SELECT i.text FROM experiments e JOIN ideas i ON i.id = e.idea_id WHERE e.symbol=? "
                           f"AND e.timeframe=? AND e.model=? AND e.status IN ({','.join('?' * len(FINAL))})",
                           (symbol, timeframe, model, *FINAL))
        return {normalise_idea(t) for (t,) in rows}
