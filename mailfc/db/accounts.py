"""Accounts (mailboxes) and aliases in the CMDB."""

from __future__ import annotations

from typing import Any

import asyncpg

from mailfc.addresses import normalize_address, split_address
from mailfc.db.domains import domain_id
from mailfc.errors import AlreadyExists, InvalidInput, NotFound

_SELECT = """
SELECT a.id, a.localpart || '@' || d.name AS address, d.name AS domain, a.state,
       a.quota_bytes, a.created_at, a.updated_at, a.password_hash
FROM accounts a JOIN domains d ON d.id = a.domain_id
"""


def _public(row: asyncpg.Record) -> dict[str, Any]:
    data = dict(row)
    data.pop("password_hash", None)
    return data


async def add(
    db: asyncpg.Connection, address: str, password_hash: str, *, quota_bytes: int | None = None
) -> dict[str, Any]:
    localpart, domain = split_address(address)
    if quota_bytes is not None and quota_bytes < 0:
        raise InvalidInput("quota must not be negative")
    async with db.transaction():
        identifier = await domain_id(db, domain)
        if await db.fetchval(
            "SELECT 1 FROM aliases WHERE domain_id = $1 AND localpart = $2", identifier, localpart
        ):
            raise AlreadyExists(f"{localpart}@{domain} is an alias already")
        try:
            await db.execute(
                "INSERT INTO accounts (domain_id, localpart, password_hash, quota_bytes)"
                " VALUES ($1, $2, $3, $4)",
                identifier, localpart, password_hash, quota_bytes,
            )
        except asyncpg.UniqueViolationError:
            raise AlreadyExists(f"account {localpart}@{domain} exists already") from None
    return await get(db, f"{localpart}@{domain}")


async def get_record(db: asyncpg.Connection, address: str) -> asyncpg.Record:
    localpart, domain = split_address(address)
    row = await db.fetchrow(_SELECT + " WHERE d.name = $1 AND a.localpart = $2", domain, localpart)
    if row is None:
        raise NotFound(f"unknown account {localpart}@{domain}: see mailfc account list {domain}")
    return row


async def get(db: asyncpg.Connection, address: str) -> dict[str, Any]:
    return _public(await get_record(db, address))


async def list_all(db: asyncpg.Connection, domain: str | None = None) -> list[dict[str, Any]]:
    if domain is None:
        rows = await db.fetch(_SELECT + " ORDER BY d.name, a.localpart")
    else:
        identifier = await domain_id(db, domain)
        rows = await db.fetch(
            _SELECT + " WHERE a.domain_id = $1 ORDER BY a.localpart", identifier
        )
    return [_public(row) for row in rows]


async def set_password(db: asyncpg.Connection, address: str, password_hash: str) -> None:
    row = await get_record(db, address)
    await db.execute(
        "UPDATE accounts SET password_hash = $2, updated_at = now() WHERE id = $1",
        row["id"], password_hash,
    )


async def set_state(db: asyncpg.Connection, address: str, state: str) -> dict[str, Any]:
    row = await get_record(db, address)
    await db.execute(
        "UPDATE accounts SET state = $2, updated_at = now() WHERE id = $1", row["id"], state
    )
    return await get(db, address)


async def remove(db: asyncpg.Connection, address: str) -> dict[str, Any]:
    row = await get_record(db, address)
    await db.execute("DELETE FROM accounts WHERE id = $1", row["id"])
    return _public(row)


async def add_alias(db: asyncpg.Connection, alias: str, destination: str) -> dict[str, Any]:
    localpart, domain = split_address(alias)
    target = normalize_address(destination)
    async with db.transaction():
        identifier = await domain_id(db, domain)
        if await db.fetchval(
            "SELECT 1 FROM accounts WHERE domain_id = $1 AND localpart = $2", identifier, localpart
        ):
            raise AlreadyExists(f"{localpart}@{domain} is an account; an alias cannot shadow it")
        try:
            await db.execute(
                "INSERT INTO aliases (domain_id, localpart, destination) VALUES ($1, $2, $3)",
                identifier, localpart, target,
            )
        except asyncpg.UniqueViolationError:
            raise AlreadyExists(f"alias {localpart}@{domain} -> {target} exists already") from None
    return {"alias": f"{localpart}@{domain}", "destination": target}


async def list_aliases(
    db: asyncpg.Connection, domain: str | None = None
) -> list[dict[str, Any]]:
    query = (
        "SELECT l.localpart || '@' || d.name AS alias, l.destination, l.created_at"
        " FROM aliases l JOIN domains d ON d.id = l.domain_id"
    )
    if domain is None:
        rows = await db.fetch(query + " ORDER BY alias, l.destination")
    else:
        identifier = await domain_id(db, domain)
        rows = await db.fetch(
            query + " WHERE l.domain_id = $1 ORDER BY alias, l.destination", identifier
        )
    return [dict(row) for row in rows]


async def remove_alias(
    db: asyncpg.Connection, alias: str, destination: str | None = None
) -> int:
    localpart, domain = split_address(alias)
    identifier = await domain_id(db, domain)
    target = normalize_address(destination) if destination else None
    result = await db.execute(
        "DELETE FROM aliases WHERE domain_id = $1 AND localpart = $2"
        " AND ($3::text IS NULL OR destination = $3)",
        identifier, localpart, target,
    )
    removed = int(result.split()[-1])
    if removed == 0:
        what = f"{localpart}@{domain}" + (f" -> {target}" if target else "")
        raise NotFound(f"no alias {what}: see mailfc alias list {domain}")
    return removed
