"""Login bans: client addresses and networks the login routers refuse.

A ban is a row of `bans` (0010_bans.sql): a network (an address is a /32 or
/128), a reason, who set it (`auto`: a router that saw password spraying; else
the admin's name), when, and when it expires (NULL: until removed).  The IMAP
and submission routers refuse every login from a banned address without
checking the password (mailfc.routers.listeners); they read the active bans
every login.ban_refresh_s, so an admin's ban or unban applies on every host
within seconds.

Every ban and unban is also written to `events` (kind `ban` / `unban`, detail:
network, set_by, expires_at) in the same transaction: `mailfc events` shows
the history after the ban itself has gone.

    add(db, target, reason=, set_by=, expires_s=)   ban now, or replace a ban's
                                                    reason and expiry
    auto_ban(db, address, reason=, expires_s=, host=)  a router's ban: never
                                                    shortens or replaces a live one
    remove(db, target, reason=, actor=)             NotFound when there is none
    list_bans(db, include_expired=False)            newest first
    active(db) -> Bans                              what the routers match against
"""

from __future__ import annotations

import datetime
import ipaddress
import json
from dataclasses import dataclass
from typing import Any

import asyncpg

from mailfc.errors import InvalidInput, NotFound

AUTO = "auto"
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_COLUMNS = "id, network, reason, set_by, created_at, expires_at"


def parse_target(text: str) -> Network:
    """`192.0.2.7`, `2001:db8::1` or `192.0.2.0/24` as a network; host bits of a
    network are an error (`192.0.2.7/24` is probably a typo for .0/24)."""
    try:
        network = ipaddress.ip_network(text.strip(), strict=True)
    except ValueError as error:
        raise InvalidInput(f"invalid address or network {text!r}: {error}; expected e.g."
                           " 192.0.2.7, 2001:db8::1 or 192.0.2.0/24") from None
    mapped = network.network_address.ipv4_mapped \
        if isinstance(network, ipaddress.IPv6Network) and network.prefixlen == 128 else None
    # A dual-stack listener sees an IPv4 client as ::ffff:a.b.c.d: banned as a.b.c.d.
    return ipaddress.IPv4Network(mapped) if mapped is not None else network


def show(network: Network) -> str:
    """An address as an address, a network in CIDR notation."""
    if network.num_addresses == 1:
        return str(network.network_address)
    return str(network)


def _row(row: asyncpg.Record) -> dict[str, Any]:
    item = dict(row)
    item["network"] = show(item["network"])
    return item


async def _event(db: asyncpg.Connection, kind: str, row: dict[str, Any], reason: str,
                 host: str | None, set_by: str) -> None:
    expires = row.get("expires_at")
    await db.execute(
        "INSERT INTO events (host, kind, reason, detail) VALUES ($1, $2, $3, $4::jsonb)",
        host, kind, f"{row['network']}: {reason}" if reason else row["network"],
        json.dumps({"network": row["network"], "set_by": set_by,
                    "expires_at": expires.isoformat() if expires else None}))


def _expiry(expires_s: int | None) -> datetime.datetime | None:
    if not expires_s:
        return None
    return datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=expires_s)


async def add(db: asyncpg.Connection, target: str, *, reason: str, set_by: str,
              expires_s: int | None = None) -> dict[str, Any]:
    """Ban `target` now (replacing the reason and expiry of a ban it has); the row."""
    network = parse_target(target)
    async with db.transaction():
        record = await db.fetchrow(
            "INSERT INTO bans (network, reason, set_by, expires_at) VALUES ($1, $2, $3, $4)"
            " ON CONFLICT (network) DO UPDATE SET reason = EXCLUDED.reason,"
            " set_by = EXCLUDED.set_by, expires_at = EXCLUDED.expires_at, created_at = now()"
            f" RETURNING {_COLUMNS}", network, reason, set_by, _expiry(expires_s))
        row = _row(record)
        await _event(db, "ban", row, reason, None, set_by)
    return row


async def auto_ban(db: asyncpg.Pool | asyncpg.Connection, address: str, *, reason: str,
                   expires_s: int, host: str | None = None) -> dict[str, Any] | None:
    """A router's ban of one address; None when a live ban of it exists already
    (an admin's ban, perhaps without expiry, is never shortened)."""
    network = parse_target(address)
    async with _connection(db) as connection, connection.transaction():
        record = await connection.fetchrow(
            "INSERT INTO bans (network, reason, set_by, expires_at) VALUES ($1, $2, $3, $4)"
            " ON CONFLICT (network) DO UPDATE SET reason = EXCLUDED.reason,"
            " set_by = EXCLUDED.set_by, expires_at = EXCLUDED.expires_at, created_at = now()"
            " WHERE bans.expires_at IS NOT NULL AND bans.expires_at <= now()"
            f" RETURNING {_COLUMNS}", network, reason, AUTO, _expiry(expires_s))
        if record is None:
            return None
        row = _row(record)
        await _event(connection, "ban", row, reason, host, AUTO)
    return row


async def remove(db: asyncpg.Connection, target: str, *, reason: str = "",
                 actor: str) -> dict[str, Any]:
    """Lift the ban on exactly `target`; NotFound when there is none."""
    network = parse_target(target)
    async with db.transaction():
        record = await db.fetchrow(f"DELETE FROM bans WHERE network = $1 RETURNING {_COLUMNS}",
                                   network)
        if record is None:
            raise NotFound(f"no ban on {show(network)}: see mailfc ban list")
        row = _row(record)
        await _event(db, "unban", row, reason or f"lifted by {actor}", None, actor)
    return row


async def list_bans(db: asyncpg.Pool | asyncpg.Connection, *,
                    include_expired: bool = False) -> list[dict[str, Any]]:
    rows = await db.fetch(
        f"SELECT {_COLUMNS}, (expires_at IS NULL OR expires_at > now()) AS active"
        " FROM bans WHERE $1 OR expires_at IS NULL OR expires_at > now()"
        " ORDER BY created_at DESC, id DESC", include_expired)
    return [_row(row) for row in rows]


@dataclass(frozen=True)
class Ban:
    network: Network
    reason: str
    set_by: str
    expires_at: datetime.datetime | None


@dataclass(frozen=True)
class Bans:
    """The active bans, for matching one client address after another."""

    addresses: dict[str, Ban]
    networks: tuple[Ban, ...] = ()

    def match(self, client_ip: str, now: datetime.datetime | None = None) -> Ban | None:
        try:
            address = ipaddress.ip_address(client_ip)
        except ValueError:
            return None
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        candidates = [self.addresses.get(str(address)),
                      *(ban for ban in self.networks
                        if ban.network.version == address.version and address in ban.network)]
        when = now or datetime.datetime.now(datetime.UTC)
        return next((ban for ban in candidates
                     if ban is not None and (ban.expires_at is None or ban.expires_at > when)),
                    None)

    def with_ban(self, ban: Ban) -> Bans:
        """These bans and one more (a router's own, before the next read)."""
        return Bans({**self.addresses, show(ban.network): ban}, self.networks)


async def active(db: asyncpg.Pool | asyncpg.Connection) -> Bans:
    rows = await db.fetch("SELECT network, reason, set_by, expires_at FROM bans"
                          " WHERE expires_at IS NULL OR expires_at > now()")
    addresses: dict[str, Ban] = {}
    networks: list[Ban] = []
    for row in rows:
        ban = Ban(row["network"], row["reason"], row["set_by"], row["expires_at"])
        if ban.network.num_addresses == 1:
            addresses[show(ban.network)] = ban
        else:
            networks.append(ban)
    return Bans(addresses, tuple(networks))


class _connection:
    """A connection from a pool (acquired and released) or the connection given."""

    def __init__(self, db: asyncpg.Pool | asyncpg.Connection) -> None:
        self._db = db
        self._acquired: Any = None

    async def __aenter__(self) -> asyncpg.Connection:
        if isinstance(self._db, asyncpg.Pool):
            self._acquired = self._db.acquire()
            connection: asyncpg.Connection = await self._acquired.__aenter__()
            return connection
        return self._db

    async def __aexit__(self, *exc: Any) -> None:
        if self._acquired is not None:
            await self._acquired.__aexit__(*exc)
