"""The ideas of a batch: read from a file, picked (``limit``, ``sample``), and keyed for resuming.

>>> items = select(["20/50 SMA crossover", "20/50 sma crossover.", "RSI < 30"], limit=5)
>>> [i.idea for i in items]                                # duplicates by normalised text dropped
['20/50 SMA crossover', 'RSI < 30']
>>> idea_key("RSI < 30", "BTC/USD", "15m", "offline") == idea_key("rsi < 30.", "BTC/USD", "15m", "offline")
True
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path

from .errors import MoondevError
from .ledger import normalise_idea


class BatchError(MoondevError, ValueError):
    """A batch cannot start: bad ideas file, bad settings, a resume folder that is not one."""


@dataclass(frozen=True)
class BatchItem:
    """One idea of a batch: its place in the batch and its identity in the ledger."""

    index: int
    idea: str


def read_ideas(path: str | Path) -> list[str]:
    """Ideas from a text file (one per line, ``#`` comments) or a CSV with an ``idea`` column."""
    p = Path(path)
    if not p.is_file():
        raise BatchError(f"{p}: no such ideas file")
    if p.suffix.lower() == ".csv":
        import pandas as pd

        df = pd.read_csv(p)
        if "idea" not in df.columns:
            raise BatchError(f"{p}: a CSV of ideas needs an 'idea' column; found {list(df.columns)}")
        return [str(i) for i in df["idea"].dropna()]
    return [line.strip() for line in p.read_text().splitlines() if line.strip() and not line.startswith("#")]


def select(ideas: list[str], *, limit: int | None = None, sample: int | None = None,
           seed: int = 0) -> list[BatchItem]:
    """Distinct ideas (first spelling kept), then a seeded random ``sample``, then the first ``limit``.

    A sample keeps the file's order, so the same seed always gives the same batch.
    """
    seen: set[str] = set()
    distinct = []
    for text in ideas:
        text = text.strip()
        norm = normalise_idea(text)
        if norm and norm not in seen:
            seen.add(norm)
            distinct.append(text)
    if sample is not None:
        if sample < 1:
            raise BatchError(f"--sample must be at least 1, not {sample}")
        picked = sorted(random.Random(seed).sample(range(len(distinct)), min(sample, len(distinct))))
        distinct = [distinct[i] for i in picked]
    if limit is not None:
        if limit < 1:
            raise BatchError(f"--limit must be at least 1, not {limit}")
        distinct = distinct[:limit]
    return [BatchItem(i, text) for i, text in enumerate(distinct)]


def idea_key(idea: str, symbol: str, timeframe: str, model: str) -> str:
    """What makes a run of an idea the same run: its normalised text, market and model."""
    ident = "\x1f".join([normalise_idea(idea), symbol, timeframe, model])
    return hashlib.sha256(ident.encode()).hexdigest()[:32]
