"""The signal-kind registry: every entry parses from its example, generates valid code, and owns its rules."""
from __future__ import annotations

import pytest

from moondev_lab import signals
from moondev_lab.codeextract import extract_strategy
from moondev_lab.models._codegen import generate
from moondev_lab.models._parser import parse_idea
from moondev_lab.models.offline import OfflineModel

KINDS = [k.name for k in signals.kinds()]


@pytest.mark.parametrize("name", KINDS)
def test_every_kind_reads_from_its_example_and_generates_valid_code(name):
    kind = signals.get(name)
    assert kind.example, f"{name} has no example idea"
    spec, missing = parse_idea(kind.example)
    assert spec is not None, missing
    assert name in [s.kind for s in spec.signals]
    code, cls = generate(spec)
    assert extract_strategy(code).strategy_name == cls
    sig = next(s for s in spec.signals if s.kind == name)
    kc = kind.code(sig.params)
    assert all(f"    {k} = {v!r}" in code for k, v in kc.params.items())
    assert all(line in code for line in kc.init)
    for helper in kc.helpers:  # the generated code embeds the very helper the fast path calls
        assert signals.helper_source(helper) in code


def test_filter_only_kinds_never_trade_alone_and_are_symmetric():
    assert set(signals.filter_only_kinds()) == {"volume", "adx", "bb_squeeze", "atr_regime", "bb_expand"}
    for name in signals.filter_only_kinds():
        kc = signals.get(name).code(signals.get(name).defaults)
        assert kc.symmetric
    spec, _ = parse_idea(signals.get("volume").example)  # no exit stated: the reversal of the cross exits, not volume
    by_kind = {s.kind: s for s in spec.signals}
    assert by_kind["ma_cross"].exit and not by_kind["volume"].exit


def test_constraints_come_from_the_registry():
    assert ("fast_n", "slow_n") in signals.get("ma_cross").less
    assert not signals.valid_params({"fast_n": 30, "slow_n": 30})
    assert not signals.valid_params({"macd_fast": 30, "macd_slow": 26})
    assert not signals.valid_params({"rsi_low": 70, "rsi_high": 30})
    assert not signals.valid_params({"sl_pct": -1.0})
    assert signals.valid_params({"fast_n": 10, "slow_n": 30, "sl_pct": 2.0})
    assert signals.is_fraction("sq_pct") and signals.is_fraction("bbx_pct") and not signals.is_fraction("sl_pct")
    # the optimizer's neighbourhood keeps them: no move crosses fast >= slow or leaves (0, 1)
    code = OfflineModel().write_code("Trade a 10/30 SMA crossover").code
    m = OfflineModel()
    seen = []
    while (r := m.improve(code, {"# Trades": 50}, {"metric": "Return [%]", "value": 1})).ok:
        seen.append(r.notes[0])
    assert seen and not any("fast_n: 10 -> 30" in n for n in seen)


def test_a_new_kind_is_one_entry(monkeypatch):
    """Registering an entry is all the parser and the code generator need."""
    import re

    def read(clause, ctx, add):
        m = re.search(r"\bzigzag\b", clause)
        if m:
            add("zigzag", {"n": 7}, m)

    entry = signals.SignalKind(
        "zigzag", lambda p: signals.KindCode({"zz_n": p["n"]}, ["self.zz = self.I(talib.SMA, close, self.zz_n)"],
                                             "close[i] > self.zz[i]", "close[i] < self.zz[i]"),
        read=read, defaults={"n": 7}, example="Buy when the zigzag turns up")
    monkeypatch.setitem(signals._REGISTRY, "zigzag", entry)
    spec, missing = parse_idea(entry.example)
    assert spec is not None, missing
    assert [s.kind for s in spec.signals] == ["zigzag"]
    code, _ = generate(spec)
    assert "zz_n = 7" in code and "close[i] > self.zz[i]" in code


def test_unknown_kind_is_a_clear_error():
    with pytest.raises(ValueError, match="no signal kind 'nope'"):
        signals.get("nope")
    with pytest.raises(ValueError, match="already registered"):
        signals.register(signals.get("rsi"))
