"""One token bucket shared by every thread that calls a model, which also honours ``retry-after``.

The SDK retries 408/409/429/5xx/529 by itself; this limiter adds what it
cannot: a global request rate, and after a 429 a pause for *all* threads
(not only the one that was told to back off).

>>> bucket = TokenBucket(rate_per_s=100, burst=2)
>>> bucket.acquire()    # returns the seconds it waited
0.0
"""
from __future__ import annotations

import threading
import time


class TokenBucket:
    """``rate_per_s`` requests per second on average, bursts of up to ``burst``; thread-safe."""

    def __init__(self, rate_per_s: float = 0.8, burst: int = 4, clock=time.monotonic, sleep=time.sleep):
        if rate_per_s <= 0 or burst < 1:
            raise ValueError("rate_per_s must be > 0 and burst >= 1")
        self.rate, self.burst = float(rate_per_s), int(burst)
        self._tokens = float(burst)
        self._clock, self._sleep = clock, sleep
        self._last = clock()
        self._paused_until = 0.0
        self._lock = threading.Lock()
        self.waited_s = 0.0  # total time callers spent waiting (for the usage summary)
        self.pauses = 0  # how many retry-after pauses were applied

    def __repr__(self) -> str:
        return f"TokenBucket(rate_per_s={self.rate:g}, burst={self.burst}, pauses={self.pauses})"

    def pause(self, seconds: float) -> None:
        """Hold every caller for ``seconds`` from now (a server's ``retry-after``)."""
        if seconds and seconds > 0:
            with self._lock:
                self._paused_until = max(self._paused_until, self._clock() + float(seconds))
                self.pauses += 1

    def acquire(self) -> float:
        """Block until a request may go out; return the seconds waited."""
        waited = 0.0
        while True:
            with self._lock:
                now = self._clock()
                self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
                self._last = now
                wait = self._paused_until - now
                if wait <= 0:
                    if self._tokens >= 1:
                        self._tokens -= 1
                        self.waited_s += waited
                        return waited
                    wait = (1 - self._tokens) / self.rate
            self._sleep(wait)
            waited += wait


def parse_retry_after(headers) -> float | None:
    """Seconds from ``retry-after-ms`` or ``retry-after`` (seconds or an HTTP date); None if absent."""
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return float(ms) / 1000
        except ValueError:
            pass
    ra = headers.get("retry-after")
    if not ra:
        return None
    try:
        return float(ra)
    except ValueError:
        from email.utils import parsedate_to_datetime

        try:
            return max(0.0, parsedate_to_datetime(ra).timestamp() - time.time())
        except (TypeError, ValueError):
            return None
