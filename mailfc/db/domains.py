"""Domains in the CMDB: add, look up, list, suspend/resume, remove."""

from __future__ import annotations

from typing import Any

import asyncpg

from mailfc.addresses import normalize_domain
from mailfc.errors import AlreadyExists, Conflict, NotFound

_SELECT = """
SELECT d.id, d.name, d.state, h.name AS host, d.created_at,
       (SELECT count(*) FROM accounts a WHERE a.domain_id = d.id) AS accounts,
       (SELECT count(*) FROM aliases l WHERE l.domain_id = d.id) AS aliases
FROM domains d LEFT JOIN hosts h ON h.id = d.host_id
"""


async def add(db: asyncpg.Connection, name: str) -> dict[str, Any]:
    domain = normalize_domain(name)
    try:
        await db.execute("INSERT INTO domains (name) VALUES ($1)", domain)
    except asyncpg.UniqueViolationError:
        raise AlreadyExists(f"domain {domain} exists already") from None
    return await get(db, domain)


async def get(db: asyncpg.Connection, name: str) -> dict[str, Any]:
    domain = normalize_domain(name)
    row = await db.fetchrow(_SELECT + " WHERE d.name = $1", domain)
    if row is None:
        raise NotFound(f"unknown domain {domain}: see mailfc domain list")
    return dict(row)


async def domain_id(db: asyncpg.Connection, name: str) -> int:
    domain = normalize_domain(name)
    found = await db.fetchval("SELECT id FROM domains WHERE name = $1", domain)
    if found is None:
        raise NotFound(f"unknown domain {domain}: add it with mailfc domain add {domain}")
    return int(found)


async def list_all(
    db: asyncpg.Connection, *, state: str | None = None, pattern: str | None = None
) -> list[dict[str, Any]]:
    rows = await db.fetch(
        _SELECT
        + " WHERE ($1::text IS NULL OR d.state = $1)"
        + " AND ($2::text IS NULL OR d.name LIKE $2) ORDER BY d.name",
        state,
        pattern.replace("*", "%") if pattern else None,
    )
    return [dict(row) for row in rows]


async def set_state(db: asyncpg.Connection, name: str, state: str) -> dict[str, Any]:
    identifier = await domain_id(db, name)
    await db.execute(
        "UPDATE domains SET state = $2, updated_at = now() WHERE id = $1", identifier, state
    )
    return await get(db, name)


async def remove(db: asyncpg.Connection, name: str, *, force: bool) -> dict[str, Any]:
    async with db.transaction():
        info = await get(db, name)
        # Lock the row so no account is added between the check and the delete.
        await db.execute("SELECT 1 FROM domains WHERE id = $1 FOR UPDATE", info["id"])
        accounts = await db.fetchval(
            "SELECT count(*) FROM accounts WHERE domain_id = $1", info["id"]
        )
        if accounts and not force:
            raise Conflict(
                f"domain {info['name']} still has {accounts} account(s): remove them first "
                "or pass --force to remove the domain with its accounts and aliases"
            )
        await db.execute("DELETE FROM domains WHERE id = $1", info["id"])
    return info
