"""Parsing strategy code from several threads at once (the RBI loop runs ideas on threads)."""
from __future__ import annotations

import ast
from concurrent.futures import ThreadPoolExecutor

import pytest

from moondev_lab._ast_parse import parse
from moondev_lab.codeextract import extract_strategy
from moondev_lab.models.offline import OfflineModel, _class_params


def test_the_cpython_thread_race_is_parsed_again_and_other_errors_raise(monkeypatch):
    real, calls = ast.parse, []

    def flaky(source, filename="<unknown>"):
        calls.append(source)
        if len(calls) == 1:  # what CPython 3.11 raises when two threads build AST objects at once (gh-106905)
            raise SystemError("AST constructor recursion depth mismatch (before=39, after=27)")
        return real(source, filename)

    monkeypatch.setattr(ast, "parse", flaky)
    assert isinstance(parse("x = 1").body[0], ast.Assign) and len(calls) == 2

    def broken(source, filename="<unknown>"):
        raise SystemError("something else")

    monkeypatch.setattr(ast, "parse", broken)
    with pytest.raises(SystemError, match="something else"):
        parse("x = 1")
    monkeypatch.setattr(ast, "parse", real)
    with pytest.raises(SyntaxError):  # bad code still says so
        parse("def (:")


@pytest.mark.timeout(120)
def test_threads_reading_strategies_at_once_all_get_the_same_answer():
    model = OfflineModel()
    codes = [model.write_code(idea, model.research(idea)).code
             for idea in ("Buy when RSI(14) < 30, sell when RSI > 70, 2% stop", "20/50 SMA crossover",
                          "MACD signal cross with 1.5 ATR stop", "Bollinger band mean reversion")]

    def read_all():
        return [(extract_strategy(c).strategy_name, _class_params.__wrapped__(c)) for c in codes]

    want = read_all()
    with ThreadPoolExecutor(4) as threads:  # a failed parse raises here, from its thread
        got = list(threads.map(lambda _: read_all(), range(100)))
    assert len(got) == 100 and all(g == want for g in got)
