"""The live runner and parity: backtest trades == a bar-by-bar replay through the sandboxed live path.

Most families run on a 6,000-bar slice of the bundled BTC 15m data (marked ``slice``);
the SMA cross, the MACD short with an ATR trailing stop and the hand-written limit/stop
strategy run on all 31,066 bars (marked ``full``).
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from moondev_lab.data import DataPool
from moondev_lab.exchange.orders import ClientOrderId
from moondev_lab.live import REPLAY_CHUNK, LiveError, LiveRunner, RunnerState, StrategySource, load_strategy
from moondev_lab.models import OfflineModel
from moondev_lab.paper import PaperExchange
from moondev_lab.parity import LOOK_AHEAD, ROUNDING, check_parity, format_table
from moondev_lab.risk import RiskLimits
from moondev_lab.sandbox.settings import BacktestSettings
from strategies import SMA_CROSS

ROOT = Path(__file__).resolve().parents[1]
IDEAS = [
    "20/50 SMA crossover",
    "Enter long when the 9 EMA crosses above the 21 EMA, 3% take profit, 1.5% stop loss",
    "Buy when RSI(14) < 30, sell when RSI > 70, 2% stop",
    "Bollinger band mean reversion",
    "MACD signal cross with 1.5 ATR stop",
    "Short when MACD crosses below its signal line, 2x ATR trailing stop",
    "20-bar Donchian breakout with volume above 1.5x average",
    "Keltner channel breakout, long and short, 2% take profit",
    "Bollinger squeeze breakout, exit after 20 bars",
    "Buy when Chaikin money flow turns positive, 3% trailing stop",
    "Go long when price crosses above VWAP and short when it crosses below",
    "Vortex indicator cross with a 2 ATR stop and 3 ATR target",
    "Buy when OBV is above its 20-bar average",
]
FULL_IDEAS = {"Short when MACD crosses below its signal line, 2x ATR trailing stop"}

HAND_WRITTEN = '''
import numpy as np
import pandas as pd
from backtesting import Strategy


class LimitStopClose(Strategy):
    """Limit entries below, stop entries above, stop-limits, SL/TP, cancels; run with trade_on_close."""

    def init(self):
        self.sma = self.I(lambda c: pd.Series(c).rolling(20).mean().to_numpy(), self.data.Close)

    def next(self):
        c = self.data.Close[-1]
        for order in self.orders:
            if not order.is_contingent and len(self.data) % 7 == 0:
                order.cancel()
        if not self.position and not self.orders:
            if c > self.sma[-1]:
                self.buy(stop=c * 1.01, sl=c * 0.97, tp=c * 1.06, size=0.5)
                self.buy(limit=c * 0.99, stop=c * 1.002, sl=c * 0.95, size=0.3)
            else:
                self.sell(limit=c * 1.01, sl=c * 1.04, tp=c * 0.95, size=0.4)
        elif self.position and len(self.data) % 50 == 0:
            self.position.close()
'''

LOOK_AHEAD_CODE = SMA_CROSS.replace(
    "self.a = self.I(talib.SMA, self.data.Close, self.n1)",
    "self.a = self.I(lambda c: pd.Series(talib.SMA(c, self.n1)).shift(-1).to_numpy(), self.data.Close)",
).replace("import talib", "import talib\nimport pandas as pd")


@pytest.fixture(scope="module")
def btc(tmp_path_factory) -> pd.DataFrame:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOONDEV_LAB_HOME", str(tmp_path_factory.mktemp("btc-home")))
        return DataPool().get("BTC/USD", "15m")


def _family_code(idea: str) -> tuple[str, str]:
    model = OfflineModel()
    research = model.research(idea)
    code = model.write_code(idea, research)
    assert code.ok, code.error
    return code.code, code.strategy_name


def _assert_parity(report) -> None:
    assert report.ok, report.summary() + "\n" + format_table(report)
    assert report.n_backtest == report.n_live > 0


# ---------------------------------------------------------------- parity
def test_parity_sma_cross_full_series(btc):  # full
    report = check_parity(StrategySource(SMA_CROSS, {}, "SmaCross"), btc)
    assert len(btc) == 31_066 and report.bars == 31_066
    _assert_parity(report)
    assert report.backtest_start == report.live_start == 30


@pytest.mark.parametrize("idea", IDEAS)
def test_parity_offline_families(idea, btc):  # slice (6,000 bars), full for FULL_IDEAS
    code, name = _family_code(idea)
    data = btc if idea in FULL_IDEAS else btc.iloc[:6000]
    _assert_parity(check_parity(StrategySource(code, {}, name), data))


@pytest.mark.parametrize("settings", [BacktestSettings(trade_on_close=True),
                                      BacktestSettings(trade_on_close=True, spread=0.0005, exclusive_orders=True)],
                         ids=["trade_on_close", "toc-spread-exclusive"])
def test_parity_hand_written_limit_stop_trade_on_close(settings, btc):  # full for the first, slice for the second
    data = btc if not settings.exclusive_orders else btc.iloc[:6000]
    _assert_parity(check_parity(StrategySource(HAND_WRITTEN, {}, "LimitStopClose"), data, settings))


def test_look_ahead_is_caught_and_named(btc):
    report = check_parity(StrategySource(LOOK_AHEAD_CODE, {}, "SmaCross"), btc.iloc[:3000])
    assert not report.ok
    causes = [c["cause"] for c in report.causes]
    assert causes[0] == LOOK_AHEAD
    assert "looks ahead" in report.causes[0]["detail"] and "λ(C)" in report.causes[0]["detail"]


def test_short_window_is_named_warm_up_not_look_ahead(btc):
    code = SMA_CROSS.replace("talib.SMA, self.data.Close, self.n2", "talib.EMA, self.data.Close, 200")
    report = check_parity(StrategySource(code, {}, "SmaCross"), btc.iloc[:1500], window=64)
    findings = {f["cause"] for f in report.indicator_findings}
    assert LOOK_AHEAD not in findings
    # The window doubles itself until the EMA agrees; any value computed before that is a warm-up cause.
    assert findings <= {"warm-up length"}


HALF_EQUITY = SMA_CROSS.replace("self.buy()", "self.buy(size=0.5)")


def _gapped(frame: pd.DataFrame, gap: float = 0.005) -> pd.DataFrame:
    """Each bar opens up to ``gap`` away from the last close (an exchange's session gaps)."""
    out = frame.copy()
    wave = gap * np.sin(np.arange(len(out)) * 0.7)
    out["Open"] = (out["Close"].shift(1) * (1 + wave)).fillna(out["Open"])
    out["High"], out["Low"] = out[["High", "Open"]].max(axis=1), out[["Low", "Open"]].min(axis=1)
    return out


def test_units_decided_at_the_close_are_tagged_unit_rounding(btc):
    # Live orders need a quantity when sent: half the equity in units at the decision bar's close. The
    # backtest counts units at the fill (the next open); where the open gaps, a trade differs by one unit.
    assert HALF_EQUITY != SMA_CROSS
    data = _gapped(btc.iloc[:3000])
    _assert_parity(check_parity(StrategySource(HALF_EQUITY, {}, "SmaCross"), data))  # sized at the fill
    report = check_parity(StrategySource(HALF_EQUITY, {}, "SmaCross"), data, live_sizing=True)
    assert not report.ok
    row = report.table.iloc[report.first_difference]
    assert row["bt_EntryBar"] == row["live_EntryBar"] and abs(row["bt_Size"] - row["live_Size"]) == 1
    assert [c["cause"] for c in report.causes] == [ROUNDING], report.causes
    assert f"trade #{report.first_difference}" in report.causes[0]["detail"]


# ---------------------------------------------------------------- the runner
def _runner(tmp_path, data, code=SMA_CROSS, **kw) -> tuple[LiveRunner, PaperExchange]:
    paper = PaperExchange(kw.pop("paper_path", None), symbol="BTC/USD").start()
    runner = LiveRunner(StrategySource(code, {}, "SmaCross"), paper, symbol="BTC/USD",
                        state_dir=tmp_path / "state", warmup_bars=0, **kw)
    return runner, paper


def test_risk_limit_refuses_orders_and_logs_them(tmp_path, btc):
    runner, paper = _runner(tmp_path, btc, limits=RiskLimits(max_order_value=1000.0))
    with runner:
        runner.replay(btc.iloc[:800])
        refused = runner.events.frame("refused")
        assert runner.counts["orders"] == 0 and len(refused) == 1
        assert refused["reason"].str.contains("max_order_value").all()
        assert runner.state == RunnerState.STOPPED and "max_order_value" in runner.stop_reason
        assert paper.trades().empty and not paper.open_orders()


def test_kill_file_stops_trading(tmp_path, btc):
    runner, paper = _runner(tmp_path, btc)
    with runner:
        runner.replay(btc.iloc[:400], finalize=False)
        orders = runner.counts["orders"]
        assert orders > 0
        (tmp_path / "state" / "KILL").write_text("stop")
        runner.feed(btc.iloc[:1200])
        assert runner.state == RunnerState.STOPPED and "kill file" in runner.stop_reason
        assert runner.counts["orders"] == orders
        assert len(runner.events.frame("stopped")) == 1


def test_sigterm_engages_the_kill_switch(tmp_path, btc):
    runner, paper = _runner(tmp_path, btc)
    with runner:
        runner.start(btc.iloc[:1])
        os.kill(os.getpid(), signal.SIGTERM)
        runner.feed(btc.iloc[:600])
        assert runner.state == RunnerState.STOPPED and "SIGTERM" in runner.stop_reason
        assert runner.counts["orders"] == 0


def test_daily_loss_limit_engages_the_kill_switch(tmp_path, btc):
    runner, _ = _runner(tmp_path, btc, limits=RiskLimits(max_daily_loss=1.0))
    with runner:
        runner.replay(btc.iloc[:3000])
        assert runner.state == RunnerState.STOPPED and "daily loss" in runner.stop_reason


def test_strategy_error_stops_with_a_clear_message(tmp_path, btc):
    bad = SMA_CROSS.replace("if crossover(self.a, self.b):", "if len(self.data) > 100: raise ValueError('boom')\n"
                                                             "        if crossover(self.a, self.b):")
    runner, _ = _runner(tmp_path, btc, code=bad)
    with runner:
        runner.replay(btc.iloc[:500])
        assert runner.state == RunnerState.STOPPED and "boom" in runner.stop_reason


def test_restart_resumes_without_doubling(tmp_path, btc):
    data = btc.iloc[:2000]
    ref, ref_paper = _runner(tmp_path / "ref", data)
    with ref:
        ref.replay(data, finalize=False)
    expected = ref_paper.trades()
    path = tmp_path / "paper.sqlite"
    for end in (700, 1300, 2000):
        runner, paper = _runner(tmp_path, data, paper_path=path)
        with runner:
            runner.replay(data.iloc[:end], finalize=False)
        paper.close()
    paper = PaperExchange(path, symbol="BTC/USD").start()
    pd.testing.assert_frame_equal(paper.trades(), expected)
    assert len(paper.orders_frame()) == len(ref_paper.orders_frame())


@pytest.mark.parametrize("durable", [False, True], ids=["in-memory", "sqlite"])
def test_long_runs_keep_only_a_trailing_window_and_open_orders_in_memory(tmp_path, btc, durable):
    data = btc.iloc[:4000]
    runner, paper = _runner(tmp_path, data, window=200, paper_path=tmp_path / "paper.sqlite" if durable else None)
    with runner:
        runner.replay(data, finalize=False)
        assert runner.counts["bars"] == len(data) - 1 and runner.counts["orders"] > 20  # (bar 0 starts it)
        assert runner.history_bars == 200 and len(runner._times) <= 2 * runner.history_bars
        assert len(paper._orders) == len(paper.open_orders()) <= 3      # finished orders left memory
        orders = paper.orders_frame()
        assert len(orders) >= runner.counts["orders"] and (orders["status"] == "filled").sum() > 20
        assert len(paper.fills()) == runner.counts["fills"]              # every fill, read back from SQLite
        first = orders.iloc[0]
        assert paper.fetch_order(first["client_order_id"], "BTC/USD").status.value == first["status"]
        assert paper.client_order_id(int(first["meta_ordinal"])) == first["client_order_id"]
        again = paper.create_order("BTC/USD", "market", "buy", 1, client_order_id=first["client_order_id"])
        assert again.status.value == first["status"] and len(paper.orders_frame()) == len(orders)  # not re-sent
    paper.close()


def test_session_reports_its_isolation_layers(tmp_path, btc):
    runner, _ = _runner(tmp_path, btc)
    with runner:
        runner.start(btc.iloc[:50])
        layers = runner.session.layers
        assert layers["namespaces"].startswith("on (user, pid, network, mount, IPC")
        assert layers["rlimits"].startswith("on (memory 2048 MiB") and {"landlock", "seccomp"} <= set(layers)
        assert runner.events.frame("start")["layers.namespaces"].iloc[0] == layers["namespaces"]


def test_a_state_folder_of_another_strategy_is_refused(tmp_path, btc):
    runner, _ = _runner(tmp_path, btc)
    with runner:
        runner.replay(btc.iloc[:200])
    other = SMA_CROSS.replace("n1 = 10", "n1 = 12")
    runner, _ = _runner(tmp_path, btc, code=other)
    with runner, pytest.raises(LiveError, match="another strategy"):
        runner.start(btc.iloc[:200])


KILL_SCRIPT = textwrap.dedent('''
    import sys
    sys.path.insert(0, {tests!r})
    from moondev_lab.data import DataPool
    from moondev_lab.live import LiveRunner, StrategySource
    from moondev_lab.paper import PaperExchange
    from strategies import SMA_CROSS
    data = DataPool().get("BTC/USD", "15m").iloc[:{n}]
    paper = PaperExchange({path!r}, symbol="BTC/USD").start()
    code = SMA_CROSS.replace("n1 = 10", "n1 = 3").replace("n2 = 30", "n2 = 8")
    with LiveRunner(StrategySource(code, {{}}, "SmaCross"), paper, symbol="BTC/USD", state_dir={state!r},
                    warmup_bars=0) as r:
        r.start(data)
        for end in range(32, {n} + 32, 32):  # progress lines let the test kill at a chosen point of the work
            r.feed(data.iloc[:end], chunk=32)
            print("AT", end, flush=True)
    print("DONE", flush=True)
''')


def test_kill_minus_nine_at_random_points_loses_and_doubles_nothing(tmp_path, btc):
    n = 2500
    code = SMA_CROSS.replace("n1 = 10", "n1 = 3").replace("n2 = 30", "n2 = 8")
    ref_paper = PaperExchange(None, symbol="BTC/USD").start()
    with LiveRunner(StrategySource(code, {}, "SmaCross"), ref_paper, symbol="BTC/USD",
                    state_dir=tmp_path / "ref", warmup_bars=0) as ref:
        ref.start(btc.iloc[:n])
        ref.feed(btc.iloc[:n])
    expected = ref_paper.trades()
    assert len(expected) > 100
    path, state = str(tmp_path / "paper.sqlite"), str(tmp_path / "state")
    script = tmp_path / "run.py"
    script.write_text(KILL_SCRIPT.format(tests=str(ROOT / "tests"), n=n, path=path, state=state))
    rng = random.Random(7)
    killed = 0
    for trial in range(20):
        proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=os.environ.copy())
        # Kill during start-up and reconciliation (k = 0), or a random moment after k more chunks: by
        # progress, not by the clock, so a fast machine cannot finish the work before the trials do.
        k = rng.randint(0, 4)
        if k == 0:
            time.sleep(rng.uniform(0.2, 1.5))
        else:
            seen = 0
            while seen < k:
                line = proc.stdout.readline()
                if not line:
                    break  # it finished (or died) first
                seen += line.startswith(b"AT ")
            time.sleep(rng.uniform(0.0, 0.05))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            killed += 1
        out, err = proc.communicate(timeout=60)
        assert proc.returncode in (0, -9), err.decode()[-2000:]
    done = subprocess.run([sys.executable, str(script)], capture_output=True, timeout=300)
    assert b"DONE" in done.stdout, done.stderr.decode()[-2000:]
    assert killed >= 10
    paper = PaperExchange(path, symbol="BTC/USD").start()
    got = paper.trades()
    pd.testing.assert_frame_equal(got, expected)          # nothing lost
    orders = paper.orders_frame()
    assert len(orders) == len(ref_paper.orders_frame())   # nothing doubled
    assert orders["client_order_id"].is_unique


# ---------------------------------------------------------------- CLI
def _cli(*args, env=None, timeout=300, input=None):
    return subprocess.run([sys.executable, "-m", "moondev_lab.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, input=input)


@pytest.fixture()
def run_dir(tmp_path) -> Path:
    d = tmp_path / "run-00001"
    d.mkdir()
    (d / "strategy.py").write_text(SMA_CROSS)
    (d / "stats.json").write_text(json.dumps({"params": {"n1": 10, "n2": 30}}))
    return d


def test_cli_parity_ok_and_mismatch(run_dir, tmp_path):
    r = _cli("parity", str(run_dir), "--end", "2023-02-15")
    assert r.returncode == 0, r.stderr
    assert "parity OK" in r.stdout
    bad = tmp_path / "look_ahead.py"
    bad.write_text(LOOK_AHEAD_CODE)
    r = _cli("parity", str(bad), "--end", "2023-02-01", "--json")
    assert r.returncode == 1
    out = json.loads(r.stdout)
    assert out["ok"] is False and out["causes"][0]["cause"] == LOOK_AHEAD


def test_cli_trade_replay_with_json_events(run_dir):
    r = _cli("trade", str(run_dir), "--replay", "2023-01-01", "2023-01-20", "--warmup", "0", "--json")
    assert r.returncode == 0, r.stderr
    events = [json.loads(line) for line in r.stdout.splitlines()]
    kinds = {e["event"] for e in events}
    assert {"start", "decision", "order", "fill", "status"} <= kinds
    assert events[-1]["state"] == "trading" and events[-1]["orders"] > 0
    r = _cli("trade", str(run_dir), "--replay", "2023-01-01", "2023-01-20", "--warmup", "0")
    assert r.returncode == 0 and r.stdout.startswith("trading | position")


@pytest.mark.parametrize("args,message", [
    (["trade", "/nonexistent"], "no such run folder"),
    (["parity", "/nonexistent"], "no such run folder"),
    (["trade", "RUN", "--live"], "confirmation"),
    (["trade", "RUN", "--live", "--replay", "2023-01-01", "2023-01-02", "--yes"], "--replay runs on the paper"),
])
def test_cli_errors_are_one_line(args, message, run_dir):
    r = _cli(*[str(run_dir) if a == "RUN" else a for a in args], input="")
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.startswith("error: ") and message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


EVERY_SIX_BARS = '''
from backtesting import Strategy


class EverySix(Strategy):
    def init(self):
        pass

    def next(self):
        if not self.position and len(self.data) % 6 == 0:
            self.buy(size=0.5)
        elif self.position and len(self.data) % 6 == 3:
            self.position.close()
'''


def test_cli_live_yes_against_fake_binance_keeps_keys_secret(run_dir, tmp_path):
    from fake_exchange import API_KEY, API_SECRET, HOUR_MS, FakeBinance

    (run_dir / "strategy.py").write_text(EVERY_SIX_BARS)
    (run_dir / "stats.json").write_text("{}")
    with FakeBinance(balances={"BTC": "0", "USDT": "100000"}, fee_rate="0") as fake:
        fake.last_open_ms -= 60 * HOUR_MS
        start_last = fake.last_open_ms

        def advance():  # new closed candles once the runner has its history
            deadline = time.monotonic() + 120
            while not fake.klines_calls() and time.monotonic() < deadline:
                time.sleep(0.05)
            while fake.last_open_ms < start_last + 60 * HOUR_MS:
                time.sleep(0.1)
                fake.last_open_ms += HOUR_MS

        import threading

        t = threading.Thread(target=advance, daemon=True)
        t.start()
        env = {"BINANCE_API_KEY": API_KEY, "BINANCE_API_SECRET": API_SECRET}
        r = _cli("trade", str(run_dir), "--live", "--yes", "--symbol", "BTC/USDT", "--timeframe", "1h",
                 "--api-url", fake.url, "--warmup", "200", "--unit", "0.001", "--interval", "0.05",
                 "--max-bars", "60", "--state", str(tmp_path / "live-state"), "--json", env=env, timeout=150)
        t.join()
        assert r.returncode == 0, r.stderr[-3000:]
        events = [json.loads(line) for line in r.stdout.splitlines()]
        orders = [e for e in events if e["event"] == "order"]
        assert orders and fake.creates == len(orders), [e for e in events if e["event"] != "order"][-5:]
        assert all(o["order"]["client_order_id"].startswith("ml-everysix-") for o in orders)
        assert {o["order"]["side"] for o in orders} == {"buy", "sell"}
        assert fake.free["BTC"] == 0 or fake.free["BTC"] > 0  # spot: never short
        assert events[-1]["state"] == "trading", events[-1]
    # No key anywhere: CLI output, the event log, the runner's state.
    blobs = [r.stdout, r.stderr] + [p.read_bytes().decode("latin-1") for p in (tmp_path / "live-state").rglob("*")
                                    if p.is_file()]
    for blob in blobs:
        assert API_KEY not in blob and API_SECRET not in blob


def test_load_strategy_reads_run_folders_and_files(run_dir, tmp_path):
    src = load_strategy(run_dir)
    assert src.name == "SmaCross" and src.params == {"n1": 10, "n2": 30}
    (tmp_path / "broken.py").write_text("class X(:\n")
    with pytest.raises(LiveError, match="not valid Python"):
        load_strategy(tmp_path / "broken.py")
    assert "SmaCross" in repr(src)


def test_a_paper_account_changed_behind_the_strategy_stops_it_as_drift(tmp_path, btc):
    # The paper replay sends the next chunk of bars before the last one is settled (pipelined), so
    # the position check is the runner's own, after each chunk: an order it never sent shows up there.
    runner, paper = _runner(tmp_path, btc)
    with runner:
        runner.replay(btc.iloc[:3000], finalize=False)
        assert runner.state == RunnerState.TRADING
        assert runner.route.position() == runner.position > 1  # long
        foreign = ClientOrderId.make("someone-else", btc.index[3000], 0)
        paper.create_order("BTC/USD", "market", "sell", 1.0, client_order_id=str(foreign))  # not the strategy's
        runner.feed(btc.iloc[:9000])
        assert runner.state == RunnerState.STOPPED and "position drift" in runner.stop_reason
        assert runner.counts["bars"] <= 3000 + REPLAY_CHUNK  # at the end of the first chunk it was in
