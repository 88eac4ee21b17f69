"""Events: every decision the platform takes, as a row with its reason.

The controller writes most; the runtime writes starts, the CLI a domain's
removal and bans, the routers the bans they set.

    kind        start, stop, drain, scale_up, scale_down, scale_out, scale_in,
                limit_change, host_down, retry_queue, gone (a container died by
                itself), queue_cleanup (a killed Postfix's leftovers removed),
                db_restart (`mailfc up` started the embedded PostgreSQL again),
                restart (`mailfc up` started a supervised process again after
                it died, with its backoff),
                orphan (a container no CMDB row owns, removed), domain_remove
                (`mailfc domain remove`: containers stopped, mail archived or
                purged), ban / unban (an address banned for failed logins, or
                an admin's ban lifted: mailfc.db.bans)
    reason      words an admin can read ("idle for 300 s", "throttled in 45% of
                CPU periods")
    detail      the measurements behind it (JSON)

`mailfc events [--domain D] [--follow]` reads them.
"""

from __future__ import annotations

import json
from typing import Any

import asyncpg

from mailfc.metrics.names import CONTROLLER_DECISIONS

KINDS = ("start", "stop", "drain", "scale_up", "scale_down", "scale_out", "scale_in",
         "limit_change", "host_down", "retry_queue", "gone", "queue_cleanup", "db_restart",
         "orphan", "domain_remove", "ban", "unban", "restart")


async def record(db: asyncpg.Pool | asyncpg.Connection, kind: str, reason: str, *,
                 host: str | None = None, domain: str | None = None,
                 service: str | None = None, instance: str | None = None,
                 detail: dict[str, Any] | None = None) -> None:
    await db.execute(
        "INSERT INTO events (host, domain, service, instance, kind, reason, detail)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb)",
        host, domain, service, instance, kind, reason, json.dumps(detail or {}, default=str))
    CONTROLLER_DECISIONS.labels(kind).inc()


async def recent(db: asyncpg.Pool | asyncpg.Connection, *, domain: str | None = None,
                 kind: str | None = None, after_id: int = 0, since_s: int | None = None,
                 limit: int = 200) -> list[dict[str, Any]]:
    rows = await db.fetch(
        """
        SELECT id, at, host, domain, service, instance, kind, reason, detail::text AS detail
        FROM events
        WHERE id > $1 AND ($2::text IS NULL OR domain = $2) AND ($3::text IS NULL OR kind = $3)
          AND ($4::integer IS NULL OR at >= now() - make_interval(secs => $4))
        ORDER BY id DESC LIMIT $5
        """, after_id, domain, kind, since_s, limit)
    result = []
    for row in reversed(rows):
        item = dict(row)
        item["detail"] = json.loads(item["detail"])
        result.append(item)
    return result
