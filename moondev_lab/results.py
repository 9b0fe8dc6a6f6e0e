"""Results you can look at: one backtest, one idea's whole RBI run, a batch of ideas, a past run.

>>> import moondev_lab as ml
>>> r = ml.run_rbi("20/50 SMA crossover", model="offline").results[0]      # doctest: +SKIP
>>> r.stats["Sharpe Ratio"], len(r.trades), r.params                      # doctest: +SKIP
>>> r.plot()              # backtesting.py's interactive chart, inline and offline   # doctest: +SKIP
>>> r.heatmap()           # the grid, as Backtest.optimize(return_heatmap=True) gives  # doctest: +SKIP
>>> ml.load_run(r.run_id).summary                                         # doctest: +SKIP

``stats`` is a ``pd.Series`` like ``Backtest.run()``'s, carrying ``_equity_curve``
and ``_trades``. Reprs round numbers for reading; the Series and DataFrames keep
full precision.
"""
from __future__ import annotations

import base64
import html
import json
import math
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ._overfit import batch_overfitting, overfit_columns, overfitting_html
from .ledger import format_params, metric_columns, rank_by_oos

#: The headline stats shown in tables and kept in the ledger.
STAT_KEYS = ("Start", "End", "Duration", "Exposure Time [%]", "Equity Final [$]", "Return [%]",
             "Buy & Hold Return [%]", "Return (Ann.) [%]", "Volatility (Ann.) [%]", "Sharpe Ratio",
             "Sortino Ratio", "Calmar Ratio", "Max. Drawdown [%]", "# Trades", "Win Rate [%]",
             "Profit Factor", "Expectancy [%]", "SQN")
_TIMES = ("Start", "End")
_DURATIONS = ("Duration", "Max. Drawdown Duration", "Avg. Drawdown Duration", "Max. Trade Duration",
              "Avg. Trade Duration")
_ISO_DURATION = re.compile(r"^-?P(\d+)DT(\d+)H(\d+)M(\d+(?:\.\d+)?)S$")


# ----------------------------------------------------------------------------- formatting
def format_value(value: Any, digits: int = 2) -> str:
    """One value for reading: ``16.24`` not ``16.237029``, ``94`` not ``94.0``, durations in days.

    Every kind of missing value (None, NaN, pd.NA, NaT) reads the same: blank.

    >>> format_value(16.237029), format_value(94.0), format_value(float("nan")), format_value(None)
    ('16.24', '94', '', '')
    >>> format_value("P323DT19H15M0S"), format_value("2023-03-01T12:30:00+00:00")
    ('323 days 19:15', '2023-03-01 12:30')
    """
    if value is None or value is pd.NaT or value is pd.NA:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        f = float(value)
        if math.isnan(f):
            return ""
        if f.is_integer() and abs(f) < 1e15:
            return str(int(f))
        return f"{f:,.{digits}f}" if abs(f) >= 1e4 else f"{f:.{digits}f}"
    if isinstance(value, str):
        m = _ISO_DURATION.match(value)
        if m:
            return format_value(pd.Timedelta(value))
        if re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d", value):
            return format_value(pd.Timestamp(value))
        return value
    if isinstance(value, pd.Timedelta):
        days, rest = value.days, value - pd.Timedelta(days=value.days)
        hm = f"{rest.components.hours:02d}:{rest.components.minutes:02d}"
        return f"{days} days {hm}" if days else hm
    if isinstance(value, pd.Timestamp):
        return value.strftime("%Y-%m-%d %H:%M")
    if isinstance(value, dict):
        return format_params(value)
    return str(value)


def formatted(df: pd.DataFrame) -> pd.DataFrame:
    """A copy of ``df`` with every cell formatted by :func:`format_value` (for text and HTML only)."""
    return df.apply(lambda col: col.map(format_value)) if len(df) else df.astype(str)


def _html_table(df: pd.DataFrame, index: bool = True) -> str:
    return formatted(df).to_html(index=index, escape=True, na_rep="")


def _text_table(df: pd.DataFrame, index: bool = True) -> str:
    return formatted(df).to_string(index=index) if len(df) else "(empty)"


def stats_table(stats: dict, keys: tuple = STAT_KEYS) -> str:
    """Headline stats as an aligned two-column text table, numbers rounded.

    >>> print(stats_table({"Return [%]": 16.237029, "# Trades": 94.0}))
    Return [%]  16.24
    # Trades       94
    """
    rows = [(k, format_value(stats[k])) for k in keys if k in stats]
    if not rows:
        return "(no stats)"
    w, v = max(len(k) for k, _ in rows), max(len(x) for _, x in rows)
    return "\n".join(f"{k:<{w}}  {x:>{v}}" for k, x in rows)


_EXC_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt|Warning)): ?(.*)$", re.M)
_STRATEGY_FRAME = re.compile(r'File "<strategy>", line (\d+)')


def explain_error(error: Any, code: str = "") -> str:
    """A failed run in a few lines: the root exception, the strategy's line, and what wrapped it.

    backtesting.py re-raises an indicator's exception as ``RuntimeError: Indicator "λ"
    error. See traceback above.``; the cause is in the traceback, which the sandbox keeps.
    """
    tb = getattr(error, "traceback", "") or ""
    kind = getattr(getattr(error, "kind", None), "value", getattr(error, "kind", ""))
    shown = f"{error.type}: {error.message}"
    found = _EXC_LINE.findall(tb)
    root = f"{found[0][0]}: {found[0][1]}" if found else shown
    lines = [f"[{kind}] {root}"]
    frames = _STRATEGY_FRAME.findall(tb)
    if frames:
        n = int(frames[0])
        src = code.splitlines()
        text = src[n - 1].strip() if 0 < n <= len(src) else ""
        lines.append(f"  at strategy line {n}: {text}" if text else f"  at strategy line {n}")
    if found and root != shown:
        lines.append(f"  (raised as {shown})")
    return "\n".join(lines)


class StrategyCode(str):
    """Strategy source: a plain ``str``, shown highlighted in a notebook."""

    def _repr_html_(self) -> str:
        from pygments import highlight
        from pygments.formatters import HtmlFormatter
        from pygments.lexers import PythonLexer

        fmt = HtmlFormatter(noclasses=True, style="friendly")
        return highlight(str(self), PythonLexer(), fmt)


# ----------------------------------------------------------------------------- one backtest
def stats_series(stats: dict, equity: pd.DataFrame | None, trades: pd.DataFrame, strategy: str) -> pd.Series:
    """A stats dict (as the sandbox returns it) as backtesting.py's Series, with ``_equity_curve``/``_trades``."""
    out: dict[str, Any] = {}
    for k, v in stats.items():
        if k == "_strategy":
            continue
        if k in _TIMES and isinstance(v, str):
            v = pd.Timestamp(v)
        elif k in _DURATIONS and isinstance(v, str):
            v = pd.Timedelta(v)
        out[k] = v
    out["_strategy"] = strategy_label(strategy, stats.get("_strategy"))
    out["_equity_curve"] = equity
    out["_trades"] = trades
    return pd.Series(out, dtype=object)


def strategy_label(strategy: str, params: dict | None) -> str:
    """``stats['_strategy']`` for reading: the class and every parameter it ran with.

    >>> strategy_label("SmaCross", {"n1": 10, "n2": 30})
    'SmaCross(n1=10,n2=30)'
    """
    return f"{strategy}({','.join(f'{k}={v}' for k, v in params.items())})" if params else strategy


def trades_frame(records: list[dict], unit: str = "ns") -> pd.DataFrame:
    """Trade records (as the sandbox returns them) as backtesting.py's ``_trades`` DataFrame.

    ``unit``: the time resolution of the bars' index (``_trades`` times use the same).
    """
    cols = ["Size", "EntryBar", "ExitBar", "EntryPrice", "ExitPrice", "SL", "TP", "PnL", "Commission",
            "ReturnPct", "EntryTime", "ExitTime", "Duration", "Tag"]
    df = pd.DataFrame.from_records(records) if records else pd.DataFrame(columns=cols)
    for c in ("EntryTime", "ExitTime"):
        if c in df:
            df[c] = pd.to_datetime(df[c], utc=True).astype(f"datetime64[{unit}, UTC]")
    if "Duration" in df:
        df["Duration"] = pd.to_timedelta(df["Duration"]).astype(f"timedelta64[{unit}]")
    for c in ("Size", "EntryBar", "ExitBar"):
        if c in df and len(df):
            df[c] = df[c].astype(float if (df[c] % 1 != 0).any() else int)
    for c in ("SL", "TP"):
        if c in df and df[c].notna().any():  # all unset stays None (object), as in backtesting.py's frame
            df[c] = pd.to_numeric(df[c], errors="coerce")
    return df


def _encode_floats(values: np.ndarray) -> str:
    """A float64 array as base64 of its little-endian bytes: exact, and compact in JSON."""
    return base64.b64encode(np.ascontiguousarray(values, dtype="<f8").tobytes()).decode()


def _decode_floats(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text, validate=True), dtype="<f8").astype(np.float64)


def equity_frame(equity: np.ndarray, index: pd.Index) -> pd.DataFrame:
    """backtesting.py's ``_equity_curve`` of a per-bar equity, computed as ``compute_stats`` does."""
    from ._bt_compat import drawdown_duration

    dd = 1 - equity / np.maximum.accumulate(equity)
    return pd.DataFrame({"Equity": equity, "DrawdownPct": dd,
                         "DrawdownDuration": drawdown_duration(pd.Series(dd, index=index)).to_numpy()}, index=index)


def equity_from_trades(close: np.ndarray, trades: pd.DataFrame, cash: float, commission: float) -> np.ndarray:
    """The bar-by-bar equity of a run, rebuilt exactly from its trades and the closes.

    backtesting.py's broker: equity = cash + open trades' ``size * (close - entry)``;
    entry commission leaves cash at entry, a trade's whole P/L (net of both
    commissions) lands at its exit bar.
    """
    eq = np.full(len(close), float(cash))
    if not len(trades):
        return eq
    realised = np.zeros(len(close) + 1)
    for size, entry_bar, exit_bar, entry_price, pnl in trades[["Size", "EntryBar", "ExitBar", "EntryPrice",
                                                              "PnL"]].itertuples(index=False):
        e, x = int(entry_bar), int(exit_bar)
        eq[e:x] += size * (close[e:x] - entry_price) - abs(size) * entry_price * commission
        realised[x] += pnl
    return eq + np.cumsum(realised)[:-1]


@dataclass
class BacktestRun:
    """One sandboxed backtest, shown like backtesting.py's: ``.stats``, ``.trades``, ``.equity``, ``.plot()``.

    A fresh run carries ``settled``: the trusted broker's
    :class:`~moondev_lab.broker.Settlement` of the strategy's order log, whose stats,
    trades and bar-by-bar equity are used as they are (full precision). A saved run
    keeps that equity exactly (``to_json``'s ``equity_full``); only a run saved before
    settlement existed has its curve rebuilt from its trades and the market data.

    >>> run = BacktestRun.from_result(pool.run(code, ref), fields, settings)    # doctest: +SKIP
    >>> run.stats["Return [%]"], run.equity["Equity"].iloc[-1]                    # doctest: +SKIP
    """

    stats_dict: dict
    trade_records: list
    equity_points: list
    data: dict  # symbol, timeframe, source, start, end (a DataRef's fields)
    settings: dict  # cash, commission, ...
    strategy: str = "Strategy"
    title: str = ""
    settled: Any = field(default=None, repr=False)  # the broker's Settlement, for a run made in this process
    full_equity: np.ndarray | None = field(default=None, repr=False)  # a saved run's exact per-bar equity
    # The strategy's own Strategy.I indicators, as it reported them (sandbox/_wire.decode_indicators): claims,
    # drawn in plot() only, never used for stats or ranking. Empty unless the run was made with indicators=True.
    indicators: list = field(default_factory=list, repr=False)
    indicators_error: str | None = None  # why a run's indicator payload was refused

    @classmethod
    def from_result(cls, result: Any, data: dict, settings: dict, title: str = "") -> "BacktestRun":
        refused = getattr(result, "indicators_error", None)
        return cls(result.stats, result.trades, result.equity, dict(data), dict(settings),
                   result.strategy or "Strategy", title, getattr(result, "settled", None),
                   indicators=list(getattr(result, "indicators", None) or []),
                   indicators_error=None if refused is None else str(refused))

    def to_json(self) -> dict:
        d = {"stats": self.stats_dict, "trades": self.trade_records, "equity": self.equity_points,
             "data": self.data, "settings": self.settings, "strategy": self.strategy, "title": self.title}
        exact = self.settled.equity["Equity"].to_numpy() if self.settled is not None else self.full_equity
        if exact is not None:
            d["equity_full"] = _encode_floats(exact)
        if self.indicators:
            d["indicators"] = [{**x, "values": [_encode_floats(row) for row in x["values"]]} for x in self.indicators]
        if self.indicators_error:
            d["indicators_error"] = self.indicators_error
        return d

    @classmethod
    def from_json(cls, d: dict) -> "BacktestRun":
        full = _decode_floats(d["equity_full"]) if d.get("equity_full") else None
        shown = [{**x, "values": np.array([_decode_floats(row) for row in x["values"]])}
                 for x in d.get("indicators") or []]
        return cls(d["stats"], d["trades"], d["equity"], d["data"], d["settings"], d.get("strategy", "Strategy"),
                   d.get("title", ""), full_equity=full, indicators=shown, indicators_error=d.get("indicators_error"))

    def __repr__(self) -> str:
        keys = ("Return [%]", "Sharpe Ratio", "Max. Drawdown [%]", "# Trades")
        shown = ", ".join(f"{k} {format_value(self.stats_dict.get(k))}" for k in keys)
        return f"<BacktestRun {self.strategy}: {shown}>"

    # -- data
    @cached_property
    def market_data(self) -> pd.DataFrame:
        """The OHLCV bars this run saw, from the pool (memory-mapped, no copy).

        From the store the run used when it is still there (the demo's, say), else from
        the current one (``$MOONDEV_LAB_HOME``).
        """
        from . import config
        from .data import DataPool, default_pool

        d = self.data
        root = d.get("root")
        own = root and Path(root).is_dir() and Path(root).resolve() != config.store_dir().resolve()
        pool = DataPool(root) if own else default_pool()
        return pool.get(d["symbol"], d["timeframe"], source=d.get("source"), start=d.get("start"), end=d.get("end"))

    @cached_property
    def trades(self) -> pd.DataFrame:
        if self.settled is not None:
            return self.settled.trades
        return trades_frame(self.trade_records, getattr(self.market_data.index.dtype, "unit", "ns"))

    @cached_property
    def equity(self) -> pd.DataFrame:
        """backtesting.py's ``_equity_curve``: ``Equity``, ``DrawdownPct``, ``DrawdownDuration`` per bar."""
        if self.settled is not None:
            return self.settled.equity
        data = self.market_data
        if self.full_equity is not None and len(self.full_equity) == len(data):
            return equity_frame(self.full_equity, data.index)
        return self._rebuilt_equity(data)

    def _rebuilt_equity(self, data: pd.DataFrame) -> pd.DataFrame:
        """A run saved before settlement: its curve from its trades, checked against the sandbox's points."""
        commission = self.settings.get("commission", 0.0)
        points = pd.DataFrame(self.equity_points)
        if isinstance(commission, (int, float)) and not isinstance(commission, bool):
            eq = equity_from_trades(data["Close"].to_numpy(), self.trades, self.settings.get("cash", 1_000_000),
                                    float(commission))
        else:  # a commission the rebuild cannot model: interpolate the sandbox's points instead
            eq = None
        curve = pd.Series(eq, index=data.index) if eq is not None else None
        if len(points):
            at = pd.DatetimeIndex(pd.to_datetime(points["time"], utc=True))
            sampled = pd.Series(points["equity"].to_numpy(), index=at)
            if curve is None or not np.allclose(curve.reindex(at).to_numpy(), sampled.to_numpy(), rtol=1e-9):
                # Not exact (an out-of-money stop, a fixed commission ...): the sandbox's points, interpolated.
                self.equity_exact = False
                both = sampled.reindex(sampled.index.union(data.index)).interpolate(method="time")
                curve = both.reindex(data.index).ffill().bfill()
        return equity_frame(curve.to_numpy(), data.index)

    equity_exact: bool = field(default=True, repr=False)

    @cached_property
    def stats(self) -> pd.Series:
        """backtesting.py's stats Series (``_equity_curve``, ``_trades``, ``_strategy`` as a label)."""
        if self.settled is None:
            return stats_series(self.stats_dict, self.equity, self.trades, self.strategy)
        stats = self.settled.stats.copy()  # the Settlement stays as the broker made it
        stats["_strategy"] = strategy_label(self.strategy, self.stats_dict.get("_strategy"))
        return stats

    def summary(self) -> pd.DataFrame:
        return pd.DataFrame({"value": [self.stats_dict.get(k) for k in STAT_KEYS]}, index=list(STAT_KEYS))

    def plot(self, title: str | None = None, **kwargs):
        """backtesting.py's interactive chart of this run (inline in a notebook, offline), with its indicators."""
        from .plotting import backtest_plot

        return backtest_plot(self.stats, self.market_data, title or self.title or self.strategy,
                             indicators=self.indicators, **kwargs)


# ----------------------------------------------------------------------------- one idea
@dataclass
class IdeaResult:
    """What happened to one idea: the tuned strategy, its in-sample and held-out runs, the grid.

    ``in_sample``/``out_of_sample`` are the headline stats dicts; ``stats``,
    ``trades``, ``equity`` and ``plot()`` are the held-out (out-of-sample) run's.
    """

    idea: str
    status: str  # ok | failed | skipped
    idea_id: int | None = None
    run_id: int | None = None
    error_kind: str | None = None
    error: str | None = None
    in_sample: dict = field(default_factory=dict)
    out_of_sample: dict = field(default_factory=dict)
    datasets: list = field(default_factory=list)
    params: dict = field(default_factory=dict)
    debug_iterations: int = 0
    optimize_iterations: int = 0
    saved: bool = False
    run_dir: str | None = None
    code: str | None = None
    findings: list = field(default_factory=list)
    symbol: str | None = None
    timeframe: str | None = None
    model: str | None = None
    experiment_id: int | None = None
    metric: str = "Return [%]"
    grid: list = field(default_factory=list)  # [(params, score or None), ...] in grid order
    overfitting: dict | None = None  # issue 15: trials, dsr, psr, pbo, min_track_record[, walk_forward]
    grid_engine: str | None = None  # the engine that ran the grid: "fast", "pool" or "backtesting"
    backtests: dict = field(default_factory=dict, repr=False)  # "in_sample"/"out_of_sample" -> BacktestRun
    sources: list = field(default_factory=list, repr=False)  # issue 12: where the idea came from (Ledger.idea_sources)

    def __post_init__(self) -> None:
        if self.code is not None and not isinstance(self.code, StrategyCode):
            self.code = StrategyCode(self.code)

    # -- tables
    def row(self, metric: str | None = None) -> dict:
        metric = metric or self.metric
        return {"run": self.run_id, "idea": self.idea[:50], "symbol": self.symbol, "timeframe": self.timeframe,
                "status": self.status, "params": format_params(self.params),
                **metric_columns(self.in_sample, self.out_of_sample, metric), **overfit_columns(self.overfitting),
                "debug": self.debug_iterations, "optimize": self.optimize_iterations,
                "error": f"{self.error_kind}: {self.error}" if self.error else "", "run_dir": self.run_dir}

    @property
    def summary(self) -> pd.DataFrame:
        """In-sample against out-of-sample, one row per headline stat (full precision)."""
        keys = [k for k in STAT_KEYS if k in self.in_sample or k in self.out_of_sample]
        return pd.DataFrame({"in-sample": [self.in_sample.get(k) for k in keys],
                             "out-of-sample": [self.out_of_sample.get(k) for k in keys]}, index=keys)

    @property
    def per_quarter(self) -> pd.DataFrame:
        """The tuned strategy on every calendar quarter of the data."""
        if not self.datasets:
            return pd.DataFrame()
        df = pd.DataFrame(self.datasets).set_index("dataset")
        if "# Trades" in df:
            df["# Trades"] = pd.to_numeric(df["# Trades"], errors="coerce").astype("Int64")
        return df

    # -- the held-out run
    def _run(self, segment: str = "out_of_sample") -> BacktestRun:
        run = self.backtests.get(segment)
        if run is None:
            raise ValueError(f"no {segment.replace('_', '-')} backtest for this idea ({self.status}"
                             f"{': ' + str(self.error) if self.error else ''})")
        return run

    @property
    def stats(self) -> pd.Series:
        return self._run().stats

    @property
    def trades(self) -> pd.DataFrame:
        return self._run().trades

    @property
    def equity(self) -> pd.DataFrame:
        return self._run().equity

    @property
    def in_sample_run(self) -> BacktestRun:
        return self._run("in_sample")

    @property
    def out_of_sample_run(self) -> BacktestRun:
        return self._run("out_of_sample")

    def plot(self, segment: str = "out_of_sample", **kwargs):
        """backtesting.py's chart of the held-out run (``segment="in_sample"`` for the tuning part).

        The held-out run's chart has the strategy's indicator panels (display only); the
        in-sample one has none: only the plotted run reports its indicators.
        """
        return self._run(segment).plot(**kwargs)

    def heatmap(self) -> pd.Series:
        """The grid's in-sample scores, indexed by parameters, as ``Backtest.optimize(return_heatmap=True)``."""
        if not self.grid:
            raise ValueError("this idea ran no parameter grid (grid=False, or no numeric parameters to tune)")
        names = list(self.grid[0][0])
        index = pd.MultiIndex.from_tuples([tuple(p[n] for n in names) for p, _ in self.grid], names=names)
        values = [np.nan if s is None else float(s) for _, s in self.grid]
        return pd.Series(values, index=index, name=self.metric)

    def overfitting_summary(self):
        """How far to trust this result (issue 15): trials, DSR, PSR, PBO, minimum track record, walk-forward,
        with the CSCV logit histogram and the walk-forward equity in a notebook."""
        from ._overfit import OverfittingSummary

        return OverfittingSummary(self.overfitting)

    def plot_heatmap(self, agg: str = "max"):
        from .plotting import heatmap_plot

        return heatmap_plot(self.heatmap(), f"grid {self.metric} (in-sample) - run {self.run_id}: {self.idea[:60]}",
                            agg=agg)

    # -- reprs
    def __repr__(self) -> str:
        head = (f"IdeaResult(run {self.run_id}, {self.status}: {self.idea[:60]!r} on {self.symbol} {self.timeframe}"
                f" with {self.model})")
        if self.error:
            head += f"\n  {self.error_kind}: {self.error}"
        if self.params:
            head += f"\n  tuned: {format_params(self.params)}"
        if self.in_sample or self.out_of_sample:
            head += "\n" + _text_table(self.summary)
        return head

    def _repr_html_(self) -> str:
        esc = html.escape
        parts = [f"<b>{esc(self.idea)}</b> &mdash; run {self.run_id}, <b>{esc(self.status)}</b>, "
                 f"{esc(str(self.symbol))} {esc(str(self.timeframe))}, model {esc(str(self.model))}"]
        if self.error:
            parts.append(f"<p><code>{esc(str(self.error_kind))}: {esc(self.error)}</code></p>")
        if self.params:
            parts.append(f"<p>tuned parameters: <code>{esc(format_params(self.params))}</code></p>")
        if self.in_sample or self.out_of_sample:
            parts.append(_html_table(self.summary))
        if self.overfitting:  # issue 15: the summary, the CSCV logit histogram, the walk-forward equity
            parts.append(overfitting_html(self.overfitting))
        if self.datasets:
            parts.append("<details><summary>per quarter</summary>" + _html_table(self.per_quarter) + "</details>")
        if self.code:
            parts.append("<details><summary>strategy code</summary>" + self.code._repr_html_() + "</details>")
        if self.run_dir:
            parts.append(f"<p>run folder: <code>{esc(self.run_dir)}</code></p>")
        return "".join(parts)

    def to_dict(self) -> dict:
        return {k: (str(v) if isinstance(v, StrategyCode) else v) for k, v in self.__dict__.items()
                if k != "backtests" and not k.startswith("_")}

    def to_json(self) -> dict:
        """Everything except the code and the full backtests, JSON-able."""
        return {k: v for k, v in self.to_dict().items() if k != "code"}


# ----------------------------------------------------------------------------- many ideas
@dataclass
class RBIReport:
    """Several ideas side by side: a ranked table, a stats comparison, an equity overlay."""

    results: list[IdeaResult]
    metric: str
    elapsed_s: float
    usage: dict
    min_trades: int = 10
    runs_dir: str | None = None
    ledger_path: str | None = None

    def table(self) -> pd.DataFrame:
        """One row per idea, best out-of-sample first; too few OOS trades ranked below (full precision)."""
        df = pd.DataFrame([r.row(self.metric) for r in self.results])
        return rank_by_oos(df, self.metric, self.min_trades) if len(df) else df

    def compare(self, keys: tuple = STAT_KEYS) -> pd.DataFrame:
        """Out-of-sample stats of every finished idea, side by side (one column per run)."""
        done = [r for r in self.results if r.out_of_sample]
        return pd.DataFrame({f"run {r.run_id}: {r.idea[:30]}": [r.out_of_sample.get(k) for k in keys]
                             for r in done}, index=list(keys))

    def plot(self):
        """The out-of-sample equity curves of every finished idea, overlaid."""
        from .plotting import equity_overlay

        curves = {f"run {r.run_id}: {r.idea[:40]}": r.equity["Equity"] for r in self.results
                  if "out_of_sample" in r.backtests}
        return equity_overlay(curves, f"out-of-sample equity, {len(curves)} ideas")

    def _head(self) -> str:
        ok = sum(r.status == "ok" for r in self.results)
        return f"RBIReport: {ok}/{len(self.results)} ideas ok in {self.elapsed_s:.1f}s; usage {self.usage}"

    _COLUMNS = ("run", "idea", "symbol", "timeframe", "status", "params", "IS {m}", "OOS {m}", "OOS trades",
                "trials", "dsr", "pbo", "wf eff", "flag", "error")

    def _shown(self) -> pd.DataFrame:
        t = self.table()
        return t[[c.format(m=self.metric) for c in self._COLUMNS if c.format(m=self.metric) in t]] if len(t) else t

    def __repr__(self) -> str:
        t = self._shown()
        return self._head() + ("\n" + _text_table(t, index=False) if len(t) else "")

    def _repr_html_(self) -> str:
        out = f"<b>RBIReport</b>: {html.escape(self._head()[11:])}" + _html_table(self._shown(), index=False)
        if any(r.out_of_sample for r in self.results):
            out += "<details><summary>out-of-sample stats side by side</summary>" + _html_table(self.compare())
            out += "</details>"
        assessed = [r for r in self.results if r.overfitting]
        for r in assessed[:self._OVERFITTING_SHOWN]:
            out += (f"<details><summary>overfitting of run {r.run_id}: {html.escape(r.idea[:60])}</summary>"
                    f"{overfitting_html(r.overfitting)}</details>")
        if len(assessed) > self._OVERFITTING_SHOWN:
            out += f"<p>({len(assessed) - self._OVERFITTING_SHOWN} more assessed ideas: see each result)</p>"
        return out

    _OVERFITTING_SHOWN = 20  # two pictures per idea: a batch-sized report would carry thousands

    def to_json(self) -> dict:
        return {"metric": self.metric, "elapsed_s": self.elapsed_s, "usage": self.usage,
                "runs_dir": self.runs_dir, "ledger": self.ledger_path,
                "results": [r.to_json() for r in self.results], "overfitting": batch_overfitting(self.results)}


# ----------------------------------------------------------------------------- past runs
RESULT_FILE = "result.json"


def load_run(run_id: int, ledger: Any = None) -> IdeaResult:
    """A past run from the ledger and its run folder, as the same :class:`IdeaResult`.

    >>> r = load_run(3)                               # doctest: +SKIP
    >>> r.stats["Return [%]"], r.plot()               # doctest: +SKIP
    """
    from .ledger import Ledger, LedgerError

    if isinstance(run_id, bool) or not isinstance(run_id, (int, np.integer, str)) or not str(run_id).isdigit():
        raise LedgerError(f"a run id is a whole number, as `moondev-lab runs ls` lists them, not {run_id!r}")
    led = ledger if ledger is not None else Ledger()
    row = led.run(int(run_id))
    res = IdeaResult(row["idea"], row["status"], idea_id=row["idea_id"], run_id=row["id"],
                     error_kind=row["error_kind"], error=row["error_message"], in_sample=row["in_sample"] or {},
                     out_of_sample=row["out_of_sample"] or {}, datasets=row["datasets"] or [],
                     params=row["params"] or {}, saved=bool(row["saved"]), run_dir=row["run_dir"],
                     symbol=row["symbol"], timeframe=row["timeframe"], model=row["model"],
                     experiment_id=row["experiment_id"])
    res.overfitting = led.overfitting(res.run_id)  # issue 15
    res.sources = led.idea_sources(res.idea_id)  # issue 12: the URL or file the idea was read from, if any
    folder = Path(row["run_dir"]) if row["run_dir"] else None
    if folder is not None and (folder / "strategy.py").exists():
        res.code = StrategyCode((folder / "strategy.py").read_text())
    if folder is not None and (folder / RESULT_FILE).exists():
        try:
            saved = json.loads((folder / RESULT_FILE).read_text())
        except ValueError as e:  # a damaged or hand-edited file: name it, not only the JSON position
            raise LedgerError(f"{folder / RESULT_FILE}: unreadable ({e})") from None
        res.metric = saved.get("metric", res.metric)
        res.grid = [(p, s) for p, s in saved.get("grid", [])]
        res.grid_engine = saved.get("grid_engine")
        res.findings = saved.get("findings", [])
        res.backtests = {k: BacktestRun.from_json(v) for k, v in saved.get("backtests", {}).items()}
    return res


# ----------------------------------------------------------------------------- notebooks as batch units
#: The MIME type under which a notebook records an idea's result, for a batch to read back.
RESULT_MIME = "application/vnd.moondev.rbi-result+json"


def publish_result(result: IdeaResult, ledger_path: str | None = None) -> None:
    """Record ``result`` in the running notebook's outputs as machine-readable JSON (and a short text).

    >>> publish_result(report.results[0])            # the last cell of rbi_template.ipynb  # doctest: +SKIP
    """
    from IPython.display import publish_display_data

    payload = {**result.to_json(), "ledger": ledger_path}
    text = (f"run {result.run_id} ({result.status}): OOS {result.metric} "
            f"{format_value(result.out_of_sample.get(result.metric))}, {format_value(result.out_of_sample.get('# Trades'))} "
            f"OOS trades; run folder {result.run_dir}")
    publish_display_data({RESULT_MIME: json.loads(json.dumps(payload, default=str)), "text/plain": text})


def read_results(notebook: str | Path) -> list[dict]:
    """Every result a notebook recorded with :func:`publish_result` (an executed notebook's file).

    >>> read_results("out/rbi_template.out.ipynb")[0]["run_id"]          # doctest: +SKIP
    """
    import nbformat

    nb = nbformat.read(str(notebook), as_version=4)
    return [o["data"][RESULT_MIME] for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if RESULT_MIME in o.get("data", {})]
