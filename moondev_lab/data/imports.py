"""Import market-data files, or a whole freqtrade data directory, into the store.

The format is detected from each file's content (:mod:`~moondev_lab.data.formats`);
symbol and timeframe come from the caller, else from a freqtrade file name
(``BTC_USDT-5m.feather``), else (timeframe only) from the candles' spacing.

>>> from moondev_lab.data.imports import import_path
>>> res = import_path("user_data/data/binance")      # doctest: +SKIP
>>> print(res.table())                                # doctest: +SKIP
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import MoondevError
from .freqtrade import list_data_files, parse_filename
from .ingest import read_file
from .store import Store, WriteResult
from .validate import Mode

#: freqtrade candle types that are OHLCV of the traded instrument; mark/index/funding candles are other series.
_TRADED = ("spot", "futures")


@dataclass
class ImportRow:
    """One file of an import: what it was read as, and what happened."""

    file: str
    format: str = ""
    symbol: str = ""
    timeframe: str = ""
    rows: int = 0
    mode: str = ""
    status: str = "ok"  # ok | conflict | skipped | error
    message: str = ""
    result: WriteResult | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "result"}


@dataclass
class ImportReport:
    rows: list[ImportRow]

    @property
    def ok(self) -> bool:
        return all(r.status in ("ok", "skipped") for r in self.rows) and any(r.status == "ok" for r in self.rows)

    def table(self) -> list[dict]:
        return [r.to_dict() for r in self.rows]

    def __repr__(self) -> str:
        done = sum(r.status == "ok" for r in self.rows)
        return f"ImportReport({done} of {len(self.rows)} files imported)"


def import_file(path: str | Path, *, symbol: str | None = None, timeframe: str | None = None,
                source: str = "local", mode: Mode = "strict", format: str | None = None,
                store: Store | None = None) -> WriteResult:
    """Detect, read, validate and store one file. Raises on bad input (nothing is stored then)."""
    path = Path(path)
    if not path.is_file():  # before the symbol: a typo in the path is the thing to fix first
        raise FileNotFoundError(f"no such file: {path}")
    named = parse_filename(path.name)
    symbol = symbol or (named.pair if named else None)
    if not symbol:
        raise ValueError(f"{path.name}: give the symbol (--symbol); it is not in the file name "
                         "(freqtrade names files PAIR-TIMEFRAME.feather, e.g. BTC_USDT-5m.feather)")
    candles, report = read_file(path, timeframe or (named.timeframe if named else None), mode, format)
    return (store or Store()).write(candles, symbol, report.timeframe, source, report=report)


def import_dir(datadir: str | Path, *, source: str | None = None, mode: Mode = "strict",
               store: Store | None = None) -> ImportReport:
    """Import every freqtrade data file in ``datadir`` (and its ``futures/``); one file's failure stops none.

    ``source`` defaults to the directory's name, which in freqtrade's layout is
    the exchange (``user_data/data/binance`` -> ``binance``).
    """
    datadir = Path(datadir)
    if not datadir.is_dir():
        raise FileNotFoundError(f"no such directory: {datadir}")
    store = store or Store()
    source = source or datadir.resolve().name
    rows: list[ImportRow] = []
    for path, info in list_data_files(datadir):
        row = ImportRow(str(path.relative_to(datadir)))
        rows.append(row)
        if info is None:
            row.status, row.message = "skipped", "not named PAIR-TIMEFRAME.ext"
            continue
        row.symbol, row.timeframe = info.pair, info.timeframe
        if info.candle_type not in _TRADED:
            row.status, row.message = "skipped", f"{info.candle_type} candles are not the pair's own OHLCV"
            continue
        try:
            res = import_file(path, symbol=info.pair, timeframe=info.timeframe, source=source, mode=mode,
                              store=store)
        except (MoondevError, ValueError, OSError) as e:
            row.status, row.message = "error", _one_line(e)
            continue
        row.result, row.mode, row.rows = res, res.mode, res.manifest.rows
        row.format = res.report.format if res.report else ""
        if not res.ok:
            row.status, row.message = "conflict", conflict_message(res)
    if not rows:
        raise FileNotFoundError(f"{datadir} holds no files")
    return ImportReport(rows)


def import_path(path: str | Path, **kw) -> WriteResult | ImportReport:
    """:func:`import_dir` for a directory, :func:`import_file` for a file."""
    if Path(path).is_dir():
        kw.pop("symbol", None), kw.pop("timeframe", None), kw.pop("format", None)
        return import_dir(path, **kw)
    kw["source"] = kw.get("source") or "local"
    return import_file(path, **kw)


def conflict_message(res: WriteResult) -> str:
    return (f"{res.conflict_count} candles differ from the stored {res.manifest.symbol} {res.manifest.timeframe} "
            f"({res.manifest.source}) and were kept as stored (first at {res.conflicts[0]}); "
            "another import of different data won, or the files disagree")


def _one_line(e: Exception) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= 300 else text[:300] + "..."
