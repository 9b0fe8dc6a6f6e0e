"""Research you can trust: the deflated Sharpe ratio, the probability of backtest overfitting, walk-forward.

The best of many tries looks good by chance alone. This module measures how much:

* :func:`probabilistic_sharpe_ratio` (PSR): the probability that the true Sharpe ratio beats a benchmark,
  given the sample length, skewness and kurtosis (Bailey & López de Prado 2012, "The Sharpe Ratio
  Efficient Frontier");
* :func:`expected_max_sharpe`: the expected best Sharpe ratio of N independent trials with no skill;
* :func:`deflated_sharpe_ratio` (DSR): the PSR against that expected maximum, a probability
  (Bailey & López de Prado 2014, "The Deflated Sharpe Ratio");
* :func:`min_track_record_length`: how many bars it takes for a Sharpe ratio to be significant;
* :func:`cscv`: the probability of backtest overfitting (PBO) by combinatorially symmetric
  cross-validation over a grid's matrix of per-bar returns (Bailey, Borwein, López de Prado & Zhu 2015);
* :func:`walk_forward`: optimise on each train window, test on the window after it, stitch the
  out-of-sample equity, against any :class:`Evaluator` (backtesting.py, the sandbox pool, the compiled fast path);
* :func:`assess_overfitting`: all of it for one run or one grid, as an :class:`Overfitting` result whose
  ``to_dict()`` is the JSON ``overfitting`` object.

All Sharpe ratios here are per bar (not annualised) unless a name says ``_ann``. The formulas assume
returns that are roughly IID; strongly autocorrelated per-bar returns make every statistic here optimistic.

>>> import numpy as np, moondev_lab as ml
>>> round(ml.deflated_sharpe_ratio(2.5 / 250 ** 0.5, 1250, n_trials=100, sharpe_variance=0.5 / 250,
...                                skew=-3, kurtosis=10), 4)          # the DSR paper's example
0.9004
>>> grid = np.random.default_rng(0).normal(0, 0.01, size=(2000, 20))  # 20 strategies of pure noise
>>> o = ml.assess_overfitting(grid, partitions=8)
>>> o.trials, o.dsr < 0.95, 0.2 < o.pbo.pbo < 0.8
(20, True, True)
"""
from __future__ import annotations

import base64
import dataclasses
import functools
import html
import io
import itertools
import math
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence

import numpy as np
import pandas as pd
from threadpoolctl import threadpool_limits

from .errors import MoondevError

EULER_GAMMA = 0.5772156649015329
_NORMAL = NormalDist()
_YEAR = pd.Timedelta(days=365.25)


class RobustnessError(MoondevError, ValueError):
    """Input the statistics cannot be computed from (too short, wrong shape, not finite, ...)."""


# ----- moments and the Sharpe ratio ---------------------------------------------------------------
@dataclass(frozen=True)
class ReturnMoments:
    """What the PSR needs of a return series: length, per-bar Sharpe, skewness, (non-excess) kurtosis."""

    n_obs: int
    sharpe: float
    skew: float
    kurtosis: float


def _as_returns(returns: Any, name: str = "returns") -> np.ndarray:
    r = np.asarray(returns, dtype=float)
    if r.ndim != 1:
        raise RobustnessError(f"{name} must be one series of per-bar returns, got shape {r.shape}")
    if len(r) < 3:
        raise RobustnessError(f"{name} has {len(r)} bars; at least 3 are needed")
    if not np.isfinite(r).all():
        raise RobustnessError(f"{name} contains NaN or infinite values at {int((~np.isfinite(r)).sum())} bars")
    return r


def return_moments(returns: Any) -> ReturnMoments:
    """Length, per-bar Sharpe ratio (mean / sample std), skewness and kurtosis (normal = 3) of ``returns``.

    A series that never moves has Sharpe 0, skewness 0 and kurtosis 3 (nothing to measure).

    >>> m = return_moments([0.01, -0.02, 0.03, 0.0, 0.01])
    >>> m.n_obs, round(m.sharpe, 4), round(m.skew, 4), round(m.kurtosis, 4)
    (5, 0.3303, -0.179, 2.2686)
    """
    r = _as_returns(returns)
    d = r - r.mean()
    m2 = float(np.mean(d * d))
    if m2 <= 0.0:
        return ReturnMoments(len(r), 0.0, 0.0, 3.0)
    std = math.sqrt(m2 * len(r) / (len(r) - 1))
    return ReturnMoments(len(r), float(r.mean()) / std, float(np.mean(d ** 3)) / m2 ** 1.5,
                         float(np.mean(d ** 4)) / m2 ** 2)


def sharpe_ratio(returns: Any) -> np.ndarray | float:
    """Per-bar Sharpe ratio (mean / sample std, 0 where the std is 0) of a series, or of each column.

    >>> round(sharpe_ratio([0.01, -0.02, 0.03, 0.0, 0.01]), 4)
    0.3303
    """
    r = np.asarray(returns, dtype=float)
    out = _sharpe_from_sums(r.sum(axis=0), (r * r).sum(axis=0), np.float64(r.shape[0]))
    return float(out) if out.ndim == 0 else out


def _sharpe_from_sums(s: np.ndarray, q: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Sharpe ratios from sums, sums of squares and counts; 0 where the variance is 0."""
    mean = np.asarray(s / n)  # a new array (0-d for one series), written in place below
    # The same operations as max(q - s * mean, 0) / (n - 1) and its sqrt, in one buffer: CSCV calls this on
    # splits x combinations matrices (12,870 x grid), where each temporary costs a pass over memory.
    std = np.multiply(s, mean, out=np.empty_like(mean))
    np.subtract(q, std, out=std)
    np.maximum(std, 0.0, out=std)
    np.divide(std, n - 1, out=std)
    np.sqrt(std, out=std)
    # Rounding can leave a tiny positive variance for a constant column; such a column has no risk and no edge.
    flat = std <= 1e-12 * np.maximum(np.abs(mean), 1e-300)
    std[flat] = 1.0
    out = np.divide(mean, std, out=mean)
    out[flat] = 0.0
    return out


def periods_per_year(index: Any) -> float | None:
    """Bars per year from a DatetimeIndex's median spacing (15-minute bars: 35,064), or None.

    >>> periods_per_year(pd.date_range("2023-01-01", periods=10, freq="15min"))
    35064.0
    """
    if not isinstance(index, pd.DatetimeIndex) or len(index) < 2:
        return None
    step = pd.Series(index).diff().median()
    return float(_YEAR / step) if step and step > pd.Timedelta(0) else None


# ----- PSR, expected maximum, DSR, MinTRL ----------------------------------------------------------
def _sharpe_std_factor(sharpe: float, skew: float, kurtosis: float) -> float:
    v = 1.0 - skew * sharpe + (kurtosis - 1.0) / 4.0 * sharpe * sharpe
    if v <= 0:
        raise RobustnessError(f"skew {skew:g} and kurtosis {kurtosis:g} give a non-positive Sharpe variance "
                              f"at Sharpe {sharpe:g}; are they per-bar values, kurtosis not excess?")
    return math.sqrt(v)


def probabilistic_sharpe_ratio(sharpe: float, n_obs: int, skew: float = 0.0, kurtosis: float = 3.0,
                               benchmark: float = 0.0) -> float:
    """PSR: the probability that the true per-bar Sharpe ratio exceeds ``benchmark``.

    ``Z[(SR - SR*) * sqrt(T - 1) / sqrt(1 - skew * SR + (kurtosis - 1) / 4 * SR^2)]``, with the
    per-bar ``sharpe`` estimated on ``n_obs`` bars; ``kurtosis`` is non-excess (normal = 3).

    >>> round(probabilistic_sharpe_ratio(0.1, 250), 4)      # SR 1.58 a year on one year of days
    0.9423
    """
    if n_obs < 2:
        raise RobustnessError(f"n_obs must be at least 2, got {n_obs}")
    z = (sharpe - benchmark) * math.sqrt(n_obs - 1) / _sharpe_std_factor(sharpe, skew, kurtosis)
    return _NORMAL.cdf(z)


def expected_max_sharpe(n_trials: int, sharpe_variance: float, mean: float = 0.0) -> float:
    """Expected maximum of ``n_trials`` independent Sharpe estimates with this variance and no skill.

    ``mean + sqrt(V) * ((1 - g) * Z^-1[1 - 1/N] + g * Z^-1[1 - 1/(N e)])``, g the Euler-Mascheroni
    constant. One trial has nothing to select from: its expected maximum is the mean.

    >>> round(expected_max_sharpe(10, 1.0), 2)             # "Pseudo-mathematics..." (2014): 1.57
    1.57
    """
    if n_trials < 1 or int(n_trials) != n_trials:
        raise RobustnessError(f"n_trials must be a whole number >= 1, got {n_trials}")
    if not sharpe_variance >= 0:
        raise RobustnessError(f"sharpe_variance must be >= 0, got {sharpe_variance}")
    if n_trials == 1:
        return float(mean)
    n = float(n_trials)
    z = (1 - EULER_GAMMA) * _NORMAL.inv_cdf(1 - 1 / n) + EULER_GAMMA * _NORMAL.inv_cdf(1 - 1 / (n * math.e))
    return float(mean + math.sqrt(sharpe_variance) * z)


def deflated_sharpe_ratio(sharpe: float, n_obs: int, n_trials: int, sharpe_variance: float,
                          skew: float = 0.0, kurtosis: float = 3.0) -> float:
    """DSR: the PSR of the selected (best) per-bar Sharpe against the expected maximum of ``n_trials``.

    ``sharpe_variance`` is the variance of the per-bar Sharpe ratios of all the trials.

    >>> round(deflated_sharpe_ratio(0.1, 1000, n_trials=1, sharpe_variance=0.0), 4)   # one try: the PSR
    0.9992
    """
    return probabilistic_sharpe_ratio(sharpe, n_obs, skew, kurtosis,
                                      benchmark=expected_max_sharpe(n_trials, sharpe_variance))


def min_track_record_length(sharpe: float, skew: float = 0.0, kurtosis: float = 3.0,
                            benchmark: float = 0.0, confidence: float = 0.95) -> float:
    """MinTRL: bars needed for the per-bar ``sharpe`` to beat ``benchmark`` with ``confidence``.

    ``1 + (1 - skew * SR + (kurtosis - 1) / 4 * SR^2) * (Z_a / (SR - SR*))^2``; infinite when
    ``sharpe <= benchmark`` (no track record is long enough).

    >>> round(min_track_record_length(0.1), 1)
    272.9
    """
    if not 0 < confidence < 1:
        raise RobustnessError(f"confidence must be in (0, 1), got {confidence}")
    if sharpe <= benchmark:
        return math.inf
    f = _sharpe_std_factor(sharpe, skew, kurtosis)
    return 1.0 + f * f * (_NORMAL.inv_cdf(confidence) / (sharpe - benchmark)) ** 2


# ----- PBO by CSCV ---------------------------------------------------------------------------------
def _as_matrix(returns: Any, name: str = "returns") -> tuple[np.ndarray, list]:
    labels = [str(c) for c in returns.columns] if isinstance(returns, pd.DataFrame) else None
    m = np.asarray(returns, dtype=float)
    if m.ndim != 2:
        raise RobustnessError(f"{name} must be a 2-D matrix (bars x combinations), got shape {m.shape}")
    if m.shape[1] < 2:
        raise RobustnessError(f"{name} has {m.shape[1]} combination(s); overfitting needs at least 2 to choose from")
    if not np.isfinite(m).all():
        bad = np.flatnonzero(~np.isfinite(m).all(axis=0))
        raise RobustnessError(f"{name} contains NaN or infinite values in column(s) {bad[:5].tolist()}")
    return m, labels or [str(k) for k in range(m.shape[1])]


@functools.lru_cache(maxsize=8)
def _split_masks(partitions: int) -> np.ndarray:
    """Every choice of half of the ``partitions`` blocks, as a 0/1 matrix (splits x partitions).

    Kept per ``partitions`` (read-only): every idea's PBO uses the same 12,870 splits of 16 blocks.
    """
    combos = np.array(list(itertools.combinations(range(partitions), partitions // 2)))
    masks = np.zeros((len(combos), partitions))
    masks[np.arange(len(combos))[:, None], combos] = 1.0
    masks.flags.writeable = False
    return masks


def _block_sums(m: np.ndarray, partitions: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    bounds = np.linspace(0, len(m), partitions + 1).astype(int)
    return (np.add.reduceat(m, bounds[:-1], axis=0), np.add.reduceat(m * m, bounds[:-1], axis=0),
            np.diff(bounds).astype(float))


def _check_partitions(n_bars: int, partitions: int) -> None:
    if partitions < 2 or partitions % 2:
        raise RobustnessError(f"partitions must be an even number >= 2, got {partitions}")
    if n_bars < 2 * partitions:
        raise RobustnessError(f"{n_bars} bars are too few for {partitions} partitions (need at least 2 bars each)")


def _oos_rank(oos: np.ndarray, chosen: np.ndarray) -> np.ndarray:
    """Rank (1..N, ties averaged) of each split's chosen column among its out-of-sample Sharpe ratios."""
    best = oos[np.arange(len(oos)), chosen][:, None]
    return (oos < best).sum(axis=1) + 0.5 * ((oos == best).sum(axis=1) - 1) + 1.0


@dataclass
class PBOResult:
    """The outcome of CSCV over a grid: PBO, the logit distribution, and the IS/OOS degradation.

    ``logits[k]`` is ``log(w / (1 - w))`` for split ``k``, where ``w`` is the out-of-sample relative rank
    of the in-sample best combination; PBO is the share of splits with a logit <= 0 (the in-sample
    winner is at best median out of sample).
    """

    pbo: float
    logits: np.ndarray
    is_sharpe: np.ndarray  # per split: in-sample Sharpe of the in-sample best
    oos_sharpe: np.ndarray  # per split: out-of-sample Sharpe of that same combination
    chosen: np.ndarray  # per split: the column picked in sample
    partitions: int
    n_combinations: int
    labels: list = field(default_factory=list)

    @property
    def n_splits(self) -> int:
        return len(self.logits)

    @property
    def degradation(self) -> tuple[float, float]:
        """Slope and intercept of out-of-sample vs in-sample Sharpe of the chosen combination."""
        if np.ptp(self.is_sharpe) == 0:
            return (math.nan, float(np.mean(self.oos_sharpe)))
        slope, intercept = np.polyfit(self.is_sharpe, self.oos_sharpe, 1)
        return float(slope), float(intercept)

    @property
    def prob_oos_loss(self) -> float:
        """Share of splits where the in-sample best loses money out of sample."""
        return float(np.mean(self.oos_sharpe < 0))

    def most_chosen(self, k: int = 5) -> pd.Series:
        """How often each combination was the in-sample best, most chosen first."""
        counts = np.bincount(self.chosen, minlength=self.n_combinations)
        return pd.Series(counts, index=self.labels or range(self.n_combinations)).sort_values(
            ascending=False).head(k)

    def to_dict(self) -> dict:
        slope, intercept = self.degradation
        return {"pbo": _num(self.pbo), "splits": self.n_splits, "partitions": self.partitions,
                "combinations": self.n_combinations, "degradation_slope": _num(slope),
                "degradation_intercept": _num(intercept), "prob_oos_loss": _num(self.prob_oos_loss),
                "logit_median": _num(float(np.median(self.logits))), "logit_hist": logit_histogram(self.logits)}

    def __repr__(self) -> str:
        slope, _ = self.degradation
        return (f"PBOResult(pbo={self.pbo:.3f}, splits={self.n_splits}, combinations={self.n_combinations}, "
                f"degradation_slope={slope:.3f}, prob_oos_loss={self.prob_oos_loss:.3f})")

    def plot(self, ax=None):
        """Histogram of the logits, with the overfit side (logit <= 0) marked."""
        return plot_logit_histogram(logit_histogram(self.logits), self.pbo, ax=ax)

    def _repr_html_(self) -> str:
        return f"<pre>{html.escape(repr(self))}</pre>{_figure_html(self.plot())}"


def cscv(returns: Any, partitions: int = 16, *, chunk: int | None = None) -> PBOResult:
    """The probability of backtest overfitting by CSCV over ``returns`` (bars x combinations).

    The bars are cut into ``partitions`` contiguous blocks; every choice of half of them is a split
    (16 blocks: 12,870 splits). In each split, the combination with the best in-sample Sharpe ratio is
    ranked among all combinations out of sample (the other half). Vectorised: per-block sums and sums
    of squares are combined for all splits with one matrix product, so the cost is one pass over the
    data plus ``splits x combinations`` arithmetic (``chunk`` bounds the splits held at once).

    One noise dataset's PBO varies widely (its columns' full-sample luck is shared by all splits);
    over many datasets of pure noise it averages about 0.5:

    >>> runs = [cscv(np.random.default_rng(s).normal(0, 0.01, (1600, 30)), partitions=8) for s in range(8)]
    >>> runs[0].n_splits, round(float(np.mean([r.pbo for r in runs])), 2)
    (70, 0.47)
    """
    m, labels = _as_matrix(returns)
    _check_partitions(len(m), partitions)
    sums, squares, counts = _block_sums(m, partitions)
    total_s, total_q, total_n = sums.sum(axis=0), squares.sum(axis=0), counts.sum()
    masks = _split_masks(partitions)
    n_splits, n_comb = len(masks), m.shape[1]
    chunk = chunk or max(1, 2_000_000 // n_comb)  # ~16 MB per temporary
    logits = np.empty(n_splits)
    is_best, oos_best = np.empty(n_splits), np.empty(n_splits)
    chosen = np.empty(n_splits, dtype=int)
    # One BLAS thread: these products are small (splits x 16 x combinations), and a second OpenBLAS
    # thread costs more than it saves and then spins; alone, CSCV takes half the CPU (same results).
    with threadpool_limits(1, user_api="blas"):
        for a in range(0, n_splits, chunk):  # chunks of thousands of splits, not one loop turn per split
            w = masks[a:a + chunk]
            is_s, is_q, is_n = w @ sums, w @ squares, (w @ counts)[:, None]
            is_sr = _sharpe_from_sums(is_s, is_q, is_n)
            oos_sr = _sharpe_from_sums(total_s - is_s, total_q - is_q, total_n - is_n)
            pick = np.argmax(is_sr, axis=1)
            rows = np.arange(len(w))
            omega = _oos_rank(oos_sr, pick) / (n_comb + 1)
            logits[a:a + chunk] = np.log(omega / (1 - omega))
            is_best[a:a + chunk], oos_best[a:a + chunk] = is_sr[rows, pick], oos_sr[rows, pick]
            chosen[a:a + chunk] = pick
    return PBOResult(float(np.mean(logits <= 0)), logits, is_best, oos_best, chosen, partitions, n_comb, labels)


def _cscv_per_split_loop(returns: Any, partitions: int = 16, splits: int | None = None) -> PBOResult:
    """CSCV as the paper describes it, one Python loop turn per split: the reference and the bench baseline.

    ``splits`` stops after that many splits (the bench times a sample of them).
    """
    m, labels = _as_matrix(returns)
    _check_partitions(len(m), partitions)
    bounds = np.linspace(0, len(m), partitions + 1).astype(int)
    blocks = [np.arange(bounds[k], bounds[k + 1]) for k in range(partitions)]
    out = []
    for k, train in enumerate(itertools.combinations(range(partitions), partitions // 2)):
        if splits is not None and k >= splits:
            break
        test = [b for b in range(partitions) if b not in train]
        is_rows = np.concatenate([blocks[b] for b in train])
        oos_rows = np.concatenate([blocks[b] for b in test])
        is_sr, oos_sr = sharpe_ratio(m[is_rows]), sharpe_ratio(m[oos_rows])
        pick = int(np.argmax(is_sr))
        omega = _oos_rank(oos_sr[None, :], np.array([pick]))[0] / (m.shape[1] + 1)
        out.append((math.log(omega / (1 - omega)), is_sr[pick], oos_sr[pick], pick))
    logits, is_best, oos_best, chosen = (np.array(c) for c in zip(*out))
    return PBOResult(float(np.mean(logits <= 0)), logits, is_best, oos_best, chosen.astype(int), partitions,
                     m.shape[1], labels)


# ----- walk-forward ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Window:
    """One fold's bar positions, half-open: train ``[train_start, train_stop)``, test after it."""

    train_start: int
    train_stop: int
    test_start: int
    test_stop: int


def walk_forward_windows(n_bars: int, folds: int = 6, *, train: int | None = None, test: int | None = None,
                         anchored: bool = False) -> list[Window]:
    """Train/test windows for ``folds`` folds over ``n_bars`` bars; the tests tile the end of the series.

    Each test window starts where its train window stops and test windows never overlap. Rolling
    windows keep ``train`` bars; anchored ones all start at bar 0 and grow. Unset sizes default to
    ``test = n_bars // (folds + 3)`` and ``train = 3 * test``; the last test window ends at the last bar.

    >>> [(w.train_start, w.train_stop, w.test_stop) for w in walk_forward_windows(100, 3, train=40, test=20)]
    [(0, 40, 60), (20, 60, 80), (40, 80, 100)]
    >>> [(w.train_start, w.train_stop) for w in walk_forward_windows(100, 3, test=20, anchored=True)]
    [(0, 40), (0, 60), (0, 80)]
    """
    if folds < 1 or int(folds) != folds:
        raise RobustnessError(f"folds must be a whole number >= 1, got {folds}")
    if test is None:
        test = (n_bars - train) // folds if train is not None else n_bars // (folds + 3)
    if train is None:
        train = n_bars - folds * test if anchored else min(3 * test, n_bars - folds * test)
    if test < 2 or train < 2 or train + folds * test > n_bars:
        raise RobustnessError(f"{n_bars} bars cannot hold {folds} folds of train {train} and test {test} bars "
                              "(each needs at least 2 bars)")
    first_test = n_bars - folds * test
    out = []
    for k in range(folds):
        t0 = first_test + k * test
        out.append(Window(0 if anchored else t0 - train, t0, t0, t0 + test))
    return out


@dataclass
class GridOutcome:
    """What an evaluator returns for a grid on one slice of bars."""

    params: list[dict]  # every combination tried, in order
    scores: np.ndarray  # the maximised metric per combination (NaN: no result)
    best_params: dict
    best_equity: pd.Series  # equity curve of the best combination on the slice
    returns: pd.DataFrame | None = None  # per-bar returns per combination, when the evaluator keeps them


class Evaluator(Protocol):
    """Runs a parameter grid, or one parameter set, on a slice ``[start, stop)`` of bars.

    Any engine plugs into :func:`walk_forward` and :func:`assess_overfitting` through this protocol:
    :class:`BacktestingEvaluator` (backtesting.py), :class:`ReturnsEvaluator` (a vectorised returns
    function), or a compiled fast path.
    """

    index: pd.Index

    def grid(self, start: int, stop: int) -> GridOutcome: ...

    def run(self, start: int, stop: int, params: Mapping[str, Any]) -> pd.Series: ...


def _combinations(params: Mapping[str, Sequence], constraint: Callable | None) -> list[dict]:
    """The grid in backtesting.py's own order (product over the keys as given), filtered by ``constraint``."""
    if not params:
        raise RobustnessError("the parameter grid is empty")
    names = list(params)
    values = [list(v) if isinstance(v, (list, tuple, range, np.ndarray, pd.Index)) else [v] for v in params.values()]
    out = [dict(zip(names, c)) for c in itertools.product(*values)]
    if constraint is not None:
        out = [p for p in out if constraint(_Attrs(p))]
    if not out:
        raise RobustnessError("no admissible parameter combinations in the grid")
    return out


class _Attrs(dict):
    """A dict that also reads as attributes, as backtesting.py's constraint functions expect."""

    __getattr__ = dict.__getitem__


def _first_best(scores: np.ndarray) -> int:
    """Index of the first maximal finite score (backtesting.py's ``heatmap.idxmax`` rule)."""
    s = np.where(np.isfinite(scores), scores, -np.inf)
    return int(np.argmax(s))


class BacktestingEvaluator:
    """An :class:`Evaluator` that runs backtesting.py on ``data.iloc[start:stop]``.

    With ``keep_returns=False`` a grid is ``Backtest(...).optimize(**params, maximize=...)`` (backtesting.py's
    own parallel optimiser); with ``keep_returns=True`` every combination is a ``Backtest.run`` whose per-bar
    equity returns are kept, which CSCV needs (slow: one full backtest per combination; the compiled fast
    path, ``ml.grid(..., keep_returns=True)``, keeps them at compiled speed for spec strategies).
    Indicators warm up inside each slice, as they would on that data alone.
    ``Backtest(...)`` gets the sandbox harness's :class:`~moondev_lab.sandbox.BacktestSettings` (default
    costs included) updated with ``backtest_kwargs``.

    >>> from backtesting import Strategy
    >>> from backtesting.lib import crossover
    >>> from backtesting.test import GOOG, SMA
    >>> class SmaCross(Strategy):
    ...     n1, n2 = 10, 30
    ...     def init(self):
    ...         self.fast, self.slow = self.I(SMA, self.data.Close, self.n1), self.I(SMA, self.data.Close, self.n2)
    ...     def next(self):
    ...         if crossover(self.fast, self.slow):
    ...             self.buy()
    ...         elif crossover(self.slow, self.fast):
    ...             self.position.close()
    >>> ev = BacktestingEvaluator(GOOG, SmaCross, {"n1": [10, 20], "n2": [40, 80]}, keep_returns=True, cash=10_000)
    >>> g = ev.grid(0, 600)
    >>> g.returns.shape, g.best_params
    ((600, 4), {'n1': 10, 'n2': 40})
    """

    def __init__(self, data: pd.DataFrame, strategy: type, params: Mapping[str, Sequence], *,
                 maximize: str = "Return [%]", constraint: Callable | None = None, keep_returns: bool = False,
                 **backtest_kwargs: Any):
        self.data, self.strategy, self.params = data, strategy, dict(params)
        self.maximize, self.constraint, self.keep_returns = maximize, constraint, keep_returns
        from .sandbox.settings import BacktestSettings

        # The harness's money settings (cash, commission, finalize_trades, ...) unless overridden.
        self.backtest_kwargs = {**BacktestSettings().kwargs(), **backtest_kwargs}
        self.index = data.index
        self.combinations = _combinations(self.params, constraint)

    def __repr__(self) -> str:
        return (f"BacktestingEvaluator({self.strategy.__name__}, {len(self.combinations)} combinations, "
                f"{len(self.data)} bars, maximize={self.maximize!r}, keep_returns={self.keep_returns})")

    def _backtest(self, start: int, stop: int):
        from backtesting import Backtest

        return Backtest(self.data.iloc[start:stop], self.strategy, **self.backtest_kwargs)

    def _score(self, stats: pd.Series) -> float:
        try:
            return float(stats[self.maximize])
        except (KeyError, TypeError, ValueError):
            return math.nan

    def grid(self, start: int, stop: int) -> GridOutcome:
        from ._bt_compat import equity_curve, strategy_params

        bt = self._backtest(start, stop)
        if not self.keep_returns:
            kw = {"constraint": self.constraint} if self.constraint is not None else {}
            stats, heat = bt.optimize(**self.params, maximize=self.maximize, return_heatmap=True, **kw)
            combos = [dict(zip(heat.index.names, k if isinstance(k, tuple) else (k,))) for k in heat.index]
            return GridOutcome(combos, heat.to_numpy(dtype=float), strategy_params(stats, self.params),
                               equity_curve(stats))
        runs = [bt.run(**p) for p in self.combinations]
        scores = np.array([self._score(s) for s in runs])
        best = _first_best(scores)
        returns = pd.DataFrame({_label(p): equity_curve(s).pct_change().fillna(0.0).to_numpy()
                                for p, s in zip(self.combinations, runs)}, index=self.index[start:stop])
        return GridOutcome(list(self.combinations), scores, dict(self.combinations[best]),
                           equity_curve(runs[best]), returns)

    def run(self, start: int, stop: int, params: Mapping[str, Any]) -> pd.Series:
        from ._bt_compat import equity_curve

        return equity_curve(self._backtest(start, stop).run(**params))


class ReturnsEvaluator:
    """An :class:`Evaluator` over a vectorised function ``returns_fn(data_slice, **params) -> per-bar returns``.

    Every combination's returns are kept (CSCV-ready). ``maximize`` is ``"return"`` (compounded total
    return, like backtesting.py's ``Return [%]``) or ``"sharpe"``. Equity starts at ``cash``.

    >>> data = pd.DataFrame({"Close": np.linspace(100, 120, 50)})
    >>> def hold(df, lag):
    ...     return df.Close.pct_change().fillna(0).to_numpy() * (np.arange(len(df)) >= lag)
    >>> ReturnsEvaluator(data, hold, {"lag": [1, 10, 30]}).grid(0, 50).best_params
    {'lag': 1}
    """

    def __init__(self, data: pd.DataFrame, returns_fn: Callable[..., Any], params: Mapping[str, Sequence], *,
                 maximize: str = "return", constraint: Callable | None = None, cash: float = 1.0):
        if maximize not in ("return", "sharpe"):
            raise RobustnessError(f"maximize must be 'return' or 'sharpe', not {maximize!r}")
        self.data, self.returns_fn, self.maximize, self.cash = data, returns_fn, maximize, cash
        self.index = data.index
        self.combinations = _combinations(params, constraint)

    def __repr__(self) -> str:
        return (f"ReturnsEvaluator({getattr(self.returns_fn, '__name__', 'fn')}, {len(self.combinations)} "
                f"combinations, {len(self.data)} bars, maximize={self.maximize!r})")

    def _returns(self, start: int, stop: int, params: Mapping[str, Any]) -> np.ndarray:
        r = np.asarray(self.returns_fn(self.data.iloc[start:stop], **params), dtype=float)
        if r.shape != (stop - start,):
            raise RobustnessError(f"returns_fn gave shape {r.shape} for a slice of {stop - start} bars")
        return r

    def grid(self, start: int, stop: int) -> GridOutcome:
        m = np.column_stack([self._returns(start, stop, p) for p in self.combinations])
        scores = np.prod(1 + m, axis=0) - 1 if self.maximize == "return" else sharpe_ratio(m)
        best = _first_best(np.asarray(scores))
        index = self.index[start:stop]
        returns = pd.DataFrame(m, index=index, columns=[_label(p) for p in self.combinations])
        return GridOutcome(list(self.combinations), np.asarray(scores), dict(self.combinations[best]),
                           pd.Series(self.cash * np.cumprod(1 + m[:, best]), index=index), returns)

    def run(self, start: int, stop: int, params: Mapping[str, Any]) -> pd.Series:
        return pd.Series(self.cash * np.cumprod(1 + self._returns(start, stop, params)),
                         index=self.index[start:stop])


class SandboxEvaluator:
    """An :class:`Evaluator` whose grids and runs go through a :class:`~moondev_lab.sandbox.SandboxPool`.

    For untrusted (LLM-written) strategy code: nothing runs in this process. ``index`` is the bar
    index of the data ``ref`` names (e.g. ``DataPool().get(...).index``; no copy); a slice
    ``[start, stop)`` becomes ``ref`` restricted to ``index[start]..index[stop - 1]``. A grid is
    ``pool.optimize``; with ``keep_returns=True`` it keeps every combination's per-bar returns, from the
    equity the trusted side settled (CSCV-ready). The best run's equity curve comes back downsampled by
    the pool (at most 2,000 points per run), which keeps its first and last values exact.

    >>> from moondev_lab.sandbox import DataRef, SandboxPool
    >>> with SandboxPool(2) as pool:                                                  # doctest: +SKIP
    ...     ev = SandboxEvaluator(pool, code, {"n1": [10, 20]}, DataRef(), ml.DataPool().get("BTC/USD", "15m").index)
    ...     wf = walk_forward(ev, folds=6)
    """

    def __init__(self, pool: Any, code: str, params: Mapping[str, Sequence], ref: Any, index: pd.Index, *,
                 maximize: str = "Return [%]", timeout: float = 120.0, settings: Any = None,
                 keep_returns: bool = False):
        self.pool, self.code, self.params, self.ref, self.index = pool, code, dict(params), ref, index
        self.maximize, self.timeout, self.settings, self.keep_returns = maximize, timeout, settings, keep_returns

    def __repr__(self) -> str:
        return f"SandboxEvaluator({len(self.index)} bars, grid {self.params}, maximize={self.maximize!r})"

    def _slice(self, start: int, stop: int):
        return dataclasses.replace(self.ref, start=self.index[start], end=self.index[stop - 1])

    @staticmethod
    def _equity(result: Any, what: str) -> pd.Series:
        if not result.ok:
            raise RobustnessError(f"{what} failed in the sandbox: {result.error.type}: {result.error.message}")
        points = result.equity
        return pd.Series([p["equity"] for p in points], index=pd.DatetimeIndex([p["time"] for p in points]),
                         name="Equity")

    def grid(self, start: int, stop: int) -> GridOutcome:
        g = self.pool.optimize(self.code, self.params, self._slice(start, stop), maximize=self.maximize,
                               timeout=self.timeout, settings=self.settings, keep_returns=self.keep_returns)
        equity = self._equity(g.result, f"the grid on bars {start}..{stop}")
        combos = [dict(p) for p, _ in g.heatmap]
        scores = np.array([math.nan if v is None else float(v) for _, v in g.heatmap])
        return GridOutcome(combos, scores, dict(g.best_params), equity, g.returns)

    def run(self, start: int, stop: int, params: Mapping[str, Any]) -> pd.Series:
        r = self.pool.run(self.code, self._slice(start, stop), params=dict(params), timeout=self.timeout,
                          settings=self.settings)
        return self._equity(r, f"the run on bars {start}..{stop}")


def _label(params: Mapping[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in params.items())


def annualised_return(equity: pd.Series, periods: float) -> float:
    """Compounded return per year of an equity curve with ``periods`` bars a year.

    The years elapsed are read from a DatetimeIndex when the curve has one (so a downsampled curve
    gives the same answer), else counted as ``(len - 1) / periods``.

    >>> round(annualised_return(pd.Series([100.0, 110.0, 121.0]), periods=2), 4)
    0.21
    """
    e = np.asarray(equity, dtype=float)
    if len(e) < 2 or e[0] <= 0:
        return math.nan
    if e[-1] <= 0:
        return -1.0
    index = getattr(equity, "index", None)
    if isinstance(index, pd.DatetimeIndex):
        years = (index[-1] - index[0]) / _YEAR
    else:
        years = (len(e) - 1) / periods
    return float((e[-1] / e[0]) ** (1 / years) - 1) if years > 0 else math.nan


@dataclass
class Fold:
    """One walk-forward fold: its windows, the parameters chosen in sample, and both annualised returns."""

    number: int
    window: Window
    params: dict
    is_return_ann: float
    oos_return_ann: float
    oos_equity: pd.Series
    span: dict = field(default_factory=dict)  # train/test first and last bar labels (timestamps)

    def to_dict(self) -> dict:
        return {"fold": self.number, **self.span, "params": {k: _plain(v) for k, v in self.params.items()},
                "is_return_ann": _num(self.is_return_ann), "oos_return_ann": _num(self.oos_return_ann)}


@dataclass
class WalkForwardResult:
    """Stitched out-of-sample equity, each fold's best parameters and the walk-forward efficiency.

    The efficiency is the stitched out-of-sample annualised return over the mean in-sample annualised
    return of the chosen parameters (NaN when the in-sample mean is not positive: nothing to keep).
    """

    folds: list[Fold]
    equity: pd.Series  # stitched: fold k's equity scaled to start where fold k-1 ended
    periods_per_year: float
    anchored: bool
    trials: int  # combinations per fold's grid

    @property
    def oos_return_ann(self) -> float:
        return annualised_return(self.equity, self.periods_per_year)

    @property
    def is_return_ann(self) -> float:
        return float(np.mean([f.is_return_ann for f in self.folds]))

    @property
    def efficiency(self) -> float:
        is_ann = self.is_return_ann
        return self.oos_return_ann / is_ann if is_ann > 0 else math.nan

    @property
    def returns(self) -> pd.Series:
        """Per-bar returns of the stitched equity (0 at the first bar)."""
        return self.equity.pct_change().fillna(0.0)

    def params_table(self) -> pd.DataFrame:
        """Each fold's chosen parameters (parameter stability) and returns, one row per fold."""
        return pd.DataFrame([{"fold": f.number, **f.params, "IS ann. return": f.is_return_ann,
                              "OOS ann. return": f.oos_return_ann} for f in self.folds]).set_index("fold")

    def to_dict(self, points: int = 200) -> dict:
        """JSON: the folds, the efficiency, and the stitched equity at most ``points`` points (to draw it again)."""
        return {"folds": [f.to_dict() for f in self.folds], "efficiency": _num(self.efficiency),
                "anchored": self.anchored, "oos_return_ann": _num(self.oos_return_ann),
                "is_return_ann": _num(self.is_return_ann), "equity": downsampled(self.equity, points)}

    def __repr__(self) -> str:
        head = (f"WalkForwardResult({len(self.folds)} {'anchored' if self.anchored else 'rolling'} folds, "
                f"efficiency={self.efficiency:.3f}, OOS ann. return={self.oos_return_ann:.2%}, "
                f"IS ann. return={self.is_return_ann:.2%})")
        return head + "\n" + self.params_table().to_string(float_format=lambda x: f"{x:.4f}")

    def plot(self, ax=None):
        """The stitched out-of-sample equity, fold boundaries dashed."""
        return plot_walk_forward_equity(self.equity.index, self.equity.to_numpy(dtype=float),
                                        [f.oos_equity.index[0] for f in self.folds[1:]], self.efficiency, ax=ax)

    def _repr_html_(self) -> str:
        return (f"<pre>{html.escape(repr(self).splitlines()[0])}</pre>{self.params_table().to_html()}"
                f"{_figure_html(self.plot())}")


def walk_forward(evaluator: Evaluator, folds: int = 6, *, train: int | None = None, test: int | None = None,
                 anchored: bool = False, periods: float | None = None) -> WalkForwardResult:
    """Optimise on each train window with ``evaluator.grid``, test the best on the next window with ``.run``.

    ``periods`` (bars per year) is read from the evaluator's DatetimeIndex when not given.

    >>> data = pd.DataFrame({"Close": 100 + np.arange(400.0)})
    >>> def hold(df, lag):
    ...     return df.Close.pct_change().fillna(0).to_numpy() * (np.arange(len(df)) >= lag)
    >>> wf = walk_forward(ReturnsEvaluator(data, hold, {"lag": [1, 5]}), folds=3, periods=365)
    >>> [f.params for f in wf.folds], len(wf.equity)
    ([{'lag': 1}, {'lag': 1}, {'lag': 1}], 198)
    """
    n_bars = len(evaluator.index)
    periods = periods or periods_per_year(evaluator.index)
    if not periods:
        raise RobustnessError("bars per year are unknown: pass periods= or data with a DatetimeIndex")
    windows = walk_forward_windows(n_bars, folds, train=train, test=test, anchored=anchored)
    out, pieces, level, trials = [], [], None, 0
    for k, w in enumerate(windows, 1):
        g = evaluator.grid(w.train_start, w.train_stop)
        trials = max(trials, len(g.params))
        oos = evaluator.run(w.test_start, w.test_stop, g.best_params)
        if len(oos) < 2 or not np.isfinite(oos.to_numpy(dtype=float)).all():
            raise RobustnessError(f"fold {k}: the evaluator's run on {w.test_stop - w.test_start} bars gave "
                                  f"{len(oos)} equity values, or non-finite ones")
        level = float(oos.iloc[0]) if level is None else level
        piece = oos / float(oos.iloc[0]) * level
        level = float(piece.iloc[-1])
        pieces.append(piece)
        ix = evaluator.index
        span = {"train": [_plain(ix[w.train_start]), _plain(ix[w.train_stop - 1])],
                "test": [_plain(ix[w.test_start]), _plain(ix[w.test_stop - 1])]}
        out.append(Fold(k, w, dict(g.best_params), annualised_return(g.best_equity, periods),
                        annualised_return(oos, periods), oos, span))
    return WalkForwardResult(out, pd.concat(pieces), periods, anchored, trials)


# ----- the combined result ---------------------------------------------------------------------------
@dataclass
class Overfitting:
    """How far to trust one result: trials, PSR, DSR, minimum track record, PBO and walk-forward.

    ``min_track_record`` is in bars, against the DSR's benchmark (the expected best Sharpe of the
    trials): the result is significant at 95% once ``n_obs`` exceeds it (infinite: never).
    """

    trials: int
    n_obs: int
    sharpe: float  # per bar, of the selected run
    sharpe_benchmark: float  # expected maximum per-bar Sharpe of `trials` unskilled trials
    sharpe_variance: float  # variance of the trials' per-bar Sharpe ratios
    skew: float
    kurtosis: float
    psr: float
    dsr: float
    min_track_record: float
    periods_per_year: float | None = None
    pbo: PBOResult | None = None
    walk_forward: WalkForwardResult | None = None
    best: str | None = None  # the selected combination's label, for a grid
    trial_sharpes: np.ndarray | None = field(default=None, repr=False)  # per-bar, for batch deflation

    @property
    def sharpe_ann(self) -> float:
        return self.sharpe * math.sqrt(self.periods_per_year) if self.periods_per_year else math.nan

    @property
    def probably_overfit(self) -> bool:
        """The ranking rule of issue 15: DSR below 0.95 or PBO above 0.5."""
        return self.dsr < 0.95 or (self.pbo is not None and self.pbo.pbo > 0.5)

    def to_dict(self) -> dict:
        """The JSON ``overfitting`` object: trials, dsr, psr, pbo, min_track_record[, walk_forward]."""
        out = {"trials": self.trials, "dsr": _num(self.dsr), "psr": _num(self.psr),
               "pbo": _num(self.pbo.pbo) if self.pbo is not None else None,
               "min_track_record": _num(self.min_track_record), "n_obs": self.n_obs,
               "sharpe": _num(self.sharpe), "sharpe_ann": _num(self.sharpe_ann),
               "sharpe_benchmark": _num(self.sharpe_benchmark), "probably_overfit": self.probably_overfit}
        if self.pbo is not None:
            out["cscv"] = self.pbo.to_dict()
        if self.walk_forward is not None:
            out["walk_forward"] = self.walk_forward.to_dict()
        return out

    def _summary(self) -> str:
        parts = [f"trials={self.trials}", f"dsr={self.dsr:.3f}", f"psr={self.psr:.3f}"]
        if self.pbo is not None:
            parts.append(f"pbo={self.pbo.pbo:.3f}")
        mtr = "inf" if math.isinf(self.min_track_record) else f"{self.min_track_record:,.0f}"
        parts += [f"min_track_record={mtr} of {self.n_obs:,} bars", f"sharpe={self.sharpe:.4f}/bar"]
        if self.periods_per_year:
            parts.append(f"({self.sharpe_ann:.2f}/yr)")
        if self.walk_forward is not None:
            parts.append(f"wf_efficiency={self.walk_forward.efficiency:.3f}")
        flag = "PROBABLY OVERFIT" if self.probably_overfit else "not flagged"
        return f"Overfitting[{flag}]({', '.join(parts)})"

    def __repr__(self) -> str:
        return self._summary()

    def _repr_html_(self) -> str:
        body = f"<b>{html.escape(self._summary())}</b>"
        if self.pbo is not None:
            body += f"<pre>{html.escape(repr(self.pbo))}</pre>{_figure_html(self.pbo.plot())}"
        if self.walk_forward is not None:
            body += self.walk_forward._repr_html_()
        return f"<div>{body}</div>"


def assess_overfitting(returns: Any, *, trials: int | None = None, trial_sharpes: Iterable[float] | None = None,
                       best: int | str | None = None, partitions: int | None = 16,
                       walk_forward: WalkForwardResult | None = None,
                       periods: float | None = None) -> Overfitting:
    """PSR, DSR, minimum track record and (for a grid) PBO of one run's or one grid's per-bar returns.

    * ``returns`` a Series / 1-D array: one run. ``trial_sharpes`` (the per-bar Sharpe ratios of every
      trial made to find it) give the variance for the DSR; ``trials`` defaults to their count, else 1.
    * ``returns`` a DataFrame / 2-D array (bars x combinations): a grid. The selected run is ``best``
      (column label or position; default the highest Sharpe), the trials' Sharpe variance comes from the
      columns, ``trials`` defaults to the number of columns (pass more to count other tries too), and PBO
      is computed by CSCV with ``partitions`` (None: skip it).

    >>> r = pd.Series(np.random.default_rng(3).normal(0.001, 0.01, 2000))
    >>> assess_overfitting(r).to_dict()["trials"]
    1
    """
    pbo = None
    label = None
    if np.ndim(returns) == 2:
        m, labels = _as_matrix(returns)
        srs = sharpe_ratio(m)
        col = _first_best(srs) if best is None else (labels.index(str(best)) if isinstance(best, str) else int(best))
        selected, label = m[:, col], labels[col]
        sharpes = srs if trial_sharpes is None else np.asarray(list(trial_sharpes), dtype=float)
        if partitions:
            pbo = cscv(returns, partitions)
    else:
        selected = returns
        sharpes = None if trial_sharpes is None else np.asarray(list(trial_sharpes), dtype=float)
    n_trials = trials if trials is not None else (len(sharpes) if sharpes is not None else 1)
    if sharpes is not None and not np.isfinite(sharpes).all():
        raise RobustnessError("trial_sharpes contains NaN or infinite values")
    if n_trials > 1 and (sharpes is None or len(sharpes) < 2):
        raise RobustnessError(f"{n_trials} trials need the Sharpe ratios of at least 2 of them (trial_sharpes=) "
                              "for the variance the deflated Sharpe uses")
    variance = float(np.var(sharpes, ddof=1)) if sharpes is not None and len(sharpes) > 1 else 0.0
    mom = return_moments(selected)
    benchmark = expected_max_sharpe(n_trials, variance)
    if periods is None:
        periods = periods_per_year(getattr(returns, "index", None))
    return Overfitting(
        trials=int(n_trials), n_obs=mom.n_obs, sharpe=mom.sharpe, sharpe_benchmark=benchmark, sharpe_variance=variance,
        skew=mom.skew, kurtosis=mom.kurtosis,
        psr=probabilistic_sharpe_ratio(mom.sharpe, mom.n_obs, mom.skew, mom.kurtosis),
        dsr=probabilistic_sharpe_ratio(mom.sharpe, mom.n_obs, mom.skew, mom.kurtosis, benchmark=benchmark),
        min_track_record=min_track_record_length(mom.sharpe, mom.skew, mom.kurtosis, benchmark=benchmark),
        periods_per_year=periods, pbo=pbo, walk_forward=walk_forward, best=label, trial_sharpes=sharpes)


def deflate_batch(results: Sequence[Overfitting]) -> Overfitting:
    """The batch view: the best idea's Sharpe deflated by every trial of every idea in the batch.

    Each idea's DSR counts its own trials; a batch that tried many ideas selected among all of them.
    The trials add up, and the variance is taken over all the trials' Sharpe ratios pooled (an idea
    without them counts as its own Sharpe ratio). The result is the best idea's, with batch ``trials``,
    ``sharpe_benchmark``, ``dsr`` and ``min_track_record``; PBO and walk-forward stay per idea (None).

    >>> rng = np.random.default_rng(0)
    >>> ideas = [assess_overfitting(rng.normal(0, 0.01, (1000, 10)), partitions=None) for _ in range(5)]
    >>> batch = deflate_batch(ideas)
    >>> batch.trials, batch.dsr <= max(o.dsr for o in ideas)
    (50, True)
    """
    if not results:
        raise RobustnessError("deflate_batch needs at least one result")
    best = max(results, key=lambda o: o.sharpe)
    pooled = np.concatenate([o.trial_sharpes if o.trial_sharpes is not None else [o.sharpe] for o in results])
    trials = sum(o.trials for o in results)
    variance = float(np.var(pooled, ddof=1)) if len(pooled) > 1 else 0.0
    benchmark = expected_max_sharpe(trials, variance)
    return dataclasses.replace(
        best, trials=trials, sharpe_benchmark=benchmark, sharpe_variance=variance, pbo=None, walk_forward=None,
        dsr=probabilistic_sharpe_ratio(best.sharpe, best.n_obs, best.skew, best.kurtosis, benchmark=benchmark),
        min_track_record=min_track_record_length(best.sharpe, best.skew, best.kurtosis, benchmark=benchmark),
        trial_sharpes=pooled)


# ----- small helpers ---------------------------------------------------------------------------------
def _num(x: Any) -> float | None:
    """A JSON-safe number: NaN and infinities become None."""
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _plain(v: Any) -> Any:
    """A JSON-safe scalar: numpy numbers become Python ones, timestamps ISO strings."""
    if isinstance(v, (pd.Timestamp, np.datetime64)):
        return pd.Timestamp(v).isoformat()
    return v.item() if isinstance(v, np.generic) else v


def logit_histogram(logits: Any, bins: int | None = None) -> dict:
    """The CSCV logits as histogram ``counts`` over ``edges`` (what the plot draws; small enough to store).

    >>> logit_histogram([-1.0, 0.5, 0.5, 2.0], bins=2)
    {'edges': [-1.0, 0.5, 2.0], 'counts': [1, 3]}
    """
    x = np.asarray(logits, dtype=float)
    counts, edges = np.histogram(x, bins=bins or min(40, max(10, len(x) // 50)))
    return {"edges": [round(float(e), 6) for e in edges], "counts": [int(c) for c in counts]}


def plot_logit_histogram(hist: Mapping, pbo: float | None, ax=None):
    """Draw a :func:`logit_histogram` (a fresh one, or one read back from JSON); logit <= 0 is overfit."""
    fig, ax = _axes(ax)
    counts = np.asarray(hist["counts"], dtype=float)
    ax.stairs(counts, np.asarray(hist["edges"], dtype=float), fill=True, color="#4c72b0")
    ax.axvline(0, color="#c44e52", lw=1.5)
    shown = "?" if pbo is None else f"{pbo:.2f}"
    ax.set_title(f"CSCV logits: PBO {shown} over {int(counts.sum()):,} splits")
    ax.set_xlabel("logit of the in-sample best's out-of-sample rank")
    return fig


def plot_walk_forward_equity(times: Any, equity: Any, fold_starts: Sequence = (), efficiency: float | None = None,
                             ax=None):
    """Draw a stitched walk-forward equity (fresh, or :func:`downsampled` and read back), folds dashed."""
    fig, ax = _axes(ax)
    ax.plot(pd.DatetimeIndex(times) if len(times) and not isinstance(times[0], (int, np.integer)) else times,
            np.asarray(equity, dtype=float), color="#4c72b0", lw=1)
    for t in fold_starts:
        ax.axvline(pd.Timestamp(t) if isinstance(t, str) else t, color="#999999", lw=0.6, ls="--")
    eff = "n/a" if efficiency is None or not math.isfinite(efficiency) else f"{efficiency:.2f}"
    ax.set_title(f"Walk-forward out-of-sample equity, {len(fold_starts) + 1} folds, efficiency {eff}")
    return fig


def downsampled(series: pd.Series, points: int = 200) -> dict:
    """``{"time": [...], "equity": [...]}``: at most ``points`` evenly spaced values, first and last exact.

    >>> downsampled(pd.Series([1.0, 2.0, 3.0, 4.0, 5.0]), 3)
    {'time': [0, 2, 4], 'equity': [1.0, 3.0, 5.0]}
    """
    n = len(series)
    at = np.unique(np.linspace(0, n - 1, min(n, max(2, points))).round().astype(int)) if n else np.array([], int)
    return {"time": [_plain(t) for t in series.index[at]],
            "equity": [float(v) for v in series.to_numpy(dtype=float)[at]]}


def _axes(ax):
    if ax is not None:
        return ax.figure, ax
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend

    fig = Figure(figsize=(6.4, 2.8), dpi=90)
    return fig, fig.add_subplot()


def _figure_html(fig) -> str:
    """A figure as an inline base64 PNG (works offline, in saved notebooks too)."""
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    return f'<img src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}"/>'
