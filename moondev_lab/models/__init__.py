"""Models for the RBI loop: Claude through the Anthropic API, or the deterministic ``offline`` model.

>>> from moondev_lab.models import ModelFactory
>>> model = ModelFactory(api_key="").get("auto")        # "offline" when no ANTHROPIC_API_KEY
>>> research = model.research("20/50 SMA crossover")
>>> result = model.write_code("20/50 SMA crossover", research)
>>> result.ok, result.strategy_name
(True, 'MaCrossStrategy')

Every model follows :class:`Model`: ``research``, ``write_code``, ``fix_code``, ``improve``.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

from ._ratelimit import TokenBucket
from .claude import DEFAULT_MODEL, SYSTEM_PROMPT, ClaudeModel, ModelUnavailable
from .factory import ModelFactory, UsageTracker
from .offline import OfflineModel
from .spec import CodeResult, ResearchResult, Signal, Stop, StrategySpec, Usage


@runtime_checkable
class Model(Protocol):
    """What the RBI loop calls."""

    name: str

    def research(self, idea: str) -> ResearchResult: ...

    def write_code(self, idea: str, research: ResearchResult) -> CodeResult: ...

    def fix_code(self, code: str, error_type: str, error_message: str, traceback: str = "") -> CodeResult: ...

    def improve(self, code: str, stats: dict, target: dict) -> CodeResult: ...


__all__ = ["Model", "ModelFactory", "OfflineModel", "ClaudeModel", "ModelUnavailable", "UsageTracker", "TokenBucket",
           "StrategySpec", "Signal", "Stop", "ResearchResult", "CodeResult", "Usage", "DEFAULT_MODEL", "SYSTEM_PROMPT"]
