"""The offline model: idea text -> StrategySpec -> backtesting.py code that really runs on the BTC data."""
from __future__ import annotations

import warnings
from pathlib import Path

import pandas as pd
import pytest
from backtesting import Backtest

from moondev_lab.codeextract import extract_strategy, static_check
from moondev_lab.models import OfflineModel
from moondev_lab.models.offline import class_params

REPO = Path(__file__).resolve().parents[1]
_SHARED = REPO.parent / "shared" / "data" / "BTC-USD-15m.csv"
BTC_CSV = _SHARED if _SHARED.exists() else REPO / "data" / "BTC-USD-15m.csv"


@pytest.fixture(scope="module")
def btc() -> pd.DataFrame:
    df = pd.read_csv(BTC_CSV, skipinitialspace=True)
    df.columns = [c.strip() for c in df.columns]
    df = df.loc[:, [c for c in df.columns if c and not c.startswith("Unnamed")]]  # the trailing comma's empty column
    df.index = pd.to_datetime(df.pop("datetime"))
    df.columns = ["Open", "High", "Low", "Close", "Volume"]
    assert len(df) > 30_000
    return df


def run_code(code: str, name: str, data: pd.DataFrame, **params) -> pd.Series:
    ns: dict = {}
    exec(compile(code, "<offline>", "exec"), ns)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bt = Backtest(data, ns[name], cash=1_000_000, commission=0.001, finalize_trades=True)
        return bt.run(**params)


TYPICAL = [
    "Buy when RSI(14) < 30, sell when RSI > 70, 2% stop",
    "20/50 SMA crossover",
    "Bollinger band mean reversion",
    "MACD signal cross with 1.5 ATR stop",
    "20-bar Donchian breakout with volume above 1.5x average",
]


@pytest.mark.parametrize("idea", TYPICAL)
def test_typical_ideas_generate_code_that_runs_and_trades(idea, btc):
    model = OfflineModel()
    research = model.research(idea)
    assert research.ok, research.not_understood
    result = model.write_code(idea, research)
    assert result.ok, result.error
    assert extract_strategy(result.code).strategy_name == result.strategy_name
    assert [f for f in static_check(result.code) if f.severity == "error"] == []
    stats = run_code(result.code, result.strategy_name, btc)
    assert stats["# Trades"] > 5
    assert stats["_trades"]["Size"].abs().min() > 0


def test_numbers_in_the_text_become_parameters():
    m = OfflineModel()
    rsi = m.research("Buy when RSI(14) < 30, sell when RSI > 70, 2% stop").spec
    assert rsi.direction == "long"
    (sig,) = rsi.signals
    assert (sig.kind, sig.params, sig.entry, sig.exit) == ("rsi", {"n": 14, "low": 30, "high": 70}, True, True)
    assert (rsi.stop_loss.kind, rsi.stop_loss.value, rsi.stop_loss.trailing) == ("pct", 2.0, False)

    below = m.research("Go long when the 7-period RSI drops below 25 and exit when it rises above 60").spec
    assert below.signals[0].params == {"n": 7, "low": 25, "high": 60}

    ema = m.research("Enter long when the 9 EMA crosses above the 21 EMA, 3% take profit, 1.5% stop loss").spec
    assert ema.signals[0].params == {"ma": "EMA", "fast": 9, "slow": 21}
    assert (ema.take_profit.kind, ema.take_profit.value) == ("pct", 3.0)
    assert (ema.stop_loss.kind, ema.stop_loss.value) == ("pct", 1.5)

    macd = m.research("Short when MACD crosses below its signal line, 2x ATR trailing stop").spec
    assert macd.direction == "short"
    assert (macd.stop_loss.kind, macd.stop_loss.value, macd.stop_loss.trailing) == ("atr", 2.0, True)

    dc = m.research("Trade 55-day Donchian breakouts with volume 2x its 30-period average, 3x ATR target").spec
    kinds = {s.kind: s.params for s in dc.entry_signals}
    assert kinds["donchian"]["n"] == 55 and kinds["volume"] == {"n": 30, "mult": 2, "cmp": "above"}
    assert dc.direction == "both" and (dc.take_profit.kind, dc.take_profit.value) == ("atr", 3.0)

    bb = m.research("Buy when price closes below the lower Bollinger Band (20, 2.5) and exit at the middle band").spec
    assert bb.signals[0].params == {"n": 20, "k": 2.5, "mode": "reversion"}


def test_defaults_are_stated_never_silent():
    spec = OfflineModel().research("Bollinger band mean reversion").spec
    assert any("Bollinger period not given: 20" in a for a in spec.assumptions)
    assert any("direction not stated" in a for a in spec.assumptions)
    code = OfflineModel().write_code("Bollinger band mean reversion").code
    assert "Assumptions:" in code and "Bollinger period not given" in code


@pytest.mark.parametrize("idea, reason", [
    ("Short perpetuals when funding rates exceed 0.1% and RSI is above 70", "funding rates"),
    ("Buy when liquidation clusters form below price", "liquidation"),
    ("Enter long on bullish RSI divergence", "divergence"),
    ("Go long when the Mass Index exceeds 27", "Mass index"),
    ("Buy when the Zorblatt Momentum Oscillator turns up", "Zorblatt Momentum Oscillator"),
    ("Buy the dip when the moon is full", "no entry rule"),
    ("Trade when volume spikes and ADX is above 25", "no directional entry signal"),
    ("", "no entry rule"),
])
def test_unmappable_ideas_say_what_was_not_understood(idea, reason):
    model = OfflineModel()
    r = model.research(idea)
    assert not r.ok and r.spec is None
    assert any(reason.lower() in x.lower() for x in r.not_understood), r.not_understood
    assert reason.lower() in r.text.lower()
    code = model.write_code(idea, r)
    assert not code.ok and code.code == "" and "not understood" in code.error


def test_generation_is_deterministic():
    idea = "Trade breakouts when Bollinger Band width contracts to a 20-day low while volume spikes, 2x ATR stop"
    a, b = OfflineModel().write_code(idea), OfflineModel().write_code(idea)
    assert a.ok and a.code == b.code


def test_fix_code_declines_honestly():
    m = OfflineModel()
    code = m.write_code("20/50 SMA crossover").code
    fix = m.fix_code(code, "ValueError", "boom")
    assert not fix.ok and "cannot repair its own generated code" in fix.error
    assert "arbitrary code" in m.fix_code("x = 1", "NameError", "y").error


def test_improve_varies_one_parameter_deterministically(btc):
    idea = "20/50 SMA crossover"
    m1, m2 = OfflineModel(), OfflineModel()
    base = m1.write_code(idea).code
    stats = {"Return [%]": 1.0, "# Trades": 40}
    seq1 = [m1.improve(base, stats, {"metric": "Return [%]", "value": 20}) for _ in range(3)]
    seq2 = [m2.improve(base, stats, {"metric": "Return [%]", "value": 20}) for _ in range(3)]
    assert [r.code for r in seq1] == [r.code for r in seq2]  # same call sequence, same proposals
    before = class_params(base)
    seen = set()
    for r in seq1:
        assert r.ok, r.error
        after = class_params(r.code)
        changed = {k for k in before if before[k] != after[k]}
        assert len(changed) == 1 and after["fast_n"] < after["slow_n"]
        seen.add(tuple(sorted(after.items())))
        # everything except that one number is byte-identical
        assert len([a for a, b in zip(base.splitlines(), r.code.splitlines()) if a != b]) == 1
    assert len(seen) == 3  # three calls, three different neighbours
    stats2 = run_code(seq1[0].code, seq1[0].strategy_name, btc.iloc[:6000])
    assert stats2["# Trades"] > 0


def test_class_parameters_work_with_backtest_optimize(btc, monkeypatch):
    import multiprocessing.dummy

    import backtesting

    # exec'd classes cannot be pickled to worker processes; threads keep this test light anyway
    monkeypatch.setattr(backtesting, "Pool", multiprocessing.dummy.Pool)
    m = OfflineModel()
    res = m.write_code("Buy when RSI(14) < 30, sell when RSI > 70, 2% stop")
    ns: dict = {}
    exec(compile(res.code, "<offline>", "exec"), ns)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bt = Backtest(btc.iloc[:5000], ns[res.strategy_name], cash=1_000_000, commission=0.001, finalize_trades=True)
        stats = bt.optimize(rsi_low=[25, 30], rsi_high=[65, 70], maximize="Return [%]")
    assert stats._strategy.rsi_low in (25, 30) and stats._strategy.rsi_high in (65, 70)
