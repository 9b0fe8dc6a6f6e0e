"""`moondev-lab rbi`, `backtest`, `doctor` and `demo` as a user runs them."""
from __future__ import annotations

import json
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
