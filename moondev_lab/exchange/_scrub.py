"""Keep API keys out of text: exception messages, log records, reprs.

Every secret a credential holds is registered here; ``scrub`` replaces each
with ``***`` and also blanks request signatures and key headers, whatever
exchange produced the text. ccxt's own DEBUG log lines carry the request
headers (``X-MBX-APIKEY``), so the exchange objects we build log through a
logger with ``ScrubFilter`` on it.
"""
from __future__ import annotations

import logging
import re
import threading

_lock = threading.Lock()
_secrets: set[str] = set()

# Signatures are not keys, but they are derived from one and reveal the request: blank them too.
_PATTERNS = [
    re.compile(r"(?i)(signature=)[^&\s'\"]+"),
    re.compile(r"(?i)((?:x-mbx-apikey|api[-_]?key|apikey|secret|passphrase|password|token)['\"]?\s*[:=]\s*['\"]?)"
               r"[^'\"&\s,}]+"),
]
MASK = "***"


def register_secret(value: str | None) -> None:
    if value and len(value) >= 4:  # masking a 1-3 character string would mangle ordinary text
        with _lock:
            _secrets.add(value)


def scrub(text: object) -> str:
    """``text`` as a string with every registered secret and signature masked.

    >>> register_secret("k3y-Abc123")
    >>> scrub("GET /api?x=1&signature=ab12cd {'X-MBX-APIKEY': 'k3y-Abc123'} k3y-Abc123")
    "GET /api?x=1&signature=*** {'X-MBX-APIKEY': '***'} ***"
    """
    s = str(text)
    with _lock:
        secrets = sorted(_secrets, key=len, reverse=True)
    for secret in secrets:
        s = s.replace(secret, MASK)
    for pattern in _PATTERNS:
        s = pattern.sub(lambda m: m.group(1) + MASK, s)
    return s


class ScrubFilter(logging.Filter):
    """Rewrites a record's message, scrubbed, before any handler sees it."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record: scrub what we have
            message = f"{record.msg} {record.args}"
        record.msg, record.args = scrub(message), None
        if record.exc_info:
            # A traceback's text is built from the exception: keep only its scrubbed summary.
            exc = record.exc_info[1]
            record.msg += f" [{type(exc).__name__}: {scrub(exc)}]"
            record.exc_info, record.exc_text = None, None
        return True


def scrubbed_logger(name: str) -> logging.Logger:
    """A logger that scrubs every record logged on it (used as ccxt's ``logger``)."""
    logger = logging.getLogger(name)
    if not any(isinstance(f, ScrubFilter) for f in logger.filters):
        logger.addFilter(ScrubFilter())
    return logger
