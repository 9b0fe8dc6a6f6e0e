"""End to end: a hostile reply of the (fake) model API never wins the RBI loop.

The real ``anthropic`` client talks to tests/fake_anthropic.py, which answers with an
honest SMA cross, a copy of it that fakes its stats in every run, and a copy that is
honest on the training data and fakes only its out-of-sample run. Both liars are
``result_mismatch`` (the true settled stats in the message), and neither ranks.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from fake_anthropic import FakeAnthropic, Recorded, text_reply
from moondev_lab.data import DataPool
from moondev_lab.ledger import Ledger
from moondev_lab.models import ModelFactory
from moondev_lab.rbi import RBIConfig, run_rbi
from moondev_lab.sandbox import SandboxPool
from strategies import sma_cross

REPO = Path(__file__).resolve().parents[1]
HONEST = sma_cross("self.buy(size=0.5)")
# The strategy's own module patches the harness that reports its stats (inside its sandbox).
LIE = '''
import pandas as _pd
from moondev_lab.sandbox import harness as _h
_real = _h.stats_to_dict
def _lie(s):
    d = _real(s)
    if {when}:
        d["Return [%]"], d["Sharpe Ratio"] = 1e9, 99.0
    return d
_h.stats_to_dict = _lie
'''
IDEA_HONEST = "Honest 10/30 SMA crossover"
IDEA_ALWAYS = "Always lying 10/30 SMA crossover"
IDEA_OOS = "Out-of-sample lying 10/30 SMA crossover"


def liar(when: str) -> str:
    return HONEST + LIE.format(when=when)


def oos_liar(first_bar) -> str:
    """Honest on the training data (its runs start at the first bar), lying on every later segment."""
    return liar(f"s['Start'] > _pd.Timestamp({first_bar.isoformat()!r})")


def fenced(code: str) -> str:
    return f"Here is the strategy:\n\n```python\n{code}```\n"


class Model:
    """Answers by what each request asks (ideas run concurrently): research notes, then the idea's code;
    a fix request gets the same code back (a model that insists)."""

    def __init__(self, codes: dict[str, str]):
        self.codes = {idea: f"# {idea}\n{code}" for idea, code in codes.items()}  # marked: a fix names its idea
        self.calls = Counter()

    def __call__(self, rec: Recorded):
        text = json.dumps(rec.body)
        idea = next(i for i in self.codes if i in text)
        if "This strategy failed in the harness" in text:
            return text_reply(fenced(self.codes[idea]))
        self.calls[idea] += 1
        return text_reply("SMA crossover: fast 10, slow 30.") if self.calls[idea] == 1 else \
            text_reply(fenced(self.codes[idea]))


def _check(results: dict, table, ledger: Ledger) -> None:
    honest, always, oos = results[IDEA_HONEST], results[IDEA_ALWAYS], results[IDEA_OOS]
    assert honest.status == "ok", honest.error
    # The always-liar fails its first run: the truth is the honest code's first run (before any grid).
    initial = ledger.code_versions(honest.run_id)[0]
    assert initial["stage"] == "initial"
    true_is, true_oos = initial["stats"]["Return [%]"], honest.out_of_sample["Return [%]"]
    assert always.status == "failed" and "ResultMismatch" in always.error
    assert f"Return [%]: claimed 1000000000.0, settled {true_is!r}" in always.error  # the true settled stats
    assert oos.status == "failed" and oos.error_kind == "result_mismatch", oos.error
    assert "out-of-sample run failed" in oos.error
    assert f"Return [%]: claimed 1000000000.0, settled {true_oos!r}" in oos.error
    assert oos.out_of_sample is None or oos.out_of_sample.get("Return [%]") != 1e9
    assert table.iloc[0]["idea"].startswith(IDEA_HONEST[:40])  # the liars never rank first


@pytest.fixture(scope="module")
def sandbox():
    with SandboxPool(2) as pool:
        yield pool


@pytest.mark.timeout(300)
def test_run_rbi_with_hostile_model_replies(sandbox, tmp_path):
    first_bar = DataPool().get("BTC/USD", "15m", start="2023-03-01", end="2023-03-31").index[0]
    model = Model({IDEA_HONEST: HONEST, IDEA_ALWAYS: liar("True"), IDEA_OOS: oos_liar(first_bar)})
    ledger = Ledger(tmp_path / "l.sqlite")
    cfg = RBIConfig(start="2023-03-01", end="2023-03-31", max_debug=1, max_optimize=0, grid=False,
                    quarters=False, timeout=60, runs_dir=tmp_path / "runs")
    with FakeAnthropic(responder=model) as fake:
        factory = ModelFactory(api_key="test-key", base_url=fake.url, rate_per_s=100, burst=100, max_retries=0,
                               timeout=10)
        report = run_rbi([IDEA_HONEST, IDEA_ALWAYS, IDEA_OOS], model=factory.get("claude-fake-1"), cfg=cfg,
                         ledger=ledger, sandbox=sandbox, progress=False)
    results = {r.idea: r for r in report.results}
    _check(results, report.table(), ledger)
    board = ledger.leaderboard(min_trades=0)
    assert list(board["idea"]) == [IDEA_HONEST]  # only settled, honest runs are finished runs
    flagged = [c for r in report.results[1:] for c in ledger.code_versions(r.run_id) if c["error"]]
    assert flagged and all("ResultMismatch" in c["error"] or "claimed" in c["error"] for c in flagged)


@pytest.mark.timeout(600)
def test_cli_rbi_with_anthropic_base_url_at_a_hostile_fake(lab_home, tmp_path):
    first_bar = DataPool().get("BTC/USD", "15m").index[0]  # (imports the bundled series into lab_home)
    model = Model({IDEA_HONEST: HONEST, IDEA_ALWAYS: liar("True"), IDEA_OOS: oos_liar(first_bar)})
    ideas = tmp_path / "ideas.txt"
    ideas.write_text("\n".join([IDEA_HONEST, IDEA_ALWAYS, IDEA_OOS]) + "\n")
    with FakeAnthropic(responder=model) as fake:
        env = {**os.environ, "ANTHROPIC_API_KEY": "sk-ant-test-must-not-leak", "ANTHROPIC_BASE_URL": fake.url}
        out = subprocess.run([sys.executable, "-m", "moondev_lab.cli", "rbi", "--ideas", str(ideas),
                              "--model", "claude-fake-1", "--max-debug", "1", "--max-optimize", "0", "--json"],
                             capture_output=True, text=True, cwd=REPO, timeout=540, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "sk-ant-test" not in out.stdout + out.stderr
    rep = json.loads(out.stdout)

    class Row(dict):
        __getattr__ = dict.get

    results = {r["idea"]: Row(r) for r in rep["results"]}
    ledger = Ledger(lab_home / "ledger.sqlite")
    board = ledger.leaderboard(min_trades=0)
    _check(results, board, ledger)
    assert list(board["idea"]) == [IDEA_HONEST]
