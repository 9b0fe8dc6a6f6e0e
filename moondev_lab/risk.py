"""Risk limits for a trading run: maximum position, order value and daily loss, and a kill switch.

The trusted process checks every order a strategy decides *before* it reaches
an exchange; a breach raises ``RiskBreach`` and nothing is sent. A daily loss
beyond the limit, a ``KILL`` file in the run folder, or SIGTERM engages the
kill switch, after which every order is refused.

>>> guard = RiskGuard(RiskLimits(max_position=1.0, max_order_value=50_000))
>>> guard.check("buy", 0.5, 40_000, position=0.0)       # fine: returns None
>>> guard.check("buy", 0.8, 40_000, position=0.5)
Traceback (most recent call last):
...
moondev_lab.risk.RiskBreach: the position would be 1.3 > max_position 1 (order value 32000)
"""
from __future__ import annotations

import signal
import threading
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .errors import MoondevError

_NS_PER_DAY = 86_400 * 10**9

class RiskBreach(MoondevError):
    """An order was refused by a risk limit or the kill switch; nothing was sent."""


@dataclass(frozen=True)
class RiskLimits:
    max_position: float | None = None      # |position| in base units after the order
    max_order_value: float | None = None   # amount x price, in quote currency
    max_daily_loss: float | None = None    # equity drop since the UTC day's first reading, quote currency


class KillSwitch:
    """Engaged by ``engage()``, by a file at ``path`` appearing, or (once installed) by SIGTERM.

    ``install()`` swaps in a SIGTERM handler (main thread only) and ``close()``
    puts the previous one back, so several runs in one process do not fight.
    """

    def __init__(self, path: Path | str | None = None):
        self.path = Path(path) if path is not None else None
        self._reason: str | None = None
        self._lock = threading.Lock()
        self._previous = None

    def engage(self, reason: str) -> None:
        with self._lock:
            self._reason = self._reason or reason  # the first reason is the one worth reporting

    @property
    def engaged(self) -> str | None:
        """Why trading must stop, or None."""
        if self._reason is None and self.path is not None and self.path.exists():
            self.engage(f"kill file {self.path} exists")
        return self._reason

    def install(self) -> "KillSwitch":
        self._previous = signal.signal(signal.SIGTERM, lambda signum, frame: self.engage("SIGTERM received"))
        return self

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def __enter__(self) -> "KillSwitch":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"KillSwitch({self.engaged or 'not engaged'})"


class RiskGuard:
    """Checks orders against ``RiskLimits`` and a ``KillSwitch``; tracks the day's equity for the loss limit."""

    def __init__(self, limits: RiskLimits, kill_switch: KillSwitch | None = None):
        self.limits = limits
        self.kill_switch = kill_switch or KillSwitch()
        self._day: int | None = None  # UTC days since the epoch
        self._day_start_equity: float | None = None

    def update_equity(self, equity: float, when=None) -> None:
        """Feed the account's equity; losing more than ``max_daily_loss`` today engages the kill switch."""
        ts = when if isinstance(when, pd.Timestamp) else pd.Timestamp(when if when is not None else
                                                                      pd.Timestamp.now(tz="UTC"))
        day = ts.value // _NS_PER_DAY  # the UTC day (``value`` is UTC for an aware time; naive times are UTC)
        if self._day != day:
            self._day, self._day_start_equity = day, equity
        loss = self._day_start_equity - equity
        if self.limits.max_daily_loss is not None and loss > self.limits.max_daily_loss:
            self.kill_switch.engage(f"daily loss {loss:.2f} > max_daily_loss {self.limits.max_daily_loss:g} "
                                    f"on {pd.Timestamp(day * _NS_PER_DAY, tz='UTC'):%Y-%m-%d}")

    def check(self, side: str, amount: float, price: float, *, position: float) -> None:
        """Raise ``RiskBreach`` if this order may not be sent; ``position`` is the signed current one."""
        reason = self.kill_switch.engaged
        if reason:
            raise RiskBreach(f"kill switch engaged: {reason}")
        value = abs(amount) * price
        cap = self.limits.max_order_value
        if cap is not None and value > cap:
            raise RiskBreach(f"order value {value:.2f} > max_order_value {cap:g}")
        after = position + (amount if side == "buy" else -amount)
        if self.limits.max_position is not None and abs(after) > self.limits.max_position:
            raise RiskBreach(f"the position would be {after:.8g} > max_position {self.limits.max_position:g} "
                             f"(order value {value:.0f})")
