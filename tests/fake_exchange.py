"""A fake Binance spot REST API on 127.0.0.1, for driving the real ``ccxt.binance``.

Public: ``exchangeInfo`` and ``klines`` from a deterministic candle series.
Signed (HMAC-SHA256 checked, ``X-MBX-APIKEY`` checked): ``account``, ``order``
(POST create, GET by ``orderId`` or ``origClientOrderId``, DELETE cancel),
``openOrders`` and ``myTrades``, over a tiny matching engine with balances,
Binance's filters (LOT_SIZE, PRICE_FILTER, NOTIONAL) and Binance's exact error
codes and messages (ccxt picks its exception class from the message text).

Faults, consumed in order by the next requests of any kind (``inject``) or by
the next order creations only (``inject_order``):

* ``"429"``, ``"418"`` -> ccxt ``DDoSProtection`` (the request is not processed)
* ``"500"``, ``"502"``, ``"503"`` (HTML body) -> ``ExchangeNotAvailable`` (not processed)
* ``"timeout"`` -> processed, but answered after the client's timeout (``RequestTimeout``);
  for an order that is "accepted, response lost"
* ``"stall"`` -> answered late and *not* processed
* ``"drop"`` -> processed, then the connection is closed with no answer (``NetworkError``)
* ``"hide"`` -> order lookups answer as if the order did not exist (a lagging order index)
* ``"garbage"`` -> HTTP 200 with a non-JSON body (for an order: after accepting it)
* ``"nulls"`` -> HTTP 200 with ``{"code": 0}``
* ``"insufficient"`` (orders) -> -2010 "Account has insufficient balance for requested action."
* ``"partial"`` (orders) -> the order fills half its quantity and stays PARTIALLY_FILLED
* ``"pass"`` -> no fault (a placeholder to skip a request)

Contingent orders, as Binance spot has them: ``STOP_LOSS_LIMIT`` and ``TAKE_PROFIT_LIMIT``
(``stopPrice`` + ``price``; refused with -2010 "Stop price would trigger immediately." when
they would), ``LIMIT_MAKER`` and OCO lists (``POST /api/v3/orderList/oco``: an above and a
below leg sharing one balance lock; one leg filling expires the other, cancelling a leg
cancels the list). Resting orders are matched on each candle the fake starts serving
(``advance()``, or setting ``last_open_ms`` forward): limits at their price or the gapped
open, stops triggered at the stop or the gapped open and then working as limits; in one
candle a list's stop-loss leg is matched before its take-profit leg. Fills are stamped with
a time inside the candle they happened in (an order that fills when placed: the one forming).

``creates`` counts the orders the fake accepted; ``create_attempts`` every POST;
``max_concurrent`` the most requests it ever served at once; ``times`` when each arrived.

>>> with FakeBinance() as fake:                     # doctest: +SKIP
...     ex = make_exchange("binance", api_url=fake.url, enableRateLimit=False)
...     fake.inject("429", "garbage")
...     fake.inject_order("timeout")                 # the next order is accepted, its answer lost
"""
from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import re
import sys
import threading
import time
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlsplit

import numpy as np

HOUR_MS = 3_600_000
ANCHOR_MS = 1_704_067_200_000  # 2024-01-01 00:00 UTC
API_KEY = "fake-key-Zx81Qp"
API_SECRET = "fake-secret-9fK2mW7tLq"

MARKET = {
    "symbol": "BTCUSDT", "status": "TRADING", "baseAsset": "BTC", "quoteAsset": "USDT",
    "baseAssetPrecision": 8, "quotePrecision": 8, "permissions": ["SPOT"], "isMarginTradingAllowed": False,
    "isSpotTradingAllowed": True, "ocoAllowed": True, "otoAllowed": False,
    # What this fake's engine can match (Binance lists STOP_LOSS and TAKE_PROFIT too).
    "orderTypes": ["LIMIT", "LIMIT_MAKER", "MARKET", "STOP_LOSS_LIMIT", "TAKE_PROFIT_LIMIT"],
    "filters": [
        {"filterType": "PRICE_FILTER", "minPrice": "0.01", "maxPrice": "1000000", "tickSize": "0.01"},
        {"filterType": "LOT_SIZE", "minQty": "0.00001", "maxQty": "9000", "stepSize": "0.00001"},
        {"filterType": "NOTIONAL", "minNotional": "5", "maxNotional": "9000000"},
    ],
}

# Binance's own (code, message) pairs; ccxt matches the message text exactly.
ERR_INSUFFICIENT = (-2010, "Account has insufficient balance for requested action.")
ERR_DUPLICATE = (-2010, "Duplicate order sent.")
ERR_NO_ORDER = (-2013, "Order does not exist.")
ERR_UNKNOWN_ORDER = (-2011, "Unknown order sent.")
ERR_SIGNATURE = (-1022, "Signature for this request is not valid.")
ERR_API_KEY = (-2015, "Invalid API-key, IP, or permissions for action.")
ERR_RECV_WINDOW = (-1021, "Timestamp for this request is outside of the recvWindow.")
ERR_TOO_MANY = (-1003, "Too many requests.")
ERR_MANDATORY = (-1102, "Mandatory parameter '{}' was not sent, was empty/null, or malformed.")
ERR_WOULD_TRIGGER = (-2010, "Stop price would trigger immediately.")
ERR_MAKER_TAKES = (-2010, "Order would immediately match and take.")
ERR_OCO_PRICES = (-2010, "The relationship of the prices for the orders is not correct.")
ERR_ORDER_TYPE = (-1116, "Invalid orderType.")
ERR_CID = (-1100, "Illegal characters found in parameter 'newClientOrderId'; "
                  "legal range is '^[\\.A-Z\\:/a-z0-9_-]{{1,36}}$'.")


def candle(open_ms: int, step_ms: int = HOUR_MS) -> list:
    """Deterministic kline for a bar, in Binance's wire format."""
    i = (open_ms - ANCHOR_MS) // step_ms
    o = 40000 + 500 * np.sin(i / 24) + i * 0.5
    c = o + 50 * np.cos(i / 7)
    h, l = max(o, c) + 20, min(o, c) - 20
    return [open_ms, f"{o:.2f}", f"{h:.2f}", f"{l:.2f}", f"{c:.2f}", f"{10 + i % 17:.5f}",
            open_ms + step_ms - 1, "0", 100, "0", "0", "0"]


class BinanceError(Exception):
    def __init__(self, err: tuple[int, str], status: int = 400):
        super().__init__(err[1])
        self.code, self.msg, self.status = err[0], err[1], status


def _fmt(x: Decimal) -> str:
    return f"{x:.8f}"


class _Server(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        # A client that timed out has hung up before our late answer: expected, not a fake bug.
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)


class FakeBinance:
    """Context manager running the fake on a free port; ``url`` is its base."""

    def __init__(self, last_open_ms: int | None = None, timeout_delay: float = 1.5, *,
                 api_key: str = API_KEY, secret: str = API_SECRET,
                 balances: dict[str, str] | None = None, fee_rate: str = "0.001"):
        # Candles exist from the anchor up to `last_open_ms` (default: 500 hours of history).
        self._last_open_ms = last_open_ms if last_open_ms is not None else ANCHOR_MS + 499 * HOUR_MS
        #: The candle length the engine matches resting orders on (klines are served at any interval).
        self.step_ms = HOUR_MS
        self.timeout_delay = timeout_delay
        self.api_key, self.secret = api_key, secret
        self.faults: list[str] = []
        self.order_faults: list[str] = []
        self.requests: list[tuple[str, dict]] = []
        self.methods: list[str] = []
        self.times: list[float] = []
        self.max_concurrent = 0
        self._active = 0
        self.free = {k: Decimal(v) for k, v in (balances or {"BTC": "1", "USDT": "100000"}).items()}
        self.locked = {k: Decimal(0) for k in self.free}
        self.fee_rate = Decimal(fee_rate)
        #: The price market orders fill at (and limit orders are checked against); default: last close.
        self.price = Decimal(candle(self.last_open_ms)[4])
        self.orders: dict[int, dict] = {}
        self.trades: list[dict] = []
        self.order_lists: dict[int, dict] = {}
        self.creates = 0
        self.create_attempts = 0
        self._ids = itertools.count(1001)
        self._list_ids = itertools.count(1)
        self._trade_ids = itertools.count(5001)
        self._lock = threading.RLock()
        self._server = _Server(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    # ------------------------------------------------------------------ test controls
    def inject(self, *faults: str) -> None:
        with self._lock:
            self.faults.extend(faults)

    def inject_order(self, *faults: str) -> None:
        """Faults for the next order creations (POST /api/v3/order) only."""
        with self._lock:
            self.order_faults.extend(faults)

    @property
    def last_open_ms(self) -> int:
        """The newest candle served; moving it forward matches resting orders on each new candle."""
        return self._last_open_ms

    @last_open_ms.setter
    def last_open_ms(self, value: int) -> None:
        with self._lock:
            while self._last_open_ms + self.step_ms <= value:
                self._last_open_ms += self.step_ms
                self._match_candle(self._last_open_ms)
            self._last_open_ms = value

    def advance(self, bars: int = 1) -> None:
        """Serve ``bars`` more candles, matching the resting orders on each."""
        self.last_open_ms += bars * self.step_ms

    def klines_calls(self) -> list[dict]:
        return [q for p, q in self.requests if p.endswith("/klines")]

    def calls(self, path_end: str, method: str | None = None) -> int:
        return sum(1 for (p, _), m in zip(self.requests, self.methods)
                   if p.endswith(path_end) and (method is None or m == method))

    def order_by_cid(self, cid: str) -> dict | None:
        with self._lock:
            return next((o for o in self.orders.values() if o["clientOrderId"] == cid), None)

    def place_foreign(self, side: str = "BUY", qty: str = "0.01", price: str = "30000.00",
                      cid: str = "web_manual_1") -> dict:
        """An open limit order someone placed by hand (not through our manager)."""
        with self._lock:
            return self._create({"symbol": "BTCUSDT", "side": side, "type": "LIMIT", "quantity": qty,
                                 "price": price, "timeInForce": "GTC", "newClientOrderId": cid}, fault=None)

    def fill(self, cid: str, qty: str | None = None, price: str | None = None) -> dict:
        """Fill (part of) a resting order now, as if the market had traded through it."""
        with self._lock:
            o = self.order_by_cid(cid)
            left = Decimal(o["origQty"]) - Decimal(o["executedQty"])
            self._execute(o, Decimal(qty) if qty else left, Decimal(price or o["price"]))
            return o

    def __enter__(self) -> "FakeBinance":
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    # ------------------------------------------------------------------ matching engine
    def _execute(self, o: dict, qty: Decimal, price: Decimal, when: int | None = None) -> None:
        base, quote = MARKET["baseAsset"], MARKET["quoteAsset"]
        cost = qty * price
        if o["side"] == "BUY":
            # A resting buy locked quote at its limit price; release what this fill used.
            self._release(o, qty * Decimal(o["price"]))
            self.free[quote] -= cost
            fee, fee_asset = qty * self.fee_rate, base
            self.free[base] += qty - fee
        else:
            self._release(o, qty)
            self.free[base] -= qty
            fee, fee_asset = cost * self.fee_rate, quote
            self.free[quote] += cost - fee
        o["executedQty"] = _fmt(Decimal(o["executedQty"]) + qty)
        o["cummulativeQuoteQty"] = _fmt(Decimal(o["cummulativeQuoteQty"]) + cost)
        o["status"] = "FILLED" if Decimal(o["executedQty"]) >= Decimal(o["origQty"]) else "PARTIALLY_FILLED"
        o["updateTime"] = when or int(time.time() * 1000)
        trade = {"symbol": o["symbol"], "id": next(self._trade_ids), "orderId": o["orderId"],
                 "orderListId": o["orderListId"], "price": _fmt(price), "qty": _fmt(qty), "quoteQty": _fmt(cost),
                 "commission": _fmt(fee), "commissionAsset": fee_asset, "time": o["updateTime"],
                 "isBuyer": o["side"] == "BUY", "isMaker": False, "isBestMatch": True}
        self.trades.append(trade)
        o.setdefault("fills", []).append({"price": trade["price"], "qty": trade["qty"],
                                          "commission": trade["commission"],
                                          "commissionAsset": fee_asset, "tradeId": trade["id"]})
        if o["status"] == "FILLED" and o["orderListId"] != -1:
            self._end_list(o["orderListId"], "EXPIRED", o["updateTime"])  # one leg done: the other expires

    def _release(self, o: dict, amount: Decimal | None = None) -> None:
        """Unlock ``amount`` (all that is left when None) of the balance the order (or its list) locked."""
        lock = o.get("_lock")
        if not lock:
            return
        amount = lock["amount"] if amount is None else min(amount, lock["amount"])
        lock["amount"] -= amount
        self.locked[lock["asset"]] -= amount
        self.free[lock["asset"]] += amount

    def _end_list(self, list_id: int, status: str, when: int) -> None:
        for leg in self.order_lists[list_id]["legs"]:
            if leg["status"] in ("NEW", "PARTIALLY_FILLED"):
                leg["status"], leg["updateTime"] = status, when
        self._release(self.order_lists[list_id]["legs"][0])
        self.order_lists[list_id].update(listStatusType="ALL_DONE", listOrderStatus="ALL_DONE",
                                         transactionTime=when)

    def _validate(self, q: dict, otype: str) -> tuple[Decimal, Decimal, Decimal | None]:
        """Quantity, price and stop price of one order (or list leg), through Binance's filters."""
        def need(name: str) -> str:
            if not q.get(name):
                raise BinanceError((ERR_MANDATORY[0], ERR_MANDATORY[1].format(name)))
            return q[name]

        if otype not in MARKET["orderTypes"]:
            raise BinanceError(ERR_ORDER_TYPE)
        qty = Decimal(need("quantity"))
        limit_priced = otype in ("LIMIT", "LIMIT_MAKER", "STOP_LOSS_LIMIT", "TAKE_PROFIT_LIMIT")
        price = Decimal(need("price")) if limit_priced else self.price
        stop = Decimal(need("stopPrice")) if otype in ("STOP_LOSS_LIMIT", "TAKE_PROFIT_LIMIT") else None
        filters = {f["filterType"]: f for f in MARKET["filters"]}
        lot, pf, notional = filters["LOT_SIZE"], filters["PRICE_FILTER"], filters["NOTIONAL"]
        if qty < Decimal(lot["minQty"]) or qty > Decimal(lot["maxQty"]) or qty % Decimal(lot["stepSize"]):
            raise BinanceError((-1013, "Filter failure: LOT_SIZE"))
        for px in ([price] if limit_priced else []) + ([stop] if stop is not None else []):
            if px < Decimal(pf["minPrice"]) or px % Decimal(pf["tickSize"]):
                raise BinanceError((-1013, "Filter failure: PRICE_FILTER"))
        if qty * price < Decimal(notional["minNotional"]):
            raise BinanceError((-1013, "Filter failure: NOTIONAL"))
        return qty, price, stop

    def _triggered(self, otype: str, side: str, stop: Decimal, price: Decimal) -> bool:
        """Binance spot: a stop-loss sells at or below its stop (buys at or above), a take-profit the reverse."""
        falls = (otype == "STOP_LOSS_LIMIT") == (side == "SELL")
        return price <= stop if falls else price >= stop

    def _new_order(self, q: dict, cid: str, otype: str, side: str, qty: Decimal, price: Decimal,
                   stop: Decimal | None, list_id: int = -1, tif: str | None = "GTC") -> dict:
        now = int(time.time() * 1000)
        o = {"symbol": q["symbol"], "orderId": next(self._ids), "orderListId": list_id, "clientOrderId": cid,
             "price": _fmt(price if otype != "MARKET" else Decimal(0)), "origQty": _fmt(qty),
             "executedQty": _fmt(Decimal(0)), "cummulativeQuoteQty": _fmt(Decimal(0)), "status": "NEW",
             "timeInForce": tif or "GTC", "type": otype, "side": side,
             "stopPrice": _fmt(stop if stop is not None else Decimal(0)), "icebergQty": _fmt(Decimal(0)),
             "time": now, "updateTime": now, "isWorking": stop is None, "workingTime": now if stop is None else -1,
             "origQuoteOrderQty": _fmt(Decimal(0)), "selfTradePreventionMode": "NONE"}
        self.orders[o["orderId"]] = o
        self.creates += 1
        return o

    def _lock_for(self, side: str, qty: Decimal, price: Decimal) -> dict:
        asset, amount = (MARKET["quoteAsset"], qty * price) if side == "BUY" else (MARKET["baseAsset"], qty)
        self.free[asset] -= amount
        self.locked[asset] += amount
        return {"asset": asset, "amount": amount}

    def _check_cid(self, cid: str) -> None:
        if not re.match(r"^[.A-Z:/a-z0-9_-]{1,36}$", cid):
            raise BinanceError(ERR_CID)
        if any(o["clientOrderId"] == cid and o["status"] in ("NEW", "PARTIALLY_FILLED")
               for o in self.orders.values()):
            raise BinanceError(ERR_DUPLICATE)

    def _create(self, q: dict, fault: str | None) -> dict:
        for name in ("symbol", "side", "type"):
            if not q.get(name):
                raise BinanceError((ERR_MANDATORY[0], ERR_MANDATORY[1].format(name)))
        if q["symbol"] != MARKET["symbol"]:
            raise BinanceError((-1121, "Invalid symbol."))
        cid = q.get("newClientOrderId") or f"fake{next(self._ids)}"
        self._check_cid(cid)
        side, otype = q["side"], q["type"]
        qty, price, stop = self._validate(q, otype)
        if stop is not None and self._triggered(otype, side, stop, self.price):
            raise BinanceError(ERR_WOULD_TRIGGER)
        if otype == "LIMIT_MAKER" and (price >= self.price if side == "BUY" else price <= self.price):
            raise BinanceError(ERR_MAKER_TAKES)
        base, quote = MARKET["baseAsset"], MARKET["quoteAsset"]
        need_asset, need = (quote, qty * price) if side == "BUY" else (base, qty)
        if fault == "insufficient" or self.free[need_asset] < need:
            raise BinanceError(ERR_INSUFFICIENT)
        o = self._new_order(q, cid, otype, side, qty, price, stop, tif=q.get("timeInForce"))
        if otype != "MARKET":  # lock what a resting order may spend
            o["_lock"] = self._lock_for(side, qty, price)
        crosses = otype == "MARKET" or (otype == "LIMIT" and (price >= self.price if side == "BUY"
                                                              else price <= self.price))
        step = Decimal(MARKET["filters"][1]["stepSize"])
        now_ms = self._last_open_ms + self.step_ms + 1  # the market's clock: inside the candle now forming
        if crosses:
            fill_qty = (qty / 2 // step) * step if fault == "partial" else qty
            self._execute(o, fill_qty, self.price if otype == "MARKET" else min(price, self.price) if side == "BUY"
                          else max(price, self.price), now_ms)
        elif fault == "partial" and stop is None:
            self._execute(o, (qty / 2 // step) * step, price, now_ms)
        return o

    def _create_oco(self, q: dict, fault: str | None) -> dict:
        """``POST /api/v3/orderList/oco``: an above and a below leg; the list locks its quantity once."""
        for name in ("symbol", "side", "quantity", "aboveType", "belowType"):
            if not q.get(name):
                raise BinanceError((ERR_MANDATORY[0], ERR_MANDATORY[1].format(name)))
        if q["symbol"] != MARKET["symbol"]:
            raise BinanceError((-1121, "Invalid symbol."))
        side = q["side"]
        legs = []
        for pos in ("above", "below"):
            otype = q[pos + "Type"]
            leg_q = {"quantity": q["quantity"], "price": q.get(pos + "Price"), "stopPrice": q.get(pos + "StopPrice")}
            qty, price, stop = self._validate({k: v for k, v in leg_q.items() if v is not None}, otype)
            legs.append((pos, otype, qty, price, stop))
        (_, a_type, qty, a_price, a_stop), (_, b_type, _, b_price, b_stop) = legs
        # Binance: one leg is a stop-loss; for a SELL the above leg > last price > the below leg's stop.
        kinds = {a_type, b_type}
        if not kinds & {"STOP_LOSS_LIMIT"} or not kinds & {"LIMIT_MAKER", "TAKE_PROFIT_LIMIT"}:
            raise BinanceError(ERR_ORDER_TYPE)
        above = a_stop if a_stop is not None else a_price
        below = b_stop if b_stop is not None else b_price
        if not below < self.price < above:
            raise BinanceError(ERR_OCO_PRICES)
        cids = [q.get(k) or f"fake{next(self._ids)}"
                for k in ("listClientOrderId", "aboveClientOrderId", "belowClientOrderId")]
        for cid in cids[1:]:
            self._check_cid(cid)
        if any(lst["listClientOrderId"] == cids[0] and lst["listOrderStatus"] == "EXECUTING"
               for lst in self.order_lists.values()):
            raise BinanceError(ERR_DUPLICATE)
        lock_price = max(a_price, b_price) if side == "BUY" else Decimal(0)
        need_asset, need = (MARKET["quoteAsset"], qty * lock_price) if side == "BUY" else (MARKET["baseAsset"], qty)
        if fault == "insufficient" or self.free[need_asset] < need:
            raise BinanceError(ERR_INSUFFICIENT)
        list_id = next(self._list_ids)
        lock = self._lock_for(side, qty, lock_price)
        made = []
        for (pos, otype, qty_, price, stop), cid in zip(legs, cids[1:]):
            o = self._new_order(q, cid, otype, side, qty_, price, stop, list_id,
                                tif=q.get(pos + "TimeInForce") if otype != "LIMIT_MAKER" else "GTC")
            o["_lock"] = lock
            made.append(o)
        now = made[0]["time"]
        self.creates -= 1  # a list is one creation (of two orders)
        self.order_lists[list_id] = {"orderListId": list_id, "contingencyType": "OCO",
                                     "listStatusType": "EXEC_STARTED", "listOrderStatus": "EXECUTING",
                                     "listClientOrderId": cids[0], "transactionTime": now,
                                     "symbol": q["symbol"], "legs": made}
        return self.order_lists[list_id]

    def _list_reply(self, lst: dict) -> dict:
        return {**{k: v for k, v in lst.items() if k != "legs"},
                "orders": [{"symbol": o["symbol"], "orderId": o["orderId"], "clientOrderId": o["clientOrderId"]}
                           for o in lst["legs"]],
                "orderReports": [{**self._public(o), "transactTime": o["time"]} for o in lst["legs"]]}

    def _match_candle(self, open_ms: int) -> None:
        """One new candle: resting orders fill (stop-loss legs first), then the price is its close."""
        _, o_, h_, l_, c_ = candle(open_ms, self.step_ms)[:5]
        o, h, l, c = (Decimal(x) for x in (o_, h_, l_, c_))
        when = open_ms + self.step_ms // 2
        resting = [x for x in self.orders.values() if x["status"] in ("NEW", "PARTIALLY_FILLED")
                   and x["type"] != "MARKET"]
        resting.sort(key=lambda x: (x["type"] != "STOP_LOSS_LIMIT", x["orderId"]))
        for x in resting:
            if x["status"] not in ("NEW", "PARTIALLY_FILLED"):
                continue  # its list's other leg filled on this candle
            side, limit = x["side"], Decimal(x["price"])
            left = Decimal(x["origQty"]) - Decimal(x["executedQty"])
            if not x["isWorking"]:
                stop = Decimal(x["stopPrice"])
                hit = (l <= stop if side == "SELL" else h >= stop) if x["type"] == "STOP_LOSS_LIMIT" else                     (h >= stop if side == "SELL" else l <= stop)
                if not hit:
                    continue
                x["isWorking"], x["workingTime"] = True, when
                at = (min(o, stop) if side == "SELL" else max(o, stop)) if x["type"] == "STOP_LOSS_LIMIT" else                     (max(o, stop) if side == "SELL" else min(o, stop))
                if (at >= limit) if side == "SELL" else (at <= limit):  # a marketable limit: the trigger price
                    self._execute(x, left, at, when)
                continue  # gapped past its limit: it rests as a limit from the next candle on
            if side == "BUY" and l <= limit:
                self._execute(x, left, min(o, limit), when)
            elif side == "SELL" and h >= limit:
                self._execute(x, left, max(o, limit), when)
        self.price = c

    def _public(self, o: dict) -> dict:
        return {k: v for k, v in o.items() if k not in ("fills", "_lock")}

    def _find(self, q: dict) -> dict:
        if "orderId" in q:
            o = self.orders.get(int(q["orderId"]))
        elif "origClientOrderId" in q:
            o = self.order_by_cid(q["origClientOrderId"])
        else:
            raise BinanceError((-1102, "Param 'origClientOrderId' or 'orderId' must be sent, but both were empty/null!"))
        if o is None:
            raise BinanceError(ERR_NO_ORDER)
        return o

    def _cancel(self, q: dict) -> dict:
        try:
            o = self._find(q)
        except BinanceError:
            raise BinanceError(ERR_UNKNOWN_ORDER) from None
        if o["status"] not in ("NEW", "PARTIALLY_FILLED"):
            raise BinanceError(ERR_UNKNOWN_ORDER)
        now = int(time.time() * 1000)
        if o["orderListId"] != -1:  # Binance: cancelling one leg cancels the whole list
            self._end_list(o["orderListId"], "CANCELED", now)
        else:
            self._release(o)
            o["status"], o["updateTime"] = "CANCELED", now
        # Binance answers with a fresh clientOrderId for the cancel and the order's own as origClientOrderId.
        return {**self._public(o), "origClientOrderId": o["clientOrderId"],
                "clientOrderId": f"cancel{next(self._ids)}", "transactTime": o["updateTime"]}

    def _account(self) -> dict:
        return {"makerCommission": 10, "takerCommission": 10, "canTrade": True, "canWithdraw": True,
                "canDeposit": True, "updateTime": int(time.time() * 1000), "accountType": "SPOT",
                "balances": [{"asset": a, "free": _fmt(self.free[a]), "locked": _fmt(self.locked[a])}
                             for a in self.free], "permissions": ["SPOT"]}

    def _check_signature(self, headers, raw: str) -> dict:
        if headers.get("X-MBX-APIKEY") != self.api_key:
            raise BinanceError(ERR_API_KEY, 401)
        payload, _, signature = raw.rpartition("&signature=")
        want = hmac.new(self.secret.encode(), payload.encode(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(want, signature):
            raise BinanceError(ERR_SIGNATURE)
        q = dict(parse_qsl(payload))
        if abs(int(q.get("timestamp", 0)) - time.time() * 1000) > int(q.get("recvWindow", 5000)):
            raise BinanceError(ERR_RECV_WINDOW)
        return q

    # ------------------------------------------------------------------ HTTP
    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def _send(self, status: int, body: str | bytes, ctype: str = "application/json",
                      headers: dict | None = None):
                data = body.encode() if isinstance(body, str) else body
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _error(self, e: BinanceError):
                return self._send(e.status, json.dumps({"code": e.code, "msg": e.msg}))

            def do_GET(self):
                self._serve("GET")

            def do_POST(self):
                self._serve("POST")

            def do_DELETE(self):
                self._serve("DELETE")

            def _serve(self, method: str):
                parts = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length).decode() if length else ""
                raw = body if method == "POST" else parts.query
                query = dict(parse_qsl(raw))
                creating = method == "POST" and parts.path in ("/api/v3/order", "/api/v3/orderList/oco")
                with fake._lock:
                    fake.requests.append((parts.path, query))
                    fake.methods.append(method)
                    fake.times.append(time.monotonic())
                    fake._active += 1
                    fake.max_concurrent = max(fake.max_concurrent, fake._active)
                    fault = fake.faults.pop(0) if fake.faults else None
                    if creating:
                        fake.create_attempts += 1
                        if fault in (None, "pass") and fake.order_faults:
                            fault = fake.order_faults.pop(0)
                try:
                    return self._faulty(method, parts, raw, query, fault, creating)
                finally:
                    with fake._lock:
                        fake._active -= 1

            def _faulty(self, method, parts, raw, query, fault, creating):
                if fault in ("429", "418"):
                    return self._send(int(fault), json.dumps({"code": ERR_TOO_MANY[0], "msg": ERR_TOO_MANY[1]}),
                                      headers={"Retry-After": "1"})
                if fault in ("500", "502", "503"):
                    return self._send(int(fault), "<html><body>Service Unavailable</body></html>", "text/html")
                if fault == "stall":
                    time.sleep(fake.timeout_delay)
                    self.close_connection = True
                    return None
                if fault == "timeout" and not creating:
                    time.sleep(fake.timeout_delay)
                if fault in ("garbage", "nulls") and not creating:
                    return self._send(200, "this is not json" if fault == "garbage" else json.dumps({"code": 0}),
                                      "text/plain" if fault == "garbage" else "application/json")
                try:
                    status, reply = self._route(method, parts.path, raw, query, fault)
                except BinanceError as e:
                    return self._error(e)
                if creating and fault == "timeout":
                    time.sleep(fake.timeout_delay)  # accepted; the answer arrives after the client gave up
                if fault == "drop":
                    self.close_connection = True
                    return None
                if creating and fault == "garbage":
                    return self._send(200, "<html>upstream reset</html>", "text/plain")
                return self._send(status, json.dumps(reply))

            def _route(self, method: str, path: str, raw: str, query: dict, fault: str | None):
                if method == "GET" and path == "/api/v3/exchangeInfo":
                    return 200, {"timezone": "UTC", "serverTime": int(time.time() * 1000), "rateLimits": [],
                                 "symbols": [MARKET]}
                if method == "GET" and path == "/api/v3/klines":
                    step = {"1h": HOUR_MS, "15m": HOUR_MS // 4, "1d": 24 * HOUR_MS}[query.get("interval", "1h")]
                    limit = min(int(query.get("limit", 500)), 1000)
                    start = int(query.get("startTime", fake.last_open_ms - (limit - 1) * step))
                    first = max(ANCHOR_MS, ANCHOR_MS + -(-(start - ANCHOR_MS) // step) * step)
                    return 200, [candle(t, step) for t in range(first, fake.last_open_ms + 1, step)][:limit]
                signed = {("GET", "/api/v3/account"), ("POST", "/api/v3/order"), ("GET", "/api/v3/order"),
                          ("DELETE", "/api/v3/order"), ("GET", "/api/v3/openOrders"), ("GET", "/api/v3/myTrades"),
                          ("POST", "/api/v3/orderList/oco")}
                if (method, path) not in signed:
                    return 404, {"code": -1, "msg": f"fake: no route {method} {path}"}
                q = fake._check_signature(self.headers, raw)
                with fake._lock:
                    if path == "/api/v3/account":
                        return 200, fake._account()
                    if path == "/api/v3/orderList/oco":
                        return 200, fake._list_reply(fake._create_oco(q, fault))
                    if path == "/api/v3/order" and method == "POST":
                        o = fake._create(q, fault)
                        return 200, {**fake._public(o), "transactTime": o["time"], "fills": o.get("fills", [])}
                    if path == "/api/v3/order" and method == "GET":
                        if fault == "hide":
                            raise BinanceError(ERR_NO_ORDER)
                        return 200, fake._public(fake._find(q))
                    if path == "/api/v3/order":
                        return 200, fake._cancel(q)
                    if path == "/api/v3/openOrders":
                        return 200, [fake._public(o) for o in fake.orders.values()
                                     if o["status"] in ("NEW", "PARTIALLY_FILLED") and fault != "hide"
                                     and q.get("symbol") in (None, o["symbol"])]
                    return 200, [t for t in fake.trades if t["symbol"] == q.get("symbol")]

        return Handler
