"""Result objects: stats like backtesting.py's, an exact equity curve, heatmaps, offline plots, past runs."""
from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from moondev_lab.ledger import Ledger
from moondev_lab.rbi import RBIConfig, run_rbi
from moondev_lab.results import BacktestRun, format_value, load_run
from moondev_lab.sandbox import DataRef, SandboxPool
from strategies import sma_cross

RSI_IDEA = "Buy when RSI(14) < 30, sell when RSI > 70, 2% stop"


@pytest.fixture(scope="module")
def sandbox():
    with SandboxPool(2) as pool:
        yield pool


def cfg(tmp_path, **kw) -> RBIConfig:
    base = dict(start="2023-03-01", end="2023-04-30", max_optimize=0, grid=True, max_grid=9, quarters=True,
                timeout=60, runs_dir=tmp_path / "runs")
    return RBIConfig(**{**base, **kw})


class _Scripts(HTMLParser):
    def __init__(self):
        super().__init__()
        self.srcs, self.inline, self.title = [], 0, None
        self._in_title = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "script":
            if attrs.get("src"):
                self.srcs.append(attrs["src"])
            else:
                self.inline += 1
        if tag == "title":
            self._in_title = True

    def handle_data(self, data):
        if self._in_title:
            self.title = data

    def handle_endtag(self, tag):
        self._in_title = self._in_title and tag != "title"


def parse_html(text: str) -> _Scripts:
    p = _Scripts()
    p.feed(text)
    return p


@pytest.mark.parametrize("buy", ["self.buy(size=0.5)", "self.buy(size=0.3, sl=self.data.Close[-1] * 0.99)",
                                 "self.sell(size=0.4)"])
def test_equity_rebuilt_exactly_and_stats_like_backtesting(sandbox, buy):
    """Stats, trades and the full equity curve equal Backtest.run()'s bar by bar: the broker's settlement
    as it is, a saved run's exact curve, and (a run saved before settlement) the curve rebuilt from trades."""
    from backtesting import Backtest

    from moondev_lab.data import default_pool

    code = sma_cross(buy)
    ref = DataRef("BTC/USD", "15m", start="2023-03-01", end="2023-03-31")
    result = sandbox.run(code, ref)
    assert result.ok, result.error
    run = BacktestRun.from_result(result, {"symbol": "BTC/USD", "timeframe": "15m", "start": ref.start,
                                           "end": ref.end}, {"cash": 1_000_000, "commission": 0.001}, "t")
    frame = default_pool().get("BTC/USD", "15m", start=ref.start, end=ref.end)
    ns: dict = {}
    exec(code, ns)  # trusted: the test's own strategy, to get backtesting.py's reference answer
    ref_stats = Backtest(frame, ns["SmaCross"], cash=1_000_000, commission=0.001, finalize_trades=True).run()
    saved = run.to_json()
    assert run.settled is not None and "equity_full" in saved
    loaded = BacktestRun.from_json(json.loads(json.dumps(saved, allow_nan=True)))
    old = BacktestRun.from_json({k: v for k, v in saved.items() if k != "equity_full"})  # saved pre-settlement
    for each in (run, loaded, old):
        check_like_backtesting(each, ref_stats)
    pd.testing.assert_frame_equal(loaded.equity, run.equity)  # exact, not rebuilt
    pd.testing.assert_frame_equal(loaded.trades, run.trades)
    assert run.stats["Sharpe Ratio"] == ref_stats["Sharpe Ratio"]  # the settlement's own, full precision


def check_like_backtesting(run: BacktestRun, ref_stats: pd.Series) -> None:
    stats = run.stats
    assert isinstance(stats, pd.Series) and run.equity_exact
    np.testing.assert_allclose(stats["_equity_curve"]["Equity"].to_numpy(),
                               ref_stats["_equity_curve"]["Equity"].to_numpy(), rtol=1e-12)
    np.testing.assert_allclose(stats["_equity_curve"]["DrawdownPct"].to_numpy(),
                               ref_stats["_equity_curve"]["DrawdownPct"].to_numpy(), atol=1e-12)
    assert stats["_equity_curve"].index.equals(ref_stats["_equity_curve"].index)
    t, rt = stats["_trades"], ref_stats["_trades"]
    assert len(t) == len(rt) and (t["EntryBar"].to_numpy() == rt["EntryBar"].to_numpy()).all()
    assert t["EntryTime"].equals(rt["EntryTime"]) and t["Duration"].equals(rt["Duration"])
    assert stats["Return [%]"] == ref_stats["Return [%]"] and stats["# Trades"] == ref_stats["# Trades"]
    assert stats["Start"] == ref_stats["Start"] and stats["Duration"] == ref_stats["Duration"]
    assert stats["_strategy"] == "SmaCross(n1=10,n2=30)"


def test_idea_result_tables_heatmap_plot_and_load_run(sandbox, tmp_path):
    led = Ledger(tmp_path / "l.sqlite")
    report = run_rbi([RSI_IDEA, "20/50 SMA crossover, long only"], model="offline", cfg=cfg(tmp_path),
                     ledger=led, sandbox=sandbox, progress=False)
    r = report.results[0]
    assert r.status == "ok", r.error
    # stats / trades / equity: the held-out run
    assert r.stats["Start"] >= pd.Timestamp(r.in_sample["End"]) and len(r.equity) > 1000
    assert list(r.equity.columns) == ["Equity", "DrawdownPct", "DrawdownDuration"]
    assert len(r.trades) == r.out_of_sample["# Trades"] and r.params
    assert list(r.summary.columns) == ["in-sample", "out-of-sample"] and "Sharpe Ratio" in r.summary.index
    assert list(r.per_quarter.index) == ["2023Q1", "2023Q2"]
    assert "<span" in r.code._repr_html_() and r.code.startswith('"""Generated')
    # heatmap: as Backtest.optimize(return_heatmap=True)
    hm = r.heatmap()
    assert isinstance(hm.index, pd.MultiIndex) and hm.name == "Return [%]" and 1 < len(hm) <= 9
    assert set(hm.index.names) == set(r.params) and hm.max() == pytest.approx(r.in_sample["Return [%]"])
    assert r.plot_heatmap().figure is not None
    # reprs round; the data keeps full precision
    text = repr(r)
    assert not re.search(r"\d+\.\d{3,}", text) and "tuned:" in text
    assert "<table" in r._repr_html_() and "strategy code" in r._repr_html_()
    # the saved plot: offline, titled with the strategy and the run
    folder = Path(r.run_dir)
    page = (folder / "plot.html").read_text()
    parsed = parse_html(page)
    assert parsed.srcs == [] and parsed.inline >= 2 and "plx.gif" not in page  # no tracking iframe either
    assert f"run {r.run_id}" in parsed.title and "out-of-sample" in parsed.title
    # a past run, loaded back
    back = load_run(r.run_id, led)
    assert back.params == r.params and back.symbol == "BTC/USD" and back.out_of_sample == r.out_of_sample
    pd.testing.assert_series_equal(back.heatmap(), hm)
    pd.testing.assert_frame_equal(back.trades, r.trades)
    pd.testing.assert_frame_equal(back.equity, r.equity)
    assert back.code == r.code
    # side by side
    both = report.compare()
    assert both.shape[1] == sum(x.status == "ok" for x in report.results)
    assert report.plot().figure is not None and "side by side" in report._repr_html_()


def test_run_folders_are_never_shared_or_overwritten(sandbox, tmp_path):
    """Two ledgers (say the demo's and yours) numbering runs from 1 into one runs/ folder."""
    folders = []
    for name in ("a", "b", "a"):  # ledger a twice: its second batch gets new run ids
        led = Ledger(tmp_path / f"{name}.sqlite")
        rep = run_rbi(["20/50 SMA crossover"], model="offline", cfg=cfg(tmp_path, grid=False, quarters=False),
                      ledger=led, sandbox=sandbox, progress=False, force=True)
        folders.append(Path(rep.results[0].run_dir))
        assert json.loads((folders[-1] / "stats.json").read_text())["ledger_id"] == led.ledger_id
    assert len(set(folders)) == 3
    assert not list((tmp_path / "runs").glob(".tmp-*"))  # nothing half-written left behind


def test_format_value():
    assert format_value(16.237029) == "16.24" and format_value(94.0) == "94"
    assert format_value(pd.Timedelta("323 days 19:15:00")) == "323 days 19:15"
    assert format_value(1234567.891) == "1,234,567.89" and format_value(np.int64(3)) == "3"


def test_a_run_without_trades_plots(sandbox):
    # No trades: the trade table's time columns are empty object columns (no .dt accessor); the plot still draws.
    code = sma_cross("self.buy(size=0.5)").replace("if crossover(self.a, self.b):", "if False:")
    march = DataRef("BTC/USD", "15m", start="2023-03-01", end="2023-03-31")
    res = sandbox.run(code, march)
    assert res.ok, res.error
    assert res.stats["# Trades"] == 0
    html = BacktestRun.from_result(res, march.resolved(), {}, "no trades").plot().to_html()
    assert not parse_html(html).srcs  # drawn offline, as every plot
