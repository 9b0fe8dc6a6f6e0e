"""Parity: the backtest's trades against a replay of the same candles through the live runner.

:func:`check_parity` runs the strategy's backtest (recorded in the sandbox, settled by the
trusted broker) and replays the same candles bar by bar through
:class:`~moondev_lab.live.LiveRunner` on a :class:`~moondev_lab.paper.PaperExchange`, then
compares the trades one by one: entry and exit bar, prices, size, PnL and commission.
Each difference is tagged with its cause:

- ``indicator look-ahead``: an indicator's value at bar t changes when later bars are
  added (the live value, computed from bars <= t, differs from the backtest's, and so does
  the value recomputed from the whole prefix ``[0, t]``): a bug in the strategy;
- ``warm-up length``: the live warm-up (first bar with every indicator) differs, or an
  indicator's trailing window was too short for its memory (the prefix value agrees);
- ``unit rounding at fill time``: the same entry, one unit apart (sizes decided in units
  at the decision bar's close, as a live exchange needs, against units at the fill);
- ``dropped for lack of cash``: the paper exchange cancelled the order for want of margin;
- ``order type the live path cannot express``: the route refused the decision.

>>> report = check_parity(load_strategy("runs/run-00001"), df)   # doctest: +SKIP
>>> report.ok, report.first_difference                           # doctest: +SKIP
(True, None)
"""
from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .broker import settle
from .live import LiveRunner, StrategySource
from .paper import PaperExchange
from .sandbox._session import StrategySession, bars_of
from .sandbox.settings import BacktestSettings

__all__ = ["ParityReport", "check_parity", "COMPARED"]

#: The trade columns compared, and their tolerance (relative; bars and sizes must be equal).
COMPARED = {"EntryBar": 0.0, "ExitBar": 0.0, "Size": 0.0, "EntryPrice": 1e-9, "ExitPrice": 1e-9,
            "PnL": 1e-6, "Commission": 1e-6}
LOOK_AHEAD = "indicator look-ahead"
WARMUP = "warm-up length"
ROUNDING = "unit rounding at fill time"
NO_CASH = "dropped for lack of cash"
CANNOT_EXPRESS = "order type the live path cannot express"


@dataclass
class ParityReport:
    """Trade-by-trade comparison. ``table`` has ``bt_*`` and ``live_*`` columns and ``match``."""

    table: pd.DataFrame
    first_difference: int | None
    causes: list[dict] = field(default_factory=list)
    indicator_findings: list[dict] = field(default_factory=list)
    backtest_start: int | None = None
    live_start: int | None = None
    timings: dict = field(default_factory=dict)
    bars: int = 0

    @property
    def ok(self) -> bool:
        return self.first_difference is None and not any(f["cause"] == LOOK_AHEAD for f in self.indicator_findings)

    @property
    def n_backtest(self) -> int:
        return int(self.table["bt_EntryBar"].notna().sum()) if len(self.table) else 0

    @property
    def n_live(self) -> int:
        return int(self.table["live_EntryBar"].notna().sum()) if len(self.table) else 0

    def summary(self) -> str:
        head = (f"parity {'OK' if self.ok else 'MISMATCH'}: {self.n_backtest} backtest trades, {self.n_live} live "
                f"trades over {self.bars:,} bars")
        lines = [head]
        if self.first_difference is not None:
            lines.append(f"first difference at trade #{self.first_difference}")
        for c in self.causes + [f for f in self.indicator_findings if f not in self.causes]:
            lines.append(f"  - {c['cause']}: {c['detail']}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"ok": self.ok, "first_difference": self.first_difference, "causes": self.causes,
                "indicators": self.indicator_findings, "backtest_trades": self.n_backtest,
                "live_trades": self.n_live, "bars": self.bars, "backtest_start": self.backtest_start,
                "live_start": self.live_start, "timings": self.timings,
                "table": self.table.head(2000).replace({np.nan: None}).to_dict("records")}

    def __repr__(self) -> str:
        return self.summary()

    def _repr_html_(self) -> str:
        """The table with the first difference highlighted (notebooks)."""
        k = self.first_difference
        window = self.table.iloc[max(0, (k or 0) - 5):(k or 0) + 6] if k is not None else self.table.head(10)

        def mark(row):
            return ["background: #fdd" if row.name == k else "" for _ in row]

        return (f"<pre>{self.summary()}</pre>" + window.style.apply(mark, axis=1).format(precision=4).to_html())


def _trade_frame(trades: pd.DataFrame) -> pd.DataFrame:
    cols = list(COMPARED)
    out = trades.reindex(columns=cols).astype(float).reset_index(drop=True)
    return out


def compare_trades(bt: pd.DataFrame, live: pd.DataFrame) -> tuple[pd.DataFrame, int | None]:
    """Side by side (``bt_*``, ``live_*``, ``match``) and the index of the first difference."""
    a, b = _trade_frame(bt), _trade_frame(live)
    n = max(len(a), len(b))
    a, b = a.reindex(range(n)), b.reindex(range(n))
    match = np.ones(n, bool)
    for col, rtol in COMPARED.items():
        x, y = a[col].to_numpy(), b[col].to_numpy()
        same = np.isclose(x, y, rtol=rtol, atol=1e-9 if rtol else 0.0) | (np.isnan(x) & np.isnan(y))
        match &= same
    table = pd.concat([a.add_prefix("bt_"), b.add_prefix("live_")], axis=1)
    table["match"] = match
    bad = np.flatnonzero(~match)
    return table, (int(bad[0]) if len(bad) else None)


def check_parity(source: StrategySource, data: pd.DataFrame, settings: BacktestSettings | None = None, *,
                 window: int = 1000, symbol: str = "BTC/USD", state_dir: Path | str | None = None,
                 timeout: float = 600.0, live_sizing: bool = False) -> ParityReport:
    """Backtest ``source`` on ``data`` and replay ``data`` through the live runner; compare (see module doc).

    ``live_sizing``: size the replay's orders as a live exchange must (fractions of equity
    become units at the decision bar's close), to see what that costs against the backtest.
    """
    settings = settings or BacktestSettings()
    times, ohlcv = bars_of(data)
    timings = {}
    t0 = time.perf_counter()
    with StrategySession(source.code, params=source.params, settings=settings, window=window,
                         timeout=timeout) as session:
        log, full = session.backtest(times, ohlcv)
        timings["backtest_s"] = time.perf_counter() - t0
        backtest = settle(log, data, settings)
        t1 = time.perf_counter()
        tmp = tempfile.TemporaryDirectory(prefix="moondev_parity_") if state_dir is None else None
        paper = PaperExchange(None, symbol=symbol, settings=settings).start()
        runner = LiveRunner(source, paper, symbol=symbol, state_dir=state_dir or tmp.name, settings=settings,
                            window=window, warmup_bars=0, timeout=timeout, size_at_send=live_sizing)
        try:
            runner.replay(data)
            timings["replay_s"] = time.perf_counter() - t1
            causal = runner.session.indicators()
            live_start = runner.session_start()
            refused = runner.events.frame("refused")
            orders = paper.orders_frame()
            stop_reason = runner.stop_reason
        finally:
            runner.close()
            if tmp is not None:
                tmp.cleanup()
        table, first = compare_trades(backtest.trades, paper.trades())
        findings = _indicator_findings(session, times, ohlcv, full, causal)
    report = ParityReport(table, first, [], findings, int(log.start), live_start, timings, len(data))
    if first is not None or stop_reason:
        report.causes = _causes(report, table, first, findings, refused, orders, stop_reason)
    return report


def _indicator_findings(session: StrategySession, times, ohlcv, full: list, causal: list) -> list[dict]:
    """Per indicator, the first bar where the live value differs from the backtest's, and why."""
    out = []
    for j, ((name, f), (_, c)) in enumerate(zip(full, causal)):
        f, c = np.atleast_2d(f), np.atleast_2d(c)
        if f.shape != c.shape:
            out.append({"cause": WARMUP, "indicator": name, "bar": 0,
                        "detail": f"{name}: the live indicator has shape {c.shape}, the backtest's {f.shape}"})
            continue
        same = np.isclose(f, c, rtol=1e-7, atol=1e-12) | (np.isnan(f) & np.isnan(c))
        bad = np.flatnonzero(~same.all(axis=0))
        if not len(bad):
            continue
        t = int(bad[0])
        prefix = np.atleast_1d(session.probe(times[:t + 1], ohlcv[:t + 1], j))
        whole = f[:, t]
        if np.allclose(prefix, whole, rtol=1e-7, atol=1e-12, equal_nan=True):
            cause = WARMUP
            detail = (f"{name} at bar {t}: the live value {_fmt(c[:, t])} differs from the backtest's {_fmt(whole)}, "
                      "but the value from the whole history agrees: the trailing window is too short for this "
                      "indicator's memory (raise --window)")
        else:
            cause = LOOK_AHEAD
            detail = (f"{name} at bar {t}: {_fmt(prefix)} computed from bars 0..{t}, but {_fmt(whole)} once later "
                      f"bars are added: the indicator looks ahead ({len(bad)} bars differ); the backtest used "
                      "future data")
        out.append({"cause": cause, "indicator": name, "bar": t, "bars_differing": int(len(bad)), "detail": detail})
    return out


def _causes(report: ParityReport, table: pd.DataFrame, first: int | None, findings: list, refused: pd.DataFrame,
            orders: pd.DataFrame, stop_reason: str | None) -> list[dict]:
    causes = []
    row = table.iloc[first] if first is not None else None
    bar = None
    if row is not None:
        bars = [row[c] for c in ("bt_EntryBar", "live_EntryBar") if not math.isnan(row[c])]
        bar = int(min(bars)) if bars else None
    ahead = [f for f in findings if f["cause"] == LOOK_AHEAD and (bar is None or f["bar"] <= bar + 1)]
    causes += ahead
    if report.backtest_start != report.live_start:
        causes.append({"cause": WARMUP, "detail": f"the backtest starts trading at bar {report.backtest_start}, "
                                                  f"the live runner at bar {report.live_start}"})
    causes += [f for f in findings if f["cause"] == WARMUP and (bar is None or f["bar"] <= bar + 1)]
    if row is not None and row["bt_EntryBar"] == row["live_EntryBar"] and \
            abs(row["bt_Size"] - row["live_Size"]) <= 1 and row["bt_Size"] != row["live_Size"]:
        causes.append({"cause": ROUNDING, "detail": f"trade #{first}: {row['bt_Size']:g} units in the backtest, "
                                                    f"{row['live_Size']:g} live"})
    if not orders.empty and "reason" in orders:
        dropped = orders[orders["reason"].fillna("").str.contains("cash")]
        if len(dropped):
            causes.append({"cause": NO_CASH, "detail": f"{len(dropped)} order(s) cancelled by the paper exchange "
                                                       f"for lack of cash, first {dropped.iloc[0]['client_order_id']}"})
    if not refused.empty and "cause" in refused and (refused["cause"] == "order type").any():
        causes.append({"cause": CANNOT_EXPRESS, "detail": str(refused[refused["cause"] == "order type"]
                                                               .iloc[0]["reason"])})
    if stop_reason and not any(c["cause"] == CANNOT_EXPRESS for c in causes):
        causes.append({"cause": "live runner stopped", "detail": stop_reason})
    if not causes and first is not None:
        causes.append({"cause": "unexplained", "detail": f"trade #{first} differs and no known cause applies"})
    return causes


def _fmt(v) -> str:
    v = np.atleast_1d(v)
    return ", ".join("nan" if math.isnan(x) else f"{x:.6g}" for x in v)


def format_table(report: ParityReport, context: int = 5, color: bool = False) -> str:
    """The trades around the first difference (or the first ones), the differing row marked ``>>``."""
    table = report.table
    k = report.first_difference
    lo = max(0, (k or 0) - context)
    part = table.iloc[lo:(k or 0) + context + 1] if k is not None else table.head(2 * context)
    cols = ["EntryBar", "ExitBar", "Size", "EntryPrice", "ExitPrice", "PnL", "Commission"]
    lines = ["   #  " + "  ".join(f"{c:>22}" for c in cols)]
    for i, r in part.iterrows():
        cells = []
        for c in cols:
            a, b = r[f"bt_{c}"], r[f"live_{c}"]
            cell = f"{_num(a)}" if (a == b or (math.isnan(a) and math.isnan(b))) else f"{_num(a)}|{_num(b)}"
            cells.append(f"{cell:>22}")
        mark = ">>" if i == k else "  "
        line = f"{mark}{i:>4}  " + "  ".join(cells)
        if color and i == k:
            line = f"\x1b[1;31m{line}\x1b[0m"
        lines.append(line)
    lines.append("(a|b: backtest|live)")
    return "\n".join(lines)


def _num(x) -> str:
    if isinstance(x, float) and math.isnan(x):
        return "-"
    return f"{x:.10g}"
