"""Lenient extraction, validation and static checks of strategy code (moondev_lab.codeextract)."""
from __future__ import annotations

import pytest

from moondev_lab.codeextract import (CodeSyntaxError, NoCodeFound, StrategyNotFound, describe_data_use, extract_code,
                                     extract_strategy, find_strategy_classes, static_check)
from strategies import sma_cross

GOOD = sma_cross("self.buy(size=0.5)")


def test_think_blocks_are_stripped_closed_and_unclosed():
    closed = f"<think>Maybe ```python\nclass Draft(Strategy): pass\n``` no.</think>Final:\n```python\n{GOOD}```\n"
    assert extract_strategy(closed).strategy_name == "SmaCross"
    unclosed = f"<think>I am still thinking about class Draft...\n```python\n{GOOD}```"
    assert extract_strategy(unclosed).strategy_name == "SmaCross"
    with pytest.raises(NoCodeFound, match="think"):
        extract_code("<think>only thoughts, never finished")


def test_unclosed_fence_is_taken_when_it_parses():
    reply = "Here is the strategy:\n```python\n" + GOOD  # the reply ended without the closing fence
    assert extract_code(reply) == GOOD


def test_truncated_unclosed_fence_reports_syntax_location():
    reply = "```python\n" + GOOD[:GOOD.index("self.buy") + 10]
    with pytest.raises(CodeSyntaxError) as ei:
        extract_code(reply)
    assert isinstance(ei.value, SyntaxError)  # the sandbox harness classifies it as a syntax error
    assert ei.value.lineno == GOOD[:GOOD.index("self.buy")].count("\n") + 1
    assert "unclosed fence" in str(ei.value) and "line" in str(ei.value)


def test_prefers_the_block_that_defines_a_strategy():
    reply = ("Install first:\n```bash\npip install ta-lib\n```\nA helper:\n```python\nimport numpy as np\n"
             "def zscore(x):\n    return (x - x.mean()) / x.std()\n```\nAnd the strategy:\n```\n" + GOOD + "```\nDone.")
    got = extract_strategy(reply)
    assert got.strategy_name == "SmaCross" and "pip install" not in got.code and "zscore" not in got.code


def test_unfenced_code_accepted_prose_rejected():
    assert extract_code(GOOD) == GOOD
    with pytest.raises(NoCodeFound, match="no code block"):
        extract_code("I'm sorry, I can't write that strategy because it needs order-book data.")
    with pytest.raises(NoCodeFound):
        extract_code("   ")


def test_exactly_one_strategy_class():
    with pytest.raises(StrategyNotFound, match="no backtesting.Strategy subclass"):
        extract_strategy("```python\nimport talib\nx = 1\n```")
    two = GOOD + "\n\nclass Other(Strategy):\n    def init(self): pass\n    def next(self): pass\n"
    with pytest.raises(StrategyNotFound) as ei:
        extract_strategy(two)
    assert ei.value.classes == ["SmaCross", "Other"]
    # a refinement of a local Strategy subclass: the leaf is the one to run
    derived = GOOD + "\n\nclass FastSmaCross(SmaCross):\n    n1 = 5\n"
    assert extract_strategy(derived).strategy_name == "FastSmaCross"
    assert find_strategy_classes(derived) == ["SmaCross", "FastSmaCross"]
    # backtesting.lib bases count too
    assert extract_strategy("from backtesting.lib import TrailingStrategy\nclass T(TrailingStrategy):\n    pass\n"
                            ).strategy_name == "T"


def test_extract_code_stays_compatible_with_the_sandbox_harness():
    from moondev_lab.sandbox.harness import extract_code as harness_extract

    reply = "<think>plan the thing</think>Sure! Here it is:\n```python\nimport talib\nx = 1\n```\nEnjoy."
    assert harness_extract(reply).strip() == "import talib\nx = 1"
    with pytest.raises(StrategyNotFound):
        extract_code(reply, require_strategy=True)


def test_static_check_flags_what_the_sandbox_refuses():
    code = """import os
import subprocess, socket
from ctypes import CDLL
import shutil
import requests
key = os.environ.get("ANTHROPIC_API_KEY")
f = open("/etc/passwd")
g = open("/tmp/out.txt", "w")
eval("1+1")
exec("x = 2")
__import__("os")
os.system("ls")
"""
    findings = static_check(code)
    msgs = [(f.line, f.severity, f.message) for f in findings]
    flagged_lines = {line for line, sev, _ in msgs if sev == "error"}
    assert {1, 2, 3, 4, 5, 6, 8, 9, 10, 11, 12} <= flagged_lines
    assert 7 not in flagged_lines  # reading a file is the sandbox's business, not a write
    assert any("os.environ" in m for _, _, m in msgs)
    assert any("open() for writing" in m for _, _, m in msgs)
    assert findings == sorted(findings, key=lambda f: (f.line, f.message))
    assert static_check(GOOD) == []
    assert "does not parse" in static_check("def (:")[0].message


def test_describe_data_use_spots_code_from_the_wild():
    wild = """import pandas as pd
from backtesting import Backtest, Strategy
data = pd.read_csv('/Users/someone/data/BTC-USD-15m.csv', parse_dates=['datetime'])
class S(Strategy):
    def init(self): pass
    def next(self): pass
if __name__ == "__main__":
    bt = Backtest(data, S, cash=10_000)
    print(bt.run())
    bt.optimize(n=range(5, 10))
    bt.plot()
"""
    use = describe_data_use(wild)
    assert use.is_wild and use.main_guard
    assert use.reads_files[0][0] == 3 and "read_csv" in use.reads_files[0][1]
    assert use.backtest_calls == [8] and use.runs == [9] and use.optimizes == [10] and use.plots == [11]
    assert "loads its own data" in str(use)
    tame = describe_data_use(GOOD)
    assert not tame.is_wild and "defines a strategy only" in str(tame)
