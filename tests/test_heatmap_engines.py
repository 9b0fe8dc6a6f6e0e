"""IdeaResult.heatmap() for every grid engine, as Backtest.optimize(return_heatmap=True) gives it, settled."""
from __future__ import annotations

import pandas as pd
import pytest

from moondev_lab.codeextract import extract_strategy
from moondev_lab.data import default_pool
from moondev_lab.ledger import Ledger
from moondev_lab.models.offline import class_params
from moondev_lab.rbi import RBIConfig, param_grid, run_rbi
from moondev_lab.results import load_run
from moondev_lab.sandbox import DataRef, ErrorKind, SandboxPool
from moondev_lab.sandbox.settings import BacktestSettings
from strategies import sma_cross

IDEA = "20/50 SMA crossover, long only"
MAX_GRID = 6


@pytest.fixture(scope="module")
def sandbox():
    with SandboxPool(2) as pool:
        yield pool


def backtesting_heatmap(code: str, grid: dict, start, end, metric: str) -> pd.Series:
    """backtesting.py's own answer, in this process, on the same bars and money settings."""
    from backtesting import Backtest

    from moondev_lab.sandbox.harness import _in_process_optimize

    namespace: dict = {}
    exec(compile(code, "<strategy>", "exec"), namespace)
    strategy = namespace[extract_strategy(code).strategy_name]
    frame = default_pool().get("BTC/USD", "15m", start=start, end=end)
    with _in_process_optimize():
        _, heatmap = Backtest(frame, strategy, **BacktestSettings().kwargs()).optimize(
            **grid, maximize=metric, return_heatmap=True)
    return heatmap


@pytest.mark.parametrize("engine", ["pool", "backtesting"])
def test_heatmap_of_either_engine_is_backtestings_own(sandbox, tmp_path, engine):
    led = Ledger(tmp_path / "l.sqlite")
    conf = RBIConfig(start="2023-03-01", end="2023-04-30", max_optimize=0, grid=True, max_grid=MAX_GRID,
                     quarters=False, timeout=60, grid_engine=engine, runs_dir=tmp_path / "runs")
    (r,) = run_rbi([IDEA], model="offline", cfg=conf, ledger=led, sandbox=sandbox, progress=False).results
    assert r.status == "ok", r.error
    assert r.grid_engine == engine
    hm = r.heatmap()
    grid = param_grid(class_params(r.code), MAX_GRID)
    train = load_run(r.run_id, led).in_sample_run.data
    expected = backtesting_heatmap(r.code, grid, train["start"], train["end"], conf.metric)
    assert isinstance(hm.index, pd.MultiIndex) and list(hm.index.names) == list(grid)
    pd.testing.assert_series_equal(hm, expected, check_exact=False, rtol=1e-12)
    # drawn (backtesting.py's heatmaps), and the same after loading the run back
    from bokeh.models import GlyphRenderer, Rect

    drawn = r.plot_heatmap()
    maps = [g for g in drawn.figure.select({"type": GlyphRenderer}) if isinstance(g.glyph, Rect)]
    assert len(maps) == 1 and f"run {r.run_id}" in drawn.title  # two parameters: one map
    assert "<script src=" not in drawn.to_html()  # offline
    pd.testing.assert_series_equal(load_run(r.run_id, led).heatmap(), hm)


MARCH = DataRef("BTC/USD", "15m", start="2023-03-01", end="2023-03-31")
DRIVER = "\n\nfrom backtesting import Backtest as _B\n_B(None, SmaCross).optimize(n1=[5, 10], n2=[30, 40], maximize='Return [%]')\n"


def _forging(record: str) -> str:
    """A script whose grid report is replaced by ``record`` (a lambda over capture, params, stats, log)."""
    return (sma_cross("self.buy(size=0.5)") + "\nimport sys\n_h = sys.modules['moondev_lab.sandbox.harness']\n"
            f"_h._record_grid_run = {record}\n" + DRIVER)


def test_a_scripts_optimize_reports_a_settled_heatmap(sandbox):
    res = sandbox.run(sma_cross("self.buy(size=0.5)") + DRIVER, MARCH, heatmap="Return [%]")
    assert res.ok, res.error
    assert [p for p, _ in res.heatmap] == [{"n1": 5, "n2": 30}, {"n1": 5, "n2": 40}, {"n1": 10, "n2": 30},
                                           {"n1": 10, "n2": 40}]
    best = max(s for _, s in res.heatmap if s is not None)
    assert res.stats["Return [%]"] == best  # the optimizer's best run, settled
    assert sandbox.run(sma_cross() + DRIVER, MARCH).heatmap is None  # not asked for: not sent


@pytest.mark.parametrize("record, kind, words", [
    ("lambda c, p, s, log: c.grid_runs.append({'params': dict(p), 'score': 1e9, 'log': log.to_dict()})",
     ErrorKind.RESULT_MISMATCH, "claimed Return [%] 1000000000.0"),
    ("lambda c, p, s, log: c.grid_runs.append({'params': [1], 'score': None, 'log': None})",
     ErrorKind.RESULT_INVALID, "parameters must be"),
    ("lambda c, p, s, log: c.grid_runs.append({'params': dict(p), 'score': 'high', 'log': None})",
     ErrorKind.RESULT_INVALID, "not a number"),
    ("lambda c, p, s, log: c.grid_runs.append({'params': dict(p), 'score': None, 'log': {'kind': 'x'}})",
     ErrorKind.RESULT_MISMATCH, "cannot be settled"),
], ids=["false-score", "bad-params", "bad-score", "bad-log"])
def test_a_forged_heatmap_is_classified(sandbox, record, kind, words):
    res = sandbox.run(_forging(record), MARCH, heatmap="Return [%]")
    assert not res.ok and res.error.kind == kind and words in res.error.message, res.error


def test_ml_grid_on_hand_written_code_has_backtestings_heatmap(sandbox):
    """``ml.grid`` on code that is not a spec strategy runs backtesting.py in the sandbox, heatmap included."""
    import moondev_lab as ml

    code, grid = sma_cross("self.buy(size=0.5)"), {"n1": [5, 10], "n2": [30, 40]}
    g = ml.grid(code, grid, start=MARCH.start, end=MARCH.end, pool=sandbox)
    assert g.engine == "backtesting"
    expected = backtesting_heatmap(code, grid, MARCH.start, MARCH.end, "Return [%]")
    pd.testing.assert_series_equal(g.heatmap, expected, check_exact=False, rtol=1e-12)
