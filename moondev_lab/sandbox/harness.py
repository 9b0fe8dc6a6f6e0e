"""The backtest harness: the part of a run that generated code does *not* own.

The harness owns the data, the column names, position sizing and the
``Backtest(...)`` call. Generated code only defines a ``Strategy``. Code
"from the wild" that reads its own CSV and calls ``Backtest(...).run()``
still runs: its ``pd.read_csv`` of a CSV it cannot read (missing, or outside what the
sandbox may read) gets the pooled data, and its ``Backtest`` uses the pooled data and
the harness's money settings.

It runs inside the sandbox's task child, but is plain Python, so it also
works in-process (that is how the tests check it against backtesting.py):

>>> from moondev_lab.sandbox.harness import execute, BacktestSettings
>>> payload = execute({"op": "run", "code": CODE}, frame)      # doctest: +SKIP
>>> payload["stats"]["Return [%]"]                              # doctest: +SKIP
"""
from __future__ import annotations

import builtins
import contextlib
import ctypes
import errno
import gc
import importlib
import io
import json
import math
import sys
import traceback
import types
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from ..codeextract import NoCodeFound, StrategyNotFound
from ..errors import MoondevError
from ._script_optimize import OptimizeReached
from ._script_optimize import describe as describe_optimize
from .errors import ErrorKind, SandboxViolation
from .settings import BacktestSettings

#: Equity curves are downsampled to at most this many points (evenly spaced, last bar kept).
EQUITY_POINTS = 2000
#: A run may make at most this many order decisions (its order log must fit the result pipe).
MAX_DECISIONS = 500_000
_OHLCV = ("Open", "High", "Low", "Close", "Volume")


# ------------------------------------------------------------------ process-wide setup
def prepare_imports() -> None:
    """Warm the worker: import the libraries strategies use, alias pandas_ta, mute tqdm.

    Called once in the warm worker before any fork, so every task child starts
    with them imported (copy-on-write shared).
    """
    defer_bokeh()
    import backtesting  # noqa: F401
    import backtesting.lib  # noqa: F401
    import talib  # noqa: F401

    alias_pandas_ta()
    silence_progress()


_PLOTTING = "backtesting._plotting"


def defer_bokeh() -> None:
    """Let ``import backtesting`` skip bokeh; it is imported on the first plot instead.

    backtesting.py imports its bokeh plotting module eagerly: 0.5 s and ~22 MiB
    of heap in every warm process, yet only ``plot=True`` runs need it. A stand-in
    ``backtesting._plotting`` forwards every use to the real module, loading it
    on first touch. Must run before backtesting is imported; otherwise a no-op.

    >>> defer_bokeh(); import backtesting                     # doctest: +SKIP
    >>> "bokeh" in sys.modules                                # doctest: +SKIP
    False
    """
    if "backtesting" in sys.modules or _PLOTTING in sys.modules:
        return
    stub = types.ModuleType(_PLOTTING, "Stand-in that imports the real module (and bokeh) on first use.")

    def real():
        if sys.modules.get(_PLOTTING) is stub:
            del sys.modules[_PLOTTING]
            module = importlib.import_module(_PLOTTING)
            import backtesting
            import backtesting.backtesting as btmod
            import backtesting.lib as lib

            backtesting._plotting = module
            btmod.plot, lib._plot_heatmaps = module.plot, module.plot_heatmaps
        return sys.modules[_PLOTTING]

    def forward(name: str):
        def call(*args, **kwargs):
            return getattr(real(), name)(*args, **kwargs)

        call.__name__ = call.__qualname__ = name
        return call

    for name in ("plot", "plot_heatmaps", "set_bokeh_output"):
        setattr(stub, name, forward(name))
    def getattr_(name: str):  # any other public name loads the real module
        if name.startswith("__"):
            raise AttributeError(name)  # the import system probes __path__ etc.
        return getattr(real(), name)

    stub.__getattr__ = getattr_
    sys.modules[_PLOTTING] = stub


_WARMUP = """
from backtesting import Strategy
from backtesting.lib import crossover
import talib
from moondev_lab.sandbox import harness as _harness

class Warmup(Strategy):
    def init(self):
        self.fast = self.I(talib.SMA, self.data.Close, 5)
        self.slow = self.I(talib.SMA, self.data.Close, 20)

    def next(self):
        if len(self.data) % 8 == 0 and _harness._warm_up_should_stop():
            raise _harness.WarmUpInterrupted
        if crossover(self.fast, self.slow):
            self.buy(size=0.5, sl=self.data.Close[-1] * 0.9)
        elif crossover(self.slow, self.fast):
            self.position.close()
"""


class WarmUpInterrupted(MoondevError):
    """Raised inside the warm-up backtest when real work has arrived."""


def _never() -> bool:
    return False


_warm_up_should_stop: Callable[[], bool] = _never


def _stop_warm_up_if_asked(_log) -> None:
    if _warm_up_should_stop():
        raise WarmUpInterrupted


def warm_up(should_stop: Callable[[], bool] | None = None, *, grid: bool = True) -> None:
    """Run one tiny backtest so first-use work (lazy imports, caches) happens before a task.

    The template calls it once before any fork. A pool's standby task child calls
    it again while idle, with ``should_stop`` polled every few bars: a fresh fork
    pays ~20 ms of copy-on-write page faults on its first backtest, and the
    standby pays them here, off the critical path, unless a task arrives first.

    >>> warm_up()                                                # doctest: +SKIP
    """
    global _warm_up_should_stop
    _warm_up_should_stop = should_stop or _never
    try:
        idx = pd.date_range("2023-01-01", periods=300, freq="15min", tz="UTC", name="ts")
        close = 100 + np.sin(np.arange(300) / 7) * 5
        frame = pd.DataFrame({"Open": close, "High": close + 1, "Low": close - 1, "Close": close,
                              "Volume": 1.0}, index=idx)
        if not _warm_up_should_stop():
            # early: checked once more after the bar loop, so a task never waits for the warm-up's stats
            json.dumps(execute({"op": "run", "code": _WARMUP}, frame, early=_stop_warm_up_if_asked), default=str)
        if grid and not _warm_up_should_stop():
            execute({"op": "grid", "code": _WARMUP, "combos": [{}], "maximize": "SQN"}, frame)
    except WarmUpInterrupted:
        pass
    finally:
        _warm_up_should_stop = _never


def alias_pandas_ta() -> None:
    """Make ``import pandas_ta`` (and its submodules) resolve to ``pandas_ta_classic``.

    pandas-ta itself needs Python >= 3.12 and numpy < 2.3; pandas-ta-classic
    has the same API (``df.ta.rsi()``, ``pandas_ta.rsi(close, length=14)``).
    """
    if "pandas_ta" in sys.modules:
        return
    classic = importlib.import_module("pandas_ta_classic")
    sys.modules["pandas_ta"] = classic
    for name, mod in list(sys.modules.items()):
        if name.startswith("pandas_ta_classic."):
            sys.modules.setdefault("pandas_ta" + name[len("pandas_ta_classic"):], mod)


def silence_progress() -> None:
    """backtesting >= 0.6.3 draws a tqdm bar on every run and ignores TQDM_DISABLE."""
    import backtesting._util as util
    import backtesting.backtesting as bt

    def _no_tqdm(seq, **_):
        return seq

    util._tqdm = bt._tqdm = _no_tqdm


# ----------------------------------------------------------------------- code handling
def extract_code(text: str) -> str:
    """Python source from a file or an LLM reply (prose, ``<think>``, fences); see :mod:`moondev_lab.codeextract`."""
    from moondev_lab.codeextract import extract_code as _extract

    return _extract(text)


def find_strategy(namespace: dict, module_name: str):
    """The one ``Strategy`` subclass the code defines (leaf classes win)."""
    from backtesting import Strategy

    found = [v for v in namespace.values()
             if isinstance(v, type) and issubclass(v, Strategy) and v is not Strategy
             and v.__module__ == module_name]
    leaves = [c for c in found if not any(o is not c and issubclass(o, c) for o in found)]
    if len(leaves) == 1:
        return leaves[0]
    if not leaves:
        raise _NoStrategy("the code defines no backtesting.Strategy subclass")
    raise _NoStrategy("the code defines several Strategy subclasses: "
                      + ", ".join(sorted(c.__name__ for c in leaves)))


class _NoStrategy(Exception):
    pass


# ------------------------------------------------------------------------ result shape
def to_jsonable(value):
    """One stats/trade value as JSON: floats keep NaN, times become ISO strings."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    if isinstance(value, np.bool_):
        return bool(value)
    if value is pd.NaT:
        return None
    if isinstance(value, (pd.Timestamp, pd.Timedelta)):
        return value.isoformat()
    if isinstance(value, (np.datetime64, np.timedelta64)):
        return to_jsonable(pd.Timestamp(value) if isinstance(value, np.datetime64) else pd.Timedelta(value))
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [to_jsonable(v) for v in value]
    return str(value)


def stats_to_dict(stats: pd.Series) -> dict:
    """backtesting.py's stats Series as a plain dict (no ``_equity_curve``/``_trades``).

    ``_strategy`` becomes the strategy's parameters as a dict.
    """
    out = {}
    for key, value in stats.items():
        if key in ("_equity_curve", "_trades"):
            continue
        if key == "_strategy":
            out[key] = to_jsonable(strategy_params(value))
        else:
            out[str(key)] = to_jsonable(value)
    return out


def strategy_params(strategy) -> dict:
    """Every parameter of a strategy instance: class defaults overridden by run kwargs."""
    from backtesting import Strategy

    params = {}
    for cls in reversed(type(strategy).__mro__):
        if issubclass(cls, Strategy) and cls is not Strategy:
            for name, value in vars(cls).items():
                if not name.startswith("_") and isinstance(value, (int, float, str, bool, type(None))):
                    params[name] = value
    params.update(getattr(strategy, "_params", {}) or {})
    return params


def trades_to_records(trades: pd.DataFrame) -> list[dict]:
    """Each trade as a JSON-able dict; column by column (a settled run's trades are converted on every run)."""
    columns = {str(k): _jsonable_column(trades[k]) for k in trades.columns}
    return [dict(zip(columns, row)) for row in zip(*columns.values())] if len(trades) else []


def _jsonable_column(column: pd.Series) -> list:
    """``[to_jsonable(v) for v in column]``, vectorised for number, bool and datetime columns."""
    if column.dtype.kind in "fiub" and isinstance(column.dtype, np.dtype):
        return column.to_numpy().tolist()  # Python floats (NaN kept), ints and bools, as to_jsonable gives
    if column.dtype.kind == "M":
        return iso_times(pd.DatetimeIndex(column))
    return [to_jsonable(v) for v in column]


def iso_times(index: pd.Index) -> list:
    """``Timestamp.isoformat()`` of each time (None for NaT), as :func:`to_jsonable` gives it.

    Vectorised for whole-second times, naive or in UTC (candles): ``Timestamp`` objects cost ~5 us each.

    >>> iso_times(pd.DatetimeIndex(["2023-01-01 00:15"], tz="UTC"))
    ['2023-01-01T00:15:00+00:00']
    """
    if isinstance(index, pd.DatetimeIndex) and str(index.tz) in ("UTC", "None"):
        seconds = _whole_seconds(index)
        if seconds is not None:
            text = np.datetime_as_string(seconds, unit="s").tolist()
            return [t + "+00:00" for t in text] if index.tz is not None else text
    return [to_jsonable(t) for t in index]


def _naive_utc(index: pd.DatetimeIndex) -> pd.DatetimeIndex:
    """The times in UTC without a zone, as the sample CSV writes them."""
    return index.tz_convert("UTC").tz_localize(None) if index.tz is not None else index


def _whole_seconds(index: pd.DatetimeIndex) -> np.ndarray | None:
    """The times as naive-UTC ``datetime64[s]``, or None if any is NaT or falls between two seconds."""
    if index.hasnans:
        return None
    values = _naive_utc(index).to_numpy()
    seconds = values.astype("datetime64[s]")
    return seconds if (seconds == values).all() else None


def equity_points(curve: pd.DataFrame, max_points: int = EQUITY_POINTS) -> list[dict]:
    """The equity curve, evenly downsampled to ``max_points`` (first and last bar kept)."""
    n = len(curve)
    if n == 0:
        return []
    idx = np.unique(np.linspace(0, n - 1, min(n, max_points)).round().astype(int))
    eq = curve["Equity"].to_numpy(dtype=float)[idx].tolist()
    dd = curve["DrawdownPct"].to_numpy(dtype=float)[idx].tolist() if "DrawdownPct" in curve else [math.nan] * len(idx)
    return [{"time": t, "equity": e, "drawdown_pct": d} for t, e, d in zip(iso_times(curve.index[idx]), eq, dd)]


# -------------------------------------------------------------------- position sizing
def normalise_size(size):
    """A size backtesting.py accepts: a fraction in (0, 1) or whole units >= 1.

    Returns None for sizes that cannot mean anything (0, NaN, inf): the order
    is then skipped rather than crashing the run. Negative sizes use their
    magnitude (the direction is the method, buy or sell).
    """
    s = float(size)
    if not math.isfinite(s) or s == 0:
        return None
    s = abs(s)
    return s if s < 1 else float(math.floor(s))


# -------------------------------------------------------------------------- patches
class _Capture:
    """State shared by the patches during one execution."""

    def __init__(self, frame: pd.DataFrame, settings: BacktestSettings):
        self.frame = frame
        self.settings = settings
        # Only the last run's stats are kept: a grid chunk runs dozens of backtests and keeping
        # every stats Series (equity curve, trades, strategy) grew a 31k-bar chunk by ~1.7 MiB a run.
        self.last_run: pd.Series | None = None
        self.size_adjustments = 0
        self.skipped_orders = 0
        self.csv_redirects: list[str] = []
        self.last_backtest = None  # the Backtest behind the last run, for plotting
        self.last_log = None  # the last run's decisions, which the trusted parent settles
        self.real_plot = None
        # task["heatmap"] (a stats key): every grid combination a script's Backtest.optimize runs, with its
        # decisions, for the parent to settle into a heatmap; None when not asked for.
        self.heatmap_key: str | None = None
        self.optimizing = None  # the Backtest whose optimize() is running (its combinations run on copies)
        self.grid_runs: list[dict] = []
        # A script's own Backtest.optimize: "report" describes it and stops the script (a pool spreads
        # it), "stop" stops there and keeps its Backtest (a grid chunk of that spread), None runs it here.
        self.optimize_mode: str | None = None
        self.optimize_call: dict | None = None
        self.optimize_note = ""
        self.optimize_backtest = None
        # execute()'s ``early``: handed to the first run that is not a grid combination (a script's own run, or
        # the harness's), so the parent settles it while this process computes the claimed stats.
        self.early: Callable | None = None


@contextlib.contextmanager
def _patched(capture: _Capture):
    """Position sizing, wild-code ``read_csv``/``Backtest`` redirection, no plotting."""
    import backtesting
    import backtesting.backtesting as btmod
    from backtesting import Strategy

    from moondev_lab._bt_compat import RecordingBacktest

    orig_buy, orig_sell = Strategy.buy, Strategy.sell
    orig_read_csv = pd.read_csv
    orig_backtest = backtesting.Backtest

    def _sized(orig):
        def order(self, *, size=Strategy._FULL_EQUITY, **kw):
            if size is not Strategy._FULL_EQUITY:
                fixed = normalise_size(size)
                if fixed is None:
                    capture.skipped_orders += 1
                    return None
                if fixed != size:
                    capture.size_adjustments += 1
                size = fixed
            return orig(self, size=size, **kw)

        order.__name__, order.__doc__ = orig.__name__, orig.__doc__
        return order

    def read_csv(filepath_or_buffer, *args, **kwargs):
        if isinstance(filepath_or_buffer, (str, Path)) and str(filepath_or_buffer).lower().endswith(".csv"):
            path = Path(filepath_or_buffer)
            try:
                missing = not path.is_file()
                if not missing:  # a host file the sandbox may see but not read (Landlock): not there for the task
                    path.open("rb").close()
            except OSError:  # PermissionError included: the script gets the pooled data, never an EACCES crash
                missing = True
            if missing:
                capture.csv_redirects.append(str(filepath_or_buffer))
                direct = None if args else _sample_frame(capture.frame, kwargs)
                if direct is not None:
                    return direct
                return orig_read_csv(io.StringIO(_as_sample_csv(capture.frame)), *args, **kwargs)
        return orig_read_csv(filepath_or_buffer, *args, **kwargs)

    capture.real_plot = orig_backtest.plot  # user code gets a no-op plot(); the harness the real one

    class HarnessBacktest(RecordingBacktest):
        """``Backtest`` for code that builds its own: pooled data, harness money settings.

        It records the strategy's decisions (:class:`~moondev_lab._bt_compat.RecordingBacktest`):
        the parent settles them itself and trusts nothing else this process reports.
        """

        max_events = MAX_DECISIONS

        def __init__(self, data=None, strategy=None, **kwargs):
            kwargs.update(capture.settings.kwargs())
            super().__init__(_pooled_with_extras(capture.frame, data), strategy, **kwargs)

        def run(self, **kwargs):
            if capture.early is not None and capture.optimizing is None:
                self.on_decided, capture.early = capture.early, None  # one order log ahead per task
            stats = super().run(**kwargs)
            capture.last_run, capture.last_log = stats, self.order_log
            capture.last_backtest = self
            if capture.optimizing is not None and self is not capture.optimizing:  # a combination, on a copy
                _record_grid_run(capture, kwargs, stats, self.order_log)
            return stats

        def optimize(self, **kwargs):
            if capture.optimize_mode == "stop":
                capture.optimize_backtest = self
                raise OptimizeReached
            if capture.optimize_mode == "report":
                capture.optimize_call, capture.optimize_note = describe_optimize(kwargs, _stats_keys(capture.frame))
                if capture.optimize_call is not None:
                    raise OptimizeReached
            # No processes in the sandbox: run the grid on threads in this process.
            reporting = capture.heatmap_key is not None and capture.optimizing is None
            if reporting:  # a script calling optimize() more than once: its last grid is the one reported
                capture.optimizing, capture.grid_runs = self, []
            try:
                with _in_process_optimize():
                    stats = super().optimize(**kwargs)
            finally:
                if reporting:
                    capture.optimizing = None
            result = stats[0] if isinstance(stats, tuple) else stats
            capture.last_run = result
            return stats

        def plot(self, *args, **kwargs):
            return None  # no browser, no HTML files from inside the sandbox

    HarnessBacktest.__name__ = HarnessBacktest.__qualname__ = "Backtest"
    Strategy.buy, Strategy.sell = _sized(orig_buy), _sized(orig_sell)
    pd.read_csv = read_csv
    backtesting.Backtest = btmod.Backtest = HarnessBacktest
    try:
        yield HarnessBacktest
    finally:
        Strategy.buy, Strategy.sell = orig_buy, orig_sell
        pd.read_csv = orig_read_csv
        backtesting.Backtest = btmod.Backtest = orig_backtest


#: A script's Backtest.optimize reports at most this many combinations for the heatmap.
MAX_GRID_RUNS = 5000


def _record_grid_run(capture: _Capture, params: dict, stats: pd.Series, log) -> None:
    """One combination of a script's ``Backtest.optimize``: its parameters, claimed score and decisions."""
    if len(capture.grid_runs) >= MAX_GRID_RUNS:
        raise ValueError(f"Backtest.optimize ran more than {MAX_GRID_RUNS} combinations; the heatmap holds at most "
                         "that many (narrow the grid)")
    key = capture.heatmap_key
    score = to_jsonable(stats.get(key)) if stats["# Trades"] else None  # as Backtest.optimize's heatmap: NaN w/o trades
    capture.grid_runs.append({"params": to_jsonable(dict(params)), "score": score,
                              "log": log.to_dict() if log is not None else None})


@contextlib.contextmanager
def _in_process_optimize():
    import backtesting
    import backtesting.backtesting as btmod
    from multiprocessing.dummy import Pool as ThreadPool

    class _NoShm:  # backtesting copies data to /dev/shm for its worker processes; threads need not
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        @staticmethod
        def df2shm(df):
            return df

        @staticmethod
        def shm2df(df):
            return df, []

    orig_pool, orig_smm = backtesting.Pool, btmod.SharedMemoryManager
    backtesting.Pool = lambda *a, **k: ThreadPool(1)
    btmod.SharedMemoryManager = _NoShm
    try:
        yield
    finally:
        backtesting.Pool, btmod.SharedMemoryManager = orig_pool, orig_smm


def _stats_keys(frame: pd.DataFrame) -> set:
    """The stats fields ``Backtest.optimize`` may maximize (those of a two-bar run)."""
    from moondev_lab._bt_compat import compute_stats

    return {k for k in compute_stats([], np.ones(2), frame.iloc[:2], 0).index if not k.startswith("_")}


def _as_sample_csv(frame: pd.DataFrame) -> str:
    """The pooled frame in the layout of the bundled BTC-USD-15m.csv, which wild code expects.

    The text is ``DataFrame.to_csv``'s (floats as their shortest repr), written by joining strings:
    ``to_csv`` took ~7 us a row, most of a wild script's overhead on a month of 15m bars.
    """
    idx = _naive_utc(frame.index)
    values = [frame[col].to_numpy(dtype=float) for col in _OHLCV]
    if any(np.isnan(v).any() for v in values):  # to_csv writes NaN as an empty field; repr would not
        out = pd.DataFrame({"datetime": idx.strftime("%Y-%m-%d %H:%M:%S")})
        for col, v in zip(_OHLCV, values):
            out[" " + col.lower()] = v
        out[""] = ""
        return out.to_csv(index=False)
    columns = [idx.strftime("%Y-%m-%d %H:%M:%S").tolist()] + [list(map(repr, v.tolist())) for v in values]
    header = ",".join(["datetime", *(" " + c.lower() for c in _OHLCV), ""])
    return "\n".join([header, *(",".join(row) + "," for row in zip(*columns))]) + "\n"


#: The sample's columns, as ``read_csv`` names them (the header ends in a comma: an unnamed, empty 7th column).
_SAMPLE_COLUMNS = ("datetime", *(" " + c.lower() for c in _OHLCV), "Unnamed: 6")
_NO_KEYWORD = object()


def _sample_frame(frame: pd.DataFrame, kwargs: dict) -> pd.DataFrame | None:
    """``read_csv(<the sample CSV>, **kwargs)``, built from the pooled columns without writing or parsing text.

    Only for the calls wild scripts make (``parse_dates`` and ``index_col`` on the ``datetime`` column, or
    nothing); for any other keyword this returns None and the caller parses :func:`_as_sample_csv`'s text,
    whatever the keyword does. The result equals that parse (tests/test_harness.py compares them): float
    ``repr`` round-trips, and the text holds whole seconds, so a frame with sub-second times is left to the
    text path. Writing and parsing the text cost ~10 ms a month of 15m bars in a warm task child, ~20 ms
    in a fresh one; this costs well under 1 ms.
    """
    if set(kwargs) - {"parse_dates", "index_col"} or not isinstance(frame.index, pd.DatetimeIndex) or not len(frame):
        return None  # (a header-only text parses to columns of another dtype)
    parse_dates, index_col = kwargs.get("parse_dates", _NO_KEYWORD), kwargs.get("index_col", _NO_KEYWORD)
    if index_col in (0, "datetime") and not isinstance(index_col, bool):
        as_index = True
    elif index_col is _NO_KEYWORD or index_col is None or index_col is False:
        as_index = False
    else:
        return None
    if parse_dates is _NO_KEYWORD or parse_dates is None or parse_dates is False:
        parse = False
    elif parse_dates is True and as_index:
        parse = True
    elif parse_dates is True and index_col is not False:
        parse = False  # read_csv parses the index only, and there is none
    elif type(parse_dates) is list and len(parse_dates) == 1 and parse_dates[0] in (0, "datetime") \
            and not isinstance(parse_dates[0], bool):
        parse = True
    else:
        return None  # e.g. True with index_col=False: read_csv raises its own error
    seconds = _whole_seconds(frame.index)
    if seconds is None:
        return None  # the text holds "%Y-%m-%d %H:%M:%S": let the parse of that text decide
    if parse:
        times = pd.DatetimeIndex(seconds.astype("datetime64[us]"), name="datetime")  # read_csv's unit for them
    else:
        times = pd.Index([t.replace("T", " ") for t in np.datetime_as_string(seconds, unit="s").tolist()],
                         dtype="str", name="datetime")
    columns = {name: frame[col].to_numpy(dtype=float, copy=True) for name, col in zip(_SAMPLE_COLUMNS[1:], _OHLCV)}
    columns[_SAMPLE_COLUMNS[-1]] = np.full(len(seconds), np.nan)
    if as_index:
        return pd.DataFrame(columns, index=times)
    return pd.DataFrame({"datetime": times, **columns})


def _pooled_with_extras(pooled: pd.DataFrame, data) -> pd.DataFrame:
    """The pooled OHLCV, plus any extra columns the code added to its own same-length frame."""
    frame = pooled.copy(deep=False)
    if isinstance(data, pd.DataFrame) and len(data) == len(pooled):
        wanted = {c.lower() for c in _OHLCV} | {"datetime", "date", "timestamp", "time", ""}
        for col in data.columns:
            name = str(col)
            if name.strip().lower() not in wanted and not name.lower().startswith("unnamed"):
                frame[name] = data[col].to_numpy()
    return frame


# ------------------------------------------------------------------------- execution
def execute(task: dict, frame, early: Callable | None = None) -> dict:
    """Run one task on ``frame``; always returns a JSON-able payload, never raises.

    ``task``: ``op`` ("run", "grid" or "runs"), ``code``, optional ``params``,
    ``settings`` (dict of :class:`BacktestSettings`), and for grids
    ``combos`` (list of param dicts) and ``maximize`` (a stats key).
    ``"runs"`` is a batch: ``runs`` lists ``{"code", "params"}``, ``frame`` is then one
    frame per run, and the payload's ``runs`` holds one "run" payload each.
    ``early``: called with the order log of the task's first run (the script's own, or the one the
    harness makes), as soon as its decisions are final (before its stats): a hint the parent may settle meanwhile; the
    payload still carries the log (:attr:`~moondev_lab._bt_compat.RecordingBacktest.on_decided`).
    """
    if task.get("op") == "runs":
        return execute_batch(task, frame)
    from . import _limits

    settings = BacktestSettings(**(task.get("settings") or {}))
    capture = _Capture(frame, settings)
    capture.heatmap_key = task.get("heatmap") if task.get("op") != "grid" else None
    capture.early = early if task.get("op") != "grid" else None
    try:
        code = extract_code(task["code"])
        compiled = compile(code, "<strategy>", "exec")
        module = types.ModuleType("__main__")  # wild scripts guard their run with __name__ == "__main__"
        module.__dict__["__builtins__"] = builtins
        # as `python strategy.py` would: scripts find their data next to themselves via __file__
        module.__dict__["__file__"] = str(Path.cwd() / "strategy.py")
        capture.optimize_mode = "stop" if task.get("op") == "grid" else task.get("optimize")
        with _patched(capture) as harness_backtest:
            try:
                exec(compiled, module.__dict__)
            except OptimizeReached:
                pass
            if capture.optimize_call is not None:  # even if the script caught OptimizeReached
                payload = {"optimize_call": capture.optimize_call, "strategy": None}
            elif task.get("op") == "grid":
                payload = _run_grid(task, module, frame, harness_backtest, capture)
            else:
                if capture.last_run is None or task.get("params"):
                    strategy = find_strategy(module.__dict__, module.__name__)
                    harness_backtest(frame, strategy).run(**(task.get("params") or {}))
                payload = _run_payload(capture.last_run, capture.last_log, task)
            if task.get("plot") and task.get("op") != "grid" and capture.optimize_call is None:
                payload.update(_plot_html(capture))
            if task.get("indicators") and task.get("op") != "grid":
                payload["indicators"] = indicator_payload(capture.last_run)
            if capture.heatmap_key is not None:
                payload["grid_runs"] = capture.grid_runs
        payload["ok"] = True
    except WarmUpInterrupted:
        raise  # a task is waiting: skip classifying (formatting a traceback costs milliseconds)
    except BaseException as exc:  # noqa: BLE001 - classify everything, including SystemExit
        payload = {"ok": False, "error": classify(exc, _limits.violations)}
    payload["size_adjustments"] = capture.size_adjustments
    payload["skipped_orders"] = capture.skipped_orders
    payload["csv_redirects"] = capture.csv_redirects[:5]
    if capture.optimize_note:
        payload["optimize_note"] = capture.optimize_note
    return payload


def execute_batch(task: dict, frames: list) -> dict:
    """Several runs in this one process (one dispatch, the data mapped once): each as its own "run" task.

    Each run has its own module and patches, so one run's failure or globals never reach the
    next; the runs' results are independent of their order, exactly as separate tasks.

    >>> execute_batch({"runs": [{"code": CODE, "params": {"n": 5}}]}, [frame])["runs"][0]["ok"]  # doctest: +SKIP
    True
    """
    runs = task.get("runs") or []
    if not isinstance(frames, list) or len(frames) != len(runs):
        return {"ok": False, "error": classify(ValueError(f"{len(runs)} runs need as many frames"))}
    out, bars = [], 0
    for k, (run, frame) in enumerate(zip(runs, frames)):
        out.append(execute({**task, "op": "run", "code": run["code"], "params": dict(run.get("params") or {}),
                            "runs": None, "plot": False, "indicators": bool(run.get("indicators"))}, frame))
        bars += len(frame)
        # Finished runs leave reference cycles (strategy <-> broker <-> data). A full collection costs
        # 50-100 ms in a warm worker, a third of a short batch: collect only once their bars add up.
        if bars >= _BATCH_COLLECT_BARS and k < len(runs) - 1:
            _release_run_memory()
            bars = 0
    return {"ok": True, "runs": out}


#: Bars a batch's finished runs may hold before they are collected (~ a few MiB per 10k bars).
_BATCH_COLLECT_BARS = 100_000


def _run_payload(stats: pd.Series, log, task: dict) -> dict:
    return _finish_payload(_run_parts(stats, log), task)


def _run_parts(stats: pd.Series, log) -> dict:
    """What a payload needs from a run, without the strategy object (its indicators, broker, data).

    ``stats``, ``trades`` and ``equity`` are only the strategy's claims; ``order_log``
    (its decisions) is what the trusted parent settles.
    """
    return {"stats": stats_to_dict(stats), "trades": stats["_trades"], "equity": stats["_equity_curve"],
            "strategy": type(stats["_strategy"]).__name__, "order_log": log.to_dict() if log is not None else None}


def _finish_payload(parts: dict, task: dict) -> dict:
    if task.get("claims") == "stats":  # the pool's parent settles trades and equity itself from the order log
        return {**parts, "trades": [], "equity": []}
    return {**parts, "trades": trades_to_records(parts["trades"]),
            "equity": equity_points(parts["equity"], task.get("equity_points", EQUITY_POINTS))}


def indicator_payload(stats: pd.Series | None) -> list[dict]:
    """The last run's ``Strategy.I`` indicators, for the trusted side's plot: plain floats, bounded.

    Only for runs whose plot is wanted (``task["indicators"]``). Rows longer than the chart
    can show are downsampled to :data:`~moondev_lab.sandbox._wire.INDICATOR_POINTS` bars
    (:func:`~moondev_lab.sandbox._wire.sample_index`); indicators past the wire's bounds are
    left out. The parent decodes this with :func:`~moondev_lab.sandbox._wire.decode_indicators`
    and draws it only: the values are the strategy's claims, never used for stats or ranking.
    """
    from moondev_lab._bt_compat import indicator_specs

    from . import _wire

    if stats is None:
        return []
    try:
        specs = indicator_specs(stats["_strategy"])[:_wire.MAX_INDICATORS]
    except Exception:  # noqa: BLE001 - display-only: odd indicators never fail the run, they are left out
        return []
    out, total = [], 0
    for spec in specs:
        values = spec["values"]
        if len(values) > _wire.MAX_INDICATOR_ROWS:
            continue
        values = values[:, _wire.sample_index(values.shape[1], min(values.shape[1], _wire.INDICATOR_POINTS))]
        total += values.size
        if total > _wire.MAX_INDICATOR_VALUES:
            break
        out.append({**spec, "values": values.tolist()})
    return out


def _plot_html(capture: _Capture) -> dict:
    """backtesting.py's own interactive HTML plot of the last run, written in the task's temp dir.

    A failing plot never fails the run: the error is reported beside the stats.
    """
    bt, stats = capture.last_backtest, capture.last_run
    if bt is None or stats is None:
        return {"plot_error": "no run to plot"}
    path = Path.cwd() / "plot.html"
    try:
        capture.real_plot(bt, results=stats, filename=str(path), open_browser=False)
        return {"plot_html": path.read_text()}
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        return {"plot_error": f"{type(exc).__name__}: {exc}"[:500]}


def _run_grid(task: dict, module, frame, harness_backtest, capture: _Capture) -> dict:
    """One chunk of a parameter grid, scored exactly like ``Backtest.optimize`` does.

    All combinations run on one ``Backtest`` object in this one process. Besides
    the scores, the full result (stats, trades, equity) of the chunk's best run
    comes back, so the pool needs no extra run at the overall best parameters:
    the first maximum of the whole grid is also the first maximum of its chunk.
    """
    _pin_mmap_threshold()
    bt = capture.optimize_backtest  # a script's own optimize call: its grid runs on its own Backtest
    if bt is None:
        bt = harness_backtest(frame, find_strategy(module.__dict__, module.__name__))
    from moondev_lab._bt_compat import strategy_class

    strategy = strategy_class(bt)
    key = task.get("maximize", "SQN")
    values: list[float | None] = []
    logs: list[dict | None] = []  # every combination's decisions: the parent settles each one's score
    best_i, best_value, best, best_sizing = 0, None, None, (0, 0)
    for i, params in enumerate(task["combos"]):
        sizing = (capture.size_adjustments, capture.skipped_orders)
        stats = bt.run(**params)
        log = bt.order_log
        sizing = (capture.size_adjustments - sizing[0], capture.skipped_orders - sizing[1])
        # Backtest._mp_task drops runs without trades from the heatmap
        value = float(stats[key]) if stats["# Trades"] else None
        values.append(value)
        logs.append(log.to_dict() if log is not None else None)
        is_best = value is not None and not math.isnan(value) and (best_value is None or value > best_value)
        if is_best:  # ">": the first of ties wins
            best_i, best_value = i, value
        if is_best or best is None:  # the first combination is the fallback when nothing trades
            best, best_sizing = _run_parts(stats, log), sizing
        # backtesting.py keeps the last run's stats (with its strategy, indicators and broker)
        # on the Backtest, and so do the patches: drop them, so that they are not still held
        # while the next run builds its own.
        bt._results = capture.last_run = capture.last_log = bt.order_log = None
        del stats, log
        _release_run_memory()
    if best is not None:
        best = {**_finish_payload(best, task), "ok": True,
                "size_adjustments": best_sizing[0], "skipped_orders": best_sizing[1]}
    return {"values": values, "logs": logs, "strategy": strategy.__name__, "best_index": best_i, "best": best}


def _release_run_memory() -> None:
    """Between the runs of a grid chunk: free the last run, and give its pages back to the OS.

    A run leaves a reference cycle (strategy <-> broker <-> data) that has reached the
    oldest generation by the time the run ends; left to the GC's thresholds, a 50-run
    chunk grew by ~6 MiB more. ``malloc_trim`` then returns free pages from the middle
    of glibc's heap. Measured on the 100-combination grid: -7 and -3.6 MiB of peak PSS.
    """
    gc.collect()
    if _malloc_trim is not None:
        _malloc_trim(0)


def _pin_mmap_threshold() -> None:
    """Keep every block over 128 KiB in its own mapping, unmapped as soon as it is freed.

    glibc raises its mmap threshold each time a mapped block is freed, so after the
    first run a run's arrays (31k bars x 8 bytes each) would come from the heap, where
    fragmentation keeps them. Pinning the threshold: about -2 MiB of peak PSS per grid.
    This only ever runs in a task child, which exits after its task.
    """
    if _mallopt is not None:
        _mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD


_glibc = ctypes.CDLL(None)
_malloc_trim = getattr(_glibc, "malloc_trim", None)  # glibc only
_mallopt = getattr(_glibc, "mallopt", None)


def classify(exc: BaseException, violations=()) -> dict:
    """A classified error dict (see :class:`~moondev_lab.sandbox.errors.ErrorKind`)."""
    tb = "".join(traceback.format_exception(exc))[-8000:]
    kind = ErrorKind.STRATEGY_ERROR
    if isinstance(exc, SandboxViolation):
        kind = exc.kind
    elif isinstance(exc, SyntaxError):
        kind = ErrorKind.SYNTAX_ERROR
    elif isinstance(exc, (_NoStrategy, NoCodeFound, StrategyNotFound)):
        kind = ErrorKind.NO_STRATEGY
    elif isinstance(exc, ImportError):
        kind = ErrorKind.IMPORT_ERROR
    elif isinstance(exc, MemoryError):
        kind = ErrorKind.MEMORY_LIMIT
    elif isinstance(exc, SystemExit):
        kind = ErrorKind.EXITED
    elif isinstance(exc, OSError) and exc.errno == errno.EAGAIN and "fork" in tb:
        kind = ErrorKind.PROCESS_LIMIT
    elif isinstance(exc, OSError) and exc.errno == errno.EFBIG:
        kind = ErrorKind.FILE_TOO_LARGE
    elif violations:
        kind = violations[-1][0]  # the strategy swallowed our exception, then failed anyway
    message = str(exc)
    if isinstance(exc, SystemExit):
        message = f"sys.exit({exc.code!r}) called"
    elif isinstance(exc, MemoryError) and not message:
        message = "out of memory: the allocation exceeds the sandbox's address-space limit"
    return {"kind": kind.value, "type": type(exc).__name__, "message": message[:4000], "traceback": tb}
