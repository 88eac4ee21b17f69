"""Reading the session records back: the queries behind `mailfc sessions`.

Filters combine with AND: domain, account, client IP (an address or a CIDR network),
verdict, and a time range on the session's start.  Results are newest first.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
from dataclasses import dataclass
from typing import Any

import asyncpg

from mailfc.errors import InvalidInput, NotFound

PROTOCOLS = ("smtp", "imap")


@dataclass(frozen=True)
class SessionFilter:
    domain: str | None = None
    account: str | None = None
    client_ip: str | None = None
    verdict: str | None = None
    since: datetime.datetime | None = None
    until: datetime.datetime | None = None
    limit: int = 50

    def where(self) -> tuple[str, list[Any]]:
        clauses: list[str] = []
        args: list[Any] = []

        def add(sql: str, value: Any) -> None:
            args.append(value)
            clauses.append(sql.format(f"${len(args)}"))

        if self.domain:
            add("domain = {}", self.domain.lower())
        if self.account:
            add("account = {}", self.account.lower())
        if self.client_ip:
            try:
                network = ipaddress.ip_network(self.client_ip, strict=False)
            except ValueError:
                raise InvalidInput(f"--ip {self.client_ip!r}: expected an address or a network,"
                                   " e.g. 192.0.2.7 or 192.0.2.0/24") from None
            add("client_ip <<= {}::inet", str(network))
        if self.verdict:
            add("verdict = {}", self.verdict)
        if self.since:
            add("started_at >= {}", self.since)
        if self.until:
            add("started_at < {}", self.until)
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", args


async def list_sessions(db: asyncpg.Connection, protocol: str, where: SessionFilter
                        ) -> list[dict[str, Any]]:
    table = _table(protocol)
    sql, args = where.where()
    args.append(where.limit)
    rows = await db.fetch(f"SELECT * FROM {table}{sql} ORDER BY started_at DESC, id DESC"
                          f" LIMIT ${len(args)}", *args)
    return [dict(row) for row in rows]


async def show_session(db: asyncpg.Connection, protocol: str, session_id: int
                       ) -> dict[str, Any]:
    table = _table(protocol)
    row = await db.fetchrow(f"SELECT * FROM {table} WHERE id = $1", session_id)
    if row is None:
        raise NotFound(f"no {protocol} session {session_id}: see mailfc sessions list")
    result = dict(row)
    if protocol == "smtp":
        result["messages_detail"] = [dict(m) for m in await db.fetch(
            "SELECT * FROM smtp_messages WHERE session_id = $1 ORDER BY started_at, id",
            session_id)]
        # detail is jsonb, which asyncpg hands over as its JSON text: decoded here, so
        # `sessions show --json` has it as an object, not as a string inside a string.
        result["events"] = [
            {**dict(e), "detail": json.loads(e["detail"]) if e["detail"] is not None else None}
            for e in await db.fetch(
                "SELECT id, message_id, at, stage, verdict, reason, rule, mode, detail"
                " FROM smtp_events WHERE session_id = $1 ORDER BY at, id", session_id)]
    else:
        result["commands_detail"] = [dict(c) for c in await db.fetch(
            "SELECT * FROM imap_commands WHERE session_id = $1 ORDER BY started_at, id",
            session_id)]
    return result


async def recorder_stats(db: asyncpg.Connection) -> list[dict[str, Any]]:
    return [dict(r) for r in await db.fetch(
        "SELECT * FROM recorder_stats ORDER BY updated_at DESC")]


def _table(protocol: str) -> str:
    if protocol not in PROTOCOLS:
        raise InvalidInput(f"unknown protocol {protocol!r}: one of {', '.join(PROTOCOLS)}")
    return f"{protocol}_sessions"
