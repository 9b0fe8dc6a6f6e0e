"""The exchange layer: the real ccxt.binance, through ExchangeManager, against the fake Binance on 127.0.0.1."""
from __future__ import annotations

import itertools
from decimal import Decimal
import logging
import os
import traceback
from concurrent.futures import ThreadPoolExecutor

import pytest

from fake_exchange import ANCHOR_MS, API_KEY, API_SECRET, HOUR_MS, FakeBinance
from moondev_lab.errors import (AuthError, BadExchangeResponse, BelowMinimum, ExchangeError, ExchangeStateError,
                                ExchangeTimeout, ExchangeUnavailable, InsufficientFunds, MoondevError,
                                OrderInFlight, OrderNotFound, OrderRejected, RateLimited, ReconciliationError,
                                TemporaryExchangeError, UnknownExchange)
from moondev_lab.exchange import (ClientOrderId, ConnectionPool, Credentials, ExchangeManager, Order, OrderState,
                                  OrderStateError, RetryPolicy, State, load_credentials, save_credentials)
from moondev_lab.exchange.manager import _ALLOWED
from moondev_lab.exchange.orders import _NEXT

pytestmark = pytest.mark.timeout(60)
SYM = "BTC/USDT"
CREDS = Credentials("binance", api_key=API_KEY, secret=API_SECRET, source="test")
_seq = itertools.count()


def cid(strategy: str = "sma_cross") -> ClientOrderId:
    return ClientOrderId.make(strategy, ANCHOR_MS + HOUR_MS * 100, next(_seq))


@pytest.fixture
def fake():
    with FakeBinance(timeout_delay=0.8) as f:
        yield f


class Sleeps(list):
    """Records the backoff delays instead of sleeping them."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def manager(fake, *, credentials=CREDS, retry=RetryPolicy(attempts=4, base_delay=0.1), start=True, **kw):
    config = {"enableRateLimit": False, "timeout": 400, **kw.pop("config", {})}
    m = ExchangeManager("binance", credentials=credentials, api_url=fake.url, config=config, retry=retry,
                        lookup_delay=0, sleep=kw.pop("sleep", Sleeps()), **kw)
    return m.start() if start else m


# ---------------------------------------------------------------------------------------------- lifecycle
def test_constructor_does_no_io_and_start_connects(fake):
    m = manager(fake, start=False)
    assert m.state == State.NEW and fake.requests == [] and m._ex is None
    m.start()
    assert m.state == State.READY
    assert [p for p, _ in fake.requests] == ["/api/v3/exchangeInfo", "/api/v3/account"]  # markets, then keys
    assert m.transitions == [(State.NEW, State.CONNECTING), (State.CONNECTING, State.READY)]
    assert m.start() is m and len(fake.requests) == 2  # idempotent
    m.close()
    assert m.state == State.CLOSED
    with pytest.raises(ExchangeStateError, match="closed"):
        m.fetch_ohlcv(SYM, "1h", limit=3)
    with pytest.raises(ExchangeStateError, match="closed"):
        m.start()


def test_every_manager_transition_is_reached(fake):
    seen: set[tuple[State, State]] = set()

    ExchangeManager("binance", api_url=fake.url).close()                      # NEW -> CLOSED
    seen.add((State.NEW, State.CLOSED))

    fake.inject("503")                                                        # start retried
    m = manager(fake)
    assert m.transitions[:5] == [(State.NEW, State.CONNECTING), (State.CONNECTING, State.ERROR),
                                 (State.ERROR, State.RETRYING), (State.RETRYING, State.CONNECTING),
                                 (State.CONNECTING, State.READY)]
    fake.inject("429")                                                        # a read retried
    assert len(m.fetch_ohlcv(SYM, "1h", limit=3)) == 3
    fake.inject(*["503"] * 4)                                                 # a read that gives up
    with pytest.raises(ExchangeUnavailable, match="gave up after 4 attempts"):
        m.fetch_ohlcv(SYM, "1h", limit=3)
    assert m.state == State.ERROR
    assert len(m.fetch_ohlcv(SYM, "1h", limit=3)) == 3                        # ERROR -> RETRYING -> READY
    assert m.state == State.READY
    seen |= set(m.transitions)
    m.close()
    seen.add(m.transitions[-1])

    bad = manager(fake, credentials=Credentials("binance", api_key=API_KEY, secret="wrong-secret-0000"), start=False)
    with pytest.raises(AuthError):
        bad.start()
    assert bad.state == State.ERROR
    bad.close()                                                               # ERROR -> CLOSED
    seen |= set(bad.transitions)

    allowed = {(a, b) for a, nexts in _ALLOWED.items() for b in nexts}
    assert seen == allowed


def test_start_that_cannot_connect_stays_in_error_and_can_be_started_again(fake):
    fake.inject(*["500"] * 4)
    m = manager(fake, start=False)
    with pytest.raises(ExchangeUnavailable, match="load_markets"):
        m.start()
    assert m.state == State.ERROR and m._sleep == [0.1, 0.2, 0.4]  # exponential backoff
    with pytest.raises(ExchangeStateError, match="start"):
        m.fetch_ohlcv(SYM, "1h")
    m.start()
    assert m.state == State.READY


# ---------------------------------------------------------------------------------------------- reads and faults
READ_FAULTS = {"429": RateLimited, "418": RateLimited, "500": ExchangeUnavailable, "503": ExchangeUnavailable,
               "timeout": ExchangeTimeout, "drop": ExchangeUnavailable, "garbage": BadExchangeResponse,
               "nulls": BadExchangeResponse}


@pytest.mark.parametrize("fault", sorted(READ_FAULTS))
@pytest.mark.parametrize("read", ["candles", "balance", "order", "open_orders"])
def test_each_fault_on_a_read_is_retried_with_the_right_error(fake, fault, read, caplog):
    m = manager(fake)
    placed = m.create_order(SYM, "limit", "buy", 0.01, 39000, client_order_id=cid())
    calls = {"candles": lambda: m.fetch_ohlcv(SYM, "1h", since=ANCHOR_MS, limit=5),
             "balance": m.fetch_balance,
             "order": lambda: m.fetch_order(placed.client_order_id, SYM),
             "open_orders": lambda: m.fetch_open_orders(SYM)}
    clean = calls[read]()
    fake.inject(fault)
    with caplog.at_level(logging.WARNING, logger="moondev_lab.exchange.manager"):
        assert calls[read]() == clean
    assert m.stats["retries"] == 1 and m.state == State.READY
    assert type(m.last_error) is READ_FAULTS[fault] and READ_FAULTS[fault].__name__ in caplog.text
    delay = m._sleep[-1]
    assert delay == (1.0 if fault in ("429", "418") else 0.1)  # 429/418 honour Retry-After (1 s)


@pytest.mark.parametrize("fault, error", sorted(READ_FAULTS.items()))
def test_a_persistent_fault_gives_up_within_the_budget(fake, fault, error):
    m = manager(fake, retry=RetryPolicy(attempts=3, base_delay=0.1))
    fake.inject(*[fault] * 3)
    before = len(fake.requests)
    with pytest.raises(error, match="gave up after 3 attempts") as info:
        m.fetch_ohlcv(SYM, "1h", since=ANCHOR_MS, limit=5)
    assert isinstance(info.value, TemporaryExchangeError) and isinstance(info.value, MoondevError)
    assert len(fake.requests) - before == 3 and m.state == State.ERROR


def test_budget_in_seconds_bounds_retries_and_418_backs_off_harder(fake):
    m = manager(fake, retry=RetryPolicy(attempts=10, base_delay=4, budget=10))
    fake.inject("503", "503", "503")
    with pytest.raises(ExchangeUnavailable, match="gave up after 2 attempts"):
        m.fetch_ohlcv(SYM, "1h", limit=2)
    assert m._sleep == [4]  # 4 s slept; the next 8 s would exceed the 10 s budget
    assert RetryPolicy(base_delay=1).delay(1, RateLimited("x", status=418)) == 8
    assert RetryPolicy(base_delay=1).delay(1, RateLimited("x", status=429)) == 2


def test_permanent_errors_are_not_retried(fake):
    m = manager(fake)
    with pytest.raises(ExchangeError, match="BadSymbol") as info:
        m.fetch_ohlcv("NOPE/USDT", "1h")
    assert not isinstance(info.value, TemporaryExchangeError)
    assert m.stats["retries"] == 0 and m.state == State.READY
    assert m.fetch_order(cid(), SYM) is None  # -2013 "Order does not exist." -> None, not an error


def test_wrong_secret_is_an_auth_error_at_start(fake):
    m = manager(fake, credentials=Credentials("binance", api_key=API_KEY, secret="not-the-secret"), start=False)
    with pytest.raises(AuthError, match="Signature for this request is not valid"):
        m.start()
    assert fake.calls("/api/v3/account") == 1  # not retried


def test_missing_keys_are_refused_without_a_request(fake, monkeypatch):
    monkeypatch.delenv("BINANCE_API_KEY", raising=False)
    monkeypatch.delenv("BINANCE_API_SECRET", raising=False)
    m = manager(fake, credentials=None)
    assert len(m.fetch_ohlcv(SYM, "1h", limit=3)) == 3  # public data needs no keys
    n = len(fake.requests)
    with pytest.raises(AuthError, match="set BINANCE_API_KEY and BINANCE_API_SECRET"):
        m.fetch_balance()
    assert len(fake.requests) == n
    with pytest.raises(AuthError, match="no API keys for binance/default"):
        manager(fake, credentials=None, require_keys=True)


def test_one_lock_serialises_threads_and_the_rate_limit_is_kept(fake):
    m = manager(fake, config={"enableRateLimit": True, "rateLimit": 60})
    start = len(fake.times)
    with ThreadPoolExecutor(4) as threads:  # an exception in any thread re-raises here
        pages = list(threads.map(lambda _: [m.fetch_ohlcv(SYM, "1h", limit=5) for _ in range(3)], range(4)))
    assert len(pages) == 4 and fake.max_concurrent == 1
    # ccxt's throttle spaces calls by rateLimit (60 ms) x the endpoint's cost (0.4 for spot klines);
    # a lower bound on the whole span (arrival jitter cancels out), not a speed assertion.
    assert len(fake.times) - start == 12 and fake.times[-1] - fake.times[start] >= 0.8 * 11 * 0.060 * 0.4


# ---------------------------------------------------------------------------------------------- orders
def test_order_states_legal_and_illegal():
    for a, b in itertools.product(OrderState, OrderState):
        o = Order(cid(), None, SYM, "buy", "limit", 1.0, 1.0, status=a)
        if a == b or b in _NEXT[a]:
            assert o.advance(b).status == b
        else:
            with pytest.raises(OrderStateError):
                o.advance(b)
    assert {s for s in OrderState if s.terminal} == {OrderState.FILLED, OrderState.CANCELED, OrderState.REJECTED}


def test_order_lifecycle_through_the_exchange(fake):
    m = manager(fake)
    c = cid()
    o = m.create_order(SYM, "limit", "buy", 0.02, 39000, client_order_id=c)
    assert o.status == OrderState.ACCEPTED and o.exchange_id and o.client_order_id == c
    fake.fill(c, qty="0.01")
    assert m.fetch_order(c, SYM).status == OrderState.PARTIALLY_FILLED
    fake.fill(c)
    done = m.fetch_order(c, SYM)
    assert done.status == OrderState.FILLED and done.filled == pytest.approx(0.02)
    assert [x for x in m._orders[c].history] == [OrderState.NEW, OrderState.SUBMITTED, OrderState.ACCEPTED,
                                                  OrderState.PARTIALLY_FILLED, OrderState.FILLED]
    c2 = cid()
    m.create_order(SYM, "limit", "sell", 0.01, 45000, client_order_id=c2)
    canceled = m.cancel_order(c2, SYM)
    assert canceled.status == OrderState.CANCELED and canceled.client_order_id == c2
    assert m.cancel_order(c2, SYM).status == OrderState.CANCELED  # a repeated cancel is harmless
    with pytest.raises(OrderNotFound):
        m.cancel_order(cid(), SYM)
    market = m.create_order(SYM, "market", "buy", 0.01, client_order_id=cid())
    assert market.status == OrderState.FILLED and market.average == pytest.approx(float(fake.price))
    assert market.history == [OrderState.NEW, OrderState.SUBMITTED, OrderState.FILLED]


def test_partial_fill_fault(fake):
    m = manager(fake)
    fake.inject_order("partial")
    o = m.create_order(SYM, "market", "buy", 0.02, client_order_id=cid())
    assert o.status == OrderState.PARTIALLY_FILLED and o.filled == pytest.approx(0.01) and o.remaining > 0


def test_insufficient_funds_is_rejected_not_retried(fake):
    m = manager(fake)
    with pytest.raises(InsufficientFunds) as info:
        m.create_order(SYM, "market", "buy", 5.0, client_order_id=cid())  # 5 BTC > 100k USDT
    assert info.value.order.status == OrderState.REJECTED
    assert info.value.order.history == [OrderState.NEW, OrderState.SUBMITTED, OrderState.REJECTED]
    fake.inject_order("insufficient")
    with pytest.raises(InsufficientFunds):
        m.create_order(SYM, "limit", "buy", 0.01, 39000, client_order_id=cid())
    assert fake.create_attempts == 2 and fake.creates == 0 and m.state == State.READY


def test_precision_truncates_and_below_minimum_is_refused_never_enlarged(fake):
    m = manager(fake)
    o = m.create_order(SYM, "limit", "buy", 0.0123456, 39000.129, client_order_id=cid())
    assert o.amount == 0.01234 and o.price == 39000.13  # amount truncated to the lot step, price to the tick
    assert fake.orders[int(o.exchange_id)]["origQty"] == "0.01234000"
    for amount, price, what in [(0.000001, 39000, "amount"), (0.0001, 39000, "order value")]:
        with pytest.raises(BelowMinimum, match=f"{what} .* below the minimum .*never enlarged") as info:
            m.create_order(SYM, "limit", "buy", amount, price, client_order_id=cid())
        assert info.value.order.status == OrderState.REJECTED
    with pytest.raises(BelowMinimum):  # a market order's reference price is checked, and not sent
        m.create_order(SYM, "market", "buy", 0.0001, 40000, client_order_id=cid())
    assert fake.create_attempts == 1
    with pytest.raises(BelowMinimum, match="NOTIONAL"):  # without a reference price the exchange refuses it
        m.create_order(SYM, "market", "buy", 0.0001, client_order_id=cid())
    assert fake.create_attempts == 2 and fake.creates == 1
    with pytest.raises(OrderRejected, match="needs a price"):
        m.create_order(SYM, "limit", "buy", 0.01, client_order_id=cid())
    with pytest.raises(ValueError, match="1-36 characters"):
        m.create_order(SYM, "limit", "buy", 0.01, 39000, client_order_id="has space")


# Fault on the order POST -> (re-sent after confirmed absent?)
ORDER_FAULTS = {"timeout": False, "drop": False, "garbage": False,   # accepted, answer lost: never re-sent
                "429": True, "418": True, "503": True, "stall": True}  # not accepted: re-sent once, same id


@pytest.mark.parametrize("fault", sorted(ORDER_FAULTS))
def test_order_with_an_unknown_outcome_is_placed_exactly_once(fake, fault):
    m = manager(fake, config={"options": {"maxRetriesOnFailure": 3}})  # asking for ccxt retries is overridden
    assert m._ex.options["maxRetriesOnFailure"] == 0
    c = cid()
    fake.inject_order(fault)
    o = m.create_order(SYM, "market", "buy", 0.01, client_order_id=c)
    assert o.status == OrderState.FILLED and o.filled == pytest.approx(0.01)
    assert fake.creates == 1 and sum(x["clientOrderId"] == c for x in fake.orders.values()) == 1
    assert fake.create_attempts == (2 if ORDER_FAULTS[fault] else 1)
    assert OrderState.IN_FLIGHT in o.history and m.trading_blocked is None
    again = m.create_order(SYM, "market", "buy", 0.01, client_order_id=c)  # same id: the same order, not a new one
    assert again.exchange_id == o.exchange_id and fake.create_attempts == (2 if ORDER_FAULTS[fault] else 1)


def test_a_lagging_order_index_then_duplicate_id_still_gives_one_order(fake):
    m = manager(fake)
    c = cid()
    fake.inject_order("timeout")             # a resting limit order is accepted, its answer lost
    fake.inject("pass", "hide", "hide")      # ...and both lookups miss it; the re-send hits "Duplicate order sent."
    o = m.create_order(SYM, "limit", "buy", 0.01, 39000, client_order_id=c)
    assert o.status == OrderState.ACCEPTED and fake.creates == 1 and fake.create_attempts == 2
    assert o.history.count(OrderState.IN_FLIGHT) == 2


def test_order_in_flight_blocks_trading_until_reconciled(fake):
    m = manager(fake, retry=RetryPolicy(attempts=2, base_delay=0.1))
    c = cid()
    fake.inject_order("timeout")
    fake.inject("pass", "503", "503")        # the lookups fail too: its fate is unknown
    with pytest.raises(OrderInFlight, match="IN_FLIGHT") as info:
        m.create_order(SYM, "market", "buy", 0.01, client_order_id=c)
    assert info.value.order.status == OrderState.IN_FLIGHT and m.trading_blocked
    with pytest.raises(ReconciliationError, match="blocked"):
        m.create_order(SYM, "market", "buy", 0.01, client_order_id=cid())
    assert fake.create_attempts == 1
    report = m.reconcile([info.value.order])
    assert [o.status for o in report.updated] == [OrderState.FILLED] and m.trading_blocked is None
    assert fake.creates == 1


def test_in_flight_order_that_never_arrived_is_rejected_by_reconciliation(fake):
    m = manager(fake, retry=RetryPolicy(attempts=2, base_delay=0.1))
    fake.inject_order("stall")
    fake.inject("pass", "503", "503")
    with pytest.raises(OrderInFlight) as info:
        m.create_order(SYM, "market", "buy", 0.01, client_order_id=cid())
    report = m.reconcile([])                  # the manager remembers its own in-flight order
    assert [o.status for o in report.missing] == [OrderState.REJECTED]
    assert report.missing[0].client_order_id == info.value.order.client_order_id and fake.creates == 0


# ---------------------------------------------------------------------------------------------- contingent orders
def oco(m, fake, amount=0.2, *, tp=1.02, sl=0.98, limit=0.975, ids=None):
    p = float(fake.price)
    ids = ids or [cid() for _ in range(3)]
    return m.create_oco(SYM, "sell", amount, take_profit=p * tp, stop_loss=p * sl, stop_limit=p * limit,
                        client_order_id=ids[0], leg_ids=(ids[1], ids[2])), ids


def test_stop_loss_limit_rests_untriggered_then_fills_on_a_candle_through_its_stop(fake):
    m = manager(fake)
    p = float(fake.price)
    o = m.create_order(SYM, "limit", "sell", 0.1, p * 0.99 - 0.004, client_order_id=cid(),
                       params={"stopLossPrice": p * 0.995 + 0.004})
    raw = fake.order_by_cid(o.client_order_id)
    assert (raw["type"], raw["status"], raw["isWorking"]) == ("STOP_LOSS_LIMIT", "NEW", False)
    assert o.trigger_price == float(raw["stopPrice"]) == round(p * 0.995 + 0.004, 2)  # through the tick size
    assert fake.locked["BTC"] == Decimal("0.1")
    for _ in range(200):
        fake.advance()
        if raw["status"] != "NEW":
            break
    assert raw["status"] == "FILLED" and raw["isWorking"]
    done = m.fetch_order(o.client_order_id, SYM)
    assert done.status == OrderState.FILLED and done.average <= o.trigger_price and done.average >= o.price
    assert fake.locked["BTC"] == 0


def test_take_profit_limit_triggers_and_a_maker_order_that_would_take_is_refused(fake):
    m = manager(fake)
    p = float(fake.price)
    # A take-profit buy (closing a short) triggers when the price falls to it; the fake's candles fall here.
    o = m.create_order(SYM, "limit", "buy", 0.1, p * 0.996, client_order_id=cid(),
                       params={"takeProfitPrice": p * 0.996})
    raw = fake.order_by_cid(o.client_order_id)
    assert (raw["type"], raw["isWorking"]) == ("TAKE_PROFIT_LIMIT", False)
    for _ in range(200):
        fake.advance()
        if raw["status"] != "NEW":
            break
    done = m.fetch_order(o.client_order_id, SYM)
    assert done.status == OrderState.FILLED and done.average <= o.trigger_price
    with pytest.raises(OrderRejected, match="Order would immediately match and take"):
        m.create_order(SYM, "limit", "buy", 0.1, float(fake.price) * 1.01, client_order_id=cid(),
                       params={"postOnly": True})  # ccxt: LIMIT_MAKER


def test_a_stop_that_would_trigger_at_once_is_rejected_with_binances_error(fake):
    m = manager(fake)
    p = float(fake.price)
    with pytest.raises(OrderRejected, match="Stop price would trigger immediately") as info:
        m.create_order(SYM, "limit", "sell", 0.1, p * 1.01, client_order_id=cid(), params={"stopLossPrice": p * 1.005})
    assert info.value.order.status == OrderState.REJECTED and fake.creates == 0
    with pytest.raises(OrderRejected, match="relationship of the prices"):
        oco(m, fake, tp=0.99)  # a sell list's take-profit must be above the price
    assert fake.creates == 0


def test_oco_locks_once_one_leg_filling_expires_the_other(fake):
    m = manager(fake)
    (tp, sl), _ = oco(m, fake, 0.5)
    assert (tp.status, sl.status) == (OrderState.ACCEPTED, OrderState.ACCEPTED)
    assert (tp.type, sl.type) == ("limit_maker", "stop_loss_limit") and fake.locked["BTC"] == Decimal("0.5")
    (tp2, sl2), _ = oco(m, fake, 0.4, tp=1.2, sl=0.8, limit=0.79)  # wide: the candles never reach it
    with pytest.raises(InsufficientFunds):  # spot: the coins are locked by the lists already
        oco(m, fake, 0.2)
    for _ in range(200):
        fake.advance()
        if not fake.order_lists[1]["listOrderStatus"] == "EXECUTING":
            break
    states = {m.fetch_order(o.client_order_id, SYM).status for o in (tp, sl)}
    assert states == {OrderState.FILLED, OrderState.CANCELED}  # EXPIRED on Binance
    assert fake.order_lists[1]["listStatusType"] == "ALL_DONE"
    # Cancelling one leg of the other list cancels both and unlocks its coins.
    m.cancel_order(sl2.client_order_id, SYM)
    assert {fake.order_by_cid(o.client_order_id)["status"] for o in (tp2, sl2)} == {"CANCELED"}
    assert fake.locked["BTC"] == 0


@pytest.mark.parametrize("fault", ["timeout", "drop", "garbage"])
def test_an_oco_whose_answer_is_lost_is_placed_exactly_once(fake, fault):
    m = manager(fake)
    fake.inject_order(fault)
    (tp, sl), ids = oco(m, fake)
    assert fake.creates == 1 and len(fake.order_lists) == 1 and fake.create_attempts == 1
    assert (tp.status, sl.status) == (OrderState.ACCEPTED, OrderState.ACCEPTED)
    assert m.stats["lookups"] >= 1
    again, _ = oco(m, fake, ids=ids)  # the same ids again: the list placed, not a second one
    assert [o.client_order_id for o in again] == ids[1:] and fake.create_attempts == 1


def test_restart_adopts_our_oco_legs_and_cancels_a_foreign_stop(fake):
    first = manager(fake, symbols=[SYM])
    (tp, sl), _ = oco(first, fake)
    first.close()
    p = float(fake.price)
    fake._create({"symbol": "BTCUSDT", "side": "SELL", "type": "STOP_LOSS_LIMIT", "quantity": "0.1",
                  "price": f"{p * 0.9:.2f}", "stopPrice": f"{p * 0.95:.2f}", "timeInForce": "GTC",
                  "newClientOrderId": "web_stop_1"}, fault=None)
    second = manager(fake, symbols=[SYM])
    report = second.reconcile([], strategy="sma_cross")
    assert sorted(o.client_order_id for o in report.adopted) == sorted([tp.client_order_id, sl.client_order_id])
    assert [o.client_order_id for o in report.canceled] == ["web_stop_1"]
    assert fake.order_by_cid("web_stop_1")["status"] == "CANCELED"


# ---------------------------------------------------------------------------------------------- restart
def test_restart_reconciliation_updates_adopts_cancels_and_ignores(fake):
    first = manager(fake, symbols=[SYM])
    resting = first.create_order(SYM, "limit", "buy", 0.01, 39000, client_order_id=cid("sma_cross"))
    filled_away = first.create_order(SYM, "limit", "buy", 0.01, 38000, client_order_id=cid("sma_cross"))
    unstored = first.create_order(SYM, "limit", "sell", 0.01, 45000, client_order_id=cid("sma_cross"))
    other_strategy = first.create_order(SYM, "limit", "sell", 0.01, 46000, client_order_id=cid("rsi_rev"))
    never_sent = Order(cid("sma_cross"), None, SYM, "buy", "limit", 0.01, 39000.0)  # stored, then a crash
    stored = [o.to_dict() for o in (resting, filled_away, never_sent)]
    first.close()

    fake.fill(filled_away.client_order_id)    # while we were away
    foreign = fake.place_foreign()

    second = manager(fake, symbols=[SYM])
    report = second.reconcile([Order.from_dict(d) for d in stored], strategy="sma_cross")
    by_cid = {o.client_order_id: o for o in report.orders}
    assert by_cid[resting.client_order_id].status == OrderState.ACCEPTED
    assert by_cid[filled_away.client_order_id].status == OrderState.FILLED
    assert by_cid[never_sent.client_order_id].status == OrderState.REJECTED
    assert [o.client_order_id for o in report.adopted] == [unstored.client_order_id]
    assert [o.client_order_id for o in report.canceled] == [foreign["clientOrderId"]]
    assert fake.order_by_cid(foreign["clientOrderId"])["status"] == "CANCELED"
    assert [o.client_order_id for o in report.ignored] == [other_strategy.client_order_id]
    assert fake.order_by_cid(other_strategy.client_order_id)["status"] == "NEW"
    assert "1 adopted, 1 canceled, 1 ignored" in repr(report)
    assert second.trading_blocked is None and fake.creates == 5  # 4 ours + the foreign one; nothing re-sent


def test_reconciliation_that_cannot_complete_refuses_to_trade(fake):
    m = manager(fake, retry=RetryPolicy(attempts=2, base_delay=0.1))
    o = m.create_order(SYM, "limit", "buy", 0.01, 39000, client_order_id=cid())
    restarted = manager(fake, retry=RetryPolicy(attempts=2, base_delay=0.1))
    fake.inject("503", "503")
    with pytest.raises(ReconciliationError, match="trading stays blocked"):
        restarted.reconcile([o])
    assert "reconciliation could not complete" in restarted.trading_blocked
    attempts = fake.create_attempts
    with pytest.raises(ReconciliationError):
        restarted.create_order(SYM, "limit", "buy", 0.01, 39000, client_order_id=cid())
    assert fake.create_attempts == attempts
    restarted.reconcile([o])
    assert restarted.trading_blocked is None
    assert restarted.create_order(SYM, "limit", "buy", 0.01, 39000, client_order_id=cid()).status == \
        OrderState.ACCEPTED


# ---------------------------------------------------------------------------------------------- keys
def test_no_key_in_reprs_logs_or_exceptions(fake, monkeypatch, caplog):
    monkeypatch.setenv("BINANCE_API_KEY", API_KEY)
    monkeypatch.setenv("BINANCE_API_SECRET", API_SECRET)
    texts = []
    with caplog.at_level(logging.DEBUG):
        m = manager(fake, credentials=None, retry=RetryPolicy(attempts=2, base_delay=0.1))
        texts += [repr(m), str(m), repr(m._credentials), repr(ConnectionPool())]
        m.fetch_balance()
        fake.inject_order("timeout")
        m.create_order(SYM, "market", "buy", 0.01, client_order_id=cid())
        for faults, call in [(["429", "429"], m.fetch_balance),
                             (["timeout", "timeout"], lambda: m.fetch_open_orders(SYM)),
                             ([], lambda: m.create_order(SYM, "market", "buy", 50.0, client_order_id=cid()))]:
            fake.inject(*faults)
            with pytest.raises(MoondevError) as info:
                call()
            texts += [str(info.value), repr(info.value), "".join(traceback.format_exception(info.value))]
        bad = manager(fake, credentials=Credentials("binance", api_key=API_KEY, secret="0" * 20), start=False)
        with pytest.raises(AuthError) as info:
            bad.start()
        texts += [str(info.value), "".join(traceback.format_exception(info.value))]
    texts.append(caplog.text)
    assert "X-MBX-APIKEY" in caplog.text and "signature=***" in caplog.text  # the wire was logged, scrubbed
    for text in texts:
        assert API_KEY not in text and API_SECRET not in text and "0" * 20 not in text


# ---------------------------------------------------------------------------------------------- credentials, pool
def test_credentials_from_env_named_accounts_and_a_private_file(monkeypatch, lab_home):
    monkeypatch.setenv("BINANCE_API_KEY", "env-key-1234")
    monkeypatch.setenv("BINANCE_API_SECRET", "env-secret-1234")
    monkeypatch.setenv("BINANCE_SUB1_API_KEY", "sub-key-1234")
    monkeypatch.setenv("BINANCE_SUB1_API_SECRET", "sub-secret-1234")
    c = load_credentials("binance")
    assert c.present and c.source == "env" and "env-key" not in repr(c) and "key set" in repr(c)
    assert load_credentials("binance", "sub1").api_key == "sub-key-1234"
    path = save_credentials("kraken", "main", "file-key-1234", "file-secret-1234")
    assert path.parent == lab_home and oct(path.stat().st_mode & 0o777) == "0o600"
    assert load_credentials("kraken", "main").secret == "file-secret-1234"
    assert not load_credentials("kraken", "other").present
    path.chmod(0o644)
    with pytest.raises(AuthError, match="readable by others.*chmod 600") as info:
        load_credentials("kraken", "main")
    assert "file-secret" not in str(info.value)
    path.write_text('[kraken.main]\napi_key = "file-key-1234\n')
    path.chmod(0o600)
    with pytest.raises(AuthError, match="not valid TOML") as info:
        load_credentials("kraken", "main")
    assert "file-key" not in str(info.value)


def test_pool_shares_one_manager_per_exchange_and_account(fake):
    with ConnectionPool(api_url=fake.url, config={"enableRateLimit": False}, credentials=CREDS) as pool:
        a = pool.get("binance")
        assert a is pool.get("binance", "default") and a.state == State.READY
        b = pool.get("binance", "sub1")
        assert b is not a and len(pool) == 2 and "binance/sub1: ready" in repr(pool)
    assert a.state == State.CLOSED and b.state == State.CLOSED and len(pool) == 0


def test_unknown_exchange_is_a_clear_error():
    with pytest.raises(UnknownExchange, match="no exchange 'nopex' registered; known: binance"):
        ExchangeManager("nopex")


def test_client_order_ids_are_deterministic_and_fit_binance():
    a = ClientOrderId.make("My Strategy: SMA/EMA cross!", "2024-03-05 10:15", 12)
    assert a == ClientOrderId.make("My Strategy: SMA/EMA cross!", "2024-03-05 10:15", 12)
    assert a != ClientOrderId.make("My Strategy: SMA/EMA cross?", "2024-03-05 10:15", 12)
    assert len(a) <= 36 and a.ours and a.seq == 12 and a.belongs_to("My Strategy: SMA/EMA cross!")
    assert str(a.bar_time) == "2024-03-05 10:15:00+00:00"
    assert not ClientOrderId("web_123").ours and ClientOrderId("web_123").seq is None
    with pytest.raises(ValueError):
        ClientOrderId.make("s", "2024-01-01", 10_000)
    roundtrip = Order.from_dict(Order(a, "7", SYM, "buy", "limit", 1, 2, status="accepted").to_dict())
    assert roundtrip.status == OrderState.ACCEPTED and roundtrip.client_order_id == a
    assert "ml-mystrate" in repr(roundtrip) and os.sep not in a
