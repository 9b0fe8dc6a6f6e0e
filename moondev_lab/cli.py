"""The ``moondev-lab`` command line: a thin layer over the library.

    moondev-lab data import data/BTC-USD-15m.csv --symbol BTC/USD --timeframe 15m
    moondev-lab data import user_data/data/binance          # a freqtrade data directory
    moondev-lab data export BTC/USD 15m --format feather [--freqtrade DIR]
    moondev-lab data fetch --exchange binance --symbol BTC/USDT --timeframe 1h --since 2024-01-01
    moondev-lab data ls [--json]
    moondev-lab data info BTC/USD 15m [--json]
    moondev-lab demo

Every command takes ``--json`` for machine-readable output.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any, Callable

Handler = Callable[[argparse.Namespace], int]


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str, allow_nan=True))


def _table(rows: list[dict], columns: list[str]) -> str:
    if not rows:
        return "(empty)"
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    line = "  ".join(c.ljust(widths[c]) for c in columns)
    body = ["  ".join(str(r.get(c, "")).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join([line, "  ".join("-" * widths[c] for c in columns), *body])


# ----- data ---------------------------------------------------------------------------
def _write_json(res) -> dict:
    return {"mode": res.mode, "rows_added": res.rows_added, "rows_skipped": res.rows_skipped,
            "conflict_count": res.conflict_count, "conflicts": res.conflicts, "series": res.manifest.summary(),
            "report": {"format": res.report.format, "timeframe": res.report.timeframe,
                       "summary": res.report.summary(), "issues": [str(i) for i in res.report.issues[:1000]],
                       "issue_count": len(res.report.issues), "gaps": len(res.report.gaps),
                       "notes": res.report.notes}}


def cmd_data_import(a: argparse.Namespace) -> int:
    from .data.imports import ImportReport, conflict_message, import_path

    res = import_path(a.path, symbol=a.symbol, timeframe=a.timeframe, source=a.source, format=a.format,
                      mode="repair" if a.repair else "strict")
    if isinstance(res, ImportReport):  # a freqtrade data directory
        if a.json:
            _print_json(res.table())
        else:
            print(_table(res.table(), ["file", "format", "symbol", "timeframe", "rows", "mode", "status", "message"]))
        return 0 if res.ok else 1
    if a.json:
        _print_json(_write_json(res))
    else:
        print(res)
        print(res.report)
    if not res.ok:  # the losing side of a race, or a file that disagrees with the store
        print(f"error: {conflict_message(res)}", file=sys.stderr)
        return 2
    return 0


def cmd_data_export(a: argparse.Namespace) -> int:
    from .data.export import export_series

    path = export_series(a.symbol, a.timeframe, a.format, out=a.out, freqtrade_dir=a.freqtrade, source=a.source)
    if a.json:
        _print_json({"path": str(path), "format": a.format})
    else:
        print(f"wrote {path}")
    return 0


def cmd_data_fetch(a: argparse.Namespace) -> int:
    from .data import Store
    from .data.fetch import fetch_ohlcv, make_exchange

    ex = make_exchange(a.exchange, api_url=a.api_url)
    res = fetch_ohlcv(ex, a.symbol, a.timeframe, since=a.since, until=a.until, store=Store(),
                      limit=a.limit, max_retries=a.retries, progress=not a.json)
    if a.json:
        _print_json(res.__dict__)
    else:
        print(res)
    return 0


def cmd_data_ls(a: argparse.Namespace) -> int:
    from .data import Store

    rows = [m.summary() for m in Store().list()]
    if a.json:
        _print_json(rows)
    else:
        print(_table(rows, ["symbol", "timeframe", "source", "rows", "first", "last", "size_mb"]))
    return 0


def cmd_data_info(a: argparse.Namespace) -> int:
    from .data import Store

    store = Store()
    m = store.verify(a.symbol, a.timeframe, a.source) if a.verify else store.find(a.symbol, a.timeframe, a.source)
    info = {**m.summary(), "file": str(store.series_dir(m.source, m.symbol, m.timeframe) / m.file),
            "capacity": m.capacity, "generation": m.generation, "updated": m.updated,
            "verified": bool(a.verify)}
    if a.json:
        _print_json(info)
    else:
        print("\n".join(f"{k:>10}: {v}" for k, v in info.items()))
    return 0


# ----- rbi / backtest / doctor ------------------------------------------------------
DEMO_IDEAS = [
    "Buy when RSI(14) < 30, sell when RSI > 70, 2% stop",
    "20/50 SMA crossover, long only, 3% take profit",
    "Bollinger band (20, 2) mean reversion: buy at the lower band, exit at the middle band",
    "MACD signal line cross with a 1.5 ATR stop",
    "20-bar Donchian breakout when volume is above 1.5x its 20-bar average",
]


def read_ideas(path: str) -> list[str]:
    """Ideas from a text file (one per line) or a CSV with an ``idea`` column."""
    from ._batch_ideas import read_ideas as read

    return read(path)


def _rbi_report(report, as_json: bool, board=None) -> None:
    from .results import formatted

    if as_json:
        _print_json(report.to_json())
        return
    print(report)
    print(f"\nresults: run folders under {report.runs_dir}\n         ledger {report.ledger_path}")
    for r in report.results:
        if r.run_dir:
            print(f"  run {r.run_id}: {r.run_dir}")
    if board is not None and len(board):
        print(f"\nleaderboard (out-of-sample, held-out last 30% of the data; fewer than {report.min_trades} "
              "OOS trades ranked below; 'probably overfit' (DSR < 0.95 or PBO > 0.5) ranked below the rest):")
        print(formatted(board).to_string(index=False))


def _rbi_config(a: argparse.Namespace):
    from .rbi import RBIConfig

    given = {k: getattr(a, k, None) for k in ("symbol", "timeframe", "source", "max_debug", "max_optimize",
                                             "grid_engine", "force", "min_trades", "walk_forward", "start", "end",
                                             "plot", "confirm")}
    return RBIConfig(**{k: v for k, v in given.items() if v is not None})  # unset: RBIConfig's own default


def cmd_rbi(a: argparse.Namespace) -> int:
    from .ledger import Ledger
    from .rbi import run_rbi

    from .sources import EmptyIdea

    if a.idea is not None and not a.idea.strip():
        raise EmptyIdea("the idea is empty: give an idea in words, --ideas FILE or --from SOURCE")
    ideas = ([a.idea] if a.idea else []) + (read_ideas(a.ideas) if a.ideas else [])
    if not ideas and not a.sources:
        raise ValueError("give an idea in quotes, --ideas FILE, or --from SOURCE")
    if a.walk_forward is not None and a.walk_forward < 1:  # issue 15
        raise ValueError(f"--walk-forward needs a number of folds >= 1, got {a.walk_forward}")
    ledger = Ledger()
    cfg = _rbi_config(a)
    report = run_rbi(ideas, model=a.model, cfg=cfg, ledger=ledger, parallel=a.parallel,
                     progress=not a.json, sources=a.sources)  # --from: read first, kept in the ledger
    _rbi_report(report, a.json, ledger.leaderboard(limit=10, min_trades=cfg.min_trades))
    return 0 if any(r.status in ("ok", "skipped") for r in report.results) else 1


def cmd_demo(a: argparse.Namespace) -> int:
    import os

    from . import config
    from .data import ensure_sample
    from .ledger import Ledger
    from .rbi import run_rbi

    # The demo keeps its whole state (store, ledger, run folders) under its own home, so it never
    # mixes with your runs; each demo adds new runs (forced), it never overwrites earlier ones.
    demo_home = config.demo_home()
    os.environ["MOONDEV_LAB_HOME"] = str(demo_home)
    m = ensure_sample()
    if not a.json:
        print(f"demo home: {demo_home} (store, ledger.sqlite and runs/ of the demo)")
        print(f"series: {m.symbol} {m.timeframe}, {m.rows} candles {m.first} .. {m.last}")
        print(f"running the RBI loop offline on {len(DEMO_IDEAS)} example ideas ...")
    ledger = Ledger(config.ledger_path())
    cfg = _rbi_config(a)
    cfg.force = True
    report = run_rbi(DEMO_IDEAS, model="offline", cfg=cfg, ledger=ledger, progress=not a.json)
    board = ledger.leaderboard(limit=10, min_trades=cfg.min_trades)
    _rbi_report(report, a.json, board)
    if not a.json and len(board):
        _demo_implement(int(board["run"].iloc[0]), ledger)
    if not a.json:
        print(f"\nnext: look at a run with  .venv/bin/moondev-lab runs show {report.results[0].run_id} "
              f"--ledger {ledger.path}")
        print("      (or `source .venv/bin/activate` once, then plain `moondev-lab ...`; "
              "notebooks/00_quickstart.ipynb walks the same loop)")
    return 0 if any(r.status == "ok" for r in report.results) else 1


def _demo_implement(run_id: int, ledger) -> None:
    """The "I" of the demo: the leader replayed bar by bar on the paper exchange, diffed with its backtest."""
    from .data.pool import default_pool
    from .live import load_strategy
    from .parity import check_parity
    from .results import load_run

    run = load_run(run_id, ledger)
    if not run.run_dir:
        return
    source = load_strategy(run.run_dir)
    print(f"\nimplement: run {run_id} replayed on the paper exchange through the live runner "
          f"({source.dataset.get('symbol', 'BTC/USD')} {source.dataset.get('timeframe', '15m')}) ...")
    frame = default_pool().get(source.dataset.get("symbol", "BTC/USD"), source.dataset.get("timeframe", "15m"))
    print(check_parity(source, frame).summary())
    print(f"      (the trade table: .venv/bin/moondev-lab parity {run.run_dir}; "
          f"paper trading: .venv/bin/moondev-lab trade {run.run_dir})")


def cmd_backtest(a: argparse.Namespace) -> int:
    """``backtest PATH``: one file, with its stats table and plot; several files, directories or globs: a table."""
    from pathlib import Path

    if len(a.paths) == 1 and Path(a.paths[0]).is_file() and not (a.csv or a.out):
        return _backtest_one(a, a.paths[0])
    return _backtest_many(a)


def _backtest_overrides(a: argparse.Namespace) -> dict:
    return {"cash": a.cash, "commission": a.commission}  # None: the script's own value, else the default


def _backtest_one(a: argparse.Namespace, path: str) -> int:
    from pathlib import Path

    from .backtest_files import resolve_settings, run_one
    from .codeextract import extract_code
    from .results import BacktestRun, explain_error, format_value, stats_table
    from .sandbox import DataRef, default_pool

    text = Path(path).read_text(encoding="utf-8", errors="replace")
    try:
        code = extract_code(text)
    except Exception:  # noqa: BLE001 - the sandbox reports why the code cannot run
        code = ""
    settings, source = resolve_settings(code or text, _backtest_overrides(a))
    ref = DataRef(a.symbol, a.timeframe, source=a.source, start=a.start, end=a.end)
    row = run_one(Path(path), default_pool(), ref, _backtest_overrides(a), timeout=a.timeout,
                  indicators=True)  # as in bulk:
    res = row.result  # the script's own bt.optimize(...) is spread over the pool
    plot_path = None
    if res.ok:
        title = f"{res.strategy} - {Path(path).name} ({a.symbol} {a.timeframe})"
        run = BacktestRun.from_result(res, ref.resolved(), settings.kwargs(), title)
        plot_path = Path(a.plot) if a.plot else _backtest_dir(Path(path).stem) / "plot.html"
        plot_path.parent.mkdir(parents=True, exist_ok=True)
        run.plot().save(plot_path)
    if a.json:
        _print_json({**res.to_dict(), "settings": settings.kwargs(), "settings_source": source, "plot_html": None,
                     "plot_path": str(plot_path) if plot_path else None, "optimize": row.optimize,
                     "best_params": row.best_params})
        return 0 if res.ok else 1
    if not res.ok:
        print(f"backtest failed: {explain_error(res.error, code)}")
        return 1
    print(f"{res.strategy} on {a.symbol} {a.timeframe}: {format_value(res.stats.get('Start'))} .. "
          f"{format_value(res.stats.get('End'))}")
    own = [k for k, src in source.items() if src == "script"]
    print(f"cash {settings.cash:,.0f}, commission {settings.commission:.2%} of each trade's value, per side"
          + (f", margin {settings.margin:g}" if settings.margin != 1 else "")
          + (f" ({', '.join(own)} from the script's own Backtest(...))" if own else ""))
    if row.optimize:
        print(f"optimize: {row.optimize}")
    print(stats_table(res.stats))
    print(f"plot: {plot_path}")
    if res.indicators_error:
        print(f"note: {res.indicators_error.message}")
    return 0


def _backtest_many(a: argparse.Namespace) -> int:
    import csv

    from .backtest_files import COLUMNS, backtest_files
    from .sandbox import DataRef

    if a.plot:
        raise ValueError("--plot is for one file; with several, each row links no plot (run that file alone)")
    ref = DataRef(a.symbol, a.timeframe, source=a.source, start=a.start, end=a.end)
    report = backtest_files(a.paths, ref, overrides=_backtest_overrides(a), timeout=a.timeout,
                            progress=not (a.json or a.csv))
    written = report.write(a.out or _backtest_dir("backtests"))
    if a.json:
        _print_json(report.to_json())
    elif a.csv:
        writer = csv.DictWriter(sys.stdout, COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(report.rows())
    else:
        print(report.text())
        print(f"wrote {written['csv']} and {written['html']}")
    if report.interrupted:
        print(f"interrupted: kept the {sum(r.status != 'interrupted' for r in report.results)} finished files "
              f"in {written['csv']}", file=sys.stderr)
        return 130
    return 0 if report.ok else 1


def _backtest_dir(stem: str):
    import time

    from . import config

    return config.home() / "backtests" / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def _batch_notebook_params(a: argparse.Namespace) -> int:
    """``batch NOTEBOOK --params runs.json``: one notebook over parameter sets."""
    from pathlib import Path

    from .batch import run_notebooks

    p = Path(a.params)
    a.notebook = a.ideas
    if p.suffix.lower() == ".csv":
        import pandas as pd

        params = pd.read_csv(p, dtype=str).to_dict("records")
    else:
        try:
            params = json.loads(p.read_text())
        except ValueError as e:  # name the file: a bare JSON position says nothing on the command line
            raise ValueError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(params, list) or not all(isinstance(x, dict) for x in params):
        raise ValueError(f"{p}: expected a JSON list of parameter objects, or a CSV with one run per row")
    client = cluster = None
    if a.dask_workers:
        from distributed import Client, LocalCluster

        cluster = LocalCluster(n_workers=a.dask_workers, threads_per_worker=a.parallel, dashboard_address=None)
        client = Client(cluster)
    try:
        report = run_notebooks(a.notebook, params, a.out, client=client, parallel=a.parallel, progress=not a.json)
    finally:
        if client is not None:
            client.close()
            cluster.close()
    if a.json:
        _print_json(report.table().to_dict("records"))
    else:
        print(report)
        outputs = report.table().get("output")
        if outputs is not None and len(outputs):
            from pathlib import Path

            print(f"executed notebooks in {Path(outputs.iloc[0]).parent}")
    return 0 if report.ok else 1


def _param_value(text: str):
    try:
        return json.loads(text)  # numbers, true/false, lists; anything else stays a string
    except ValueError:
        return text


def cmd_batch(a: argparse.Namespace) -> int:
    """``batch IDEAS``: ideas through the RBI loop on Dask (``--params``: the notebook-over-parameters batch)."""
    import dataclasses

    from .batch import run_batch

    if a.params:
        if not a.ideas:
            raise ValueError("batch --params needs the notebook to run")
        return _batch_notebook_params(a)
    if not a.ideas and not a.resume:
        raise ValueError("give an ideas file (one per line, or a CSV with an 'idea' column), or --resume DIR")
    cfg = _rbi_config(a)
    given = {"start": a.start, "end": a.end, "grid": a.grid, "quarters": a.quarters}
    cfg = dataclasses.replace(cfg, **{k: v for k, v in given.items() if v is not None})
    if not a.verbose:
        import distributed  # noqa: F401  (it sets its loggers up on import; quieten them after)

        logging.getLogger("distributed").setLevel(logging.ERROR)  # the scheduler's INFO chatter
    board = run_batch(None if a.resume else a.ideas, workers=a.workers, scheduler=a.scheduler, out=a.out,
                      resume=a.resume, notebook=a.notebook, model=a.model, cfg=cfg,
                      parameters={k: _param_value(v) for k, v in (a.parameter or [])},
                      memory_limit_mb=a.memory_limit, limit=a.limit, sample=a.sample, seed=a.seed,
                      progress=not a.json)
    totals = board.summary
    if a.json:
        _print_json({"out": totals["out"], "totals": totals,
                     "rows": json.loads(board.to_json(orient="records"))})
    else:
        print(board)
        print(f"output: {totals['out']}")
    if totals["state"] == "interrupted":
        print(f"interrupted; carry on with: moondev-lab batch --resume {totals['out']}", file=sys.stderr)
        return 130
    return 0 if totals["ok"] or not totals["failed"] else 1


# ----- runs -------------------------------------------------------------------------
def _ledger(a: argparse.Namespace):
    from pathlib import Path

    from .ledger import Ledger

    if a.ledger and not Path(a.ledger).exists():
        raise FileNotFoundError(f"no ledger at {a.ledger}")
    return Ledger(a.ledger) if a.ledger else Ledger()


def cmd_runs_ls(a: argparse.Namespace) -> int:
    from .results import formatted

    runs = _ledger(a).runs(limit=a.limit)
    if a.json:
        _print_json(runs.to_dict("records"))
        return 0
    shown = runs.assign(idea=runs["idea"].str.slice(0, 50), symbol=runs["symbol"].fillna("?"),
                        timeframe=runs["timeframe"].fillna("?"))
    cols = ["run_id", "idea", "symbol", "timeframe", "model", "status", "error_kind", "run_dir"]
    print(formatted(shown[cols]).to_string(index=False) if len(shown) else "(no runs yet)")
    return 0


def _load(a: argparse.Namespace):
    from .results import load_run

    return load_run(a.run_id, _ledger(a))


def cmd_runs_show(a: argparse.Namespace) -> int:
    from pathlib import Path

    from .results import formatted

    r = _load(a)
    plot_path = None
    if a.plot:
        plot_path = Path(r.run_dir) / "plot.html" if r.run_dir else None
        if plot_path is None or not plot_path.exists():  # a run folder is never rewritten: a fresh file instead
            plot_path = _backtest_dir(f"run-{r.run_id}") / "plot.html"
            plot_path.parent.mkdir(parents=True, exist_ok=True)
            r.plot().save(plot_path)
    if a.json:
        _print_json({**r.to_json(), "plot_path": str(plot_path) if plot_path else None})
        return 0
    print(r)
    if r.datasets:
        print("\nper quarter:\n" + formatted(r.per_quarter).to_string())
    if r.run_dir:
        print(f"\nrun folder: {r.run_dir}")
    if plot_path:
        print(f"plot: {plot_path}")
    return 0


def cmd_runs_export(a: argparse.Namespace) -> int:
    r = _load(a)
    if not (a.trades or a.equity):
        raise ValueError("say what to export: --trades FILE.csv and/or --equity FILE.csv")
    written = {}
    if a.trades:
        r.trades.to_csv(a.trades, index=False)
        written["trades"] = {"path": a.trades, "rows": len(r.trades)}
    if a.equity:
        r.equity.to_csv(a.equity, index_label="time")
        written["equity"] = {"path": a.equity, "rows": len(r.equity)}
    if a.json:
        _print_json(written)
    else:
        for what, w in written.items():
            print(f"{w['rows']} {what} rows of run {r.run_id} written to {w['path']}")
    return 0


def cmd_doctor(a: argparse.Namespace) -> int:
    from .memory import health_check

    from .sandbox._isolation import degraded, host_report

    report = health_check()
    layers = host_report()
    if a.json:
        _print_json({**report.to_dict(), "sandbox_layers": layers, "sandbox_degraded": degraded(layers)})
    else:
        print(report)
        print("sandbox layers:")
        for name, state in layers.items():
            print(f"  {'!!' if state.startswith('off') else '  '} {name:<18} {state}")
        if degraded(layers):
            print(f"  SANDBOX DEGRADED: {', '.join(degraded(layers))} off; strategy code gets the other layers only")
    return 0 if report.ok else 1


def _trade_data(a, symbol_default: str = "BTC/USD"):
    """The candles of a paper replay: the store's series, sliced by --replay START END."""
    from .data.pool import default_pool

    start, end = (a.replay or (None, None))
    return default_pool().get(a.data_symbol or symbol_default, a.timeframe, start=start, end=end)


def cmd_trade(a: argparse.Namespace) -> int:
    """Trade a strategy bar by bar: paper by default, live with --live, keys and a confirmation."""
    from pathlib import Path

    from .live import LiveError, LiveRunner, load_strategy
    from .risk import RiskLimits

    source = load_strategy(a.target)
    target = Path(a.target)
    state_dir = Path(a.state) if a.state else (target / "live" if target.is_dir() else
                                               target.parent / f"{target.stem}-live")
    limits = RiskLimits(max_position=a.max_position, max_order_value=a.max_order_value, max_daily_loss=a.max_daily_loss)
    if a.live and a.replay:
        raise LiveError("--replay runs on the paper exchange; drop --live")
    from .exchange.registry import get_spec

    get_spec(a.exchange)  # paper trading never calls it, but a name it does not know is a typo to report
    events = []

    def on_event(kind: str, data: dict) -> None:
        if a.json:
            print(json.dumps({"event": kind, **data}, default=str), flush=True)
        events.append(kind)

    if a.live:
        from .exchange import ExchangeManager

        if not a.yes:
            if not sys.stdin.isatty():
                raise LiveError("live trading needs a confirmation: type the symbol at the prompt, or pass --yes")
            typed = input(f"LIVE trading {source.name} on {a.exchange} {a.symbol}. Type the symbol to confirm: ")
            if typed.strip() != a.symbol:
                raise LiveError("confirmation did not match the symbol; nothing was traded")
        exchange = ExchangeManager(a.exchange, a.account, api_url=a.api_url, require_keys=True, symbols=[a.symbol])
        exchange.start()
    else:
        from .paper import PaperExchange

        exchange = PaperExchange(state_dir / "paper.sqlite", symbol=a.symbol)
    with LiveRunner(source, exchange, symbol=a.symbol, timeframe=a.timeframe, state_dir=state_dir, limits=limits,
                    window=a.window, warmup_bars=a.warmup, unit=a.unit, on_event=on_event) as runner:
        try:
            if not a.live:
                frame = _trade_data(a, a.symbol)
                exchange.candles = frame
                runner.start(frame.iloc[:max(1, a.warmup)] if a.warmup > 0 else frame)
                runner.feed(frame)
            else:
                runner.start()
                runner.run(interval=a.interval, max_bars=a.max_bars,
                           status=None if a.json else lambda line: print("\r" + line, end="", flush=True))
        finally:
            exchange.close()
        line = runner.status_line()
        if a.json:
            print(json.dumps({"event": "status", **runner.status()}, default=str))
        else:
            print(line)
        return 1 if runner.stop_reason and not runner.kill_switch.engaged else 0


def cmd_parity(a: argparse.Namespace) -> int:
    """Backtest vs a live-runner replay on the same candles, trade by trade; exit 1 on a mismatch."""
    from .live import load_strategy
    from .parity import check_parity, format_table

    source = load_strategy(a.target)
    symbol = a.symbol or source.dataset.get("symbol") or "BTC/USD"
    timeframe = a.timeframe or source.dataset.get("timeframe") or "15m"
    from .data.pool import default_pool

    frame = default_pool().get(symbol, timeframe, start=a.start, end=a.end)
    report = check_parity(source, frame, window=a.window, symbol=symbol, live_sizing=a.live_sizing)
    if a.json:
        _print_json(report.to_dict())
    else:
        print(report.summary())
        print(format_table(report, color=sys.stdout.isatty()))
    return 0 if report.ok else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moondev-lab", description="Research and backtest workbench for traders.")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = p.add_subparsers(dest="command", required=True)

    def add(parent, name: str, handler: Handler, help: str) -> argparse.ArgumentParser:
        sp = parent.add_parser(name, help=help, description=help)
        sp.add_argument("--json", action="store_true", help="print machine-readable JSON")
        sp.set_defaults(handler=handler)
        return sp

    data = sub.add_parser("data", help="the OHLCV store").add_subparsers(dest="data_command", required=True)
    sp = add(data, "import", cmd_data_import,
             "validate a data file (CSV, ccxt/freqtrade JSON, feather, parquet; detected from its content) "
             "or a freqtrade data directory, and import it into the store")
    sp.add_argument("path", help="a file, or a freqtrade data directory (PAIR-TIMEFRAME.feather files)")
    sp.add_argument("--symbol", help="default: from a freqtrade file name (BTC_USDT-5m.feather)")
    sp.add_argument("--timeframe", help="default: from the file name, else the candles' spacing")
    sp.add_argument("--source", help="default: 'local' for a file, the directory's name (the exchange) for a directory")
    sp.add_argument("--format", help="skip detection and read as this format (csv, ohlcv-json, feather, parquet)")
    sp.add_argument("--repair", action="store_true", help="drop/fix bad rows and report them instead of failing")
    sp = add(data, "export", cmd_data_export, "write a stored series to a file, or into a freqtrade data directory")
    sp.add_argument("symbol")
    sp.add_argument("timeframe")
    sp.add_argument("--format", default="feather", choices=["csv", "parquet", "feather", "json", "jsongz"])
    sp.add_argument("--freqtrade", metavar="DIR", help="write DIR/PAIR-TIMEFRAME.<format> as freqtrade expects")
    sp.add_argument("--out", help="the file to write (default: ./PAIR-TIMEFRAME.<format>)")
    sp.add_argument("--source")
    sp = add(data, "fetch", cmd_data_fetch, "download candles with ccxt (resumes after the last stored one)")
    sp.add_argument("--exchange", required=True)
    sp.add_argument("--symbol", required=True)
    sp.add_argument("--timeframe", required=True)
    sp.add_argument("--since")
    sp.add_argument("--until")
    sp.add_argument("--limit", type=int, default=1000)
    sp.add_argument("--retries", type=int, default=5)
    sp.add_argument("--api-url", help="replace the exchange's API host (a proxy or a test server)")
    add(data, "ls", cmd_data_ls, "list stored series")
    sp = add(data, "info", cmd_data_info, "show one series' manifest")
    sp.add_argument("symbol")
    sp.add_argument("timeframe")
    sp.add_argument("--source")
    sp.add_argument("--verify", action="store_true", help="recompute checksums")

    def data_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--symbol", default="BTC/USD")
        sp.add_argument("--timeframe", default="15m")
        sp.add_argument("--source")

    def loop_args(sp: argparse.ArgumentParser) -> None:
        data_args(sp)
        sp.add_argument("--max-debug", type=int, help="debug-loop iterations (default 3)")
        sp.add_argument("--max-optimize", type=int, help="optimize-loop iterations (default 2)")
        sp.add_argument("--min-trades", type=int,
                        help="fewer out-of-sample trades than this are flagged 'too few trades' (default 10)")
        sp.add_argument("--grid-engine", choices=["auto", "pool", "backtesting"],
                        help="parameter grid: auto (default; the compiled fast path for the offline model's "
                             "strategies, confirmed in the sandbox, else the pool), the sandbox pool, or "
                             "backtesting.py's own Backtest.optimize")
        sp.add_argument("--charts", dest="plot", choices=["all", "saved", "none"],
                        help="which ok ideas get plot.html in their run folder: all (default), saved (out-of-sample "
                             "above the save threshold) or none; `runs show N --plot` draws any on demand")
        sp.add_argument("--confirm", choices=["all", "kept"],
                        help="with the fast grid engine, which runs backtesting.py confirms in the sandbox: all "
                             "(default) or kept (the results kept and shown: in-sample, out-of-sample, quarters)")

    sp = add(sub, "rbi", cmd_rbi, "research, backtest and rank trading ideas")
    sp.add_argument("idea", nargs="?", help="an idea in quotes")
    sp.add_argument("--ideas", help="a file of ideas: one per line, or a CSV with an 'idea' column")
    sp.add_argument("--from", dest="sources", action="append", metavar="SOURCE",
                    help="an idea from an article URL, a PDF, a YouTube URL or a .txt/.md file (repeatable)")
    sp.add_argument("--model", default="auto", help="offline, auto (Claude if ANTHROPIC_API_KEY is set) or a Claude model")
    sp.add_argument("--parallel", type=int, help="ideas in flight at once")
    sp.add_argument("--force", action="store_true", default=None,
                    help="run ideas again even if done or given up on this symbol/timeframe/model")
    loop_args(sp)
    sp.add_argument("--walk-forward", type=int, metavar="K",
                    help="also walk-forward optimise each idea over K rolling folds (issue 15)")
    sp.add_argument("--start", help="research on data from this date")
    sp.add_argument("--end", help="research on data up to this date")
    sp = add(sub, "backtest", cmd_backtest, "run strategy files in the sandbox on pooled data (one file: its "
             "stats and plot; several files, directories or globs: a table, concurrently on one pool)")
    sp.add_argument("paths", nargs="+", metavar="PATH", help="strategy files, directories of them, or globs")
    sp.add_argument("--csv", action="store_true", help="print the table as CSV")
    sp.add_argument("--out", help="where to write backtests.csv and backtests.html (default: a new folder under "
                    "$MOONDEV_LAB_HOME/backtests/)")
    data_args(sp)
    sp.add_argument("--start")
    sp.add_argument("--end")
    sp.add_argument("--timeout", type=float, default=120.0)
    sp.add_argument("--cash", type=float, help="starting cash (default: the script's own Backtest(cash=...), "
                    "else 1,000,000)")
    sp.add_argument("--commission", type=float,
                    help="commission as a fraction of each trade's value, per side (default: the script's own, "
                         "else 0.001 = 0.1%%)")
    sp.add_argument("--plot", metavar="PATH", help="where to write plot.html (default: a new folder under "
                    "$MOONDEV_LAB_HOME/backtests/)")
    sp = add(sub, "batch", cmd_batch, "run a batch of ideas through the RBI loop on Dask, with a leaderboard "
             "(or, with --params, one notebook over parameter sets)")
    sp.add_argument("ideas", nargs="?", metavar="IDEAS", help="IDEAS: a text file (one per line) or a CSV with an 'idea' column; "
                    "with --params: the notebook")
    sp.add_argument("--workers", type=int, help="LocalCluster workers (default: from CPUs and memory)")
    sp.add_argument("--scheduler", help="an existing Dask scheduler, e.g. tcp://host:8786 "
                    "(default $DASK_SCHEDULER_ADDRESS)")
    sp.add_argument("--out", help="output folder (default $MOONDEV_LAB_HOME/batches/batch-TIME)")
    sp.add_argument("--resume", metavar="DIR", help="carry on the interrupted batch in DIR with its settings")
    sp.add_argument("--notebook", nargs="?", const=True, metavar="PATH",
                    help="run each idea as a notebook with papermill (default notebooks/rbi_template.ipynb)")
    sp.add_argument("-p", "--parameter", nargs=2, action="append", metavar=("KEY", "VALUE"),
                    help="an extra notebook parameter (JSON values are parsed)")
    sp.add_argument("--limit", type=int, help="the first N ideas only")
    sp.add_argument("--sample", type=int, help="N ideas picked at random (with --seed)")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--model", default="auto", help="offline, auto (Claude if ANTHROPIC_API_KEY is set) or a Claude model")
    sp.add_argument("--memory-limit", type=int, default=2048, metavar="MB",
                    help="per idea: its sandbox tasks' new memory, or its notebook kernel's RSS (default 2048)")
    sp.add_argument("--start", help="research on data from this date")
    sp.add_argument("--end", help="research on data up to this date")
    sp.add_argument("--grid", action=argparse.BooleanOptionalAction, help="grid-search parameters (default on)")
    sp.add_argument("--quarters", action=argparse.BooleanOptionalAction, help="test every quarter (default on)")
    loop_args(sp)
    sp.add_argument("--params", help="notebook batch: a JSON list of parameter objects, or a CSV with one run per row")
    sp.add_argument("--parallel", type=int, default=2, help="notebook batch: kernels at once")
    sp.add_argument("--dask-workers", type=int, default=0, help="notebook batch: on a local Dask cluster of N workers")
    runs = sub.add_parser("runs", help="past RBI runs").add_subparsers(dest="runs_command", required=True)

    def ledger_arg(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument("--ledger", help="a ledger file (default $MOONDEV_LAB_HOME/ledger.sqlite; the demo's is "
                        "$MOONDEV_LAB_HOME/demo/ledger.sqlite)")
        return sp

    ledger_arg(add(runs, "ls", cmd_runs_ls, "list runs, newest first")).add_argument("--limit", type=int)
    sp = ledger_arg(add(runs, "show", cmd_runs_show, "one run: stats in and out of sample, per quarter, folder"))
    sp.add_argument("run_id", type=int)
    sp.add_argument("--plot", action="store_true", help="print the path of the run's plot.html (made if missing)")
    sp = ledger_arg(add(runs, "export", cmd_runs_export, "write a run's trades or equity curve to CSV"))
    sp.add_argument("run_id", type=int)
    sp.add_argument("--trades", metavar="FILE.csv")
    sp.add_argument("--equity", metavar="FILE.csv")
    sp = add(sub, "trade", cmd_trade, "trade a strategy bar by bar on closed candles (paper by default)")
    sp.add_argument("target", metavar="RUN_DIR|STRATEGY.py")
    sp.add_argument("--exchange", default="binance")
    sp.add_argument("--account", default="default")
    sp.add_argument("--symbol", default="BTC/USD")
    sp.add_argument("--timeframe", default="15m")
    mode = sp.add_mutually_exclusive_group()
    mode.add_argument("--paper", action="store_true", help="the paper exchange (default)")
    mode.add_argument("--live", action="store_true", help="real orders: needs keys and a confirmation")
    sp.add_argument("--yes", action="store_true", help="confirm live trading without the typed symbol (scripts)")
    sp.add_argument("--replay", nargs=2, metavar=("START", "END"), help="paper: replay stored candles START..END")
    sp.add_argument("--data-symbol", help="the stored series a paper run reads (default: --symbol)")
    sp.add_argument("--state", help="state folder (default RUN_DIR/live)")
    sp.add_argument("--window", type=int, default=1000, help="indicator window in bars (see LiveStrategy)")
    sp.add_argument("--warmup", type=int, default=1000, help="history bars before the first decision")
    sp.add_argument("--unit", type=float, default=1.0, help="live: base units per strategy unit")
    sp.add_argument("--interval", type=float, default=5.0, help="live: seconds between polls")
    sp.add_argument("--max-bars", type=int, help="live: stop after this many new bars")
    sp.add_argument("--max-position", type=float)
    sp.add_argument("--max-order-value", type=float)
    sp.add_argument("--max-daily-loss", type=float)
    sp.add_argument("--api-url", help="replace the exchange's API host (a test server)")
    sp = add(sub, "parity", cmd_parity, "backtest vs a live-runner replay of the same candles, trade by trade")
    sp.add_argument("target", metavar="RUN_DIR|STRATEGY.py")
    sp.add_argument("--symbol", help="default: the run's dataset, else BTC/USD")
    sp.add_argument("--timeframe", help="default: the run's dataset, else 15m")
    sp.add_argument("--start")
    sp.add_argument("--end")
    sp.add_argument("--window", type=int, default=1000)
    sp.add_argument("--live-sizing", action="store_true",
                    help="size orders as live trading must: fractions of equity as units at the decision's close")
    add(sub, "doctor", cmd_doctor, "health check: memory, CPU, disk, cgroup limit, store")
    loop_args(add(sub, "demo", cmd_demo, "run the RBI loop offline on the bundled data, ending with a leaderboard"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from .errors import MoondevError

    try:
        return args.handler(args)
    except BrokenPipeError:  # before OSError, which it is
        # `moondev-lab runs ls | head`: the reader left. Point stdout at /dev/null so the
        # interpreter's final flush does not raise again, and stop quietly.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (MoondevError, OSError, ValueError) as e:  # OSError: a missing file or folder, no permission, a full disk
        if getattr(args, "json", False):
            _print_json({"error": type(e).__name__, "message": str(e)})
        else:
            print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
