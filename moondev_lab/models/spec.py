"""The structured form of a trading idea, and the result types every model returns.

The offline model parses an idea into a :class:`StrategySpec` and writes code
from it; the Claude model returns prose research (``spec`` is None there).

>>> spec = StrategySpec(idea="20/50 SMA crossover", direction="long",
...                     signals=[Signal("ma_cross", {"ma": "SMA", "fast": 20, "slow": 50}, entry=True)])
>>> spec.describe()
'long; entry: ma_cross(ma=SMA, fast=20, slow=50)'
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Signal:
    """One recognised building block, e.g. ``Signal("rsi", {"n": 14, "low": 30, "high": 70}, entry=True)``.

    ``entry``: its state must hold to open a trade (all entry signals are ANDed,
    and a trade opens on the bar where the whole AND becomes true).
    ``exit``: its opposite state closes the trade (exit signals are ORed).
    ``phrase`` is the text it was read from.
    """

    kind: str
    params: dict
    entry: bool = False
    exit: bool = False
    phrase: str = ""

    def __str__(self) -> str:
        return f"{self.kind}({', '.join(f'{k}={v}' for k, v in self.params.items())})"


@dataclass
class Stop:
    """A stop-loss or take-profit: ``kind`` "pct" (value in %) or "atr" (value in ATR multiples)."""

    kind: str
    value: float
    trailing: bool = False
    atr_n: int = 14

    def __str__(self) -> str:
        unit = "%" if self.kind == "pct" else f" x ATR({self.atr_n})"
        return f"{'trailing ' if self.trailing else ''}{self.value:g}{unit}"


@dataclass
class StrategySpec:
    """A strategy the offline code generator can write."""

    idea: str
    direction: str = "long"  # long | short | both
    signals: list[Signal] = field(default_factory=list)
    stop_loss: Stop | None = None
    take_profit: Stop | None = None
    max_bars: int | None = None  # time exit
    assumptions: list[str] = field(default_factory=list)  # defaults chosen and qualifiers ignored, said aloud
    name: str = "IdeaStrategy"

    @property
    def entry_signals(self) -> list[Signal]:
        return [s for s in self.signals if s.entry]

    @property
    def exit_signals(self) -> list[Signal]:
        return [s for s in self.signals if s.exit]

    def describe(self) -> str:
        parts = [self.direction, "entry: " + " AND ".join(map(str, self.entry_signals))]
        if self.exit_signals:
            parts.append("exit: " + " OR ".join(map(str, self.exit_signals)))
        if self.stop_loss:
            parts.append(f"stop {self.stop_loss}")
        if self.take_profit:
            parts.append(f"target {self.take_profit}")
        if self.max_bars:
            parts.append(f"time exit {self.max_bars} bars")
        return "; ".join(parts)


@dataclass
class Usage:
    """Tokens, cost and latency of one model call (all zero for the offline model)."""

    model: str
    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    cost_usd: float = 0.0
    cost_known: bool = True  # False when the model is missing from the price table
    latency_s: float = 0.0
    step: str = ""  # research | write_code | fix_code | improve


@dataclass
class ResearchResult:
    """What ``Model.research`` returns."""

    ok: bool
    text: str
    spec: StrategySpec | None = None
    not_understood: list[str] = field(default_factory=list)
    usage: Usage | None = None
    # The exception a failed call caught (e.g. anthropic.APIConnectionError): typed, for models._outage
    failure: BaseException | None = field(default=None, repr=False, compare=False)

    def __repr__(self) -> str:
        head = "understood" if self.ok else f"NOT understood: {', '.join(self.not_understood)}"
        return f"ResearchResult({head}; {self.text[:120]!r})"


@dataclass
class CodeResult:
    """What ``write_code``/``fix_code``/``improve`` return; ``code`` is validated, or ``ok`` is False."""

    ok: bool
    code: str = ""
    strategy_name: str = ""
    error: str | None = None
    raw: str = ""
    usage: Usage | None = None
    notes: list[str] = field(default_factory=list)
    failure: BaseException | None = field(default=None, repr=False, compare=False)  # as ResearchResult's

    def __repr__(self) -> str:
        if self.ok:
            return f"CodeResult(ok, {self.strategy_name}, {len(self.code.splitlines())} lines)"
        return f"CodeResult(failed: {self.error})"
