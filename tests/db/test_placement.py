"""Placement: a domain gets the active host with most room, and moves off a drained host."""

from __future__ import annotations

import asyncpg
import pytest

from mailfc.db import domains, hosts
from mailfc.db.placement import NoHost, place


async def test_placement_prefers_room_and_follows_drain(clean_cmdb: asyncpg.Pool) -> None:
    async with clean_cmdb.acquire() as db:
        # Only this test's hosts may take domains.
        await db.execute("UPDATE hosts SET state = 'draining'")
        await hosts.add(db, "small", "10.1.0.1", "10.91.0.0/24", capacity=1)
        await hosts.add(db, "large", "10.1.0.2", "10.92.0.0/24", capacity=50)
        await domains.add(db, "p1.example")
        await domains.add(db, "p2.example")
        try:
            # Added but never heard from: pending, no domain goes there.
            with pytest.raises(NoHost):
                await place(db, "p1.example")
            await hosts.heartbeat(db, "small")
            await hosts.heartbeat(db, "large")
            first = await place(db, "p1.example")
            assert first.host == "large" and first.dispatcher_address == "10.1.0.2"
            # Stable: asking again does not move it.
            assert (await place(db, "p1.example")).host == "large"

            await hosts.set_state(db, "large", "draining")
            moved = await place(db, "p1.example")
            assert moved.host == "small"
            assert (await domains.get(db, "p1.example"))["host"] == "small"

            await hosts.set_state(db, "small", "down")
            with pytest.raises(NoHost):
                await place(db, "p2.example")
            assert (await domains.get(db, "p2.example"))["host"] is None
        finally:
            await db.execute("DELETE FROM hosts WHERE name IN ('small', 'large')")
            await db.execute("UPDATE hosts SET state = 'active'")
