"""ModelFactory and ClaudeModel driven through the REAL anthropic client against tests/fake_anthropic.py."""
from __future__ import annotations

import logging
import sys
import threading
import time
import traceback
import warnings
from pathlib import Path

import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fake_anthropic import FakeAnthropic, error_reply, text_reply  # noqa: E402

from moondev_lab.models import ClaudeModel, ModelFactory, ModelUnavailable, OfflineModel, TokenBucket  # noqa: E402
from moondev_lab.models._pricing import cost_usd  # noqa: E402
from strategies import sma_cross

MODEL = "claude-sonnet-4-6"
KEY = "test-key-DO-NOT-LOG-5b1e"

GOOD = sma_cross("self.buy(size=0.5)")
BUGGY = GOOD.replace("self.data.Close, self.n2", "self.data.close, self.n2")  # AttributeError at init


def fenced(code: str, before: str = "Here is the strategy:", after: str = "Good luck!") -> str:
    return f"{before}\n```python\n{code}```\n{after}"


@pytest.fixture
def fake():
    with FakeAnthropic() as server:
        yield server


@pytest.fixture
def factory(fake):
    f = ModelFactory(api_key=KEY, base_url=fake.url, max_retries=2, timeout=5.0, connect_timeout=2.0,
                     rate_per_s=100, burst=10)
    yield f
    f.close()


@pytest.fixture(scope="module")
def small_btc() -> pd.DataFrame:
    repo = Path(__file__).resolve().parents[1]
    path = repo.parent / "shared" / "data" / "BTC-USD-15m.csv"
    path = path if path.exists() else repo / "data" / "BTC-USD-15m.csv"
    df = pd.read_csv(path, skipinitialspace=True, nrows=3000)
    df.columns = [c.strip() for c in df.columns]
    df = df.loc[:, [c for c in df.columns if c and not c.startswith("Unnamed")]]
    df.index = pd.to_datetime(df.pop("datetime"))
    df.columns = ["Open", "High", "Low", "Close", "Volume"]
    return df


def backtest(code: str, name: str, data: pd.DataFrame):
    from backtesting import Backtest

    ns: dict = {}
    exec(compile(code, "<claude>", "exec"), ns)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Backtest(data, ns[name], cash=1_000_000, commission=0.001, finalize_trades=True).run()


def assert_contract_request(req, max_tokens=8192):
    body = req.body
    assert req.path == "/v1/messages"
    assert body["model"] == MODEL and body["max_tokens"] == max_tokens
    assert not {"temperature", "top_p", "top_k"} & set(body)  # anthropic >= 1 removed them
    assert "exactly ONE class" in body["system"] and "self.I(" in body["system"]
    assert "Open, High, Low, Close, Volume" in body["system"] and "Backtest(" in body["system"]
    assert "(0, 1)" in body["system"]  # the size contract
    auth = req.headers.get("x-api-key") or req.headers.get("authorization", "").removeprefix("Bearer ")
    assert auth == KEY


def test_good_code_end_to_end(fake, factory, small_btc):
    fake.add(text_reply("Research: SMA 10/30 crossover, long only.", input_tokens=200, output_tokens=50),
             text_reply(fenced(GOOD), input_tokens=900, output_tokens=400, cache_read=100))
    model = factory.get(MODEL)
    assert isinstance(model, ClaudeModel) and factory.get(MODEL) is model  # pooled
    research = model.research("10/30 SMA crossover")
    assert research.ok and "SMA 10/30" in research.text
    result = model.write_code("10/30 SMA crossover", research)
    assert result.ok, result.error
    assert result.strategy_name == "SmaCross" and result.code == GOOD and "Good luck" in result.raw
    assert backtest(result.code, result.strategy_name, small_btc)["# Trades"] > 0
    # what the fake received
    assert len(fake.message_requests) == 2
    for req in fake.message_requests:
        assert_contract_request(req)
    assert "10/30 SMA crossover" in fake.message_requests[0].body["messages"][0]["content"]
    assert "SMA 10/30 crossover, long only" in fake.message_requests[1].body["messages"][0]["content"]
    # usage and cost per call, and totals
    assert (result.usage.input_tokens, result.usage.output_tokens, result.usage.cache_read_input_tokens) == (900, 400, 100)
    assert result.usage.cost_usd == pytest.approx(cost_usd(MODEL, 900, 400, 0, 100)[0]) and result.usage.cost_known
    assert result.usage.latency_s > 0 and result.usage.step == "write_code"
    s = factory.usage_summary()
    assert s["calls"] == 2 and s["input_tokens"] == 1100 and s["output_tokens"] == 450
    assert s["cost_usd"] == pytest.approx(cost_usd(MODEL, 200, 50)[0] + cost_usd(MODEL, 900, 400, 0, 100)[0])
    assert s["by_step"]["research"]["calls"] == 1 and s["by_model"]["claude-fake-1"]["calls"] == 2


def test_buggy_code_then_fix_with_the_real_exception(fake, factory, small_btc):
    fake.add(text_reply(fenced(BUGGY)), text_reply(fenced(GOOD, before="Fixed: use Close.")))
    model = factory.get(MODEL)
    first = model.write_code("SMA cross", None)
    assert first.ok  # it parses; the bug only shows when it runs
    with pytest.raises(AttributeError) as ei:
        backtest(first.code, first.strategy_name, small_btc)
    tb = "".join(traceback.format_exception(ei.value))
    fixed = model.fix_code(first.code, type(ei.value).__name__, str(ei.value), tb)
    assert fixed.ok and fixed.code == GOOD
    assert backtest(fixed.code, fixed.strategy_name, small_btc)["# Trades"] > 0
    prompt = fake.message_requests[1].body["messages"][0]["content"]
    assert "AttributeError" in prompt and str(ei.value) in prompt and "self.data.close" in prompt
    assert "Traceback" in prompt


def test_truncated_reply_is_refused(fake, factory):
    cut = "```python\n" + GOOD[: len(GOOD) // 2]
    fake.add(text_reply(cut, stop_reason="max_tokens", output_tokens=8192))
    result = factory.get(MODEL).write_code("SMA cross", None)
    assert not result.ok and result.code == ""
    assert "truncated reply (stop_reason=max_tokens" in result.error
    assert result.raw == cut and result.usage.output_tokens == 8192  # still billed, still recorded
    assert factory.usage_summary()["output_tokens"] == 8192


def test_reply_without_code_block(fake, factory):
    fake.add(text_reply("I would use a moving-average crossover with a volatility filter. Good luck!"))
    result = factory.get(MODEL).write_code("SMA cross", None)
    assert not result.ok and result.error.startswith("no code block")


def test_two_strategies_or_syntax_error_are_refused(fake, factory):
    two = GOOD + "\n\nclass Other(Strategy):\n    def init(self): pass\n    def next(self): pass\n"
    fake.add(text_reply(fenced(two)), text_reply(fenced("class Broken(Strategy):\n    def init(self)\n")))
    model = factory.get(MODEL)
    r1 = model.write_code("x", None)
    assert not r1.ok and "SmaCross, Other" in r1.error
    r2 = model.write_code("x", None)
    assert not r2.ok and r2.error.startswith("code does not parse") and "line 2" in r2.error


def test_thinking_and_several_text_blocks_are_joined(fake, factory):
    code_a, code_b = GOOD[:200], GOOD[200:]
    fake.add(text_reply("Plan done.\n```python\n" + code_a, code_b + "```\n", thinking="let me think"))
    result = factory.get(MODEL).write_code("SMA cross", None)
    assert result.ok and result.code == GOOD


def test_429_and_529_then_success_pause_everyone(fake, factory, caplog):
    fake.add(error_reply(429, "slow down", retry_after=0.05), error_reply(529, "overloaded", retry_after=0.05),
             text_reply(fenced(GOOD)))
    caplog.set_level(logging.DEBUG)
    model = factory.get(MODEL)
    t0 = time.perf_counter()
    result = model.write_code("SMA cross", None)
    assert result.ok, result.error
    assert time.perf_counter() - t0 < 3.0
    reqs = fake.message_requests
    assert len(reqs) == 3 and [r.headers.get("x-stainless-retry-count") for r in reqs] == ["0", "1", "2"]
    assert factory.usage_summary()["rate_limit_pauses"] == 2 and model.retries_seen == 2
    assert "HTTP 429" in caplog.text and "HTTP 529" in caplog.text
    assert KEY not in caplog.text and KEY not in repr(model) and KEY not in repr(factory)


def test_rate_limit_exhausting_retries_is_a_clean_failure(fake, factory, caplog):
    fake.add(*[error_reply(429, "slow down", retry_after=0.05)] * 3)
    caplog.set_level(logging.DEBUG)
    result = factory.get(MODEL).write_code("SMA cross", None)
    assert not result.ok and "HTTP 429" in result.error and "RateLimitError" in result.error
    assert len(fake.message_requests) == 3  # max_retries=2: three attempts, no more
    research = factory.get(MODEL).research("x")
    assert not research.ok and "HTTP 400" in research.text  # script exhausted: 400 is not retried
    assert KEY not in caplog.text


def test_research_refuses_ideas_needing_other_data(fake, factory):
    fake.add(text_reply("NOT_BACKTESTABLE: funding rates and open interest\nThe idea needs derivatives data."))
    r = factory.get(MODEL).research("Short when funding is high")
    assert not r.ok and r.not_understood == ["funding rates and open interest"]


def test_improve_sends_stats_and_target(fake, factory):
    fake.add(text_reply(fenced(GOOD.replace("n1 = 10", "n1 = 12"))))
    stats = {"Return [%]": 3.2, "Sharpe Ratio": float("nan"), "# Trades": 17, "_trades": "not sent"}
    r = factory.get(MODEL).improve(GOOD, stats, {"metric": "Return [%]", "value": 20})
    assert r.ok and "n1 = 12" in r.code
    prompt = fake.message_requests[0].body["messages"][0]["content"]
    assert "Return [%] >= 20" in prompt and '"Sharpe Ratio": null' in prompt and "_trades" not in prompt


def test_factory_auto_and_availability(fake, monkeypatch):
    assert ModelFactory().get("auto").name == "offline"  # conftest removes ANTHROPIC_API_KEY
    f = ModelFactory()
    assert f.available("offline") and not f.available("claude") and not f.available(MODEL)
    with pytest.raises(ModelUnavailable, match="ANTHROPIC_API_KEY"):
        f.get("claude")
    assert isinstance(f.get("offline"), OfflineModel) and f.get("offline") is f.get("auto")
    # the standard environment variables are honoured
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    monkeypatch.setenv("ANTHROPIC_BASE_URL", fake.url)
    env_factory = ModelFactory(max_retries=0, timeout=5.0)
    assert env_factory.available("claude") and env_factory.resolve("auto") == ("anthropic", MODEL)
    fake.add(text_reply("research notes"))
    model = env_factory.get("auto")
    assert isinstance(model, ClaudeModel) and model.research("idea").ok
    assert fake.message_requests[0].body["model"] == MODEL
    env_factory.close()


def test_factory_pool_is_thread_safe(factory):
    got: list = []
    barrier = threading.Barrier(8)

    def grab():
        barrier.wait()
        got.append(factory.get(MODEL))

    threads = [threading.Thread(target=grab) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 8 and len({id(m) for m in got}) == 1


def test_token_bucket_paces_and_pauses_all_threads():
    bucket = TokenBucket(rate_per_s=20, burst=2)
    t0 = time.perf_counter()
    for _ in range(6):
        bucket.acquire()
    assert time.perf_counter() - t0 >= 0.18  # 2 from the burst, 4 more at 20/s
    bucket.pause(0.25)
    waits: list[float] = []
    threads = [threading.Thread(target=lambda: waits.append(bucket.acquire())) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(waits) == 3 and min(waits) >= 0.2 and bucket.pauses == 1


def test_offline_usage_is_counted_at_zero_cost():
    f = ModelFactory(api_key="")
    m = f.get("auto")
    m.write_code("20/50 SMA crossover", m.research("20/50 SMA crossover"))
    s = f.usage_summary()
    assert s["calls"] == 2 and s["cost_usd"] == 0 and s["by_model"]["offline"]["calls"] == 2
