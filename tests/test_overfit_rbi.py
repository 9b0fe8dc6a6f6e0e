"""Issue 15 in the RBI loop: trials counted, DSR/PSR/PBO per idea, leaderboard groups, JSON, walk-forward."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pandas as pd
import pytest

from moondev_lab._overfit import POOL_RETURNS, PROBABLY_OVERFIT, count_trials
from moondev_lab.ledger import Ledger, rank_by_oos
from moondev_lab.rbi import RBIConfig, run_rbi
from moondev_lab.sandbox import SandboxPool

SMA_IDEA = "20/50 SMA crossover, long only, 3% take profit"
KEYS = {"trials", "dsr", "psr", "pbo", "min_track_record"}


@pytest.fixture(scope="module")
def sandbox():
    with SandboxPool(2) as pool:
        yield pool


def cfg(**kw) -> RBIConfig:
    base = dict(start="2023-03-01", end="2023-04-15", max_optimize=1, grid=True, max_grid=8, quarters=False,
                timeout=60, min_trades=1)
    return RBIConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def walked(sandbox, tmp_path_factory):
    """One offline idea through the loop with a grid and 3 walk-forward folds, on 6 weeks of 15m bars."""
    tmp = tmp_path_factory.mktemp("wf")
    led = Ledger(tmp / "l.sqlite")
    report = run_rbi(SMA_IDEA, model="offline", cfg=cfg(walk_forward=3, runs_dir=tmp / "runs"), ledger=led,
                     sandbox=sandbox, progress=False)
    return report, led


def test_trials_counted_from_every_stage(walked):
    report, led = walked
    res = report.results[0]
    assert res.status == "ok", res.error
    versions = led.code_versions(res.run_id)
    produced = sum(1 for c in versions if c["stage"] in ("initial", "debug", "optimize") and c["stats"] is not None)
    assert produced >= 1 and len(res.grid) == 8
    assert res.overfitting["trials"] == produced + len(res.grid)
    # The ledger keeps the object (stats JSON of an "overfitting" code version), and load_run gets it back.
    assert led.overfitting(res.run_id)["trials"] == res.overfitting["trials"]
    from moondev_lab.results import load_run

    assert load_run(res.run_id, led).overfitting["dsr"] == res.overfitting["dsr"]


def test_count_trials_skips_variants_without_a_result():
    versions = [{"stage": "initial", "stats": None}, {"stage": "debug", "stats": None},
                {"stage": "debug", "stats": {"Return [%]": 1.0}}, {"stage": "optimize", "stats": None}]
    assert count_trials(versions, grid_size=0) == 1


def test_overfitting_object_and_pbo_from_the_fast_path(walked):
    report, _ = walked
    o = report.results[0].overfitting
    assert KEYS <= set(o)
    assert 0.0 <= o["dsr"] <= 1.0 and 0.0 <= o["psr"] <= 1.0
    assert o["dsr"] <= o["psr"]  # deflating by 5+ trials can only lower it
    # The offline model's code is a spec strategy: its grid returns come from the fast path, so PBO exists.
    assert o["pbo"] is not None and 0.0 <= o["pbo"] <= 1.0 and o["cscv"]["splits"] == 12870
    assert o["sharpe_variance_source"].startswith("grid returns")
    assert o["min_track_record"] is None or o["min_track_record"] > 1
    assert o["probably_overfit"] == (o["dsr"] < 0.95 or o["pbo"] > 0.5)
    batch = report.to_json()["overfitting"]
    assert batch["ideas"] == 1 and batch["trials"] == o["trials"] and 0 <= batch["dsr"] <= 1


def test_walk_forward_through_run_rbi(walked):
    report, _ = walked
    res = report.results[0]
    wf = res.overfitting["walk_forward"]
    assert wf["folds"] == 3 and len(wf["fold_details"]) == 3
    assert "efficiency" in wf  # a number, or None when the in-sample mean return is not positive
    spans = wf["fold_details"]
    for f in spans:
        assert pd.Timestamp(f["train"][1]) < pd.Timestamp(f["test"][0])  # test strictly after its train window
        assert set(f["params"]) == set(res.grid[0][0])
    for a, b in zip(spans, spans[1:]):
        assert pd.Timestamp(a["test"][1]) < pd.Timestamp(b["test"][0])  # test windows never overlap
    assert math.isfinite(res._overfitting.walk_forward.equity.iloc[-1])


def test_pool_grid_of_non_spec_code_gets_a_pbo_and_says_where_from(sandbox, tmp_path):
    """Code that is not a spec strategy: its pool grid keeps each combination's settled returns, so
    it gets a PBO, and the notes say they came from the pool grid.

    Its walk-forward goes through the SandboxEvaluator: the untrusted code never runs in this process.
    """
    from strategies import sma_cross

    from moondev_lab.models import OfflineModel

    class Foreign(OfflineModel):  # any code the fast path cannot prove is the generator's
        def write_code(self, idea, research=None):
            res = super().write_code(idea, research)
            res.code = sma_cross("self.buy(size=0.5)")
            return res

    led = Ledger(tmp_path / "l.sqlite")
    report = run_rbi(SMA_IDEA, model=Foreign(), cfg=cfg(max_optimize=0, walk_forward=2, runs_dir=tmp_path / "runs"), ledger=led,
                     sandbox=sandbox, progress=False)
    res = report.results[0]
    assert res.status == "ok", res.error
    o = res.overfitting
    assert res.grid_engine == "pool" and len(res.grid) == 4
    assert o["pbo"] is not None and 0 <= o["pbo"] <= 1 and o["cscv"]["splits"] == 12870
    assert o["cscv"]["combinations"] == 4  # a combination without trades has flat equity: zero returns, kept
    assert POOL_RETURNS in o["notes"] and o["sharpe_variance_source"] == "grid returns (pool grid)"
    assert o["trials"] == 1 + len(res.grid) and 0 <= o["dsr"] <= 1
    assert not hasattr(res, "_grid_returns")  # the matrix is not kept on the result (a batch holds thousands)
    assert o["walk_forward"]["folds"] == 2, o["notes"]
    assert isinstance(res._overfitting.walk_forward.folds[0].oos_equity.index, pd.DatetimeIndex)


PNG = '<img src="data:image/png;base64,'


def _overfitting_section(page: str) -> str:
    start = page.index("<div class='moondev-overfitting'>")
    return page[start:page.index("</div>", start)]


def test_result_html_shows_the_summary_the_logit_histogram_and_the_walk_forward_equity(walked):
    import base64

    from moondev_lab.results import load_run

    report, led = walked
    res = report.results[0]
    o = res.overfitting
    assert sum(o["cscv"]["logit_hist"]["counts"]) == 12870
    assert 2 <= len(o["walk_forward"]["equity"]["equity"]) <= 200
    section = _overfitting_section(res._repr_html_())
    for label in ("trials", "dsr", "psr", "pbo", "min track record", "wf efficiency"):
        assert f">{label}" in section
    assert section.count(PNG) == 2  # the CSCV logit histogram and the walk-forward equity
    for img in section.split(PNG)[1:]:
        assert base64.b64decode(img[:img.index('"')]).startswith(b"\x89PNG")
    # A run loaded from the ledger draws the same pictures from the stored object alone.
    loaded = load_run(res.run_id, led)
    assert not hasattr(loaded, "_overfitting")
    assert _overfitting_section(loaded._repr_html_()) == section
    # The report shows them per idea.
    page = report._repr_html_()
    assert f"overfitting of run {res.run_id}" in page and _overfitting_section(page) == section


def test_leaderboard_columns_and_probably_overfit_group(walked):
    _, led = walked
    board = led.leaderboard(min_trades=1)
    assert {"trials", "dsr", "pbo", "wf eff", "flag"} <= set(board.columns)
    assert board.loc[0, "trials"] >= 5
    # Ranking: an overfit run with the best return goes below a clean one, above too-few-trades runs.
    df = pd.DataFrame({"run": [1, 2, 3, 4], "status": "ok", "OOS Return [%]": [50.0, 10.0, 5.0, 80.0],
                       "OOS trades": [30, 30, 30, 2], "dsr": [0.40, 0.99, 0.97, 0.99],
                       "pbo": [0.1, 0.2, 0.7, None]})
    ranked = rank_by_oos(df, "Return [%]", min_trades=10)
    assert list(ranked["run"]) == [2, 1, 3, 4]
    assert list(ranked["flag"]) == ["", PROBABLY_OVERFIT, PROBABLY_OVERFIT, "too few trades"]


def test_report_table_shows_the_columns(walked):
    report, _ = walked
    text = repr(report)
    for col in ("trials", "dsr", "pbo", "wf eff"):
        assert col in text
    assert report.table().loc[0, "trials"] == report.results[0].overfitting["trials"]


def _cli(*args, env=None, timeout=240):
    return subprocess.run([sys.executable, "-m", "moondev_lab.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_cli_rbi_json_carries_overfitting(lab_home, tmp_path):
    import os

    env = {**os.environ, "MOONDEV_LAB_HOME": str(lab_home)}
    p = _cli("rbi", SMA_IDEA, "--model", "offline", "--json", "--start", "2023-03-01", "--end", "2023-03-20",
             "--max-optimize", "0", "--walk-forward", "2", env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.loads(p.stdout)
    o = out["results"][0]["overfitting"]
    assert KEYS <= set(o) and o["walk_forward"]["folds"] == 2 and "efficiency" in o["walk_forward"]
    assert 0 <= o["dsr"] <= 1 and 0 <= o["psr"] <= 1 and 0 <= o["pbo"] <= 1 and isinstance(o["trials"], int)
    # ... and what a reader of the JSON needs to draw the CSCV histogram and the walk-forward equity again.
    assert sum(o["cscv"]["logit_hist"]["counts"]) == o["cscv"]["splits"]
    assert len(o["walk_forward"]["equity"]["time"]) == len(o["walk_forward"]["equity"]["equity"]) >= 2
    assert out["overfitting"]["ideas"] == 1


def test_cli_rejects_a_bad_fold_count(lab_home):
    import os

    p = _cli("rbi", SMA_IDEA, "--model", "offline", "--walk-forward", "0",
             env={**os.environ, "MOONDEV_LAB_HOME": str(lab_home)}, timeout=60)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        "error: --walk-forward needs a number of folds >= 1, got 0"]
