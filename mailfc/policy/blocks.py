"""The admin blocks a sender is checked against at MAIL, held in process.

The same rule as mailfc_policy_check() in 0004_policy.sql, which the milter
and the submission path use: a block of kind `ip` (an address or CIDR) matches
the client address, `sender` the lower-cased sender, `sender_domain` its
domain; a block past expires_at no longer matches.  SMTP-In asks for every
message, and a database round trip per MAIL was the slowest step of a busy
MX; the list is read again every BLOCKS_REFRESH_S instead, so a new block
applies there within seconds.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from mailfc.policy.snapshot import Snapshot

BLOCKS_REFRESH_S = 2.0
SENDER_KINDS = ("ip", "sender", "sender_domain")
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Block:
    kind: str
    value: str
    reason: str
    expires_at: datetime.datetime | None

    def as_row(self) -> Mapping[str, Any]:
        return {"kind": self.kind, "value": self.value, "reason": self.reason}


@dataclass(frozen=True)
class Blocks:
    networks: tuple[tuple[Network, Block], ...] = ()
    # (kind, value) -> block, for the kinds matched by equality
    values: Mapping[tuple[str, str], Block] = field(default_factory=dict)

    def match(self, client_ip: str | None, sender: str,
              at: datetime.datetime) -> Block | None:
        sender = sender.lower()
        candidates: list[Block | None] = [
            self.values.get(("sender", sender)),
            self.values.get(("sender_domain", sender.rpartition("@")[2])) if "@" in sender
            else None]
        if client_ip:
            address = ipaddress.ip_address(client_ip)
            candidates += [block for network, block in self.networks
                           if address.version == network.version and address in network]
        return next((b for b in candidates
                     if b is not None and (b.expires_at is None or b.expires_at > at)), None)


class BlockList(Snapshot[Blocks]):
    what = "admin blocks"

    def __init__(self, pool: asyncpg.Pool) -> None:
        super().__init__(pool, Blocks(), BLOCKS_REFRESH_S)

    async def read(self) -> Blocks:
        rows = await self.pool.fetch(
            "SELECT kind, value, reason, expires_at FROM blocks WHERE kind = ANY($1)"
            " AND (expires_at IS NULL OR expires_at > now())", list(SENDER_KINDS))
        networks: list[tuple[Network, Block]] = []
        values: dict[tuple[str, str], Block] = {}
        for row in rows:
            block = Block(row["kind"], row["value"], row["reason"], row["expires_at"])
            if block.kind == "ip":
                try:
                    networks.append((ipaddress.ip_network(block.value, strict=False), block))
                except ValueError:
                    continue    # not an address: the SQL rule skips it as well
            else:
                values[(block.kind, block.value)] = block
        return Blocks(tuple(networks), values)
