"""Indicator panels on trusted-side plots: the task's claimed ``Strategy.I`` values, bounded, drawn only."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import talib

from conftest import REPO
from moondev_lab.data import default_pool
from moondev_lab.ledger import Ledger
from moondev_lab.rbi import RBIConfig, run_rbi
from moondev_lab.results import BacktestRun, load_run
from moondev_lab.sandbox import DataRef, ErrorKind, SandboxPool
from moondev_lab.sandbox._wire import INDICATOR_POINTS
from strategies import sma_cross

MARCH = DataRef("BTC/USD", "15m", start="2023-03-01", end="2023-03-31")
# A panel below the chart (not an overlay), and a two-row indicator with one name per row.
PANELS = sma_cross("self.buy(size=0.5)").replace(
    "    def next(self):",
    "        self.rsi = self.I(talib.RSI, self.data.Close, 14, overlay=False, name='RSI(14)')\n"
    "        self.bands = self.I(lambda c: talib.BBANDS(c, 20)[::2], self.data.Close, name=['BB upper', 'BB lower'])\n"
    "\n    def next(self):")


@pytest.fixture(scope="module")
def sandbox():
    with SandboxPool(1) as pool:
        yield pool


def legend(plot) -> list[str]:
    from bokeh.models import LegendItem

    return [str(item.label.value) for item in plot.figure.select({"type": LegendItem}) if item.label is not None]


def test_plot_shows_the_indicators_the_task_reported(sandbox):
    res = sandbox.run(PANELS, MARCH, indicators=True)
    assert res.ok, res.error
    shown = {x["name"] if isinstance(x["name"], str) else tuple(x["name"]): x for x in res.indicators}
    assert set(shown) == {"SMA(C,10)", "SMA(C,30)", "RSI(14)", ("BB upper", "BB lower")}
    assert shown["SMA(C,10)"]["overlay"] and not shown["RSI(14)"]["overlay"]
    close = default_pool().get("BTC/USD", "15m", start=MARCH.start, end=MARCH.end)["Close"].to_numpy()
    np.testing.assert_allclose(shown["RSI(14)"]["values"][0], talib.RSI(close, 14), equal_nan=True)
    assert shown[("BB upper", "BB lower")]["values"].shape == (2, len(close))
    run = BacktestRun.from_result(res, MARCH.resolved(), {}, "panels")
    labels = legend(run.plot())
    assert {"SMA(C,10)", "SMA(C,30)", "RSI(14)", "BB upper", "BB lower"} <= set(labels)
    # The stats are the settled ones; a run without indicators=True sends none (the dispatch stays small).
    plain = sandbox.run(PANELS, MARCH)
    assert plain.indicators == () and plain.stats == res.stats
    assert "RSI(14)" not in legend(BacktestRun.from_result(plain, MARCH.resolved(), {}, "plain").plot())
    # Saved and loaded back (result.json): the same panels.
    back = BacktestRun.from_json(json.loads(json.dumps(run.to_json())))
    assert set(legend(back.plot())) == set(labels)


def test_long_runs_send_indicators_at_the_chart_resolution(sandbox):
    full = DataRef("BTC/USD", "15m")
    res = sandbox.run(sma_cross(), full, indicators=True)
    assert res.ok, res.error
    n = len(default_pool().get("BTC/USD", "15m"))
    assert n > INDICATOR_POINTS and [x["values"].shape for x in res.indicators] == [(1, INDICATOR_POINTS)] * 2
    close = default_pool().get("BTC/USD", "15m")["Close"].to_numpy()
    sampled = np.linspace(0, n - 1, INDICATOR_POINTS).round().astype(int)
    np.testing.assert_allclose(res.indicators[0]["values"][0], talib.SMA(close, 10)[sampled], equal_nan=True)
    plot = BacktestRun.from_result(res, full.resolved(), {}, "long").plot()
    assert {"SMA(C,10)", "SMA(C,30)"} <= set(legend(plot))


def _forging(payload: str) -> str:
    """Strategy code that replaces the harness's indicator report with ``payload`` (a Python expression)."""
    return sma_cross("self.buy(size=0.5)") + (
        "\nimport sys\n_h = sys.modules['moondev_lab.sandbox.harness']\n"
        f"_h.indicator_payload = lambda stats: {payload}\n")


@pytest.mark.parametrize("payload, words", [
    ("'not a list'", "expected a list"),
    ("[{'name': 'x', 'values': [[0.0] * 10]}] * 100", "over the limit"),
    ("[{'name': 'huge', 'values': [[1.0] * 3_000_000]}]", "points"),
    ("[{'name': 'x', 'values': [[0.0] * 8] * 60} for _ in range(2)]", "rows"),
    ("[{'name': 5, 'values': [[0.0] * len(stats['_equity_curve'])]}]", "name must be"),
    ("[{'name': 'x', 'values': [['1'] * len(stats['_equity_curve'])]}]", "must be numbers"),
    ("[{'name': 'x', 'values': [[True] * len(stats['_equity_curve'])]}]", "must be numbers"),
    ("[{'name': 'x', 'overlay': 'yes', 'values': [[0.0] * len(stats['_equity_curve'])]}]", "true or false"),
    ("[{'name': 'x', 'values': 'abc'}]", "non-empty list of rows"),
], ids=["not-a-list", "too-many", "huge-row", "too-many-rows", "bad-name", "strings", "bools", "bad-flag",
        "bad-values"])
def test_a_forged_indicator_payload_is_refused_and_the_plot_still_draws(sandbox, payload, words):
    honest = sandbox.run(sma_cross("self.buy(size=0.5)"), MARCH, indicators=True)
    res = sandbox.run(_forging(payload), MARCH, indicators=True, timeout=60)
    assert res.ok, res.error  # display-only data: the settled run stands
    assert res.stats == honest.stats and res.indicators == []
    err = res.indicators_error
    assert err is not None and err.kind == ErrorKind.RESULT_INVALID and words in err.message, err
    run = BacktestRun.from_result(res, MARCH.resolved(), {}, "forged")
    assert run.indicators_error and "OHLC" in legend(run.plot())  # the chart, without the refused panels


def test_a_payload_past_the_wire_bounds_is_a_classified_result(sandbox):
    """Nested deeper than the wire decoder allows: the whole reply is result_invalid, never a crash."""
    deep = "[{'name': 'x', 'values': [[0.0]], 'extra': eval('[' * 40 + ']' * 40)}]"
    res = sandbox.run(_forging(deep), MARCH, indicators=True)
    assert not res.ok and res.error.kind == ErrorKind.RESULT_INVALID and "nested" in res.error.message


def test_idea_result_runs_show_and_backtest_plots_have_indicators(sandbox, tmp_path, lab_home):
    led = Ledger(tmp_path / "l.sqlite")
    conf = RBIConfig(start="2023-03-01", end="2023-04-30", max_optimize=0, grid=False, quarters=False, timeout=60,
                     runs_dir=tmp_path / "runs")
    (r,) = run_rbi(["Buy when RSI(14) < 30, sell when RSI > 70"], model="offline", cfg=conf, ledger=led,
                   sandbox=sandbox, progress=False).results
    assert r.status == "ok", r.error
    names = [x["name"] for x in r.out_of_sample_run.indicators]
    assert names and all(isinstance(n, str) for n in names)
    assert set(names) <= set(legend(r.plot()))
    page = (Path(r.run_dir) / "plot.html").read_text()
    assert all(n in page for n in names)
    assert set(names) <= set(legend(load_run(r.run_id, led).plot()))
    # runs show --plot draws a fresh plot when the folder has none: from the saved panels.
    (Path(r.run_dir) / "plot.html").unlink()
    out = subprocess.run([sys.executable, "-m", "moondev_lab.cli", "runs", "show", str(r.run_id), "--plot",
                          "--ledger", str(led.path)], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    plot = Path(out.stdout.split("plot: ")[-1].strip())
    assert all(n in plot.read_text() for n in names)
    # backtest --plot: a strategy file, plotted with its panels.
    path = tmp_path / "panels.py"
    path.write_text(PANELS)
    target = tmp_path / "bt-plot.html"
    out = subprocess.run([sys.executable, "-m", "moondev_lab.cli", "backtest", str(path), "--start", "2023-03-01",
                          "--end", "2023-03-31", "--plot", str(target)], capture_output=True, text=True, cwd=REPO,
                         timeout=300)
    assert out.returncode == 0, out.stderr + out.stdout
    assert "RSI(14)" in target.read_text() and "BB upper" in target.read_text()
    assert pd.notna(r.out_of_sample.get("Return [%]"))


def test_a_reply_larger_than_the_header_limit_decodes():
    """The header is bounded, not the whole reply: a result of several MiB (a plot run's panels) is read."""
    from moondev_lab.sandbox._wire import MAX_HEADER, decode_reply, encode_reply

    big = json.dumps({"ok": True, "stats": {}, "pad": "x" * (MAX_HEADER + 10)}).encode()
    reply = decode_reply(encode_reply({"error": None, "worker_pid": 1}, big))
    assert reply["error"] is None and len(reply["payload"]["pad"]) == MAX_HEADER + 10
    with pytest.raises(ValueError, match="header is missing or too large"):
        decode_reply(b"x" * (MAX_HEADER + 2) + b"\n{}")
