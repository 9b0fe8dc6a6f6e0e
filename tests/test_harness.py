"""The backtest harness, in-process: result shape, sizing, pandas_ta, wild code."""
from __future__ import annotations

import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from backtesting import Backtest

from moondev_lab.config import BUNDLED_DATA_DIR
from moondev_lab.sandbox.harness import (BacktestSettings, alias_pandas_ta, equity_points, execute,
                                          extract_code, normalise_size, silence_progress, warm_up)
from strategies import sma_cross

SMA_CROSS = sma_cross("self.buy(size=2.6)          # fractional units: invalid for backtesting.py")


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    """Two weeks of the real bundled BTC 15m candles, shaped like the data pool's frames."""
    raw = pd.read_csv(BUNDLED_DATA_DIR / "BTC-USD-15m.csv")
    raw.columns = raw.columns.str.strip()
    raw = raw.drop(columns=[c for c in raw.columns if not c or c.startswith("Unnamed")])
    raw.index = pd.DatetimeIndex(pd.to_datetime(raw.pop("datetime"), utc=True), name="ts")
    raw.columns = [c.title() for c in raw.columns]
    return raw.loc["2023-03-01":"2023-03-14"]


def test_run_matches_plain_backtesting_and_normalises_size(frame):
    payload = execute({"op": "run", "code": SMA_CROSS}, frame)
    assert payload["ok"], payload.get("error")
    # The same strategy with the size the harness chose (2.6 -> 2 whole units).
    ns: dict = {}
    exec(SMA_CROSS.replace("size=2.6", "size=2"), ns)
    silence_progress()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = Backtest(frame, ns["SmaCross"], **BacktestSettings().kwargs()).run()
    assert payload["size_adjustments"] > 0
    assert payload["stats"]["Return [%]"] == pytest.approx(ref["Return [%]"], rel=1e-12)
    assert payload["stats"]["# Trades"] == ref["# Trades"] == len(payload["trades"])
    assert payload["stats"]["_strategy"] == {"n1": 10, "n2": 30}
    assert payload["stats"]["Start"] == ref["Start"].isoformat()
    assert payload["stats"]["Duration"] == ref["Duration"].isoformat()
    assert payload["trades"][0]["Size"] == 2
    assert payload["equity"][-1]["equity"] == pytest.approx(ref["Equity Final [$]"])


def test_no_trades_keeps_nan(frame):
    code = "from backtesting import Strategy\nclass Idle(Strategy):\n    def init(self): pass\n    def next(self): pass\n"
    stats = execute({"op": "run", "code": code}, frame)["stats"]
    assert stats["# Trades"] == 0
    assert math.isnan(stats["Win Rate [%]"]) and math.isnan(stats["Sharpe Ratio"])


@pytest.mark.parametrize("size, expected", [(0.5, 0.5), (3.7, 3.0), (1.0, 1.0), (-0.25, 0.25), (-4.2, 4.0),
                                            (0, None), (float("nan"), None), (float("inf"), None),
                                            (np.float64(12.99), 12.0)])
def test_normalise_size(size, expected):
    assert normalise_size(size) == expected


def test_pandas_ta_alias_supports_typical_calls():
    alias_pandas_ta()
    import pandas_ta

    close = pd.Series(np.sin(np.arange(200) / 5) * 10 + 100)
    rsi = pandas_ta.rsi(close, length=14)
    assert 0 < rsi.iloc[-1] < 100
    df = pd.DataFrame({"close": close, "high": close + 1, "low": close - 1, "open": close})
    assert df.ta.rsi().iloc[-1] == pytest.approx(rsi.iloc[-1])
    assert df.ta.atr(length=14).notna().sum() > 150


def test_extract_code_from_llm_reply():
    reply = "<think>plan the thing</think>Sure! Here it is:\n```python\nimport talib\nx = 1\n```\nEnjoy."
    assert extract_code(reply).strip() == "import talib\nx = 1"
    assert extract_code("x = 2\n").strip() == "x = 2"


def test_wild_script_reads_missing_csv_and_uses_harness_settings(frame):
    wild = '''
import pandas as pd
from backtesting import Backtest, Strategy
data = pd.read_csv('/Users/someone/data/BTC-USD-15m.csv')
data.columns = data.columns.str.strip().str.lower()
data = data.drop(columns=[c for c in data.columns if 'unnamed' in c])
data = data.rename(columns={'open': 'Open', 'high': 'High', 'low': 'Low', 'close': 'Close', 'volume': 'Volume'})
data['datetime'] = pd.to_datetime(data['datetime'])
data = data.set_index('datetime')
data['Mid'] = (data['High'] + data['Low']) / 2

class MidBreak(Strategy):
    def init(self):
        pass
    def next(self):
        if not self.position and self.data.Close[-1] > self.data.Mid[-1]:
            self.buy(size=0.5)
        elif self.position and self.data.Close[-1] < self.data.Mid[-1]:
            self.position.close()

bt = Backtest(data, MidBreak, cash=10_000, commission=0.0)
print(bt.run())
bt.plot()
'''
    payload = execute({"op": "run", "code": wild}, frame)
    assert payload["ok"], payload.get("error")
    assert payload["csv_redirects"] == ["/Users/someone/data/BTC-USD-15m.csv"]
    assert payload["stats"]["Start"] == frame.index[0].isoformat()
    assert payload["stats"]["# Trades"] > 0
    assert payload["stats"]["Commissions [$]"] > 0          # the harness's commission, not 0.0
    assert payload["equity"][0]["equity"] == pytest.approx(1_000_000)


def test_equity_downsampled_to_cap():
    idx = pd.date_range("2023-01-01", periods=10_000, freq="15min", tz="UTC")
    curve = pd.DataFrame({"Equity": np.arange(10_000.0), "DrawdownPct": 0.0}, index=idx)
    pts = equity_points(curve, 2000)
    assert len(pts) == 2000
    assert pts[0]["equity"] == 0 and pts[-1]["equity"] == 9999
    assert pts[-1]["time"] == idx[-1].isoformat()


def test_fast_converters_give_exactly_what_the_generic_ones_gave(frame):
    """trades_to_records / equity_points / the sample CSV are vectorised; their output is unchanged."""
    from moondev_lab.sandbox.harness import _as_sample_csv, iso_times, to_jsonable, trades_to_records

    ns: dict = {}
    exec(sma_cross("self.buy(size=0.5, sl=self.data.Close[-1] * 0.97, tag='long')"), ns)
    stats = Backtest(frame, ns["SmaCross"], cash=1_000_000, finalize_trades=True).run()
    trades, curve = stats["_trades"], stats["_equity_curve"]
    assert len(trades) > 5 and trades["Tag"].iloc[0] == "long"
    assert trades_to_records(trades) == [{str(k): to_jsonable(v) for k, v in row.items()}
                                         for row in trades.to_dict("records")]
    assert trades_to_records(trades.iloc[:0]) == []
    n = len(curve)
    assert equity_points(curve, 50) == [
        {"time": to_jsonable(curve.index[i]), "equity": float(curve["Equity"].iloc[i]),
         "drawdown_pct": float(curve["DrawdownPct"].iloc[i])}
        for i in np.unique(np.linspace(0, n - 1, 50).round().astype(int))]
    for index in (frame.index, frame.index.tz_localize(None), frame.index.tz_convert("America/New_York"),
                  frame.index + pd.Timedelta("1.5s"), pd.DatetimeIndex([frame.index[0], pd.NaT])):
        assert iso_times(index) == [to_jsonable(t) for t in index]
    # the CSV a wild script's read_csv gets: DataFrame.to_csv's text, NaN and odd floats included
    odd = frame.iloc[:6].copy()
    odd["Open"] = [1e16, 1e-5, 0.1, 123456789.123, 5.0, float(2**60)]
    for sample in (frame, odd, odd.assign(Volume=[1.0, np.nan, 2, 3, 4, 5])):
        legacy = pd.DataFrame({"datetime": sample.index.tz_convert("UTC").tz_localize(None)
                               .strftime("%Y-%m-%d %H:%M:%S")})
        for col in ("Open", "High", "Low", "Close", "Volume"):
            legacy[" " + col.lower()] = sample[col].to_numpy()
        legacy[""] = ""
        assert _as_sample_csv(sample) == legacy.to_csv(index=False)


_CSV_CALLS = [{}, {"index_col": 0}, {"index_col": "datetime"}, {"index_col": False}, {"parse_dates": True},
              {"parse_dates": ["datetime"]}, {"parse_dates": [0]}, {"parse_dates": False, "index_col": 0},
              {"parse_dates": True, "index_col": 0}, {"parse_dates": ["datetime"], "index_col": "datetime"},
              {"parse_dates": [0], "index_col": "datetime"}]


def test_redirected_read_csv_builds_exactly_the_frame_its_csv_text_parses_to(frame):
    """A wild script's read_csv of a missing CSV: built from the pooled columns, equal to parsing the sample text."""
    import io

    from moondev_lab.sandbox.harness import _as_sample_csv, _sample_frame

    odd = frame.iloc[:7].copy()
    odd["Open"] = [1e16, 1e-5, 0.1, -0.0, float("inf"), float(2**60), np.nan]
    samples = (frame, frame.set_axis(frame.index.tz_localize(None)), frame.set_axis(frame.index.tz_convert("Asia/Tokyo")), odd)
    for sample in samples:
        text = _as_sample_csv(sample)
        volume = sample["Volume"].to_numpy().copy()
        for kwargs in _CSV_CALLS:
            built = _sample_frame(sample, kwargs)
            assert built is not None, kwargs
            pd.testing.assert_frame_equal(built, pd.read_csv(io.StringIO(text), **kwargs), check_exact=True)
            built[" volume"] *= 2  # the script's own, writable copy: the pooled data never changes
        np.testing.assert_array_equal(sample["Volume"].to_numpy(), volume)
    # Anything else parses the text, so read_csv does whatever it does with it (a result, or its own error).
    for kwargs in ({"usecols": ["datetime", " close"]}, {"sep": ";"}, {"parse_dates": True, "index_col": False},
                   {"parse_dates": ["open"]}, {"index_col": [0]}, {"index_col": True}, {"parse_dates": [False]}):
        assert _sample_frame(frame, kwargs) is None, kwargs
    assert _sample_frame(frame.set_axis(frame.index + pd.Timedelta("1.5s")), {}) is None  # the text keeps whole seconds
    assert _sample_frame(frame.iloc[:0], {}) is None
    wild = """
import pandas as pd
from backtesting import Backtest, Strategy
a = pd.read_csv("/nowhere/BTC-USD-15m.csv", parse_dates=["datetime"], index_col="datetime")
b = pd.read_csv("/nowhere/BTC-USD-15m.csv", usecols=["datetime", " close"])
assert list(b.columns) == ["datetime", " close"] and len(a) == len(b) and (a[" close"].to_numpy() == b[" close"].to_numpy()).all()
class Hold(Strategy):
    def init(self): pass
    def next(self):
        if not self.position: self.buy()
Backtest(a, Hold).run()
"""
    payload = execute({"op": "run", "code": wild}, frame)
    assert payload["ok"], payload.get("error")
    assert payload["csv_redirects"] == ["/nowhere/BTC-USD-15m.csv"] * 2


def test_errors_are_classified(frame):
    assert execute({"op": "run", "code": "def f(:"}, frame)["error"]["kind"] == "syntax_error"
    assert execute({"op": "run", "code": "x = 1"}, frame)["error"]["kind"] == "no_strategy"
    assert execute({"op": "run", "code": "import not_a_real_module_xyz"}, frame)["error"]["kind"] == "import_error"
    bad = SMA_CROSS.replace("self.position.close()", "raise ValueError('boom')")
    err = execute({"op": "run", "code": bad}, frame)["error"]
    assert (err["kind"], err["type"], err["message"]) == ("strategy_error", "ValueError", "boom")


def test_prose_without_code_is_classified_no_strategy():
    from moondev_lab.sandbox.harness import execute

    payload = execute({"op": "run", "code": "I would buy low and sell high, good luck!"}, None)
    assert payload["ok"] is False and payload["error"]["kind"] == "no_strategy"


def test_grid_chunk_returns_its_first_best_run_like_a_fresh_run(frame):
    combos = [{"n1": 5, "n2": 20}, {"n1": 10, "n2": 30}, {"n1": 10, "n2": 30}, {"n1": 15, "n2": 40}]
    chunk = execute({"op": "grid", "code": SMA_CROSS, "combos": combos, "maximize": "Return [%]"}, frame)
    assert chunk["ok"], chunk.get("error")
    values = chunk["values"]
    assert len(values) == 4 and values[1] == values[2]  # a tie: the first one must win
    best = max(range(4), key=lambda i: (values[i] is not None, values[i] if values[i] is not None else 0, -i))
    assert chunk["best_index"] == best
    fresh = execute({"op": "run", "code": SMA_CROSS, "params": combos[best]}, frame)
    got = chunk["best"]
    # The chunk's best run equals a fresh run at those parameters, field by field (NaN-aware).
    assert json.dumps(got["stats"], sort_keys=True) == json.dumps(fresh["stats"], sort_keys=True)
    assert got["trades"] == fresh["trades"] and got["equity"] == fresh["equity"]
    assert (got["size_adjustments"], got["skipped_orders"]) == (fresh["size_adjustments"], fresh["skipped_orders"])
    assert chunk["size_adjustments"] > got["size_adjustments"] > 0  # per-run counts, not the chunk's total


def test_interrupted_warm_up_leaves_the_harness_intact(frame):
    import backtesting
    from backtesting import Strategy

    before = (backtesting.Backtest, Strategy.buy, Strategy.sell, pd.read_csv)
    polls = []

    def stop_after_a_few_polls() -> bool:
        polls.append(1)
        return len(polls) > 3  # stops inside the warm-up backtest's next()

    warm_up(stop_after_a_few_polls)
    assert len(polls) == 4  # it stopped at the first poll that said so, and polled no more
    warm_up(lambda: True)  # a task already waiting: nothing runs
    assert (backtesting.Backtest, Strategy.buy, Strategy.sell, pd.read_csv) == before
    payload = execute({"op": "run", "code": SMA_CROSS}, frame)
    assert payload["ok"] and payload["size_adjustments"] > 0


def test_backtesting_imports_without_bokeh_until_the_first_plot(tmp_path):
    script = f'''
import sys, warnings
warnings.simplefilter("ignore")
from moondev_lab.sandbox import harness
harness.prepare_imports()
from backtesting import Backtest, Strategy
from backtesting.lib import crossover, plot_heatmaps
from backtesting.test import GOOG
assert "bokeh" not in sys.modules, "bokeh imported eagerly"

class Hold(Strategy):
    def init(self): pass
    def next(self):
        if not self.position: self.buy()

bt = Backtest(GOOG.iloc[:200], Hold, finalize_trades=True)
bt.run()
bt.plot(filename={str(tmp_path / "plot.html")!r}, open_browser=False)
assert "bokeh" in sys.modules
print("ok")
'''
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         cwd=str(Path(__file__).resolve().parents[1]))
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
    assert "Bokeh" in (tmp_path / "plot.html").read_text()
