"""Placement: which host runs a domain's containers.

A domain keeps its host while that host is active.  A domain without a host,
or whose host is draining or down, gets the active host with the most free
room (capacity minus live containers; ties: fewest domains), chosen and stored
in one statement so concurrent routers agree.  `NoHost` when no active host has
room.  A pending host (added with `mailfc host add`, never heard from) is not
active: nothing is placed on it until its first heartbeat.
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from mailfc.errors import TemporaryFailure


class NoHost(TemporaryFailure):
    """No active container host with room."""


@dataclass(frozen=True)
class Placement:
    domain: str
    host: str
    dispatcher_address: str
    lmtp_port: int
    imap_port: int
    smtp_port: int

    def port(self, service: str) -> int:
        return {"lmtp": self.lmtp_port, "imap": self.imap_port, "smtp": self.smtp_port}[service]


_CURRENT = """
SELECT d.name AS domain, h.name AS host, host(h.dispatcher_address) AS dispatcher_address,
       h.lmtp_port, h.imap_port, h.smtp_port
FROM domains d JOIN hosts h ON h.id = d.host_id
WHERE d.name = $1 AND h.state = 'active'
"""

_PLACE = """
WITH candidate AS (
    SELECT h.id FROM hosts h
    WHERE h.state = 'active'
    ORDER BY h.capacity - (SELECT count(*) FROM container_instances c
                           WHERE c.host_id = h.id AND c.state <> 'stopped') DESC,
             (SELECT count(*) FROM domains x WHERE x.host_id = h.id),
             h.id
    LIMIT 1
)
UPDATE domains d SET host_id = (SELECT id FROM candidate), updated_at = now()
WHERE d.name = $1 AND EXISTS (SELECT 1 FROM candidate)
  AND (d.host_id IS NULL OR d.host_id NOT IN (SELECT id FROM hosts WHERE state = 'active'))
RETURNING d.name
"""


async def place(db: asyncpg.Connection | asyncpg.Pool, domain: str) -> Placement:
    """The domain's host, choosing one first when it has none (or a dead one)."""
    row = await db.fetchrow(_CURRENT, domain)
    if row is None:
        await db.fetchval(_PLACE, domain)
        row = await db.fetchrow(_CURRENT, domain)
    if row is None:
        raise NoHost(f"no active container host with room for {domain}: see mailfc host list")
    return Placement(**dict(row))
