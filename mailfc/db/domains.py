"""Domains in the CMDB: add, look up, list, suspend/resume, remove, container timeouts.

Timeouts: a domain's containers stop when idle for idle_timeout_s and are
replaced after lifetime_s (mailfc.controller).  They live in container_specs:
the domain's own row per service, else the default row (domain_id NULL).
set_timeouts() gives the domain rows of its own (the defaults copied, then
the timeouts changed), for every service alike.

Removal is two steps so containers can be stopped in between (mailfc.cli.domain):
prepare_removal() checks and suspends (no new container starts for a
suspended domain), remove() deletes the row (its container rows cascade).
"""

from __future__ import annotations

from typing import Any

import asyncpg

from mailfc.addresses import normalize_domain
from mailfc.errors import AlreadyExists, Conflict, InvalidInput, NotFound

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


SPEC_SERVICES = ("smtp", "lmtp", "imap")


async def timeouts(db: asyncpg.Connection, name: str) -> dict[str, dict[str, Any]]:
    """service -> {idle_timeout_s, lifetime_s, own}: the effective values and whether
    they are the domain's own (else the defaults)."""
    identifier = await domain_id(db, name)
    rows = await db.fetch(
        """SELECT DISTINCT ON (service) service, idle_timeout_s, lifetime_s,
                  domain_id IS NOT NULL AS own
             FROM container_specs WHERE domain_id = $1 OR domain_id IS NULL
            ORDER BY service, domain_id IS NULL""", identifier)
    return {row["service"]: {"idle_timeout_s": row["idle_timeout_s"],
                             "lifetime_s": row["lifetime_s"], "own": row["own"]}
            for row in rows}


async def set_timeouts(db: asyncpg.Connection, name: str, *, idle_timeout_s: int | None,
                       lifetime_s: int | None) -> dict[str, dict[str, Any]]:
    """Set the domain's idle timeout and/or lifetime for all its services."""
    for label, value in (("idle timeout", idle_timeout_s), ("lifetime", lifetime_s)):
        if value is not None and not 0 < value <= 2**31 - 1:
            raise InvalidInput(f"{label} of {value} s is out of range (1 s .. 68 years)")
    identifier = await domain_id(db, name)
    async with db.transaction():
        await db.execute(
            """INSERT INTO container_specs
                   (domain_id, service, cpu_quota_us, cpu_period_us, cpu_quota_max_us,
                    memory_bytes, memory_max_bytes, pids_limit, lifetime_s, idle_timeout_s,
                    max_instances)
               SELECT $1, s.service, s.cpu_quota_us, s.cpu_period_us, s.cpu_quota_max_us,
                      s.memory_bytes, s.memory_max_bytes, s.pids_limit,
                      coalesce($3, s.lifetime_s), coalesce($2, s.idle_timeout_s),
                      s.max_instances
                 FROM container_specs s WHERE s.domain_id IS NULL
               ON CONFLICT ((coalesce(domain_id, 0)), service) DO UPDATE SET
                   idle_timeout_s = coalesce($2, container_specs.idle_timeout_s),
                   lifetime_s = coalesce($3, container_specs.lifetime_s)""",
            identifier, idle_timeout_s, lifetime_s)
    return await timeouts(db, name)


async def live_containers(db: asyncpg.Connection, name: str) -> list[dict[str, Any]]:
    """The domain's live container rows with their host's name."""
    rows = await db.fetch(
        """SELECT i.name, i.service, h.name AS host FROM container_instances i
             JOIN domains d ON d.id = i.domain_id JOIN hosts h ON h.id = i.host_id
            WHERE d.name = $1 AND i.state <> 'stopped' ORDER BY i.id""",
        normalize_domain(name))
    return [dict(row) for row in rows]


async def prepare_removal(db: asyncpg.Connection, name: str, *, force: bool
                          ) -> dict[str, Any]:
    """Check that the domain may go and suspend it, so none of its containers starts
    again while they are stopped."""
    async with db.transaction():
        info = await get(db, name)
        await db.execute("SELECT 1 FROM domains WHERE id = $1 FOR UPDATE", info["id"])
        accounts = await db.fetchval(
            "SELECT count(*) FROM accounts WHERE domain_id = $1", info["id"])
        if accounts and not force:
            raise Conflict(
                f"domain {info['name']} still has {accounts} account(s): remove them first "
                "or pass --force to remove the domain with its accounts and aliases")
        await db.execute("UPDATE domains SET state = 'suspended', updated_at = now()"
                         " WHERE id = $1", info["id"])
    return info


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
