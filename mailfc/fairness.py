"""Per-key concurrency caps for the shared resident parts (DESIGN: fairness).

A resident service that works for every domain through one bounded resource (a
database pool, connections towards containers) must not let one domain take all
of it: its waiters would be served first-in-first-out and every other domain would
queue behind a flood.  `PerKeyLimit` caps how many holders one key (a domain) may
have at once; waiters of one key wait on that key alone.

    limit = PerKeyLimit(3)
    async with limit.slot("a.example"):
        ...

Keys without a holder or waiter are forgotten, so tens of thousands of domains
cost nothing while quiet.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


class _Key:
    __slots__ = ("semaphore", "users")

    def __init__(self, per_key: int) -> None:
        self.semaphore = asyncio.Semaphore(per_key)
        self.users = 0          # holders and waiters


class PerKeyLimit:
    def __init__(self, per_key: int) -> None:
        if per_key < 1:
            raise ValueError("per_key must be at least 1")
        self.per_key = per_key
        self._keys: dict[str, _Key] = {}

    @contextlib.asynccontextmanager
    async def slot(self, key: str) -> AsyncIterator[None]:
        entry = self._keys.get(key)
        if entry is None:
            entry = self._keys[key] = _Key(self.per_key)
        entry.users += 1
        try:
            async with entry.semaphore:
                yield
        finally:
            entry.users -= 1
            if entry.users == 0:
                del self._keys[key]

    def in_use(self, key: str) -> int:
        """Holders and waiters of `key` (0 for a key nobody uses)."""
        entry = self._keys.get(key)
        return entry.users if entry else 0
