"""Download candles with a real ccxt exchange class into the store.

>>> from moondev_lab.data.fetch import fetch_ohlcv
>>> fetch_ohlcv("binance", "BTC/USDT", "1h", since="2024-01-01")   # doctest: +SKIP
FetchResult(binance BTC/USDT 1h: +8784 candles in 9 pages, 0 retries ...)

Pages with ``since``/``limit``, validates every page (ccxt turns a non-JSON
200 body into rows of ``None``), retries network errors with exponential
backoff (HTTP 429 raises ``DDoSProtection``, a sibling of
``RateLimitExceeded``: both are ``NetworkError``), resumes after the last
stored candle, drops the still-forming last candle, and commits each page to
the store as it arrives, so an interrupted download loses nothing.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable
from urllib.parse import urlsplit

import pandas as pd
from tqdm.auto import tqdm

from ..errors import MoondevError
from ._timeframes import timeframe_ms
from .ingest import from_ccxt
from .store import SeriesNotFound, Store
from .validate import DataValidationError

if TYPE_CHECKING:
    import ccxt

log = logging.getLogger(__name__)


class FetchError(MoondevError, RuntimeError):
    """Fetching gave up; ``.result`` says what was stored before that."""

    def __init__(self, message: str, result: "FetchResult"):
        super().__init__(message)
        self.result = result


@dataclass
class FetchResult:
    exchange: str
    symbol: str
    timeframe: str
    candles: int = 0
    pages: int = 0
    retries: int = 0
    errors: list[str] = field(default_factory=list)
    resumed_from: pd.Timestamp | None = None
    last: pd.Timestamp | None = None

    def __repr__(self) -> str:
        resumed = f", resumed after {self.resumed_from}" if self.resumed_from is not None else ""
        return (f"FetchResult({self.exchange} {self.symbol} {self.timeframe}: +{self.candles} candles in "
                f"{self.pages} pages, {self.retries} retries{resumed}; last {self.last})")


def make_exchange(exchange_id: str, api_url: str | None = None, **config: Any) -> ccxt.Exchange:
    """A public-data ccxt exchange; ``api_url`` swaps every API host (for tests or proxies)."""
    import ccxt  # ~0.3 s: only commands that fetch pay it (the CLI imports this module for FetchError)

    try:
        cls = getattr(ccxt, exchange_id)
    except AttributeError:
        raise ValueError(f"unknown exchange {exchange_id!r}; ccxt has e.g. binance, kraken, coinbase") from None
    options = {"fetchMarkets": {"types": ["spot"]}, "fetchCurrencies": False, "fetchMargins": False}
    ex = cls({"enableRateLimit": True, "timeout": 10_000, "options": options, **config})
    if api_url:
        base = api_url.rstrip("/")
        for name, url in list(ex.urls["api"].items()):
            if isinstance(url, str):
                ex.urls["api"][name] = base + urlsplit(url).path
    return ex


def _looks_like_data(payload) -> bool:
    """An empty OHLCV answer is a JSON list (or an object wrapping one), not garbage."""
    if isinstance(payload, list):
        return True
    if isinstance(payload, dict):
        return any(isinstance(v, (list, dict)) and _looks_like_data(v) for v in payload.values())
    return False


def _to_ms(when) -> int | None:
    if when is None:
        return None
    if isinstance(when, (int, float)):
        return int(when)
    t = pd.Timestamp(when)
    t = t.tz_localize("UTC") if t.tzinfo is None else t
    return int(t.value // 1_000_000)


def fetch_ohlcv(exchange: str | ccxt.Exchange, symbol: str, timeframe: str, since=None, until=None, *,
                store: Store | None = None, source: str | None = None, limit: int = 1000,
                max_retries: int = 5, backoff: float = 1.0, progress: bool = True,
                sleep: Callable[[float], None] = time.sleep) -> FetchResult:
    """Fetch ``symbol`` candles from ``since`` (or after the last stored one) up to ``until``/now."""
    import ccxt

    ex = make_exchange(exchange) if isinstance(exchange, str) else exchange
    store = store or Store()
    source = source or ex.id
    step = timeframe_ms(timeframe)
    result = FetchResult(ex.id, symbol, timeframe)

    start = _to_ms(since)
    try:
        last = store.find(symbol, timeframe, source).last_ts // 1_000_000
        if start is None or start <= last:
            start = last + step
            result.resumed_from = pd.Timestamp(last, unit="ms", tz="UTC")
    except SeriesNotFound:
        pass
    if start is None:
        raise ValueError("nothing stored yet for this series: pass since= (--since on the command line), "
                         "e.g. '2024-01-01'")
    now = ex.milliseconds()
    end = min(_to_ms(until) or now, now)

    def call(what: str, fn, *args, **kwargs):
        for attempt in range(max_retries + 1):
            try:
                return fn(*args, **kwargs)
            except (ccxt.NetworkError, ccxt.BadResponse, DataValidationError) as e:
                # NetworkError covers DDoSProtection (429), RateLimitExceeded, RequestTimeout, 5xx.
                result.errors.append(f"{what}: {type(e).__name__}: {str(e)[:200]}")
                if attempt == max_retries:
                    raise FetchError(f"{what} failed after {max_retries + 1} attempts: {type(e).__name__}: "
                                     f"{str(e)[:300]} (stored so far: {result.candles} candles)", result) from e
                result.retries += 1
                delay = backoff * 2 ** attempt
                log.warning("%s failed (%s); retry %d/%d in %.2fs", what, type(e).__name__,
                            attempt + 1, max_retries, delay)
                sleep(delay)

    call("load_markets", ex.load_markets)
    total = max(0, (end - start) // step)
    with tqdm(total=total, unit="candle", desc=f"{ex.id} {symbol} {timeframe}", disable=not progress) as bar:
        cursor = start
        while cursor < end:
            def page():
                rows = ex.fetch_ohlcv(symbol, timeframe, since=cursor, limit=limit)
                if not rows and not _looks_like_data(ex.last_json_response):
                    # ccxt drops the None rows of a non-JSON 200 body when `since` is set,
                    # so garbage would look like "no more candles": refuse to believe it.
                    raise ccxt.BadResponse(f"{ex.id} answered fetch_ohlcv with no candle data: "
                                           f"{str(ex.last_http_response)[:120]!r}")
                candles, _ = from_ccxt(rows, timeframe, "strict", where=f"page {result.pages + 1}")
                # The last candle is still forming until its bar closes: never store it.
                ms = candles.index.asi8 // 1_000_000
                return rows, candles[(ms + step <= now) & (ms < end)]

            rows, candles = call(f"fetch_ohlcv page {result.pages + 1}", page)
            result.pages += 1
            if not len(candles):
                break
            store.write(candles, symbol, timeframe, source)
            result.candles += len(candles)
            result.last = candles.index[-1]
            bar.update(len(candles))
            cursor = int(candles.index[-1].value // 1_000_000) + step
            if len(rows) < limit:
                break
    return result
