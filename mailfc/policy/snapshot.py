"""CMDB facts a gateway reads for every message, read a few seconds at a time.

A `Snapshot` holds the last value a query returned and reads it again when it
is older than `refresh_s`: one query every few seconds instead of one per
message, and an admin's change (`mailfc limit set`, `mailfc abuse block`)
applies within those seconds.  A failed read keeps the last known value and
is logged; concurrent readers share one refresh.
"""

from __future__ import annotations

import asyncio
import logging
import time
from abc import ABC, abstractmethod
from typing import Generic, TypeVar

import asyncpg

log = logging.getLogger("mailfc.policy")

T = TypeVar("T")


class Snapshot(ABC, Generic[T]):
    what = "CMDB facts"

    def __init__(self, pool: asyncpg.Pool, empty: T, refresh_s: float) -> None:
        self.pool = pool
        self.value = empty
        self.refresh_s = refresh_s
        self._fresh_until = 0.0
        self._refreshing: asyncio.Task[None] | None = None

    async def get(self) -> T:
        if time.monotonic() >= self._fresh_until:
            if self._refreshing is None or self._refreshing.done():
                self._refreshing = asyncio.create_task(self._refresh())
            await asyncio.shield(self._refreshing)
        return self.value

    @abstractmethod
    async def read(self) -> T: ...

    async def _refresh(self) -> None:
        try:
            self.value = await self.read()
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
            log.warning("cannot read %s (keeping the last known): %s", self.what, error)
        self._fresh_until = time.monotonic() + self.refresh_s
