"""Grid replies are the strategy's too: malformed ones are classified, claimed scores never rank.

The forgeries are real: the strategy code replaces ``harness._run_grid`` inside its own
task child (as an attacker would), so each forged payload crosses the real pipe.
"""
from __future__ import annotations

import math

import pytest

from moondev_lab.data import DataPool
from moondev_lab.sandbox import DataRef, ErrorKind, SandboxPool
from strategies import sma_cross

SMA_CROSS = sma_cross()
GRID = {"n1": [5, 10], "n2": [20, 30, 40]}
FORGE = "\nfrom moondev_lab.sandbox import harness as _h\n_real = _h._run_grid\n"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> DataRef:
    store = tmp_path_factory.mktemp("grid-home") / "store"
    DataPool(store).get("BTC/USD", "15m")  # imports the bundled sample
    return DataRef("BTC/USD", "15m", start="2023-03-01", end="2023-03-08", root=str(store))


@pytest.fixture(scope="module")
def pool():
    with SandboxPool(1, max_tasks_per_worker=50) as p:  # one worker: one chunk holds the whole grid
        yield p


@pytest.fixture(scope="module")
def honest(pool, data):
    opt = pool.optimize(SMA_CROSS, GRID, data, maximize="Return [%]")
    assert opt.result.ok and not opt.errors, opt.result.error
    return opt


def _forged(body: str) -> str:
    """SMA_CROSS whose grid chunk returns ``body`` (an expression of ``p``, the real payload, and ``a``)."""
    return SMA_CROSS + FORGE + f"def _forge(*a):\n    p = _real(*a)\n    return {body}\n_h._run_grid = _forge\n"


MALFORMED = {
    "no best_index": "{k: v for k, v in p.items() if k != 'best_index'}",
    "no values": "{k: v for k, v in p.items() if k != 'values'}",
    "no logs": "{k: v for k, v in p.items() if k != 'logs'}",
    "values not a list": "{**p, 'values': {'a': 1}}",
    "values of text": "{**p, 'values': ['1e9'] * len(p['values'])}",
    "values of bools": "{**p, 'values': [True] * len(p['values'])}",
    "too few values": "{**p, 'values': p['values'][:2]}",
    "too many values": "{**p, 'values': p['values'] * 2, 'logs': p['logs'] * 2}",
    "best_index a float": "{**p, 'best_index': 0.0}",
    "best_index a bool": "{**p, 'best_index': True}",
    "best_index out of range": "{**p, 'best_index': 99}",
    "best_index negative": "{**p, 'best_index': -1}",
    "best a list": "{**p, 'best': [1, 2]}",
    "logs of the wrong length": "{**p, 'logs': p['logs'][:1]}",
    "payload a list": "[p]",  # (the harness itself trips on it: a strategy_error)
    "payload empty": "{}",
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", list(MALFORMED))
def test_a_malformed_grid_reply_is_result_invalid(pool, data, honest, name):
    opt = pool.optimize(_forged(MALFORMED[name]), GRID, data, maximize="Return [%]")
    assert not opt.result.ok, name
    assert opt.result.error.kind in (ErrorKind.RESULT_INVALID, ErrorKind.STRATEGY_ERROR), opt.result.error
    assert [e.kind for e in opt.errors] == [opt.result.error.kind]
    assert all(score is None for _, score in opt.heatmap)  # nothing of it is believed
    # ... and the pool is healthy: the next honest grid gives the honest answer.
    again = pool.optimize(SMA_CROSS, GRID, data, maximize="Return [%]")
    assert again.result.ok and again.heatmap == honest.heatmap


def test_malformed_shapes_are_result_invalid_not_other_errors(pool, data):
    for name in ("no best_index", "values of text", "best_index out of range", "payload empty"):
        opt = pool.optimize(_forged(MALFORMED[name]), GRID, data, maximize="Return [%]")
        assert opt.result.error.kind == ErrorKind.RESULT_INVALID, (name, opt.result.error)


def test_inflated_claimed_scores_never_rank(pool, data, honest):
    code = _forged("{**p, 'values': [1e9 if v is not None else None for v in p['values']]}")
    opt = pool.optimize(code, GRID, data, maximize="Return [%]")
    assert opt.heatmap == honest.heatmap  # the settled scores, not the claims
    assert opt.best_params == honest.best_params
    assert not opt.result.ok and opt.result.error.kind == ErrorKind.RESULT_MISMATCH
    assert "claimed Return [%] 1000000000.0, settled" in opt.result.error.message
    assert opt.result.stats["Return [%]"] == honest.result.stats["Return [%]"]  # the true stats are shown


def test_a_claimed_best_that_is_not_the_settled_best_is_run_afresh(pool, data, honest):
    # The forger points best_index at the worst combination and claims it scored highest.
    worst = min((i for i, (_, s) in enumerate(honest.heatmap) if s is not None), key=lambda i: honest.heatmap[i][1])
    code = _forged(f"{{**p, 'best_index': {worst}, 'values': [v if i != {worst} else 1e9 "
                   "for i, v in enumerate(p['values'])]}")
    opt = pool.optimize(code, GRID, data, maximize="Return [%]")
    assert opt.heatmap == honest.heatmap and opt.best_params == honest.best_params
    assert not opt.result.ok and opt.result.error.kind == ErrorKind.RESULT_MISMATCH
    assert f"combination {worst}: claimed Return [%] 1000000000.0" in opt.result.error.message
    assert opt.result.stats["Return [%]"] == honest.result.stats["Return [%]"]


def test_forged_order_logs_are_settled_as_what_they_are(pool, data, honest):
    # Every combination sends the log of a do-nothing run, and claims it won: it settles at no trades.
    code = _forged("{**p, 'logs': [{**l, 'n': 0, 'columns': {k: '' for k in l['columns']}} for l in p['logs']]}")
    opt = pool.optimize(code, GRID, data, maximize="Return [%]")
    assert all(score is None for _, score in opt.heatmap)
    assert not opt.result.ok and opt.result.error.kind == ErrorKind.RESULT_MISMATCH
    garbage = _forged("{**p, 'logs': ['x'] * len(p['logs'])}")
    opt = pool.optimize(garbage, GRID, data, maximize="Return [%]")
    assert all(score is None for _, score in opt.heatmap)
    assert opt.result.error.kind == ErrorKind.RESULT_MISMATCH and "cannot be settled" in opt.result.error.message


def test_honest_grid_heatmap_is_settled_and_unflagged(honest):
    assert honest.result.error is None and any(s is not None and not math.isnan(s) for _, s in honest.heatmap)
    assert honest.result.settled is not None


def test_a_script_running_backtest_optimize_is_settled(pool, data, honest):
    # backtesting.py's optimize runs copies of the Backtest: each copy must record its own decisions.
    code = SMA_CROSS + f"\nfrom backtesting import Backtest\nBacktest(None, SmaCross).optimize(**{GRID!r}, " \
                       "maximize='Return [%]')\n"
    res = pool.run(code, data)
    assert res.ok, res.error
    assert res.stats["Return [%]"] == honest.result.stats["Return [%]"]
    assert res.stats["_strategy"] == {**res.stats["_strategy"], **honest.best_params}
