"""The results ledger: every idea, run, code version, stat and model cost, in SQLite.

>>> from moondev_lab import Ledger
>>> led = Ledger(":memory:")
>>> idea = led.add_idea("Buy when RSI(14) < 30,  sell when RSI > 70")
>>> idea.id == led.add_idea("buy when rsi(14) < 30, sell when rsi > 70.").id   # deduped
True

Ideas are deduplicated on normalised text and carry a failure budget: an
idea that failed ``failure_budget`` times is marked ``gave_up`` and is never
run again, so a batch cannot loop forever on one bad idea.
"""
from __future__ import annotations

import hashlib
import json
import re
import sqlite3
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import pandas as pd

from . import config

SCHEMA = """
CREATE TABLE IF NOT EXISTS ideas (
    id INTEGER PRIMARY KEY, text TEXT NOT NULL, norm_hash TEXT NOT NULL UNIQUE,
    status TEXT NOT NULL DEFAULT 'new', failures INTEGER NOT NULL DEFAULT 0, last_error TEXT,
    created TEXT NOT NULL DEFAULT (datetime('now')));
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY, idea_id INTEGER NOT NULL REFERENCES ideas(id), model TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'running', error_kind TEXT, error_message TEXT,
    in_sample TEXT, out_of_sample TEXT, datasets TEXT, params TEXT, saved INTEGER NOT NULL DEFAULT 0,
    run_dir TEXT, started TEXT NOT NULL DEFAULT (datetime('now')), finished TEXT);
CREATE TABLE IF NOT EXISTS code_versions (
    id INTEGER PRIMARY KEY, run_id INTEGER NOT NULL REFERENCES runs(id), stage TEXT NOT NULL,
    iteration INTEGER NOT NULL, code TEXT NOT NULL, sha256 TEXT NOT NULL, error TEXT, stats TEXT,
    created TEXT NOT NULL DEFAULT (datetime('now')));
CREATE TABLE IF NOT EXISTS usage (
    id INTEGER PRIMARY KEY, run_id INTEGER REFERENCES runs(id), model TEXT NOT NULL, step TEXT NOT NULL,
    input_tokens INTEGER NOT NULL DEFAULT 0, output_tokens INTEGER NOT NULL DEFAULT 0,
    cost_usd REAL NOT NULL DEFAULT 0, created TEXT NOT NULL DEFAULT (datetime('now')));
"""


def normalise_idea(text: str) -> str:
    """Lower-case, single-spaced, without trailing punctuation: the dedup key."""
    return re.sub(r"\s+", " ", text).strip().strip(".!;,").lower()


def _dumps(obj: Any) -> str | None:
    # NaN must survive the round trip (a strategy with no trades has NaN Sharpe).
    return None if obj is None else json.dumps(obj, default=str, allow_nan=True)


def _loads(s: str | None) -> Any:
    return None if s is None else json.loads(s)


@dataclass(frozen=True)
class Idea:
    id: int
    text: str
    status: str
    failures: int
    last_error: str | None


class Ledger:
    """Thread-safe SQLite ledger (one connection, WAL, a lock around each statement)."""

    def __init__(self, path: str | Path | None = None, failure_budget: int = 3):
        self.path = str(path) if path is not None else str(config.ledger_path())
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self.failure_budget = failure_budget
        # Re-entrant: a transaction() holds it while the calls inside it take it again.
        self._lock = threading.RLock()
        # timeout= is SQLite's busy timeout: writers from other processes wait, never "database is locked".
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        with self._lock:
            if self.path != ":memory:":
                self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(SCHEMA)

    def __repr__(self) -> str:
        n = self._one("SELECT count(*) FROM ideas")[0]
        r = self._one("SELECT count(*) FROM runs")[0]
        return f"Ledger({self.path!r}: {n} ideas, {r} runs)"

    def close(self) -> None:
        self._db.close()

    def _exec(self, sql: str, args: Iterable = ()) -> sqlite3.Cursor:
        with self._lock:
            return self._db.execute(sql, tuple(args))

    def _one(self, sql: str, args: Iterable = ()) -> sqlite3.Row | None:
        with self._lock:
            return self._db.execute(sql, tuple(args)).fetchone()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """Several calls as one atomic write; the caller may run its own statements on the connection.

        >>> led = Ledger(":memory:")
        >>> with led.transaction() as db:
        ...     idea = led.add_idea("20/50 SMA crossover")
        ...     run = led.start_run(idea.id, "offline")
        """
        with self._lock:  # one transaction at a time on this connection
            self._db.execute("BEGIN IMMEDIATE")  # take the write lock now: no deadlock on upgrade later
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # ----- ideas ---------------------------------------------------------------------
    def add_idea(self, text: str) -> Idea:
        """Insert an idea, or return the existing one with the same normalised text."""
        h = hashlib.sha256(normalise_idea(text).encode()).hexdigest()
        self._exec("INSERT OR IGNORE INTO ideas(text, norm_hash) VALUES (?, ?)", (text.strip(), h))
        return self._idea(self._one("SELECT * FROM ideas WHERE norm_hash=?", (h,)))

    @staticmethod
    def _idea(row: sqlite3.Row) -> Idea:
        return Idea(row["id"], row["text"], row["status"], row["failures"], row["last_error"])

    def idea(self, idea_id: int) -> Idea:
        return self._idea(self._one("SELECT * FROM ideas WHERE id=?", (idea_id,)))

    def may_run(self, idea: Idea) -> bool:
        """False once the idea has succeeded or used up its failure budget."""
        current = self.idea(idea.id)
        return current.status not in ("done", "gave_up")

    def record_failure(self, idea_id: int, error: str) -> Idea:
        self._exec("UPDATE ideas SET failures=failures+1, last_error=?, "
                   "status=CASE WHEN failures+1 >= ? THEN 'gave_up' ELSE 'failed' END WHERE id=?",
                   (error[:2000], self.failure_budget, idea_id))
        return self.idea(idea_id)

    def record_success(self, idea_id: int) -> None:
        self._exec("UPDATE ideas SET status='done', last_error=NULL WHERE id=?", (idea_id,))

    # ----- runs ----------------------------------------------------------------------
    def start_run(self, idea_id: int, model: str) -> int:
        self._exec("UPDATE ideas SET status='running' WHERE id=?", (idea_id,))
        return self._exec("INSERT INTO runs(idea_id, model) VALUES (?, ?)", (idea_id, model)).lastrowid

    def add_code(self, run_id: int, stage: str, iteration: int, code: str,
                 error: str | None = None, stats: dict | None = None) -> int:
        sha = hashlib.sha256(code.encode()).hexdigest()
        return self._exec("INSERT INTO code_versions(run_id, stage, iteration, code, sha256, error, stats) "
                          "VALUES (?,?,?,?,?,?,?)", (run_id, stage, iteration, code, sha, error, _dumps(stats))).lastrowid

    def add_usage(self, run_id: int | None, model: str, step: str, input_tokens: int = 0,
                  output_tokens: int = 0, cost_usd: float = 0.0) -> None:
        self._exec("INSERT INTO usage(run_id, model, step, input_tokens, output_tokens, cost_usd) VALUES (?,?,?,?,?,?)",
                   (run_id, model, step, int(input_tokens or 0), int(output_tokens or 0), float(cost_usd or 0)))

    def finish_run(self, run_id: int, status: str, *, error_kind: str | None = None, error_message: str | None = None,
                   in_sample: dict | None = None, out_of_sample: dict | None = None, datasets: list | None = None,
                   params: dict | None = None, saved: bool = False, run_dir: str | None = None) -> None:
        self._exec("UPDATE runs SET status=?, error_kind=?, error_message=?, in_sample=?, out_of_sample=?, datasets=?, "
                   "params=?, saved=?, run_dir=?, finished=datetime('now') WHERE id=?",
                   (status, error_kind, (error_message or "")[:4000] or None, _dumps(in_sample), _dumps(out_of_sample),
                    _dumps(datasets), _dumps(params), int(saved), run_dir, run_id))

    def run(self, run_id: int) -> dict:
        row = self._one("SELECT * FROM runs WHERE id=?", (run_id,))
        out = dict(row)
        for k in ("in_sample", "out_of_sample", "datasets", "params"):
            out[k] = _loads(out[k])
        return out

    def code_versions(self, run_id: int) -> list[dict]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM code_versions WHERE run_id=? ORDER BY id", (run_id,)).fetchall()
        return [{**dict(r), "stats": _loads(r["stats"])} for r in rows]

    # ----- reports -------------------------------------------------------------------
    def leaderboard(self, metric: str = "Return [%]", limit: int = 20) -> pd.DataFrame:
        """Best finished runs by out-of-sample ``metric``."""
        with self._lock:
            rows = self._db.execute("SELECT r.id, i.text, r.model, r.in_sample, r.out_of_sample, r.params "
                                    "FROM runs r JOIN ideas i ON i.id=r.idea_id WHERE r.status='ok'").fetchall()
        recs = [{"run": r["id"], "idea": r["text"][:60], "model": r["model"],
                 **metric_columns(_loads(r["in_sample"]) or {}, _loads(r["out_of_sample"]) or {}, metric)}
                for r in rows]
        df = pd.DataFrame(recs, columns=["run", "idea", "model", *metric_columns({}, {}, metric)])
        return rank_by_oos(df, metric).head(limit)

    def usage_summary(self, run_ids: Iterable[int] | None = None) -> dict:
        """Model calls, tokens and cost: of the whole ledger, or of the given runs only."""
        where, args = "", ()
        if run_ids is not None:
            args = tuple(run_ids)
            where = f" WHERE run_id IN ({','.join('?' * len(args))})" if args else " WHERE 0"
        row = self._one("SELECT count(*), coalesce(sum(input_tokens),0), coalesce(sum(output_tokens),0), "
                        "coalesce(sum(cost_usd),0) FROM usage" + where, args)
        return {"calls": row[0], "input_tokens": row[1], "output_tokens": row[2], "cost_usd": round(row[3], 6)}

    def ideas(self) -> pd.DataFrame:
        with self._lock:
            return pd.read_sql_query("SELECT id, text, status, failures, last_error FROM ideas ORDER BY id", self._db)


def metric_columns(in_sample: dict, out_of_sample: dict, metric: str) -> dict:
    """The ranking columns of every results table: in-sample and out-of-sample ``metric``, and more."""
    return {f"IS {metric}": in_sample.get(metric), f"OOS {metric}": out_of_sample.get(metric),
            "OOS Sharpe": out_of_sample.get("Sharpe Ratio"), "OOS trades": out_of_sample.get("# Trades")}


def rank_by_oos(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Best out-of-sample ``metric`` first; runs without one last."""
    key = f"OOS {metric}"
    df[key] = pd.to_numeric(df[key], errors="coerce")
    return df.sort_values(key, ascending=False, na_position="last").reset_index(drop=True)
