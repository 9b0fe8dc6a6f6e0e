"""The SQLite ledger: dedup, failure budget, NaN survival, threads, leaderboard."""
from __future__ import annotations

import math
import threading

from moondev_lab.ledger import Ledger, normalise_idea


def test_dedup_and_failure_budget(tmp_path):
    led = Ledger(tmp_path / "l.sqlite", failure_budget=2)
    a = led.add_idea("Buy when RSI(14) < 30,  sell when RSI > 70.")
    b = led.add_idea("buy when rsi(14) < 30, sell when rsi > 70")
    assert a.id == b.id and normalise_idea(a.text) == "buy when rsi(14) < 30, sell when rsi > 70"
    assert led.may_run(a)
    assert led.record_failure(a.id, "SyntaxError: x").status == "failed" and led.may_run(a)
    assert led.record_failure(a.id, "SyntaxError: x").status == "gave_up"
    assert not led.may_run(a)  # never re-queued forever
    # Reopening the file keeps everything.
    again = Ledger(tmp_path / "l.sqlite")
    assert again.idea(a.id).failures == 2 and "1 ideas" in repr(again)


def test_runs_code_stats_nan_and_usage(tmp_path):
    led = Ledger(tmp_path / "l.sqlite")
    idea = led.add_idea("20/50 SMA cross")
    run = led.start_run(idea.id, "offline")
    led.add_code(run, "initial", 0, "class S(Strategy): ...", stats={"Sharpe Ratio": float("nan")})
    led.add_usage(run, "claude-x", "write_code", 100, 50, 0.0012)
    led.finish_run(run, "ok", in_sample={"Return [%]": 5.0, "Sharpe Ratio": float("nan")},
                   out_of_sample={"Return [%]": 2.5, "Sharpe Ratio": 0.3, "# Trades": 4}, params={"n1": 20})
    led.record_success(idea.id)
    r = led.run(run)
    assert math.isnan(r["in_sample"]["Sharpe Ratio"]) and r["params"] == {"n1": 20}
    assert math.isnan(led.code_versions(run)[0]["stats"]["Sharpe Ratio"])
    assert led.usage_summary() == {"calls": 1, "input_tokens": 100, "output_tokens": 50, "cost_usd": 0.0012}
    board = led.leaderboard()
    assert board.loc[0, "OOS Return [%]"] == 2.5 and not led.may_run(idea)


def test_threads_share_one_ledger(tmp_path):
    led = Ledger(tmp_path / "l.sqlite")

    def work(k):
        for j in range(20):
            i = led.add_idea(f"idea {k % 3} {j}")
            led.finish_run(led.start_run(i.id, "offline"), "ok", out_of_sample={"Return [%]": j})

    ts = [threading.Thread(target=work, args=(k,)) for k in range(6)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    assert len(led.ideas()) == 60 and len(led.leaderboard(limit=1000)) == 120


def test_usage_summary_per_runs(tmp_path):
    led = Ledger(tmp_path / "l.sqlite")
    a = led.start_run(led.add_idea("a").id, "m")
    b = led.start_run(led.add_idea("b").id, "m")
    led.add_usage(a, "m", "research", 10, 5, 0.1)
    led.add_usage(b, "m", "research", 20, 7, 0.2)
    assert led.usage_summary([b]) == {"calls": 1, "input_tokens": 20, "output_tokens": 7, "cost_usd": 0.2}
    assert led.usage_summary([])["calls"] == 0 and led.usage_summary()["calls"] == 2
