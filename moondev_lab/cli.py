"""The ``moondev-lab`` command line: a thin layer over the library.

    moondev-lab data import data/BTC-USD-15m.csv --symbol BTC/USD --timeframe 15m
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
def cmd_data_import(a: argparse.Namespace) -> int:
    from .data import Store

    res = Store().import_csv(a.path, a.symbol, a.timeframe, source=a.source, mode="repair" if a.repair else "strict")
    if a.json:
        _print_json({"mode": res.mode, "rows_added": res.rows_added, "rows_skipped": res.rows_skipped,
                     "conflicts": res.conflicts, "series": res.manifest.summary(),
                     "report": {"summary": res.report.summary(), "issues": [str(i) for i in res.report.issues],
                                "gaps": len(res.report.gaps), "notes": res.report.notes}})
    else:
        print(res)
        print(res.report)
    return 0


def cmd_data_fetch(a: argparse.Namespace) -> int:
    from .data import Store
    from .data.fetch import fetch_ohlcv, make_exchange

    ex = make_exchange(a.exchange, api_url=a.api_url)
    res = fetch_ohlcv(ex, a.symbol, a.timeframe, since=a.since, until=a.until, store=Store(),
                      limit=a.limit, max_retries=a.retries, progress=not a.json)
    if a.json:
        _print_json({**{k: v for k, v in res.__dict__.items()}})
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


# ----- demo ---------------------------------------------------------------------------
def cmd_demo(a: argparse.Namespace) -> int:
    from .data import DataPool, ensure_sample

    m = ensure_sample()
    pool = DataPool()
    df = pool.get(m.symbol, m.timeframe)
    if a.json:
        _print_json({"series": m.summary(), "pool": pool.stats().to_dict()})
        return 0
    print(f"store: {pool.store.root}")
    print(f"series: {m.symbol} {m.timeframe}, {m.rows} candles {m.first} .. {m.last}")
    print(df.tail(3).to_string())
    print(pool.stats())
    return 0


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
    sp = add(data, "import", cmd_data_import, "validate a CSV and import it into the store")
    sp.add_argument("path")
    sp.add_argument("--symbol", required=True)
    sp.add_argument("--timeframe", required=True)
    sp.add_argument("--source", default="local")
    sp.add_argument("--repair", action="store_true", help="drop/fix bad rows and report them instead of failing")
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

    add(sub, "demo", cmd_demo, "run the main job offline on the bundled data")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from .data import DataValidationError, StoreError
    from .data.fetch import FetchError

    try:
        return args.handler(args)
    except (DataValidationError, StoreError, FetchError, FileNotFoundError, ValueError) as e:
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
