"""`moondev-lab rbi`, `backtest`, `doctor` and `demo` as a user runs them."""
from __future__ import annotations

import json
import re
import math
import os
import subprocess
import sys

import pytest

from conftest import REPO
from moondev_lab.ledger import Ledger

WILD = '''import pandas as pd
from backtesting import Backtest, Strategy
import talib

class RsiDip(Strategy):
    def init(self):
        self.rsi = self.I(talib.RSI, self.data.Close, 14)
    def next(self):
        if self.rsi[-1] < 30 and not self.position:
            self.buy(size=3)          # whole units of BTC would need ~100k cash: the harness copes
        elif self.rsi[-1] > 70:
            self.position.close()

df = pd.read_csv("/home/someone/data/BTC-USD-15m.csv")
df.columns = [c.strip().lower() for c in df.columns]
df = df.rename(columns={"open": "Open", "high": "High", "low": "Low", "close": "Close", "volume": "Volume"})
df["datetime"] = pd.to_datetime(df["datetime"])
df = df.set_index("datetime")[["Open", "High", "Low", "Close", "Volume"]]
bt = Backtest(df, RsiDip, cash=100_000, commission=0.002)
stats = bt.run()
print(stats)
bt.plot()
'''

REPLY = '''<think>The user wants an EMA cross.</think>
Sure! Here is a strategy that trades EMA crossovers.

```python
from backtesting import Strategy
from backtesting.lib import crossover
import pandas_ta as ta
import pandas as pd

class EmaCross(Strategy):
    def init(self):
        close = pd.Series(self.data.Close)
        self.fast = self.I(lambda: ta.ema(close, length=12).to_numpy())
        self.slow = self.I(lambda: ta.ema(close, length=26).to_numpy())
    def next(self):
        if crossover(self.fast, self.slow):
            self.buy()
        elif crossover(self.slow, self.fast):
            self.position.close()
```

Let me know if you want a stop-loss.
'''


def cli(*args, timeout=300) -> subprocess.CompletedProcess:
    env = {**os.environ, "ANTHROPIC_API_KEY": "sk-ant-test-must-not-leak"} if "--model" in args else dict(os.environ)
    return subprocess.run([sys.executable, "-m", "moondev_lab.cli", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=timeout, env=env)


@pytest.mark.parametrize("name, code", [("wild.py", WILD), ("reply.md", REPLY)])
def test_backtest_command_runs_any_strategy_file(tmp_path, name, code):
    path = tmp_path / name
    path.write_text(code)
    out = cli("backtest", str(path), "--symbol", "BTC/USD", "--timeframe", "15m", "--start", "2023-05-01",
              "--end", "2023-06-01", "--json")
    assert out.returncode == 0, out.stderr + out.stdout
    res = json.loads(out.stdout)
    assert res["ok"] and res["stats"]["Start"].startswith("2023-05-01")
    assert res["stats"]["# Trades"] == len(res["trades"]) > 0


def test_backtest_command_classifies_hostile_code(tmp_path):
    path = tmp_path / "evil.py"
    path.write_text("while True:\n    pass\n")
    out = cli("backtest", str(path), "--timeout", "2", "--json")
    assert out.returncode == 1
    assert json.loads(out.stdout)["error"]["kind"] == "timeout"


def test_rbi_command_with_ideas_file(tmp_path, lab_home):
    ideas = tmp_path / "ideas.txt"
    ideas.write_text("# one idea per line\nBuy when RSI(14) < 30, sell when RSI > 70, 2% stop\n"
                     "Trade the news sentiment of Elon Musk tweets\n")
    out = cli("rbi", "--ideas", str(ideas), "--model", "offline", "--max-optimize", "0", "--json")
    assert out.returncode == 0, out.stderr
    rep = json.loads(out.stdout)
    ok, bad = rep["results"]
    assert ok["status"] == "ok" and not math.isnan(ok["out_of_sample"]["Return [%]"])
    assert bad["status"] == "failed" and bad["error_kind"] == "not_understood"
    run_dir = lab_home / "runs" / f"run-{ok['run_id']:05d}-{Ledger(lab_home / 'ledger.sqlite').ledger_id[:8]}"
    assert ok["run_dir"] == str(run_dir)
    assert {p.name for p in run_dir.iterdir()} == {"strategy.py", "stats.json", "result.json", "plot.html"}
    assert "sk-ant-test" not in out.stdout + out.stderr
    table = cli("rbi", "Buy when RSI(14) < 30, sell when RSI > 70, 2% stop", "--model", "offline")
    assert "skipped" in table.stdout and "leaderboard" in table.stdout  # deduped, leaderboard still shown


def test_doctor(lab_home):
    out = cli("doctor", "--json")
    report = json.loads(out.stdout)
    assert out.returncode == (0 if report["ok"] else 1)
    assert set(report["checks"]) >= {"memory", "cgroup limit", "cpu", "disk", "store"}
    assert str(lab_home / "store") in report["checks"]["store"]["value"]
    text = cli("doctor").stdout
    assert "store" in text and ("healthy" in text or "problem" in text.lower())


BAD_INDICATOR = '''from backtesting import Strategy


class Bad(Strategy):
    def init(self):
        self.x = self.I(lambda: undefined_thing(self.data.Close))

    def next(self):
        pass
'''


def test_backtest_prints_the_real_error_and_its_line(tmp_path):
    path = tmp_path / "bad.py"
    path.write_text(BAD_INDICATOR)
    out = cli("backtest", str(path), "--start", "2023-05-01", "--end", "2023-05-10")
    assert out.returncode == 1
    assert "NameError: name 'undefined_thing' is not defined" in out.stdout
    assert "at strategy line 6: self.x = self.I(lambda: undefined_thing(self.data.Close))" in out.stdout
    assert "Traceback" not in out.stdout + out.stderr


def test_backtest_prints_stats_money_settings_and_an_offline_plot(tmp_path):
    from strategies import SMA_CROSS

    path = tmp_path / "sma.py"
    path.write_text(SMA_CROSS)
    plot = tmp_path / "p" / "plot.html"
    out = cli("backtest", str(path), "--start", "2023-05-01", "--end", "2023-06-01", "--cash", "50000",
              "--commission", "0.002", "--plot", str(plot))
    assert out.returncode == 0, out.stderr
    assert "cash 50,000, commission 0.20%" in out.stdout and f"plot: {plot}" in out.stdout
    assert "Sharpe Ratio" in out.stdout and "# Trades" in out.stdout
    assert not re.search(r"\d\.\d{3,}", out.stdout) and "P30D" not in out.stdout  # rounded, readable
    assert out.stderr == ""  # no stray warnings
    page = plot.read_text()
    assert "<script src=" not in page.replace("<script src=\"data:", "") and "sma.py" in page.split("</title>")[0]


def test_runs_commands_and_expected_errors(tmp_path, lab_home):
    out = cli("rbi", "20/50 SMA crossover", "--model", "offline", "--max-optimize", "0")
    assert out.returncode == 0, out.stderr
    assert "results: run folders under" in out.stdout and str(lab_home / "runs") in out.stdout
    assert "symbol" in out.stdout and "timeframe" in out.stdout and "params" in out.stdout
    listed = json.loads(cli("runs", "ls", "--json").stdout)
    (run,) = listed
    assert {"run_id", "idea", "symbol", "timeframe", "status", "run_dir"} <= set(run)
    assert (run["symbol"], run["timeframe"], run["status"]) == ("BTC/USD", "15m", "ok")
    shown = cli("runs", "show", str(run["run_id"]), "--plot")
    assert shown.returncode == 0 and "out-of-sample" in shown.stdout and "plot.html" in shown.stdout
    trades = tmp_path / "trades.csv"
    exported = cli("runs", "export", str(run["run_id"]), "--trades", str(trades))
    assert exported.returncode == 0 and trades.read_text().startswith("Size,EntryBar,ExitBar")
    # A forced re-run: a new run and folder.
    forced = cli("rbi", "20/50 SMA crossover", "--model", "offline", "--max-optimize", "0", "--force", "--json")
    again = json.loads(forced.stdout)["results"][0]
    assert again["status"] == "ok" and again["run_id"] == run["run_id"] + 1 and again["run_dir"] != run["run_dir"]
    # Expected errors: one line, exit 2, no traceback.
    for args in (("runs", "show", "999"), ("rbi", "x", "--model", "claude-sonnet-4-5"),
                 ("runs", "export", "1"), ("runs", "ls", "--ledger", str(tmp_path / "nope.sqlite"))):
        env = {k: v for k, v in os.environ.items() if k != "ANTHROPIC_API_KEY"}
        bad = subprocess.run([sys.executable, "-m", "moondev_lab.cli", *args], capture_output=True, text=True,
                             cwd=REPO, timeout=120, env=env)
        assert bad.returncode == 2, (args, bad.stderr)
        assert bad.stderr.startswith("error: ") and bad.stderr.count("\n") == 1, bad.stderr
    # A closed pipe (| head) is not an error.
    piped = subprocess.run(f"{sys.executable} -m moondev_lab.cli runs ls | head -c 10", shell=True,
                           capture_output=True, text=True, cwd=REPO, timeout=60)
    assert "Traceback" not in piped.stderr and "BrokenPipe" not in piped.stderr


def test_demo_keeps_its_own_home_and_never_overwrites(lab_home):
    first = cli("demo", "--max-optimize", "0")
    assert first.returncode == 0, first.stderr
    demo = lab_home / "demo"
    assert f"demo home: {demo}" in first.stdout and ".venv/bin/moondev-lab" in first.stdout
    assert not (lab_home / "ledger.sqlite").exists() and not (lab_home / "runs").exists()
    folders = {p.name: p.stat().st_mtime_ns for p in (demo / "runs").iterdir()}
    assert len(folders) == 5
    second = cli("demo", "--max-optimize", "0", "--json")
    assert second.returncode == 0, second.stderr
    after = {p.name: p.stat().st_mtime_ns for p in (demo / "runs").iterdir()}
    assert len(after) == 10 and all(after[name] == t for name, t in folders.items())  # old runs untouched
    assert {r["run_id"] for r in json.loads(second.stdout)["results"]} == {6, 7, 8, 9, 10}
