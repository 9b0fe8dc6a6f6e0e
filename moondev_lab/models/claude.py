"""The Anthropic-backed model: research and strategy code from Claude, with the harness contract in every prompt.

>>> from moondev_lab.models import ModelFactory
>>> model = ModelFactory().get("claude-sonnet-4-6")     # needs ANTHROPIC_API_KEY   # doctest: +SKIP
>>> res = model.research("20/50 SMA crossover")         # doctest: +SKIP
>>> model.write_code("20/50 SMA crossover", res).code   # doctest: +SKIP

What this class guarantees, whatever the reply:

* only parameters anthropic >= 1 accepts are sent (model, max_tokens, system,
  messages; no ``temperature``);
* explicit timeouts; the SDK's own retries (408/409/429/5xx/529), and a
  shared :class:`~moondev_lab.models._ratelimit.TokenBucket` that every
  thread waits on, paused for everyone after a 429/529 with ``retry-after``;
* every text block of the reply is joined (thinking blocks are skipped);
* a reply cut off at ``max_tokens`` is refused, never returned as code;
* token usage and cost are recorded per call; the API key is never logged.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any

from ..codeextract import CodeExtractionError, extract_strategy
from ..errors import MoondevError
from ._pricing import cost_usd
from ._ratelimit import TokenBucket, parse_retry_after
from .spec import CodeResult, ResearchResult, Usage

log = logging.getLogger(__name__)

DEFAULT_MODEL = "claude-sonnet-4-6"

SYSTEM_PROMPT = """You are a quantitative trading researcher who writes strategies for backtesting.py (version 0.6).

The code you write runs inside a sandboxed harness with this contract:
- Define exactly ONE class that subclasses backtesting.Strategy (`from backtesting import Strategy`), with init() and next().
- Create every indicator in init() with self.I(...), e.g. `self.rsi = self.I(talib.RSI, self.data.Close, self.rsi_n)`.
  talib, numpy, pandas and pandas_ta are available; `from backtesting.lib import crossover` is allowed.
- The data columns are exactly Open, High, Low, Close, Volume (self.data.Close etc.); the index is a datetime index.
- Do NOT load data (no read_csv, no files, no downloads), do NOT create Backtest(...) or call run()/optimize()/plot(),
  do NOT print, and do NOT use os, sys, subprocess, sockets, environment variables or network access.
  The harness owns the data, the column names, the cash, the commission and the Backtest call.
- Order sizes must be a fraction of equity in (0, 1), e.g. self.buy(size=0.95), or a whole number of units (>= 1).
  Never pass a fractional size >= 1. Stop-loss and take-profit are prices: self.buy(size=0.95, sl=..., tp=...),
  and for a long order sl < current price < tp.
- Put tunable numbers in class attributes (e.g. `rsi_n = 14`) so they can be optimised.
Reply with the complete code in a single ```python fenced block."""

RESEARCH_PROMPT = """Research this trading idea and turn it into precise, backtestable rules on OHLCV candles:

{idea}

Give: the indicators with their parameters, the exact entry and exit conditions, the direction (long, short or both),
and the stop-loss / take-profit. If the idea cannot be tested on OHLCV candles alone (it needs funding rates, order
books, on-chain data, options, news, other markets...), start your reply with the line
NOT_BACKTESTABLE: <what data it needs>"""

CODE_PROMPT = """Write the backtesting.py strategy for this idea.

Idea: {idea}

Research notes:
{research}

Follow the harness contract exactly. Reply with one ```python block."""

FIX_PROMPT = """This strategy failed in the harness. Fix it and return the complete corrected code in one ```python block.

Error: {error_type}: {error_message}

Traceback (last part):
{traceback}

Code:
```python
{code}
```"""

IMPROVE_PROMPT = """Improve this strategy toward the target: {metric} >= {value}.

In-sample stats of the current version:
{stats}

Propose ONE coherent change (parameters, a filter, or the exit) that is likely to improve the target without
overfitting, and return the complete new code in one ```python block. Keep the harness contract.

Code:
```python
{code}
```"""

_STAT_KEYS = ("Return [%]", "Buy & Hold Return [%]", "Sharpe Ratio", "Sortino Ratio", "Max. Drawdown [%]",
              "# Trades", "Win Rate [%]", "Profit Factor", "Expectancy [%]", "Exposure Time [%]", "SQN")


class ModelUnavailable(MoondevError, RuntimeError):
    """The requested model cannot be used here (no API key, or the client library is missing)."""


class ModelCallFailed(MoondevError):
    """A model call that failed after the SDK's retries; ``__cause__`` is the SDK's exception."""


def _failed(message: str, cause: BaseException) -> ModelCallFailed:
    err = ModelCallFailed(message)
    err.__cause__ = cause
    return err


class ClaudeModel:
    """One Anthropic model behind the :class:`~moondev_lab.models.Model` protocol. Thread-safe."""

    provider = "anthropic"

    def __init__(self, model: str = DEFAULT_MODEL, *, api_key: str | None = None, base_url: str | None = None,
                 limiter: TokenBucket | None = None, tracker: Any = None, max_tokens: int = 8192,
                 max_retries: int = 3, timeout: float = 120.0, connect_timeout: float = 10.0):
        try:
            import anthropic
        except ImportError as e:  # pragma: no cover - anthropic is a dependency
            raise ModelUnavailable("the anthropic package is not installed") from e
        key = api_key or os.environ.get("ANTHROPIC_API_KEY")
        if not key:
            raise ModelUnavailable(f"{model} needs ANTHROPIC_API_KEY (or api_key=...); use model='offline' without one")
        self.name = model
        self.max_tokens = int(max_tokens)
        self.base_url = base_url or os.environ.get("ANTHROPIC_BASE_URL") or None
        self.limiter = limiter or TokenBucket()
        self.tracker = tracker
        self._anthropic = anthropic
        timeout_obj = anthropic.Timeout(timeout, connect=connect_timeout)
        # The response hook sees every attempt, including the ones the SDK retries by itself.
        http_client = anthropic.DefaultHttpxClient(timeout=timeout_obj, event_hooks={"response": [self._on_response]})
        self._client = anthropic.Anthropic(api_key=key, base_url=self.base_url, max_retries=max_retries,
                                           timeout=timeout_obj, http_client=http_client)
        self.retries_seen = 0

    def __repr__(self) -> str:  # never the key
        where = f", base_url={self.base_url!r}" if self.base_url else ""
        return f"ClaudeModel({self.name!r}{where}, max_tokens={self.max_tokens})"

    def close(self) -> None:
        self._client.close()

    # ----------------------------------------------------------------- transport
    def _on_response(self, response) -> None:
        if response.status_code in (429, 529):
            self.retries_seen += 1
            wait = parse_retry_after(response.headers)
            log.warning("%s: HTTP %s from the API%s", self.name, response.status_code,
                        f"; pausing all model calls for {wait:g}s" if wait else "")
            if wait:
                self.limiter.pause(wait)

    def _call(self, step: str, prompt: str) -> tuple[str | None, str | None, Usage | None, ModelCallFailed | None]:
        """``(text, stop_reason, usage, error)``; ``error`` when the call failed: its message reads well,
        its ``__cause__`` is the SDK's exception, by whose type the RBI loop tells an outage
        (:mod:`moondev_lab.models._outage`)."""
        api = self._anthropic
        self.limiter.acquire()
        t0 = time.perf_counter()
        try:
            msg = self._client.messages.create(model=self.name, max_tokens=self.max_tokens, system=SYSTEM_PROMPT,
                                               messages=[{"role": "user", "content": prompt}])
        except api.APIStatusError as e:
            log.warning("%s %s failed: HTTP %s %s", self.name, step, e.status_code, type(e).__name__)
            return None, None, None, _failed(f"API error HTTP {e.status_code} ({type(e).__name__}) after retries: "
                                             f"{_short(e)}", e)
        except api.APIConnectionError as e:
            log.warning("%s %s failed: %s", self.name, step, type(e).__name__)
            return None, None, None, _failed(f"API connection failed after retries ({type(e).__name__}): {_short(e)}", e)
        latency = time.perf_counter() - t0
        text = "".join(getattr(b, "text", "") for b in msg.content if getattr(b, "type", None) == "text")
        u = msg.usage
        cw = getattr(u, "cache_creation_input_tokens", 0) or 0
        cr = getattr(u, "cache_read_input_tokens", 0) or 0
        cost, known = cost_usd(self.name, u.input_tokens, u.output_tokens, cw, cr)
        usage = Usage(model=getattr(msg, "model", None) or self.name, input_tokens=u.input_tokens,
                      output_tokens=u.output_tokens, cache_creation_input_tokens=cw, cache_read_input_tokens=cr,
                      cost_usd=cost, cost_known=known, latency_s=latency, step=step)
        if self.tracker is not None:
            self.tracker.record(usage)
        log.info("%s %s: %d in / %d out tokens, $%.4f, %.2fs, stop_reason=%s", self.name, step, u.input_tokens,
                 u.output_tokens, cost, latency, msg.stop_reason)
        return text, msg.stop_reason, usage, None

    def _code(self, step: str, prompt: str) -> CodeResult:
        text, stop, usage, err = self._call(step, prompt)
        if err:
            return CodeResult(False, error=str(err), failure=err.__cause__)
        if stop == "max_tokens":
            return CodeResult(False, error=f"truncated reply (stop_reason=max_tokens at {self.max_tokens} tokens); "
                                           "not used as code", raw=text or "", usage=usage)
        try:
            found = extract_strategy(text or "")
        except CodeExtractionError as e:
            label = {"no_code": "no code block", "syntax": "code does not parse",
                     "strategy": "no single Strategy class"}.get(e.reason, "bad code")
            return CodeResult(False, error=f"{label}: {e}", raw=text or "", usage=usage)
        return CodeResult(True, found.code, found.strategy_name, raw=text or "", usage=usage)

    # ------------------------------------------------------------------ protocol
    def research(self, idea: str) -> ResearchResult:
        text, stop, usage, err = self._call("research", RESEARCH_PROMPT.format(idea=idea))
        if err:
            return ResearchResult(False, str(err), usage=usage, failure=err.__cause__)
        first = (text or "").strip().splitlines()[0] if (text or "").strip() else ""
        if first.upper().startswith("NOT_BACKTESTABLE"):
            reason = first.split(":", 1)[1].strip() if ":" in first else "needs data not in OHLCV candles"
            return ResearchResult(False, text, not_understood=[reason], usage=usage)
        if stop == "max_tokens":  # research prose is still useful; say it was cut
            text += "\n[research reply truncated at max_tokens]"
        return ResearchResult(True, text or "", usage=usage)

    def write_code(self, idea: str, research: ResearchResult | None = None) -> CodeResult:
        notes = research.text if research is not None else "(none)"
        return self._code("write_code", CODE_PROMPT.format(idea=idea, research=notes))

    def fix_code(self, code: str, error_type: str, error_message: str, traceback: str = "") -> CodeResult:
        return self._code("fix_code", FIX_PROMPT.format(code=code, error_type=error_type,
                                                        error_message=error_message[:2000],
                                                        traceback=(traceback or "(none)")[-3000:]))

    def improve(self, code: str, stats: dict, target: dict) -> CodeResult:
        slim = {k: _jsonable(stats[k]) for k in _STAT_KEYS if stats and k in stats}
        return self._code("improve", IMPROVE_PROMPT.format(code=code, stats=json.dumps(slim, indent=1),
                                                           metric=target.get("metric", "Return [%]"),
                                                           value=target.get("value")))


def _jsonable(v):
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    return None if math.isnan(f) else round(f, 4)


def _short(e: Exception) -> str:
    return str(e).replace("\n", " ")[:300]
