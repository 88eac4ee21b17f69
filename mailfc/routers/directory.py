"""What the routers ask of the CMDB: who is this user, where does their domain live.

One lookup per session: accounts and aliases are read straight from
PostgreSQL (an indexed equality over a unix socket is well under a
millisecond), so a password change or a suspension applies to the next
session without any cache to invalidate.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import asyncpg

from mailfc.addresses import split_address
from mailfc.db.placement import Placement, place
from mailfc.errors import InvalidInput
from mailfc.passwords import verify_password


@dataclass(frozen=True)
class Account:
    address: str
    localpart: str
    domain: str
    password_hash: str
    active: bool  # the account and its domain are both active


class Directory:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def account(self, username: str) -> Account | None:
        try:
            localpart, domain = split_address(username)
        except InvalidInput:
            return None
        row = await self.pool.fetchrow(
            "SELECT a.password_hash, a.state = 'active' AND d.state = 'active' AS active"
            " FROM accounts a JOIN domains d ON d.id = a.domain_id"
            " WHERE d.name = $1 AND a.localpart = $2", domain, localpart)
        if row is None:
            return None
        return Account(f"{localpart}@{domain}", localpart, domain, row["password_hash"],
                       row["active"])

    async def verify(self, account: Account, password: str) -> bool:
        # Argon2 takes ~20 ms of CPU: off the event loop so other sessions go on.
        return await asyncio.to_thread(verify_password, account.password_hash, password)

    async def recipient(self, address: str) -> list[str] | None:
        """Hosted mailboxes `address` delivers to (itself, or an alias's targets)."""
        try:
            localpart, domain = split_address(address)
        except InvalidInput:
            return None
        rows = await self.pool.fetch(
            """
            SELECT a.localpart || '@' || d.name AS target FROM accounts a
            JOIN domains d ON d.id = a.domain_id
            WHERE d.name = $1 AND a.localpart = $2 AND d.state = 'active'
            UNION
            SELECT l.destination FROM aliases l JOIN domains d ON d.id = l.domain_id
            WHERE d.name = $1 AND l.localpart = $2 AND d.state = 'active'
            """, domain, localpart)
        return [row["target"] for row in rows] or None

    async def is_hosted(self, domain: str) -> bool:
        return bool(await self.pool.fetchval(
            "SELECT 1 FROM domains WHERE name = $1", domain))

    async def place(self, domain: str) -> Placement:
        return await place(self.pool, domain)

    async def record_auth(self, protocol: str, username: str, domain: str | None,
                          client_ip: str | None, success: bool, reason: str) -> None:
        await self.pool.execute(
            "INSERT INTO auth_attempts (at, protocol, username, domain, client_ip, success,"
            " reason) VALUES (now(), $1, $2, $3, $4, $5, $6)",
            protocol, username[:320], domain, client_ip, success, reason)
