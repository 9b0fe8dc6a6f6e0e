"""``ModelFactory``: a thread-safe, lazily filled pool of models keyed by (provider, model).

>>> from moondev_lab.models import ModelFactory
>>> f = ModelFactory(api_key="")            # no key: "auto" means the offline model
>>> f.get("auto").name
'offline'
>>> f.available("offline"), f.available("claude")
(True, False)
>>> f.usage_summary()["calls"]
0
"""
from __future__ import annotations

import os
import threading
from collections import defaultdict
from dataclasses import asdict

from ._ratelimit import TokenBucket
from .claude import DEFAULT_MODEL, ClaudeModel, ModelUnavailable
from .offline import OfflineModel
from .spec import Usage

_CLAUDE_ALIASES = {"claude", "anthropic"}


class UsageTracker:
    """Totals of every model call, across threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.calls: list[Usage] = []

    def record(self, usage: Usage) -> None:
        with self._lock:
            self.calls.append(usage)

    def summary(self) -> dict:
        with self._lock:
            calls = list(self.calls)
        out = {"calls": len(calls), "input_tokens": 0, "output_tokens": 0, "cache_creation_input_tokens": 0,
               "cache_read_input_tokens": 0, "cost_usd": 0.0, "cost_known": True, "latency_s": 0.0,
               "by_model": {}, "by_step": {}}
        by_model: dict = defaultdict(lambda: {"calls": 0, "input_tokens": 0, "output_tokens": 0, "cost_usd": 0.0})
        by_step: dict = defaultdict(lambda: {"calls": 0, "cost_usd": 0.0})
        for u in calls:
            for k in ("input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens",
                      "cost_usd", "latency_s"):
                out[k] += getattr(u, k)
            out["cost_known"] &= u.cost_known
            m = by_model[u.model]
            m["calls"] += 1
            m["input_tokens"] += u.input_tokens
            m["output_tokens"] += u.output_tokens
            m["cost_usd"] += u.cost_usd
            s = by_step[u.step or "?"]
            s["calls"] += 1
            s["cost_usd"] += u.cost_usd
        out["cost_usd"] = round(out["cost_usd"], 6)
        out["latency_s"] = round(out["latency_s"], 3)
        out["by_model"], out["by_step"] = dict(by_model), dict(by_step)
        return out

    def records(self) -> list[dict]:
        with self._lock:
            return [asdict(u) for u in self.calls]


class ModelFactory:
    """Hands out models: ``get("auto" | "offline" | "claude" | "<claude model name>")``.

    ``api_key`` / ``base_url`` default to ``ANTHROPIC_API_KEY`` / ``ANTHROPIC_BASE_URL``.
    All Claude models from one factory share one rate limiter and one usage tracker.
    """

    def __init__(self, api_key: str | None = None, base_url: str | None = None, *, default_model: str = DEFAULT_MODEL,
                 rate_per_s: float = 0.8, burst: int = 4, max_retries: int = 3, timeout: float = 120.0,
                 connect_timeout: float = 10.0, max_tokens: int = 8192):
        self._api_key = api_key
        self._base_url = base_url
        self.default_model = default_model
        self.limiter = TokenBucket(rate_per_s, burst)
        self.tracker = UsageTracker()
        self._client_kw = dict(max_retries=max_retries, timeout=timeout, connect_timeout=connect_timeout,
                               max_tokens=max_tokens)
        self._pool: dict[tuple[str, str], object] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        keys = ", ".join(f"{p}:{m}" for p, m in self._pool) or "empty"
        return f"ModelFactory(claude={'available' if self.available('claude') else 'no key'}, pool=[{keys}])"

    # What is configured: the explicit argument wins, then the environment (read at call time).
    def _key(self) -> str | None:
        return self._api_key if self._api_key is not None else os.environ.get("ANTHROPIC_API_KEY")

    def _url(self) -> str | None:
        return self._base_url or os.environ.get("ANTHROPIC_BASE_URL") or None

    def resolve(self, model: str = "auto") -> tuple[str, str]:
        """``(provider, model name)`` that :meth:`get` would use."""
        m = (model or "auto").strip()
        if m == "auto":
            return ("anthropic", self.default_model) if self._key() else ("offline", "offline")
        if m.lower() == "offline":
            return "offline", "offline"
        if m.lower() in _CLAUDE_ALIASES:
            return "anthropic", self.default_model
        return "anthropic", m

    def available(self, provider_or_model: str = "auto") -> bool:
        """Can :meth:`get` hand this out here? ("offline" always can; Claude needs a key.)"""
        provider, _ = self.resolve(provider_or_model)
        if provider == "offline":
            return True
        try:
            import anthropic  # noqa: F401
        except ImportError:  # pragma: no cover
            return False
        return bool(self._key())

    def get(self, model: str = "auto"):
        """The pooled model for ``model``, created on first use. Raises :class:`ModelUnavailable`."""
        key = self.resolve(model)
        with self._lock:
            found = self._pool.get(key)
            if found is None:
                found = self._pool[key] = self._create(*key)
            return found

    def _create(self, provider: str, name: str):
        if provider == "offline":
            return OfflineModel(self.tracker)
        if not self._key():
            raise ModelUnavailable(f"model {name!r} needs ANTHROPIC_API_KEY (or ModelFactory(api_key=...)); "
                                   "use 'offline' to run without one")
        return ClaudeModel(name, api_key=self._key(), base_url=self._url(), limiter=self.limiter,
                           tracker=self.tracker, **self._client_kw)

    def usage_summary(self) -> dict:
        """Totals across every call made through this factory's models."""
        out = self.tracker.summary()
        out["rate_limit_pauses"] = self.limiter.pauses
        out["rate_limit_wait_s"] = round(self.limiter.waited_s, 3)
        return out

    def close(self) -> None:
        with self._lock:
            for m in self._pool.values():
                close = getattr(m, "close", None)
                if close:
                    close()
            self._pool.clear()
