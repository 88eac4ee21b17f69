"""Admin blocks and the admin event log.

A block is a row of the `blocks` table (0001_cmdb.sql), the table the limit engine
reads at every decision (mailfc_policy_check in 0004_policy.sql): a new block
refuses the next transaction on every host with `550 5.7.1`, and a removed one lets
it pass, without restarting anything.  Each change is also written to
`admin_events` (0007_analysis.sql) in the same transaction, so the account
timeline and `why` can say who blocked what, when and why.

    KIND            what the engine compares it with         typed as
    account         the authenticated account (SMTP AUTH)    bob@example.org
    domain          the hosted domain of the session         example.org
    ip              the client address (or network)          192.0.2.7, 192.0.2.0/24
    sender          the envelope sender (MAIL FROM)          --kind sender x@remote.example
    sender_domain   the envelope sender's domain             --kind sender_domain spam.example

An account or domain block names a hosted one (NotFound otherwise); a sender or
sender domain may be anywhere.  Blocking what is blocked already replaces its reason
and expiry.
"""

from __future__ import annotations

import datetime
import getpass
import json
import os
from typing import Any

import asyncpg

from mailfc.addresses import normalize_address, normalize_domain
from mailfc.analysis.targets import ACCOUNT, DOMAIN, IP, classify, normalize_ip
from mailfc.analysis.targets import require_account as _require_account
from mailfc.analysis.targets import require_domain as _require_domain
from mailfc.errors import InvalidInput, NotFound

KINDS = ("account", "domain", "ip", "sender", "sender_domain")


def default_actor() -> str:
    return os.environ.get("SUDO_USER") or getpass.getuser()


async def _resolve(db: asyncpg.Connection, target: str, kind: str | None,
                   *, must_exist: bool) -> tuple[str, str]:
    if kind is None:
        found = classify(target)
        kind, value = found.kind, found.value
    elif kind == "sender":
        value = normalize_address(target)
    elif kind == "sender_domain":
        value = normalize_domain(target)
    elif kind == IP:
        value = normalize_ip(target)
    elif kind == ACCOUNT:
        value = normalize_address(target)
    elif kind == DOMAIN:
        value = normalize_domain(target)
    else:
        raise InvalidInput(f"unknown block kind {kind!r}: one of {', '.join(KINDS)}")
    if must_exist and kind == ACCOUNT:
        value = await _require_account(db, value)
    elif must_exist and kind == DOMAIN:
        value = await _require_domain(db, value)
    return kind, value


async def block(db: asyncpg.Connection, target: str, *, kind: str | None = None,
                reason: str = "", expires_s: int | None = None, actor: str | None = None
                ) -> dict[str, Any]:
    """Block `target` now; returns the block row."""
    kind, value = await _resolve(db, target, kind, must_exist=True)
    expires = (datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=expires_s)
               if expires_s else None)
    async with db.transaction():
        row = await db.fetchrow(
            "INSERT INTO blocks (kind, value, reason, expires_at) VALUES ($1, $2, $3, $4)"
            " ON CONFLICT (kind, value) DO UPDATE SET reason = EXCLUDED.reason,"
            " expires_at = EXCLUDED.expires_at, created_at = now()"
            " RETURNING id, kind, value, reason, created_at, expires_at",
            kind, value, reason, expires)
        await _event(db, actor, "block", kind, value, reason,
                     {"expires_at": expires.isoformat() if expires else None})
    return dict(row)


async def unblock(db: asyncpg.Connection, target: str, *, kind: str | None = None,
                  reason: str = "", actor: str | None = None) -> dict[str, Any]:
    """Remove a block; NotFound when there is none."""
    kind, value = await _resolve(db, target, kind, must_exist=False)
    async with db.transaction():
        row = await db.fetchrow(
            "DELETE FROM blocks WHERE kind = $1 AND value = $2"
            " RETURNING id, kind, value, reason, created_at, expires_at", kind, value)
        if row is None:
            raise NotFound(f"no {kind} block on {value}: see mailfc abuse blocks")
        await _event(db, actor, "unblock", kind, value, reason, {"was": row["reason"]})
    return dict(row)


async def list_blocks(db: asyncpg.Connection) -> list[dict[str, Any]]:
    rows = await db.fetch(
        "SELECT id, kind, value, reason, created_at, expires_at,"
        " (expires_at IS NULL OR expires_at > now()) AS active"
        " FROM blocks ORDER BY created_at DESC, id DESC")
    return [dict(row) for row in rows]


async def blocks_affecting(db: asyncpg.Connection, account: str) -> list[dict[str, Any]]:
    """Active account and domain blocks that refuse `account`."""
    rows = await db.fetch(
        "SELECT kind, value, reason, created_at, expires_at FROM blocks"
        " WHERE (expires_at IS NULL OR expires_at > now())"
        " AND ((kind = 'account' AND value = $1) OR (kind = 'domain' AND value = $2)"
        "      OR (kind = 'sender' AND value = $1))"
        " ORDER BY created_at", account, account.rpartition("@")[2])
    return [dict(row) for row in rows]


async def events(db: asyncpg.Connection, values: list[str], start: datetime.datetime,
                 end: datetime.datetime) -> list[dict[str, Any]]:
    """Admin events about any of `values` (an account, its domain, its IPs) in a range."""
    rows = await db.fetch(
        "SELECT at, actor, action, kind, value, reason FROM admin_events"
        " WHERE value = ANY($1::text[]) AND at >= $2 AND at < $3 ORDER BY at",
        values, start, end)
    return [dict(row) for row in rows]


async def _event(db: asyncpg.Connection, actor: str | None, action: str, kind: str,
                 value: str, reason: str, detail: dict[str, Any]) -> None:
    await db.execute(
        "INSERT INTO admin_events (actor, action, kind, value, reason, detail)"
        " VALUES ($1, $2, $3, $4, $5, $6::jsonb)",
        actor or default_actor(), action, kind, value, reason, json.dumps(detail))
