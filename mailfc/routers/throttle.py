"""Failed-login throttling for the routers, per client IP and per account.

Counts failures in a sliding window; past the limit a key is refused without
the password being checked (so a guessing run learns nothing and costs no
Argon2 time).  In-process: each router instance throttles what it sees.
"""

from __future__ import annotations

import asyncio
import collections
import time


class FailureThrottle:
    def __init__(self, limit: int, window_s: float) -> None:
        self.limit = limit
        self.window_s = window_s
        self._failures: dict[str, collections.deque[float]] = {}

    def _recent(self, key: str, now: float) -> collections.deque[float]:
        stamps = self._failures.get(key)
        if stamps is None:
            return collections.deque()
        while stamps and stamps[0] <= now - self.window_s:
            stamps.popleft()
        if not stamps:
            del self._failures[key]
        return stamps

    def blocked(self, key: str) -> bool:
        return len(self._recent(key, time.monotonic())) >= self.limit

    def fail(self, key: str) -> None:
        now = time.monotonic()
        self._recent(key, now)
        self._failures.setdefault(key, collections.deque()).append(now)
        if len(self._failures) > 100_000:
            # Bound memory under a spray of distinct keys: forget the stalest.
            for stale in list(self._failures)[:10_000]:
                del self._failures[stale]

    def succeed(self, key: str) -> None:
        self._failures.pop(key, None)


async def delay_failure(seconds: float) -> None:
    """Sleep at least `seconds` by the monotonic clock before a failure is answered.

    uvloop's timers count from the loop time cached when the loop iteration began
    (in whole milliseconds), so a plain sleep can end early by as much as that
    iteration has run; the delay is a promise to the client (no faster guessing),
    so the lag is added."""
    lag = max(0.0, time.monotonic() - asyncio.get_running_loop().time())
    await asyncio.sleep(seconds + lag + 0.001)
