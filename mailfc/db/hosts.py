"""Container hosts: each runs one dispatcher and the containers of its domains.

States: pending (added with `mailfc host add`, never heard from: no domain is
placed on it) -> active at its first heartbeat (or when `mailfc up` registers
it) -> draining (the admin) / down (no heartbeat for host_down_after_s, seen
by another host's controller) -> active again when it registers.
"""

from __future__ import annotations

import ipaddress
from typing import Any

import asyncpg

from mailfc.errors import AlreadyExists, Conflict, InvalidInput, NotFound

_SELECT = """
SELECT h.id, h.name, host(h.dispatcher_address) AS dispatcher_address, h.lmtp_port,
       h.imap_port, h.smtp_port, h.container_subnet::text AS container_subnet, h.capacity,
       h.state, h.heartbeat_at,
       (SELECT count(*) FROM domains d WHERE d.host_id = h.id) AS domains,
       (SELECT count(*) FROM container_instances c
         WHERE c.host_id = h.id AND c.state <> 'stopped') AS containers
FROM hosts h
"""


def _check(dispatcher_address: str, container_subnet: str, capacity: int) -> None:
    try:
        ipaddress.ip_address(dispatcher_address)
    except ValueError:
        raise InvalidInput(f"invalid dispatcher address {dispatcher_address!r}") from None
    try:
        ipaddress.ip_network(container_subnet, strict=True)
    except ValueError as error:
        raise InvalidInput(f"invalid container subnet {container_subnet!r}: {error}") from None
    if capacity < 0:
        raise InvalidInput("capacity must not be negative")


async def add(
    db: asyncpg.Connection, name: str, dispatcher_address: str, container_subnet: str,
    *, capacity: int = 1000, lmtp_port: int = 10024, imap_port: int = 10143,
    smtp_port: int = 10587,
) -> dict[str, Any]:
    _check(dispatcher_address, container_subnet, capacity)
    if not name or len(name) > 253 or any(c.isspace() for c in name):
        raise InvalidInput(f"invalid host name {name!r}")
    try:
        await db.execute(
            "INSERT INTO hosts (name, dispatcher_address, container_subnet, capacity,"
            " lmtp_port, imap_port, smtp_port, state)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, 'pending')",
            name, dispatcher_address, container_subnet, capacity, lmtp_port, imap_port,
            smtp_port,
        )
    except asyncpg.UniqueViolationError:
        raise AlreadyExists(f"host {name} exists already") from None
    return await get(db, name)


async def register(
    db: asyncpg.Connection, name: str, dispatcher_address: str, container_subnet: str,
    *, capacity: int, lmtp_port: int, imap_port: int, smtp_port: int,
) -> dict[str, Any]:
    """Insert or refresh this machine's own host row (used by `mailfc up`)."""
    _check(dispatcher_address, container_subnet, capacity)
    await db.execute(
        """
        INSERT INTO hosts (name, dispatcher_address, container_subnet, capacity,
                           lmtp_port, imap_port, smtp_port, heartbeat_at)
        VALUES ($1, $2, $3, $4, $5, $6, $7, now())
        ON CONFLICT (name) DO UPDATE SET
            dispatcher_address = EXCLUDED.dispatcher_address,
            container_subnet = EXCLUDED.container_subnet,
            capacity = EXCLUDED.capacity, lmtp_port = EXCLUDED.lmtp_port,
            imap_port = EXCLUDED.imap_port, smtp_port = EXCLUDED.smtp_port,
            heartbeat_at = now(),
            state = CASE WHEN hosts.state IN ('down', 'pending') THEN 'active'
                         ELSE hosts.state END
        """,
        name, dispatcher_address, container_subnet, capacity, lmtp_port, imap_port, smtp_port,
    )
    return await get(db, name)


async def get(db: asyncpg.Connection, name: str) -> dict[str, Any]:
    row = await db.fetchrow(_SELECT + " WHERE h.name = $1", name)
    if row is None:
        raise NotFound(f"unknown host {name}: see mailfc host list")
    return dict(row)


async def list_all(db: asyncpg.Connection) -> list[dict[str, Any]]:
    return [dict(row) for row in await db.fetch(_SELECT + " ORDER BY h.name")]


async def set_state(db: asyncpg.Connection, name: str, state: str) -> dict[str, Any]:
    current = await get(db, name)
    if state == "active" and current["state"] == "pending":
        raise Conflict(f"host {name} has never reported: it becomes active at its first"
                       " heartbeat (start `mailfc up` there)")
    await db.execute("UPDATE hosts SET state = $2 WHERE name = $1", name, state)
    return await get(db, name)


async def heartbeat(db: asyncpg.Connection | asyncpg.Pool, name: str) -> None:
    """This host is alive: its heartbeat, and a pending host becomes active."""
    await db.execute(
        "UPDATE hosts SET heartbeat_at = now(),"
        " state = CASE WHEN state = 'pending' THEN 'active' ELSE state END"
        " WHERE name = $1", name)
