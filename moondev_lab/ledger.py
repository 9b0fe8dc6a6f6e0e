"""The results ledger: every idea, run, code version, stat and model cost, in SQLite.

>>> from moondev_lab import Ledger
>>> led = Ledger(":memory:")
>>> idea = led.add_idea("Buy when RSI(14) < 30,  sell when RSI > 70")
>>> idea.id == led.add_idea("buy when rsi(14) < 30, sell when rsi > 70.").id   # deduped
True
>>> exp = led.experiment(idea.id, "BTC/USD", "15m", "offline")
>>> led.may_run(exp), exp.key
(True, ('BTC/USD', '15m', 'offline'))

An idea's text is deduplicated; what is run, skipped or given up is an
*experiment*: one idea on one symbol and timeframe with one model. Each
experiment carries a failure budget: once it failed ``failure_budget`` times it
is given up and not run again (unless forced), so a batch cannot loop forever on
one bad idea. A model outage is not the idea's fault: it is recorded as
``model_unavailable``, left to be retried, and never charged to the budget.

The file has a schema version (``PRAGMA user_version``); opening an older ledger
upgrades it in place, inside one transaction, keeping every row. Several
processes may write one ledger at once: WAL, a busy timeout, and short
``BEGIN IMMEDIATE`` transactions.
"""
from __future__ import annotations

import contextlib
import enum
import hashlib
import json
import re
import sqlite3
import threading
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import pandas as pd

from . import config
from .errors import MoondevError

#: Version 1 is the schema of the first releases (no user_version set, ideas keyed on text only).
_SCHEMA_V1 = """
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

#: Version 2: experiments (idea x symbol x timeframe x model) carry status and failure budget;
#: runs record their symbol, timeframe and money settings; the ledger gets a unique id (run folders
#: are named with it, so two ledgers never share one). Rows written by version 1 keep their data;
#: their symbol and timeframe were never recorded, so they stay NULL ("?" in tables).
_SCHEMA_V2 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE experiments (
    id INTEGER PRIMARY KEY, idea_id INTEGER NOT NULL REFERENCES ideas(id),
    symbol TEXT, timeframe TEXT, model TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'new', failures INTEGER NOT NULL DEFAULT 0, last_error TEXT,
    created TEXT NOT NULL DEFAULT (datetime('now')),
    UNIQUE (idea_id, symbol, timeframe, model));
ALTER TABLE runs ADD COLUMN experiment_id INTEGER REFERENCES experiments(id);
ALTER TABLE runs ADD COLUMN symbol TEXT;
ALTER TABLE runs ADD COLUMN timeframe TEXT;
ALTER TABLE runs ADD COLUMN settings TEXT;
CREATE INDEX runs_experiment ON runs(experiment_id);
-- version-1 history: one experiment per (idea, model) that ran, carrying the idea's status and budget
INSERT INTO experiments (idea_id, symbol, timeframe, model, status, failures, last_error)
    SELECT DISTINCT r.idea_id, NULL, NULL, r.model, i.status, i.failures, i.last_error
    FROM runs r JOIN ideas i ON i.id = r.idea_id;
UPDATE runs SET experiment_id = (SELECT e.id FROM experiments e
                                 WHERE e.idea_id = runs.idea_id AND e.model = runs.model AND e.symbol IS NULL);
"""


def _migrate_v2(db: sqlite3.Connection) -> None:
    for statement in _statements(_SCHEMA_V2):
        db.execute(statement)
    db.execute("INSERT INTO meta(key, value) VALUES ('ledger_id', ?)", (uuid.uuid4().hex,))


def _statements(script: str) -> list[str]:
    body = "\n".join(line for line in script.splitlines() if not line.lstrip().startswith("--"))
    return [s.strip() for s in body.split(";") if s.strip()]


def _migrate_v1(db: sqlite3.Connection) -> None:
    for statement in _statements(_SCHEMA_V1):
        db.execute(statement)


#: Version 3: where an idea came from (issue 12: ``rbi --from``, ``run_rbi(sources=...)``): the URL or
#: path, its kind, the whole extracted text and the sentences the rules were taken from. One idea may
#: have several sources (the same rules found twice are one idea); the same text from the same source
#: is kept once. Older rows have no source: ideas typed in.
_SCHEMA_V3 = """
CREATE TABLE idea_sources (
    id INTEGER PRIMARY KEY, idea_id INTEGER NOT NULL REFERENCES ideas(id),
    source TEXT NOT NULL, kind TEXT NOT NULL, text TEXT NOT NULL, text_sha256 TEXT NOT NULL,
    reduced_by TEXT, sentences_used TEXT, notes TEXT, created TEXT NOT NULL DEFAULT (datetime('now')),
    UNIQUE (idea_id, source, text_sha256));
CREATE INDEX idea_sources_idea ON idea_sources(idea_id);
"""


def _migrate_v3(db: sqlite3.Connection) -> None:
    for statement in _statements(_SCHEMA_V3):
        db.execute(statement)


#: ``MIGRATIONS[k]`` upgrades a ledger from version ``k`` to ``k + 1``; append, never edit.
MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [_migrate_v1, _migrate_v2, _migrate_v3]
SCHEMA_VERSION = len(MIGRATIONS)

#: Statuses after which an experiment is not run again unless forced.
_FINAL = ("done", "gave_up")


def normalise_idea(text: str) -> str:
    """Lower-case, single-spaced, without trailing punctuation: the dedup key."""
    return re.sub(r"\s+", " ", text).strip().strip(".!;,").lower()


def _dumps(obj: Any) -> str | None:
    # NaN must survive the round trip (a strategy with no trades has NaN Sharpe).
    return None if obj is None else json.dumps(obj, default=str, allow_nan=True)


def _loads(s: str | None) -> Any:
    return None if s is None else json.loads(s)


class LedgerError(MoondevError, ValueError):
    """A ledger that cannot be used (not a ledger, newer than this code), a missing run, or an unreadable run folder."""


@dataclass(frozen=True)
class Idea:
    id: int
    text: str


@dataclass(frozen=True)
class Experiment:
    """One idea on one symbol and timeframe with one model: what is run, skipped or given up."""

    id: int
    idea_id: int
    text: str
    symbol: str | None
    timeframe: str | None
    model: str
    status: str  # new | running | done | failed | retry | gave_up
    failures: int
    last_error: str | None

    @property
    def key(self) -> tuple:
        return (self.symbol, self.timeframe, self.model)

    def why_not_run(self) -> str:
        """Why a finished experiment is skipped, in words."""
        where = f"on {self.symbol} {self.timeframe} with {self.model}"
        if self.status == "gave_up":
            last = f" (last: {self.last_error[:200]})" if self.last_error else ""
            return f"gave up after {self.failures} failures {where}{last}; use force=True (--force) to run it again"
        return f"already done {where}; use force=True (--force) to run it again"


class LedgerState(enum.Enum):
    NEW = "new"  # nothing opened yet
    OPEN = "open"
    CLOSED = "closed"


class Ledger:
    """Thread- and process-safe SQLite ledger (WAL, busy timeout, short transactions).

    The constructor touches no file: :meth:`start` opens (and upgrades) it, or the first call
    that needs it does; :meth:`close` ends it for good.

    >>> led = Ledger(":memory:")
    >>> led.state.value, led.start().state.value, led.schema_version == SCHEMA_VERSION
    ('new', 'open', True)
    >>> led.close(); led.state.value
    'closed'
    """

    def __init__(self, path: str | Path | None = None, failure_budget: int = 3, busy_timeout_s: float = 60.0):
        self.path = str(path) if path is not None else str(config.ledger_path())
        self.failure_budget = failure_budget
        self.busy_timeout_s = busy_timeout_s
        # Re-entrant: a transaction() holds it while the calls inside it take it again.
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None
        self._ledger_id: str | None = None
        self.state = LedgerState.NEW

    def start(self) -> "Ledger":
        """Open the file (created if missing) and run the missing migrations; a no-op when open."""
        with self._lock:
            if self.state is LedgerState.OPEN:
                return self
            if self.state is LedgerState.CLOSED:
                raise LedgerError(f"{self.path}: this Ledger was closed; open a new one")
            try:
                if self.path != ":memory:":
                    Path(self.path).parent.mkdir(parents=True, exist_ok=True)
                self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None,
                                             timeout=self.busy_timeout_s)
                self._conn.row_factory = sqlite3.Row
                self._conn.execute(f"PRAGMA busy_timeout={int(self.busy_timeout_s * 1000)}")
                if self.path != ":memory:":
                    self._conn.execute("PRAGMA journal_mode=WAL")
                self._conn.execute("PRAGMA foreign_keys=ON")
                self._upgrade()
                self._ledger_id = self._one("SELECT value FROM meta WHERE key='ledger_id'")[0]
            except BaseException as e:  # nothing half-open is kept: the next call tries again, and says why
                if self._conn is not None:
                    self._conn.close()
                    self._conn = None
                if isinstance(e, (sqlite3.DatabaseError, OSError)):  # another file, a damaged one, a directory
                    raise LedgerError(f"{self.path}: cannot open it as a moondev_lab ledger ({e})") from None
                raise
            self.state = LedgerState.OPEN
            return self

    @property
    def _db(self) -> sqlite3.Connection:
        conn = self._conn
        return conn if conn is not None else self.start()._conn

    @property
    def ledger_id(self) -> str:
        """This ledger's own id (a uuid made when the file was created)."""
        if self._ledger_id is None:
            self.start()
        return self._ledger_id

    def _upgrade(self) -> None:
        """Run the missing migrations, all in one transaction: an upgrade is complete or absent."""
        with self._tx() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise LedgerError(f"{self.path} has ledger schema version {version}, newer than this "
                                  f"moondev_lab ({SCHEMA_VERSION}); upgrade moondev_lab to open it")
            for migrate in MIGRATIONS[version:]:
                migrate(db)
            if version < SCHEMA_VERSION:
                db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    @property
    def schema_version(self) -> int:
        return self._one("PRAGMA user_version")[0]

    def __repr__(self) -> str:
        if self.state is not LedgerState.OPEN:  # a repr opens no file
            return f"Ledger({self.path!r}, {self.state.value})"
        n = self._one("SELECT count(*) FROM ideas")[0]
        r = self._one("SELECT count(*) FROM runs")[0]
        return f"Ledger({self.path!r}: {n} ideas, {r} runs)"

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            self.state = LedgerState.CLOSED

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One short write transaction; BEGIN IMMEDIATE takes the write lock up front (no upgrade deadlock).

        Inside :meth:`transaction` (same thread: the lock is re-entrant) it joins the open transaction.
        """
        with self._lock:
            if self._db.in_transaction:
                yield self._db
                return
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

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
        ...     run = led.start_run(led.experiment(idea, "BTC/USD", "15m", "offline"))
        ...     led.finish_run(run, "ok")
        """
        with self._tx() as db:
            yield db

    def _all(self, sql: str, args: Iterable = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, tuple(args)).fetchall()

    # ----- ideas and experiments ---------------------------------------------------------
    def add_idea(self, text: str) -> Idea:
        """Insert an idea, or return the existing one with the same normalised text."""
        h = hashlib.sha256(normalise_idea(text).encode()).hexdigest()
        with self._tx() as db:
            db.execute("INSERT OR IGNORE INTO ideas(text, norm_hash) VALUES (?, ?)", (text.strip(), h))
            row = db.execute("SELECT id, text FROM ideas WHERE norm_hash=?", (h,)).fetchone()
        return Idea(row["id"], row["text"])

    def add_idea_source(self, found) -> Idea:
        """The idea of ``found`` (a :class:`~moondev_lab.sources.IdeaSource`: its rules, deduplicated as any
        idea), with where it came from kept beside it: source, kind, the extracted text, the sentences used.

        >>> led = Ledger(":memory:")
        >>> from moondev_lab.sources import extract_idea
        >>> idea = led.add_idea_source(extract_idea("Buy when RSI(14) < 30, sell when RSI > 70"))
        >>> idea.id == led.add_idea("buy when rsi(14) < 30, sell when rsi > 70").id
        True
        >>> [(s["kind"], s["source"][:15]) for s in led.idea_sources(idea.id)]
        [('text', 'Buy when RSI(14')]
        """
        used = [{"index": s.index, "roles": list(s.roles), "text": s.text} for s in found.sentences_used]
        with self._tx():  # the idea and its source together, or neither
            idea = self.add_idea(found.rules)
            self._exec("INSERT OR IGNORE INTO idea_sources(idea_id, source, kind, text, text_sha256, reduced_by, "
                       "sentences_used, notes) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                       (idea.id, found.source, found.kind, found.text, hashlib.sha256(found.text.encode()).hexdigest(),
                        found.reduced_by, _dumps(used), _dumps(list(found.notes))))
        return idea

    def idea_sources(self, idea_id: int) -> list[dict]:
        """Where an idea came from, oldest first: ``source``, ``kind``, ``text``, ``sentences_used``, ...; [] if typed."""
        rows = self._all("SELECT source, kind, text, reduced_by, sentences_used, notes, created FROM idea_sources "
                         "WHERE idea_id=? ORDER BY id", (idea_id,))
        return [{**dict(r), "sentences_used": _loads(r["sentences_used"]) or [], "notes": _loads(r["notes"]) or []}
                for r in rows]

    def idea(self, idea_id: int) -> Idea:
        row = self._one("SELECT id, text FROM ideas WHERE id=?", (idea_id,))
        if row is None:
            raise LedgerError(f"no idea {idea_id} in {self.path}")
        return Idea(row["id"], row["text"])

    _EXPERIMENT = ("SELECT e.id, e.idea_id, i.text, e.symbol, e.timeframe, e.model, e.status, e.failures, "
                   "e.last_error FROM experiments e JOIN ideas i ON i.id = e.idea_id ")

    def experiment(self, idea: Idea | int | str, symbol: str, timeframe: str, model: str) -> Experiment:
        """The experiment of ``idea`` on ``symbol``/``timeframe`` with ``model``, created on first use."""
        if isinstance(idea, str):
            idea = self.add_idea(idea)
        idea_id = idea.id if isinstance(idea, Idea) else int(idea)
        with self._tx() as db:
            db.execute("INSERT OR IGNORE INTO experiments(idea_id, symbol, timeframe, model) VALUES (?,?,?,?)",
                       (idea_id, symbol, timeframe, model))
            row = db.execute(self._EXPERIMENT + "WHERE e.idea_id=? AND e.symbol=? AND e.timeframe=? AND e.model=?",
                             (idea_id, symbol, timeframe, model)).fetchone()
        return Experiment(*row)

    def experiment_by_id(self, experiment_id: int) -> Experiment:
        row = self._one(self._EXPERIMENT + "WHERE e.id=?", (experiment_id,))
        if row is None:
            raise LedgerError(f"no experiment {experiment_id} in {self.path}")
        return Experiment(*row)

    def may_run(self, experiment: Experiment) -> bool:
        """False once the experiment succeeded or used up its failure budget."""
        return self.experiment_by_id(experiment.id).status not in _FINAL

    def record_failure(self, experiment_id: int, error: str, *, charge: bool = True) -> Experiment:
        """Count a failure against the budget; ``charge=False`` (a model outage) only marks it for a retry."""
        if charge:
            self._exec("UPDATE experiments SET failures=failures+1, last_error=?, "
                       "status=CASE WHEN failures+1 >= ? THEN 'gave_up' ELSE 'failed' END WHERE id=?",
                       (error[:2000], self.failure_budget, experiment_id))
        else:
            self._exec("UPDATE experiments SET status='retry', last_error=? WHERE id=?", (error[:2000], experiment_id))
        return self.experiment_by_id(experiment_id)

    def record_success(self, experiment_id: int) -> None:
        self._exec("UPDATE experiments SET status='done', last_error=NULL WHERE id=?", (experiment_id,))

    def last_ok_run(self, experiment_id: int) -> int | None:
        row = self._one("SELECT max(id) FROM runs WHERE experiment_id=? AND status='ok'", (experiment_id,))
        return row[0]

    # ----- runs ----------------------------------------------------------------------
    def start_run(self, experiment: Experiment, settings: dict | None = None) -> int:
        with self._tx() as db:
            db.execute("UPDATE experiments SET status='running' WHERE id=?", (experiment.id,))
            return db.execute("INSERT INTO runs(idea_id, experiment_id, model, symbol, timeframe, settings) "
                              "VALUES (?,?,?,?,?,?)",
                              (experiment.idea_id, experiment.id, experiment.model, experiment.symbol,
                               experiment.timeframe, _dumps(settings))).lastrowid

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

    _RUN = ("SELECT r.*, i.text AS idea FROM runs r JOIN ideas i ON i.id = r.idea_id ")

    def run(self, run_id: int) -> dict:
        row = self._one(self._RUN + "WHERE r.id=?", (run_id,))
        if row is None:
            raise LedgerError(f"no run {run_id} in {self.path}")
        out = dict(row)
        for k in ("in_sample", "out_of_sample", "datasets", "params", "settings"):
            out[k] = _loads(out[k])
        return out

    def runs(self, limit: int | None = None) -> pd.DataFrame:
        """Every run, newest first: ``run_id, idea, symbol, timeframe, model, status, error, run_dir``..."""
        rows = self._all(self._RUN + "ORDER BY r.id DESC" + (f" LIMIT {int(limit)}" if limit else ""))
        recs = [{"run_id": r["id"], "idea": r["idea"], "symbol": r["symbol"], "timeframe": r["timeframe"],
                 "model": r["model"], "status": r["status"], "error_kind": r["error_kind"],
                 "error": r["error_message"], "run_dir": r["run_dir"], "started": r["started"],
                 "finished": r["finished"]} for r in rows]
        return pd.DataFrame(recs, columns=["run_id", "idea", "symbol", "timeframe", "model", "status", "error_kind",
                                           "error", "run_dir", "started", "finished"])

    def code_versions(self, run_id: int) -> list[dict]:
        rows = self._all("SELECT * FROM code_versions WHERE run_id=? ORDER BY id", (run_id,))
        return [{**dict(r), "stats": _loads(r["stats"])} for r in rows]

    # ----- reports -------------------------------------------------------------------
    def leaderboard(self, metric: str = "Return [%]", limit: int = 20, min_trades: int = 10) -> pd.DataFrame:
        """Best finished runs by out-of-sample ``metric``; runs with too few OOS trades ranked below."""
        from ._overfit import ledger_overfitting, overfit_columns

        rows = self._all("SELECT r.id, i.text, r.model, r.symbol, r.timeframe, r.in_sample, r.out_of_sample, r.params, "
                         f"({self._OVERFITTING_SQL}) AS overfitting "
                         "FROM runs r JOIN ideas i ON i.id=r.idea_id WHERE r.status='ok'")
        recs = [{"run": r["id"], "idea": r["text"][:60], "symbol": r["symbol"] or "?",
                 "timeframe": r["timeframe"] or "?", "model": r["model"],
                 "params": format_params(_loads(r["params"]) or {}),
                 **metric_columns(_loads(r["in_sample"]) or {}, _loads(r["out_of_sample"]) or {}, metric),
                 **overfit_columns(ledger_overfitting(r["overfitting"]))}
                for r in rows]
        df = pd.DataFrame(recs, columns=["run", "idea", "symbol", "timeframe", "model", "params",
                                         *metric_columns({}, {}, metric), *overfit_columns(None)])
        return rank_by_oos(df, metric, min_trades).head(limit).reset_index(drop=True)

    # Issue 15: a run's overfitting object is the stats JSON of its last "overfitting" code version.
    _OVERFITTING_SQL = ("SELECT c.stats FROM code_versions c WHERE c.run_id = r.id AND c.stage = 'overfitting' "
                        "ORDER BY c.id DESC LIMIT 1")

    def overfitting(self, run_id: int) -> dict | None:
        """The run's ``overfitting`` object (trials, dsr, psr, pbo, ...), or None when it was not assessed."""
        from ._overfit import ledger_overfitting

        row = self._one(f"SELECT ({self._OVERFITTING_SQL}) FROM runs r WHERE r.id=?", (run_id,))
        return ledger_overfitting(row[0]) if row else None

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
        """One row per experiment (ideas never run have one row with no symbol)."""
        with self._lock:
            return pd.read_sql_query(
                "SELECT i.id, i.text, e.symbol, e.timeframe, e.model, coalesce(e.status, 'new') AS status, "
                "coalesce(e.failures, 0) AS failures, e.last_error FROM ideas i "
                "LEFT JOIN experiments e ON e.idea_id = i.id ORDER BY i.id, e.id", self._db)


def format_params(params: dict) -> str:
    """Tuned parameters in one short cell: ``n1=10, n2=30``.

    >>> format_params({"rsi_n": 18, "low": 38.0, "k": 1.23456})
    'rsi_n=18, low=38, k=1.235'
    """
    def fmt(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    return ", ".join(f"{k}={fmt(v)}" for k, v in params.items())


def metric_columns(in_sample: dict, out_of_sample: dict, metric: str) -> dict:
    """The ranking columns of every results table: in-sample and out-of-sample ``metric``, and more."""
    trades = out_of_sample.get("# Trades")
    return {f"IS {metric}": in_sample.get(metric), f"OOS {metric}": out_of_sample.get(metric),
            "OOS Sharpe": out_of_sample.get("Sharpe Ratio"),
            "OOS trades": None if trades is None else int(trades)}


TOO_FEW_TRADES = "too few trades"


def rank_by_oos(df: pd.DataFrame, metric: str, min_trades: int = 10) -> pd.DataFrame:
    """Best out-of-sample ``metric`` first; runs with fewer than ``min_trades`` OOS trades, then none, last.

    A run with 3 out-of-sample trades and a great Sharpe is luck, not evidence:
    it is flagged ``too few trades`` in the ``flag`` column and ranked below the rest.
    """
    key = f"OOS {metric}"
    df = df.copy()
    df[key] = pd.to_numeric(df[key], errors="coerce")
    trades = pd.to_numeric(df["OOS trades"], errors="coerce")
    df["OOS trades"] = trades.astype("Int64")
    few = trades.isna() | (trades < min_trades)
    ok = df["status"].eq("ok") if "status" in df else pd.Series(True, index=df.index)
    df["flag"] = [TOO_FEW_TRADES if f and o else "" for f, o in zip(few, ok)]
    tier = (~ok).astype(int) * 2 + (few & ok).astype(int)
    if "dsr" in df:  # issue 15: DSR < 0.95 or PBO > 0.5 -> a "probably overfit" group below the rest
        from ._overfit import PROBABLY_OVERFIT, probably_overfit

        over = probably_overfit(df["dsr"], df["pbo"]) & ok
        df["flag"] = [", ".join(x for x in (PROBABLY_OVERFIT if o else "", f) if x) for o, f in zip(over, df["flag"])]
        tier = (~ok).astype(int) * 4 + (few & ok).astype(int) * 2 + over.astype(int)
    df = df.assign(_tier=tier).sort_values(["_tier", key], ascending=[True, False], na_position="last")
    return df.drop(columns="_tier").reset_index(drop=True)
