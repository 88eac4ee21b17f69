"""What the routers ask of the CMDB: who is this user, where does their domain live.

One lookup per session: accounts and aliases are read straight from
PostgreSQL (an indexed equality over a unix socket is well under a
millisecond), so a password change or a suspension applies to the next
session without any cache to invalidate.  Only placements are remembered for
a few seconds, and forgotten at once when a host fails a delivery.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import asyncpg

from mailfc.addresses import split_address
from mailfc.db.placement import Placement, place
from mailfc.errors import InvalidInput
from mailfc.passwords import verify_password

PLACEMENT_TTL_S = 5.0
VERIFIED_TTL_S = 300.0
VERIFIED_MAX = 100_000
# Recipients found are remembered this long: every message asks at SMTP-In and
# again at the LMTP Router.  Only found ones: a new mailbox works at once, a
# removed one still receives for at most this long (as with Postfix's caches).
RECIPIENT_TTL_S = 5.0
RECIPIENT_MAX = 100_000
# Password checks run one at a time per process, beside its event loop: a burst
# of logins (fifty clients of one flooding domain at once, a botnet guessing)
# then takes at most one core, not every core the loop's default pool would
# use, and the host's other sessions keep the rest.
PASSWORD_CHECKS = ThreadPoolExecutor(max_workers=1, thread_name_prefix="password-check")


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
        self._placements: dict[str, tuple[float, Placement]] = {}
        self._verified: dict[bytes, float] = {}
        self._recipients: dict[str, tuple[float, dict[str, bool]]] = {}
        self._cache_key = secrets.token_bytes(32)

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
        """Check a password; a success is remembered for VERIFIED_TTL_S.

        Argon2 costs ~20 ms of CPU by design, and mail clients log in again and
        again with the same password: without this cache a busy (or
        compromised) account's reconnects would spend the shared routers' CPU
        on hashing.  The key is a keyed digest of hash and password, so the
        cache never holds a password, and a changed password misses it at once.
        """
        key = hmac.new(self._cache_key, account.password_hash.encode() + b"\0"
                       + password.encode(), hashlib.sha256).digest()
        now = time.monotonic()
        if self._verified.get(key, 0.0) > now:
            return True
        # Off the event loop so other sessions go on meanwhile (PASSWORD_CHECKS).
        ok = await asyncio.get_running_loop().run_in_executor(
            PASSWORD_CHECKS, verify_password, account.password_hash, password)
        if ok:
            if len(self._verified) >= VERIFIED_MAX:
                self._verified.clear()
            self._verified[key] = now + VERIFIED_TTL_S
        return ok

    async def recipient(self, address: str) -> dict[str, bool] | None:
        """Where `address` delivers: itself or an alias's targets, each with
        whether it is hosted here (an alias may forward elsewhere); None when
        the address is no mailbox or alias of an active hosted domain."""
        try:
            localpart, domain = split_address(address)
        except InvalidInput:
            return None
        now = time.monotonic()
        cached = self._recipients.get(f"{localpart}@{domain}")
        if cached is not None and cached[0] > now:
            return dict(cached[1])
        rows = await self.pool.fetch(
            """
            SELECT a.localpart || '@' || d.name AS target, true AS hosted FROM accounts a
            JOIN domains d ON d.id = a.domain_id
            WHERE d.name = $1 AND a.localpart = $2 AND d.state = 'active'
            UNION
            SELECT l.destination, EXISTS (SELECT 1 FROM domains x
                                          WHERE x.name = split_part(l.destination, '@', 2))
            FROM aliases l JOIN domains d ON d.id = l.domain_id
            WHERE d.name = $1 AND l.localpart = $2 AND d.state = 'active'
            """, domain, localpart)
        targets = {row["target"]: row["hosted"] for row in rows}
        if not targets:
            return None
        if len(self._recipients) >= RECIPIENT_MAX:
            self._recipients.clear()
        self._recipients[f"{localpart}@{domain}"] = (now + RECIPIENT_TTL_S, dict(targets))
        return targets

    async def is_hosted(self, domain: str) -> bool:
        return bool(await self.pool.fetchval("SELECT 1 FROM domains WHERE name = $1",
                                             domain.lower()))

    async def sender_addresses(self, address: str) -> set[str]:
        """Addresses `address` may send as: itself and the aliases that deliver to it."""
        rows = await self.pool.fetch(
            "SELECT l.localpart || '@' || d.name AS alias FROM aliases l"
            " JOIN domains d ON d.id = l.domain_id WHERE l.destination = $1", address)
        return {address, *(row["alias"] for row in rows)}

    async def place(self, domain: str) -> Placement:
        """The domain's host; remembered for PLACEMENT_TTL_S, since every
        delivery asks and placement changes only when a host drains or dies."""
        now = time.monotonic()
        cached = self._placements.get(domain)
        if cached is not None and cached[0] > now:
            return cached[1]
        placement = await place(self.pool, domain)
        self._placements[domain] = (now + PLACEMENT_TTL_S, placement)
        return placement

    def forget_placement(self, domain: str) -> None:
        """After a failure towards the domain's host: ask the CMDB next time."""
        self._placements.pop(domain, None)
