"""The live route on spot: sl/tp, stop and limit entries as real orders, through the real ``ccxt.binance``.

The fake exchange (tests/fake_exchange.py) serves the candles and matches resting orders on
each candle it starts serving; the test moves it one candle at a time and polls the runner,
so the account and the strategy's own broker see the same bars in the same order.
"""
from __future__ import annotations

import random
import textwrap

import pytest

from fake_exchange import API_KEY, API_SECRET, HOUR_MS, FakeBinance
from moondev_lab._ccxt_route import is_leg, leg_id
from moondev_lab.exchange import ExchangeManager
from moondev_lab.exchange.credentials import Credentials
from moondev_lab.live import LiveRunner, RunnerState, StrategySource
from moondev_lab.sandbox.settings import BacktestSettings

pytestmark = pytest.mark.timeout(240)
CREDS = Credentials("binance", api_key=API_KEY, secret=API_SECRET, source="test")
SETTINGS = BacktestSettings(cash=1_000_000, commission=0.0)  # strategy units are whole BTC

BRACKET = textwrap.dedent('''
    from backtesting import Strategy

    class Bracket(Strategy):
        """Every 9 bars when flat: a market buy with a stop-loss and a take-profit; trailing stop on odd entries."""
        trail = 0
        close_every = 23

        def init(self):
            pass

        def next(self):
            c = self.data.Close[-1]
            if not self.position and not self.orders and len(self.data) % 9 == 0:
                self.buy(size=3, sl=c * 0.992, tp=c * 1.008)
            elif self.trail and self.trades and self.trades[-1].sl and c * 0.992 > self.trades[-1].sl:
                self.trades[-1].sl = c * 0.992
            elif self.position and len(self.data) % self.close_every == 0:
                self.position.close()
''')

STOP_ENTRY = textwrap.dedent('''
    from backtesting import Strategy

    class StopEntry(Strategy):
        """Stop entries above the price with a stop-loss only, limit entries below with a take-profit only; closes."""
        def init(self):
            pass

        def next(self):
            c = self.data.Close[-1]
            n = len(self.data)
            if not self.position and not self.orders:
                if n % 2:
                    self.buy(stop=c * 1.002, sl=c * 0.99, size=2)
                else:
                    self.buy(limit=c * 0.9995, tp=c * 1.003, size=2)
            elif self.orders and not self.position and n % 5 == 0:
                for o in self.orders:
                    o.cancel()
            elif self.position and n % 12 == 0:
                self.position.close()
''')

SHORT = textwrap.dedent('''
    from backtesting import Strategy

    class Shorty(Strategy):
        def init(self):
            pass

        def next(self):
            if not self.position and len(self.data) % 4 == 0:
                self.sell(size=2)
''')


def manager(fake) -> ExchangeManager:
    return ExchangeManager("binance", credentials=CREDS, api_url=fake.url, lookup_delay=0,
                           config={"enableRateLimit": False, "timeout": 2000})


def runner(code: str, name: str, fake, state_dir, **kw) -> LiveRunner:
    exchange = kw.pop("exchange", None) or manager(fake)
    return LiveRunner(StrategySource(code, kw.pop("params", {}), name), exchange, symbol="BTC/USDT",
                      timeframe="1h", state_dir=state_dir, settings=SETTINGS, warmup_bars=60, unit=0.001,
                      timeout=60, **kw)


def drive(r: LiveRunner, fake, bars: int) -> None:
    for _ in range(bars):
        fake.advance()
        r.poll()
        if r.state != RunnerState.TRADING:
            break


def orders_of(r: LiveRunner):
    frame = r.events.frame("order")
    return frame.drop_duplicates("order.client_order_id", keep="last") if not frame.empty else frame


def assert_once_each(fake) -> None:
    cids = [o["clientOrderId"] for o in fake.orders.values()]
    assert len(cids) == len(set(cids)), "an order was placed twice"


@pytest.fixture
def fake():
    with FakeBinance(balances={"BTC": "0", "USDT": "100000"}, fee_rate="0") as f:
        f.last_open_ms -= 200 * HOUR_MS  # history to start from; the test serves the rest bar by bar
        yield f


def test_sl_tp_become_an_oco_after_the_entry_and_the_account_follows_the_strategy(fake, tmp_path):
    with runner(BRACKET, "Bracket", fake, tmp_path / "s") as r:
        r.start()
        drive(r, fake, 150)
        assert r.state == RunnerState.TRADING, r.stop_reason
        legs = [o for o in fake.orders.values() if o["orderListId"] != -1]
        kinds = {(o["type"], o["status"]) for o in legs}
        # Both legs of OCO lists, and both ways out: the stop-loss leg and the take-profit leg filled.
        assert {"LIMIT_MAKER", "STOP_LOSS_LIMIT"} <= {k for k, _ in kinds}
        assert ("STOP_LOSS_LIMIT", "FILLED") in kinds and ("LIMIT_MAKER", "FILLED") in kinds
        assert ("LIMIT_MAKER", "EXPIRED") in kinds or ("STOP_LOSS_LIMIT", "EXPIRED") in kinds
        # Every leg carries our deterministic id, derived from the entry decision's.
        entries = [o for o in fake.orders.values() if o["type"] == "MARKET" and o["side"] == "BUY"]
        for e in entries:
            mine = [o for o in legs if o["clientOrderId"] in (leg_id(e["clientOrderId"], 2),
                                                              leg_id(e["clientOrderId"], 3))]
            assert len(mine) in (0, 2)
        assert_once_each(fake)
        logged = orders_of(r)  # the legs' ends are in the event log too
        legs_logged = logged[logged["order.client_order_id"].map(is_leg)]
        assert {"filled", "canceled", "accepted"} <= set(legs_logged["order.status"])
        # The account holds what the strategy's broker holds after every bar (checked each poll), and now:
        assert r.route.position() == pytest.approx(r.position)
        assert float(fake.locked["BTC"]) == pytest.approx(sum(float(o["origQty"]) for o in legs if o["status"] == "NEW") / 2)


def test_a_trailing_stop_replaces_the_oco_and_a_close_cancels_it_first(fake, tmp_path):
    with runner(BRACKET, "Bracket", fake, tmp_path / "s", params={"trail": 1}) as r:
        r.start()
        drive(r, fake, 150)
        assert r.state == RunnerState.TRADING, r.stop_reason
        lists = {}
        for o in fake.orders.values():
            if o["orderListId"] != -1:
                lists.setdefault(o["orderListId"], []).append(o["status"])
        canceled = [k for k, v in lists.items() if v == ["CANCELED", "CANCELED"]]
        assert len(canceled) >= 3  # replaced by a higher stop, or taken down before a close
        assert_once_each(fake)
        assert r.route.position() == pytest.approx(r.position)


def test_stop_and_limit_entries_with_one_contingent_order_each(fake, tmp_path):
    with runner(STOP_ENTRY, "StopEntry", fake, tmp_path / "s") as r:
        r.start()
        drive(r, fake, 150)
        assert r.state == RunnerState.TRADING, r.stop_reason
        by_type: dict[tuple, int] = {}
        for o in fake.orders.values():
            key = (o["type"], o["side"], o["status"])
            by_type[key] = by_type.get(key, 0) + 1
        assert by_type.get(("STOP_LOSS_LIMIT", "BUY", "FILLED"), 0) >= 1      # stop entries that triggered
        assert by_type.get(("STOP_LOSS_LIMIT", "SELL", "CANCELED"), 0) >= 1   # their stop-losses, cancelled ...
        assert by_type.get(("MARKET", "SELL", "FILLED"), 0) >= 1              # ... before the closes
        assert by_type.get(("LIMIT", "BUY", "FILLED"), 0) >= 1                # limit entries
        assert by_type.get(("LIMIT", "SELL", "FILLED"), 0) >= 1               # their take-profits
        assert sum(v for (t, s, st), v in by_type.items() if s == "BUY" and st == "CANCELED") >= 1  # cancels
        assert_once_each(fake)
        assert r.route.position() == pytest.approx(r.position)


def test_an_sl_filled_before_the_runner_saw_the_bar_before_it_is_not_drift(fake, tmp_path):
    with runner(BRACKET, "Bracket", fake, tmp_path / "s", params={"close_every": 10 ** 6}) as r:
        for _ in range(3):  # three times: the exchange runs ahead of the runner until a leg fills
            if r.state == RunnerState.NEW:
                r.start()
            for _ in range(60):
                drive(r, fake, 1)
                if r.route.bracket is not None and r.route.bracket.legs:
                    break
            legs = [fake.order_by_cid(c) for c in r.route.bracket.legs]
            behind = 0
            while all(o["status"] == "NEW" for o in legs):
                fake.advance()  # the runner is slow: it has not polled since
                behind += 1
            fake.advance()  # and the next bar is forming too when it finally polls
            r.poll()
            assert r.state == RunnerState.TRADING, r.stop_reason
            assert r.route.bracket is None and r.route.position() == pytest.approx(r.position) == 0
        assert behind >= 1


def test_spot_refuses_a_short_with_one_clear_error(fake, tmp_path):
    with runner(SHORT, "Shorty", fake, tmp_path / "s") as r:
        r.start()
        drive(r, fake, 10)
        assert r.state == RunnerState.STOPPED
        assert "spot cannot short" in r.stop_reason and "margin" in r.stop_reason
        refused = r.events.frame("refused")
        assert list(refused["cause"]) == ["order type"]
        assert fake.create_attempts == 0


def run_until_a_bracket(r: LiveRunner, fake) -> None:
    r.start()
    for _ in range(120):
        drive(r, fake, 1)
        if r.route.bracket is not None:
            return
    raise AssertionError("no entry with sl/tp filled")


class Crash(BaseException):
    """The process dies here (nothing after it runs)."""


def test_exclusive_orders_and_hedging_are_refused_live_before_anything_is_sent(fake, tmp_path):
    from dataclasses import replace

    from moondev_lab.live import LiveError

    for key in ("exclusive_orders", "hedging"):
        r = LiveRunner(StrategySource(BRACKET, {}, "Bracket"), manager(fake), symbol="BTC/USDT", timeframe="1h",
                       state_dir=tmp_path / key, settings=replace(SETTINGS, **{key: True}), unit=0.001)
        with r, pytest.raises(LiveError, match=f"{key}=True is not supported by the live route"):
            r.start()
    assert fake.requests == []


def test_restart_adopts_working_legs_cancels_stale_ones_and_places_missing_ones(fake, tmp_path):
    state = tmp_path / "s"
    with runner(BRACKET, "Bracket", fake, state) as r:
        run_until_a_bracket(r, fake)
        working = list(r.route.bracket.legs)
        assert len(working) == 2 and all(fake.order_by_cid(c)["status"] == "NEW" for c in working)
    # While it is down: a stale leg of this strategy (an OCO replaced before a crash) rests on the book.
    stale = str(leg_id(working[0][:-4] + "7", 3))
    fake.place_foreign(side="BUY", qty="0.01000", price="1000.00", cid=stale)
    creates = fake.creates
    with runner(BRACKET, "Bracket", fake, state) as r2:
        r2.start()
        assert r2.route.bracket is not None and r2.route.bracket.legs == working  # adopted, not re-placed
        assert all(fake.order_by_cid(c)["status"] == "NEW" for c in working) and fake.creates == creates
        assert fake.order_by_cid(stale)["status"] == "CANCELED"
        drive(r2, fake, 60)
        assert r2.state == RunnerState.TRADING, r2.stop_reason
        assert_once_each(fake)


def test_restart_places_the_sl_tp_of_an_entry_that_filled_before_a_crash(fake, tmp_path, monkeypatch):
    from moondev_lab._ccxt_route import CcxtRoute

    def die(self, bracket):
        raise Crash()

    state = tmp_path / "s"
    with monkeypatch.context() as m:
        m.setattr(CcxtRoute, "_place", die)  # dies between the entry's fill and its sl/tp
        with runner(BRACKET, "Bracket", fake, state) as r:
            with pytest.raises(Crash):
                run_until_a_bracket(r, fake)
    assert not any(o["orderListId"] != -1 for o in fake.orders.values())
    with runner(BRACKET, "Bracket", fake, state) as r2:
        r2.start()  # the crashed bar is decided again: its entry is found filled (not re-sent) ...
        drive(r2, fake, 1)  # ... and the next bar places its sl/tp
        assert sum(o["type"] == "MARKET" for o in fake.orders.values()) == 1
        legs = r2.route.bracket.legs
        assert len(legs) == 2 and all(fake.order_by_cid(c)["status"] == "NEW" for c in legs)
        drive(r2, fake, 40)
        assert r2.state == RunnerState.TRADING, r2.stop_reason
        assert_once_each(fake)


def cli_trade_live(fake, tmp_path, code: str, bars: int = 60):
    """``moondev-lab trade RUN --live --yes`` against the fake, which serves one candle each time the runner
    has finished the last one and polled again."""
    import os
    import subprocess
    import sys
    import threading

    run = tmp_path / "run"
    run.mkdir()
    (run / "strategy.py").write_text(code)
    stop = threading.Event()

    def serve_bar_by_bar():
        seen = 0
        while not stop.is_set() and seen < bars:
            calls = len(fake.klines_calls())
            if calls >= 2:
                while len(fake.klines_calls()) < calls + 2 and not stop.is_set():
                    stop.wait(0.01)
                fake.advance()
                seen += 1
            else:
                stop.wait(0.01)

    t = threading.Thread(target=serve_bar_by_bar, daemon=True)
    t.start()
    try:
        return subprocess.run([sys.executable, "-m", "moondev_lab.cli", "trade", str(run), "--live", "--yes",
                               "--symbol", "BTC/USDT", "--timeframe", "1h", "--api-url", fake.url, "--warmup", "60",
                               "--unit", "0.001", "--interval", "0.02", "--max-bars", str(bars - 5),
                               "--state", str(tmp_path / "state"), "--json"], capture_output=True, text=True,
                              timeout=180, env={**os.environ, "BINANCE_API_KEY": API_KEY,
                                                "BINANCE_API_SECRET": API_SECRET})
    finally:
        stop.set()
        t.join()


def test_cli_trade_live_places_sl_tp_as_exchange_orders(fake, tmp_path):
    import json

    r = cli_trade_live(fake, tmp_path, BRACKET)
    assert r.returncode == 0, r.stderr[-2000:] + r.stdout[-2000:]
    events = [json.loads(line) for line in r.stdout.splitlines()]
    assert events[-1]["state"] == "trading", events[-1]
    types = {e["order"]["type"] for e in events if e["event"] == "order"}
    assert {"market", "limit_maker", "stop_loss_limit"} <= types
    assert_once_each(fake)
    assert API_KEY not in r.stdout + r.stderr and API_SECRET not in r.stdout + r.stderr


def test_cli_trade_live_stops_on_a_short_and_says_spot_cannot_short(fake, tmp_path):
    import json

    r = cli_trade_live(fake, tmp_path, SHORT, bars=12)
    assert r.returncode == 1, r.stderr[-2000:]
    events = [json.loads(line) for line in r.stdout.splitlines()]
    assert [e["event"] for e in events if e["event"] in ("refused", "stopped")] == ["refused", "stopped"]
    assert events[-1]["state"] == "stopped" and "spot cannot short" in events[-1]["stop_reason"]
    assert fake.create_attempts == 0 and "Traceback" not in r.stderr


def dying_manager(fake, k: int, after: bool) -> ExchangeManager:
    """A manager whose process dies at its k-th order call: before the request, or after the exchange took it."""
    m, calls = manager(fake), [0]
    for name in ("create_order", "create_oco", "cancel_order"):
        def call(*args, _real=getattr(m, name), **kw):
            calls[0] += 1
            if calls[0] == k and not after:
                raise Crash()
            out = _real(*args, **kw)
            if calls[0] == k:
                raise Crash()
            return out
        setattr(m, name, call)
    return m


@pytest.mark.parametrize("seed", [5, 1])
def test_crashes_at_random_order_calls_never_double_an_order_nor_leave_a_position_unguarded(fake, tmp_path, seed):
    rng, state, crashes = random.Random(seed), tmp_path / "s", 0
    for trial in range(20):
        exchange = dying_manager(fake, rng.randint(1, 8), after=rng.random() < 0.5)
        try:
            with runner(BRACKET, "Bracket", fake, state, params={"trail": 1}, exchange=exchange) as r:
                r.start()
                r.poll()  # as run() does: the bars that closed while it was down, before the market moves on
                drive(r, fake, 12)
                assert r.state == RunnerState.TRADING, f"trial {trial}: {r.stop_reason}"
        except Crash:
            crashes += 1
    assert crashes >= 12
    with runner(BRACKET, "Bracket", fake, state, params={"trail": 1}) as r:
        r.start()
        drive(r, fake, 30)
        assert r.state == RunnerState.TRADING, r.stop_reason
        assert r.route.position() == pytest.approx(r.position)
        if r.position:  # a position the strategy holds with a stop has its stop on the exchange
            assert r.route.bracket is not None and r.route.bracket.legs
            assert all(fake.order_by_cid(c)["status"] == "NEW" for c in r.route.bracket.legs)
    assert_once_each(fake)
