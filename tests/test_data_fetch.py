"""The fetch path: the real ccxt.binance against a fake Binance on 127.0.0.1, with every fault."""
from __future__ import annotations

import ccxt
import pandas as pd
import pytest

from fake_exchange import ANCHOR_MS, HOUR_MS, FakeBinance, candle
from moondev_lab.data import Store
from moondev_lab.data.fetch import FetchError, fetch_ohlcv, make_exchange

SINCE = pd.Timestamp(ANCHOR_MS, unit="ms", tz="UTC")


@pytest.fixture
def fake():
    with FakeBinance(timeout_delay=1.0) as f:
        yield f


def exchange(fake, **kw):
    return make_exchange("binance", api_url=fake.url, enableRateLimit=False, timeout=kw.pop("timeout", 3000))


def run(fake, store, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("backoff", 0.0)
    return fetch_ohlcv(exchange(fake, timeout=kw.pop("timeout", 3000)), "BTC/USDT", "1h", store=store, **kw)


def test_pages_validates_and_stores_everything(fake, tmp_path):
    store = Store(tmp_path / "s")
    res = run(fake, store, since=SINCE, limit=120)
    assert res.candles == 500 and res.pages == 5 and res.retries == 0
    df = store.read("BTC/USDT", "1h")
    assert len(df) == 500 and df.index[0] == SINCE
    assert df["Open"].iloc[7] == float(candle(ANCHOR_MS + 7 * HOUR_MS)[1])
    starts = [int(q["startTime"]) for q in fake.klines_calls()]
    assert starts == [ANCHOR_MS + k * 120 * HOUR_MS for k in range(5)]  # since/limit paging, no overlap


@pytest.mark.parametrize("faults, exc_name", [
    (["429"], "DDoSProtection"),
    (["418", "503"], "DDoSProtection"),
    (["500"], "ExchangeNotAvailable"),
    (["timeout"], "RequestTimeout"),
    (["garbage"], "BadResponse"),  # 200 + non-JSON: ccxt filters its None rows away
    (["nulls"], "BadResponse"),
])
def test_each_fault_is_retried_and_nothing_is_lost(fake, tmp_path, faults, exc_name):
    store = Store(tmp_path / "s")
    fake.inject("pass", *faults)  # the first request (exchangeInfo) succeeds
    res = run(fake, store, since=SINCE, limit=200, timeout=500)
    assert res.retries == len(faults) and res.candles == 500
    assert exc_name in res.errors[0]
    store.verify("BTC/USDT", "1h")
    assert len(store.read("BTC/USDT", "1h")) == 500


def test_gives_up_clearly_and_keeps_what_it_had(fake, tmp_path):
    store = Store(tmp_path / "s")
    fake.inject("pass", "pass", *["429"] * 10)  # first page works, then the exchange keeps refusing
    with pytest.raises(FetchError, match="DDoSProtection") as e:
        run(fake, store, since=SINCE, limit=200, max_retries=2)
    assert e.value.result.candles == 200
    assert len(store.read("BTC/USDT", "1h")) == 200  # the committed page survived


def test_resumes_after_last_stored_candle_and_drops_forming_one(tmp_path):
    store = Store(tmp_path / "s")
    now_ms = int(pd.Timestamp.now(tz="UTC").value // 1_000_000)
    last_open = now_ms - now_ms % HOUR_MS  # the current, still-forming hour
    with FakeBinance(last_open_ms=last_open) as fake:
        since = pd.Timestamp(last_open - 50 * HOUR_MS, unit="ms", tz="UTC")
        first = run(fake, store, since=since, until=since + pd.Timedelta(hours=30))
        assert first.candles == 30
        again = run(fake, store, since=since)  # resumes: starts after the stored 30
        assert again.resumed_from == since + pd.Timedelta(hours=29)
        assert int(fake.klines_calls()[-1]["startTime"]) == int((since + pd.Timedelta(hours=30)).value // 1e6)
        df = store.read("BTC/USDT", "1h")
        assert df.index[-1] == pd.Timestamp(last_open - HOUR_MS, unit="ms", tz="UTC")  # forming bar not stored
        assert len(df) == 50 and df.index.is_unique


def test_client_side_errors_are_clear(fake, tmp_path):
    with pytest.raises(ValueError, match="unknown exchange"):
        make_exchange("no_such_exchange")
    with pytest.raises(ValueError, match="since"):
        run(fake, Store(tmp_path / "s"))
    with pytest.raises(ccxt.BadSymbol):
        fetch_ohlcv(exchange(fake), "NOPE/USDT", "1h", since=SINCE, store=Store(tmp_path / "s"), progress=False)
