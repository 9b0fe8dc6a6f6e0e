"""USD prices per million tokens, for the usage ledger.

Prices are list prices as published by Anthropic for these model families
(checked 2026); a model not matched here is recorded with ``cost_known=False``
and cost 0 rather than a guess. Cache writes cost 1.25x input, cache reads 0.1x.

>>> cost_usd("claude-sonnet-4-5", 1_000_000, 100_000)
(4.5, True)
"""
from __future__ import annotations

# (prefix, input $/MTok, output $/MTok); the first matching prefix wins, so specific before general.
PRICES: list[tuple[str, float, float]] = [
    ("claude-opus-4-5", 5.0, 25.0),
    ("claude-opus-4-6", 5.0, 25.0),
    ("claude-opus-4-0", 15.0, 75.0),
    ("claude-opus-4-1", 15.0, 75.0),
    ("claude-opus-4-2025", 15.0, 75.0),
    ("claude-3-opus", 15.0, 75.0),
    ("claude-sonnet-4", 3.0, 15.0),
    ("claude-3-7-sonnet", 3.0, 15.0),
    ("claude-3-5-sonnet", 3.0, 15.0),
    ("claude-haiku-4", 1.0, 5.0),
    ("claude-3-5-haiku", 0.8, 4.0),
    ("claude-3-haiku", 0.25, 1.25),
]


def cost_usd(model: str, input_tokens: int, output_tokens: int, cache_write: int = 0,
             cache_read: int = 0) -> tuple[float, bool]:
    """``(cost, known)`` for one call."""
    for prefix, pin, pout in PRICES:
        if model.startswith(prefix):
            cost = (input_tokens * pin + cache_write * pin * 1.25 + cache_read * pin * 0.1 + output_tokens * pout) / 1e6
            return round(cost, 6), True
    return 0.0, False
