"""A model outage is told by the exception's type, through the real anthropic client against a fake API.

Recorded as ``model_unavailable``, retried later, never charged to the idea's failure budget.
"""
from __future__ import annotations

import pytest

from fake_anthropic import FakeAnthropic, error_reply, reset_reply, text_reply
from moondev_lab.ledger import Ledger
from moondev_lab.models import ModelFactory, ModelUnavailable, OfflineModel
from moondev_lab.models._outage import outage_reason, register_outage
from moondev_lab.models.spec import ResearchResult
from moondev_lab.rbi import RBI, RBIConfig
from moondev_lab.sandbox import SandboxPool
from strategies import sma_cross

IDEA = "10/30 SMA cross"
GOOD = "```python\n" + sma_cross("self.buy(size=0.5)") + "```\n"
RETRIES = 1  # the SDK's own retries: two attempts per call


@pytest.fixture(scope="module")
def sandbox():
    with SandboxPool(1) as pool:
        yield pool


def cfg() -> RBIConfig:
    return RBIConfig(start="2023-03-01", end="2023-03-31", max_optimize=0, grid=False, quarters=False, timeout=60)


def claude(fake: FakeAnthropic):
    factory = ModelFactory(api_key="test-key", base_url=fake.url, rate_per_s=100, burst=100, max_retries=RETRIES,
                           timeout=5)
    return factory, factory.get("claude-fake-1")


def _budget(led: Ledger):
    return led.experiment(IDEA, "BTC/USD", "15m", "claude-fake-1")


@pytest.mark.parametrize("reply, words", [
    (error_reply(529, "overloaded", retry_after=0), ("OverloadedError", "529")),
    (error_reply(500, "internal", retry_after=0), ("InternalServerError", "500")),
    (reset_reply(), ("APIConnectionError",)),
], ids=["529-overloaded", "500-server-error", "connection-reset"])
def test_outage_through_the_real_client_is_never_charged(sandbox, tmp_path, reply, words):
    led = Ledger(tmp_path / "l.sqlite", failure_budget=2)
    attempts = RETRIES + 1
    with FakeAnthropic([reply] * attempts * 3) as fake:  # three ideas' worth: more than the budget
        factory, model = claude(fake)
        with RBI(model, cfg(), led, sandbox, factory) as rbi:
            for _ in range(3):
                res = rbi.run_one(IDEA)
                assert res.status == "failed" and res.error_kind == "model_unavailable", res.error
                assert res.error.startswith("research: ") and all(w in res.error for w in words), res.error
        assert len(fake.message_requests) == attempts * 3  # the SDK retried, then the loop gave up on the call
    exp = _budget(led)
    assert exp.status == "retry" and exp.failures == 0 and led.may_run(exp)
    # The API is back: the same idea runs, and is done.
    with FakeAnthropic([text_reply("SMA crossover: fast 10, slow 30."), text_reply(GOOD)]) as fake:
        factory, model = claude(fake)
        with RBI(model, cfg(), led, sandbox, factory) as rbi:
            assert rbi.run_one(IDEA).status == "ok"
    assert led.experiment_by_id(exp.id).status == "done"


def test_a_refused_request_is_not_an_outage(sandbox, tmp_path):
    """HTTP 400 is the request's fault, not the network's: charged like any failure."""
    led = Ledger(tmp_path / "l.sqlite", failure_budget=2)
    with FakeAnthropic([error_reply(400, "bad request")]) as fake:
        factory, model = claude(fake)
        with RBI(model, cfg(), led, sandbox, factory) as rbi:
            res = rbi.run_one(IDEA)
    assert res.error_kind != "model_unavailable" and "400" in res.error
    assert _budget(led).failures == 1


class _Scripted(OfflineModel):
    """The offline model, whose research step raises or returns what a test says."""

    def __init__(self, research):
        super().__init__()
        self.name = "claude-fake-1"
        self._research = research

    def research(self, idea: str):
        return self._research()


def _raise(exc):
    def go():
        raise exc
    return go


@pytest.mark.parametrize("research, outage", [
    (_raise(ConnectionResetError(104, "Connection reset by peer")), True),
    (_raise(TimeoutError("timed out")), True),
    (_raise(ModelUnavailable("no key")), True),
    (_raise(ValueError("a bug in the model client")), False),
    # The same words as an outage, but no exception: text is never matched.
    (lambda: ResearchResult(False, "API connection failed after retries (APIConnectionError)"), False),
], ids=["reset", "timeout", "unavailable", "bug", "text-only"])
def test_outage_is_told_by_type_never_by_text(sandbox, tmp_path, research, outage):
    led = Ledger(tmp_path / "l.sqlite", failure_budget=2)
    with RBI(_Scripted(research), cfg(), led, sandbox) as rbi:
        res = rbi.run_one(IDEA)
    assert res.status == "failed"
    assert (res.error_kind == "model_unavailable") is outage, res.error
    assert _budget(led).failures == (0 if outage else 1)


def test_registry_most_specific_class_and_causes():
    import anthropic
    import httpx

    request = httpx.Request("POST", "http://127.0.0.1/v1/messages")
    timeout = anthropic.APITimeoutError(request)
    assert outage_reason(timeout).startswith("API timed out (APITimeoutError")  # not its parent's reason
    not_implemented = anthropic.HTTPNotImplementedError("nope", response=httpx.Response(501, request=request),
                                                        body=None)
    assert outage_reason(not_implemented) is None  # an InternalServerError, yet retrying will not help
    wrapped = RuntimeError("the client gave up")
    wrapped.__cause__ = ConnectionRefusedError(111, "refused")
    assert "ConnectionRefusedError" in outage_reason(wrapped)
    handled = RuntimeError("raised while handling")
    handled.__context__ = ConnectionRefusedError(111, "refused")  # implicit context: not its cause
    assert outage_reason(handled) is None

    class Down(Exception):
        pass

    register_outage(Down, "our gateway is down")
    assert outage_reason(Down()) == "our gateway is down (Down)"


def test_classifying_an_offline_failure_does_not_import_anthropic():
    """Only an imported anthropic can have raised its errors: an offline run never pays its import to classify."""
    import subprocess
    import sys

    probe = ("import sys\n"
             "from moondev_lab.models._outage import outage_reason\n"
             "assert outage_reason(ValueError('x')) is None\n"
             "assert 'anthropic' not in sys.modules, 'classifying imported anthropic'\n"
             "import anthropic, httpx\n"
             "req = httpx.Request('POST', 'http://127.0.0.1/v1/messages')\n"
             "print(outage_reason(anthropic.APIConnectionError(request=req)))\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "API connection failed (APIConnectionError)"
