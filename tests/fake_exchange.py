"""A fake Binance spot REST API on 127.0.0.1, for driving the real ``ccxt.binance``.

It serves ``exchangeInfo`` and ``klines`` from a deterministic candle series
and can inject faults into the next requests, in order:

* ``"429"`` and ``"418"`` -> ccxt ``DDoSProtection``
* ``"500"``, ``"503"`` (HTML body) -> ``ExchangeNotAvailable``
* ``"timeout"`` -> the reply comes after the client's timeout (``RequestTimeout``)
* ``"garbage"`` -> HTTP 200 with a non-JSON body (ccxt returns rows of ``None``)
* ``"nulls"`` -> HTTP 200 with ``{"code": 0}`` (one all-``None`` row)

>>> with FakeBinance() as fake:                     # doctest: +SKIP
...     ex = make_exchange("binance", api_url=fake.url, enableRateLimit=False)
...     fake.inject("429", "garbage")
"""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import numpy as np

HOUR_MS = 3_600_000
ANCHOR_MS = 1_704_067_200_000  # 2024-01-01 00:00 UTC

MARKET = {
    "symbol": "BTCUSDT", "status": "TRADING", "baseAsset": "BTC", "quoteAsset": "USDT",
    "baseAssetPrecision": 8, "quotePrecision": 8, "permissions": ["SPOT"], "isMarginTradingAllowed": False,
    "filters": [
        {"filterType": "PRICE_FILTER", "minPrice": "0.01", "maxPrice": "1000000", "tickSize": "0.01"},
        {"filterType": "LOT_SIZE", "minQty": "0.00001", "maxQty": "9000", "stepSize": "0.00001"},
        {"filterType": "NOTIONAL", "minNotional": "5", "maxNotional": "9000000"},
    ],
}


def candle(open_ms: int, step_ms: int = HOUR_MS) -> list:
    """Deterministic kline for a bar, in Binance's wire format."""
    i = (open_ms - ANCHOR_MS) // step_ms
    o = 40000 + 500 * np.sin(i / 24) + i * 0.5
    c = o + 50 * np.cos(i / 7)
    h, l = max(o, c) + 20, min(o, c) - 20
    return [open_ms, f"{o:.2f}", f"{h:.2f}", f"{l:.2f}", f"{c:.2f}", f"{10 + i % 17:.5f}",
            open_ms + step_ms - 1, "0", 100, "0", "0", "0"]


class FakeBinance:
    """Context manager running the fake on a free port; ``url`` is its base."""

    def __init__(self, last_open_ms: int | None = None, timeout_delay: float = 1.5):
        # Candles exist from the anchor up to `last_open_ms` (default: 500 hours of history).
        self.last_open_ms = last_open_ms if last_open_ms is not None else ANCHOR_MS + 499 * HOUR_MS
        self.timeout_delay = timeout_delay
        self.faults: list[str] = []
        self.requests: list[tuple[str, dict]] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def inject(self, *faults: str) -> None:
        with self._lock:
            self.faults.extend(faults)

    def klines_calls(self) -> list[dict]:
        return [q for p, q in self.requests if p.endswith("/klines")]

    def __enter__(self) -> "FakeBinance":
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def _send(self, status: int, body: str | bytes, ctype: str = "application/json"):
                data = body.encode() if isinstance(body, str) else body
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                parts = urlsplit(self.path)
                query = {k: v[0] for k, v in parse_qs(parts.query).items()}
                with fake._lock:
                    fake.requests.append((parts.path, query))
                    fault = fake.faults.pop(0) if fake.faults else None
                if fault in ("429", "418"):
                    return self._send(int(fault), json.dumps({"code": -1003, "msg": "Too many requests."}))
                if fault in ("500", "502", "503"):
                    return self._send(int(fault), "<html><body>Service Unavailable</body></html>", "text/html")
                if fault == "timeout":
                    time.sleep(fake.timeout_delay)
                if fault == "garbage":
                    return self._send(200, "this is not json", "text/plain")
                if fault == "nulls":
                    return self._send(200, json.dumps({"code": 0}))
                if parts.path == "/api/v3/exchangeInfo":
                    return self._send(200, json.dumps({"timezone": "UTC", "serverTime": int(time.time() * 1000),
                                                       "rateLimits": [], "symbols": [MARKET]}))
                if parts.path == "/api/v3/klines":
                    step = {"1h": HOUR_MS, "15m": HOUR_MS // 4, "1d": 24 * HOUR_MS}[query.get("interval", "1h")]
                    limit = min(int(query.get("limit", 500)), 1000)
                    start = int(query.get("startTime", fake.last_open_ms - (limit - 1) * step))
                    first = max(ANCHOR_MS, ANCHOR_MS + -(-(start - ANCHOR_MS) // step) * step)
                    rows = [candle(t, step) for t in range(first, fake.last_open_ms + 1, step)][:limit]
                    return self._send(200, json.dumps(rows))
                return self._send(404, json.dumps({"code": -1, "msg": f"fake: no route GET {parts.path}"}))

        return Handler
