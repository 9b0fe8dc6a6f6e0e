"""The SQLite ledger: dedup, failure budget, NaN survival, threads, leaderboard."""
from __future__ import annotations

import math
import threading

from moondev_lab.ledger import SCHEMA_VERSION, Ledger, normalise_idea


def test_dedup_and_failure_budget(tmp_path):
    led = Ledger(tmp_path / "l.sqlite", failure_budget=2)
    a = led.add_idea("Buy when RSI(14) < 30,  sell when RSI > 70.")
    b = led.add_idea("buy when rsi(14) < 30, sell when rsi > 70")
    assert a.id == b.id and normalise_idea(a.text) == "buy when rsi(14) < 30, sell when rsi > 70"
    exp = led.experiment(a, "BTC/USD", "15m", "offline")
    assert led.may_run(exp)
    assert led.record_failure(exp.id, "SyntaxError: x").status == "failed" and led.may_run(exp)
    # A model outage is retried later and never charged to the budget.
    assert led.record_failure(exp.id, "model_unavailable: down", charge=False).status == "retry"
    assert led.experiment_by_id(exp.id).failures == 1 and led.may_run(exp)
    gave_up = led.record_failure(exp.id, "SyntaxError: x")
    assert gave_up.status == "gave_up" and "gave up after 2 failures" in gave_up.why_not_run()
    assert not led.may_run(exp)  # never re-queued forever
    # The same idea on another symbol, timeframe or model is another experiment, with its own budget.
    for key in (("ETH/USD", "15m", "offline"), ("BTC/USD", "1h", "offline"), ("BTC/USD", "15m", "claude-x")):
        other = led.experiment(a.id, *key)
        assert other.id != exp.id and led.may_run(other)
    # Reopening the file keeps everything.
    again = Ledger(tmp_path / "l.sqlite")
    assert again.experiment_by_id(exp.id).failures == 2 and "1 ideas" in repr(again)
    assert again.ledger_id == led.ledger_id and again.schema_version == SCHEMA_VERSION


def test_runs_code_stats_nan_and_usage(tmp_path):
    led = Ledger(tmp_path / "l.sqlite")
    idea = led.experiment("20/50 SMA cross", "BTC/USD", "15m", "offline")
    run = led.start_run(idea, settings={"cash": 10_000})
    led.add_code(run, "initial", 0, "class S(Strategy): ...", stats={"Sharpe Ratio": float("nan")})
    led.add_usage(run, "claude-x", "write_code", 100, 50, 0.0012)
    led.finish_run(run, "ok", in_sample={"Return [%]": 5.0, "Sharpe Ratio": float("nan")},
                   out_of_sample={"Return [%]": 2.5, "Sharpe Ratio": 0.3, "# Trades": 4}, params={"n1": 20})
    led.record_success(idea.id)
    r = led.run(run)
    assert math.isnan(r["in_sample"]["Sharpe Ratio"]) and r["params"] == {"n1": 20}
    assert (r["symbol"], r["timeframe"], r["settings"]) == ("BTC/USD", "15m", {"cash": 10_000})
    assert math.isnan(led.code_versions(run)[0]["stats"]["Sharpe Ratio"])
    assert led.usage_summary() == {"calls": 1, "input_tokens": 100, "output_tokens": 50, "cost_usd": 0.0012}
    board = led.leaderboard()
    assert board.loc[0, "OOS Return [%]"] == 2.5 and not led.may_run(idea)
    assert board.loc[0, "params"] == "n1=20" and board.loc[0, "flag"] == "too few trades"


def test_threads_share_one_ledger(tmp_path):
    led = Ledger(tmp_path / "l.sqlite")

    def work(k):
        for j in range(20):
            i = led.experiment(f"idea {k % 3} {j}", "BTC/USD", "15m", "offline")
            led.finish_run(led.start_run(i), "ok", out_of_sample={"Return [%]": j})

    ts = [threading.Thread(target=work, args=(k,)) for k in range(6)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    assert len(led.ideas()) == 60 and len(led.leaderboard(limit=1000)) == 120


def test_usage_summary_per_runs(tmp_path):
    led = Ledger(tmp_path / "l.sqlite")
    a = led.start_run(led.experiment("a", "BTC/USD", "15m", "m"))
    b = led.start_run(led.experiment("b", "BTC/USD", "15m", "m"))
    led.add_usage(a, "m", "research", 10, 5, 0.1)
    led.add_usage(b, "m", "research", 20, 7, 0.2)
    assert led.usage_summary([b]) == {"calls": 1, "input_tokens": 20, "output_tokens": 7, "cost_usd": 0.2}
    assert led.usage_summary([])["calls"] == 0 and led.usage_summary()["calls"] == 2


def test_too_few_trades_rank_below(tmp_path):
    led = Ledger(tmp_path / "l.sqlite")
    for text, ret, trades in (("lucky", 50.0, 3), ("solid", 10.0, 40), ("none", None, 0), ("meh", 2.0, 12)):
        run = led.start_run(led.experiment(text, "BTC/USD", "15m", "offline"))
        led.finish_run(run, "ok", out_of_sample={"Return [%]": ret, "# Trades": trades, "Sharpe Ratio": 5.2})
    board = led.leaderboard()
    assert list(board["idea"]) == ["solid", "meh", "lucky", "none"]
    assert list(board["flag"]) == ["", "", "too few trades", "too few trades"]
    assert str(board["OOS trades"].dtype) == "Int64"  # 94, not 94.0
    assert list(led.leaderboard(min_trades=1)["idea"])[:3] == ["lucky", "solid", "meh"]


V1_ROWS = """
INSERT INTO ideas(id, text, norm_hash, status, failures, last_error) VALUES
    (1, 'RSI dip', 'h1', 'done', 0, NULL), (2, 'order book', 'h2', 'gave_up', 3, 'not_understood: x'),
    (3, 'never run', 'h3', 'new', 0, NULL);
INSERT INTO runs(id, idea_id, model, status, out_of_sample, params, run_dir) VALUES
    (1, 1, 'offline', 'ok', '{"Return [%]": 4.5, "# Trades": 30}', '{"n": 14}', '/x/runs/run-00001'),
    (2, 2, 'offline', 'failed', NULL, NULL, NULL);
INSERT INTO code_versions(run_id, stage, iteration, code, sha256) VALUES (1, 'initial', 0, 'code', 's');
INSERT INTO usage(run_id, model, step, input_tokens) VALUES (1, 'offline', 'research', 7);
"""


def test_upgrade_from_the_first_schema_keeps_everything(tmp_path):
    """A ledger written by the code before schema versions (user_version 0) is upgraded in place."""
    import sqlite3

    from moondev_lab.ledger import _SCHEMA_V1

    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.executescript(_SCHEMA_V1 + V1_ROWS)  # exactly the schema the first releases created
    db.commit()
    assert db.execute("PRAGMA user_version").fetchone()[0] == 0
    db.close()
    led = Ledger(path)
    assert led.schema_version == SCHEMA_VERSION
    old = led.run(1)
    assert old["out_of_sample"]["Return [%]"] == 4.5 and old["params"] == {"n": 14} and old["symbol"] is None
    assert led.code_versions(1)[0]["code"] == "code" and led.usage_summary()["input_tokens"] == 7
    ideas = led.ideas()
    assert list(ideas["text"]) == ["RSI dip", "order book", "never run"]
    assert list(ideas["status"]) == ["done", "gave_up", "new"] and list(ideas["failures"]) == [0, 3, 0]
    # The old leaderboard row is still there, its unknown symbol shown as "?".
    board = led.leaderboard()
    assert board.loc[0, "run"] == 1 and board.loc[0, "symbol"] == "?"
    # New runs work, and the old run keeps its id.
    exp = led.experiment("RSI dip", "BTC/USD", "15m", "offline")
    assert led.may_run(exp) and led.start_run(exp) == 3
    # Opening again is a no-op; a ledger from a newer moondev_lab is refused, not damaged.
    ledger_id = led.ledger_id
    led.close()
    assert Ledger(path).ledger_id == ledger_id
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version=99")
    db.commit()
    db.close()
    import pytest

    from moondev_lab.ledger import LedgerError

    with pytest.raises(LedgerError, match="newer"):
        Ledger(path).start()


def _writer(path: str, k: int, n: int) -> None:
    led = Ledger(path, busy_timeout_s=60)
    for j in range(n):
        exp = led.experiment(f"idea {k}-{j}", "BTC/USD", "15m", "offline")
        run = led.start_run(exp)
        led.add_code(run, "initial", 0, "code")
        led.finish_run(run, "ok", out_of_sample={"Return [%]": j, "# Trades": 20})
        led.record_success(exp.id)


def test_several_writer_processes(tmp_path):
    """Processes writing one ledger at once never see "database is locked" and never lose a row."""
    import multiprocessing as mp

    path = str(tmp_path / "shared.sqlite")
    Ledger(path).start().close()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(path, k, 25)) for k in range(4)]
    [p.start() for p in procs]
    [p.join(120) for p in procs]
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    led = Ledger(path)
    assert len(led.runs()) == 100 and len(led.leaderboard(limit=1000)) == 100


def test_upgrade_from_version_2_adds_idea_sources_and_keeps_every_row(tmp_path):
    """A version-2 ledger (before idea sources) is upgraded in place; its ideas have no source, new ones do."""
    import sqlite3

    from moondev_lab.ledger import _SCHEMA_V1, MIGRATIONS
    from moondev_lab.sources import extract_idea

    path = tmp_path / "v2.sqlite"
    db = sqlite3.connect(path)
    db.executescript(_SCHEMA_V1 + V1_ROWS)
    MIGRATIONS[1](db)  # exactly the version-2 schema
    db.execute("PRAGMA user_version=2")
    db.commit()
    assert "idea_sources" not in {r[0] for r in db.execute("SELECT name FROM sqlite_master")}
    db.close()
    led = Ledger(path)
    assert led.schema_version == SCHEMA_VERSION == 3
    assert list(led.ideas()["text"]) == ["RSI dip", "order book", "never run"] and led.run(1)["params"] == {"n": 14}
    assert led.idea_sources(1) == []  # typed in before sources were kept
    idea = led.add_idea_source(extract_idea("Buy when RSI(14) < 30, sell above 70", model="offline"))
    assert idea.id == 4 and led.add_idea("buy when rsi(14) < 30, sell above 70.").id == idea.id  # deduplicated
    (kept,) = led.idea_sources(idea.id)
    assert kept["kind"] == "text" and kept["text"] == idea.text and kept["sentences_used"][0]["text"] == idea.text
    led.close()
    assert Ledger(path).idea_sources(idea.id)[0]["source"] == idea.text


def test_the_constructor_touches_no_file_and_a_closed_ledger_stays_closed(tmp_path):
    import pytest

    from moondev_lab.ledger import LedgerError, LedgerState

    path = tmp_path / "deep" / "ledger.sqlite"
    led = Ledger(path)
    assert led.state is LedgerState.NEW and not path.parent.exists()
    assert led.ideas().empty and led.state is LedgerState.OPEN and path.exists()  # the first call opened it
    assert led.start() is led  # a no-op once open
    led.close()
    assert led.state is LedgerState.CLOSED
    with pytest.raises(LedgerError, match="was closed"):
        led.runs()
    Ledger(tmp_path / "never-used.sqlite").close()
    assert not (tmp_path / "never-used.sqlite").exists()
