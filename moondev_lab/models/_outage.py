"""Which failures of a model call are outages: by exception class, in one registry.

An outage (the API unreachable, timing out, overloaded, rate-limited past the
client's retries, or no model configured) is not the idea's fault: the RBI loop
records it as ``model_unavailable``, retries the idea later and never charges its
failure budget. Everything else a model call raises is a real failure.

The registry maps an exception class to a short reason, or to ``None`` for a class
that is *not* an outage although a parent class is (HTTP 501 is an
``InternalServerError``, but retrying will not help). The most specific registered
class in the exception's MRO decides; a wrapped cause (``raise ... from``) is looked
at too, so an ``httpx`` or socket error wrapped in another exception still counts.

>>> outage_reason(ConnectionResetError(104, "Connection reset by peer"))
'network error (ConnectionResetError)'
>>> outage_reason(ValueError("bad idea")) is None
True

No error text is ever matched: the clients keep the exception they caught
(``ResearchResult.failure`` / ``CodeResult.failure``), so the type is always known.
"""
from __future__ import annotations

import sys
import threading

_registry: dict[type, str | None] = {}
_lock = threading.Lock()
_builtins_loaded = False
_anthropic_loaded = False


def register_outage(exc_type: type, reason: str | None) -> None:
    """Classify ``exc_type`` (and its subclasses, unless registered themselves) as an outage.

    ``reason=None`` marks a subclass as *not* an outage.

    >>> class MyGatewayDown(Exception): ...
    >>> register_outage(MyGatewayDown, "my gateway is down")
    >>> outage_reason(MyGatewayDown())
    'my gateway is down (MyGatewayDown)'
    """
    with _lock:
        _registry[exc_type] = reason


def _load_builtins() -> None:
    """The known outages; anthropic's classes once anthropic is imported.

    anthropic's exceptions can only have been raised if anthropic is already imported, so an
    offline run (the offline model failing) never pays its import (1.8-5 s here) just to classify.
    """
    global _builtins_loaded, _anthropic_loaded
    if _builtins_loaded and _anthropic_loaded:
        return
    known: dict[type, str | None] = {}
    if not _builtins_loaded:
        from .claude import ModelUnavailable

        known.update({
            ModelUnavailable: "model unavailable",
            # Model calls do network I/O only: any OSError there (reset, refused, DNS, socket timeout) is the
            # network's. Classification is applied to model calls only, never to the loop's own file writes.
            OSError: "network error",
        })
    anthropic = sys.modules.get("anthropic")
    if anthropic is not None and not _anthropic_loaded:
        known.update({
            anthropic.APIConnectionError: "API connection failed",
            anthropic.APITimeoutError: "API timed out",
            anthropic.InternalServerError: "API server error",       # every 5xx, 529 overloaded included
            anthropic.RateLimitError: "API rate limit",             # 429, still there after the retries
            anthropic.RequestTimeoutError: "API request timeout",   # 408
        })
        for name, reason in (("OverloadedError", "API overloaded"), ("ServiceUnavailableError", "API unavailable"),
                             ("GatewayTimeoutError", "API gateway timeout"), ("HTTPNotImplementedError", None)):
            cls = getattr(anthropic, name, None)  # newer anthropic releases only
            if cls is not None:
                known[cls] = reason
    with _lock:
        for cls, reason in known.items():
            _registry.setdefault(cls, reason)  # a caller's own registration wins
        _builtins_loaded = True
        _anthropic_loaded = anthropic is not None


def outage_reason(exc: BaseException | None) -> str | None:
    """Why ``exc`` is an outage (``"API overloaded (OverloadedError)"``), or None when it is not one."""
    _load_builtins()
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        for cls in type(exc).__mro__:
            if cls in _registry:
                reason = _registry[cls]
                if reason is not None:
                    status = getattr(exc, "status_code", None)
                    return f"{reason} ({type(exc).__name__}{f', HTTP {status}' if status else ''})"
                break  # registered as not an outage; its cause may still be one
        exc = exc.__cause__  # only an explicit ``raise ... from``: an error raised while handling one is not it
    return None
