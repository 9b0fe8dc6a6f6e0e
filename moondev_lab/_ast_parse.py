"""``ast.parse`` that is safe to call from several threads at once.

CPython 3.11 keeps the counter that guards AST object construction in the
interpreter's state, shared by every thread. Two threads building trees at once
(the RBI loop runs ideas on threads) can then fail a good parse with
``SystemError: AST constructor recursion depth mismatch`` (cpython gh-106905).
Our own parses take turns behind one lock; a parse that still trips over another
library's (outside the lock) is tried again, since the code itself is fine.

>>> type(parse("x = 1").body[0]).__name__
'Assign'
"""
from __future__ import annotations

import ast
import logging
import threading

log = logging.getLogger(__name__)
_LOCK = threading.Lock()


def parse(source: str, filename: str = "<unknown>", attempts: int = 3) -> ast.Module:
    """``ast.parse(source, filename)``, one thread at a time; the race's spurious error is retried."""
    for attempt in range(attempts):
        try:
            with _LOCK:
                return ast.parse(source, filename)
        except SystemError as e:
            if "recursion depth mismatch" not in str(e) or attempt == attempts - 1:
                raise
            log.info("ast.parse hit CPython's thread race (%s); parsing again", e)
    raise AssertionError("unreachable")
