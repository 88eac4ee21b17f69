"""Subjects ranked by a metric over a time range: who sends, who is refused, who fails logins.

    rows = await top(db, by="account", metric="messages", span=range, domain=None, limit=20)
    series = await top_series(db, by, metric, span, [row["subject"] for row in rows])

SUBJECTS (--by)      account | domain | ip | sender (sender: SMTP metrics only)
METRICS (--metric)   source table             counted
    messages         smtp_messages            accepted transactions (each message once:
                                              not again in the rows of later hops,
                                              smtp_messages.hop, e.g. Filter-Out)
    recipients       smtp_messages            recipients of accepted transactions
    bytes            smtp_messages            size of accepted transactions
    deferrals        smtp_messages            transactions refused temporarily (4xx)
    rejects          smtp_messages            transactions refused permanently (5xx)
    imap_commands    imap_sessions            commands of the sessions started in the range
    auth_failures    auth_attempts            failed logins (IMAP and submission)

Every row carries all metrics of its source, so the table shows the context (a
sender ranked by deferrals shows its accepted messages too).  Subjects whose metric
is zero are left out.  Scope: platform-wide, or one domain with `domain`.
"""

from __future__ import annotations

import datetime
import decimal
from dataclasses import dataclass
from typing import Any

import asyncpg

from mailfc.analysis.timerange import TimeRange
from mailfc.errors import InvalidInput

SUBJECTS = ("account", "domain", "ip", "sender")


@dataclass(frozen=True)
class Source:
    table: str
    time_column: str
    keys: dict[str, str]           # --by -> SQL expression
    columns: dict[str, str]        # output column -> aggregate
    only: str = ""                 # a condition every counted row meets


_SMTP = Source(
    "smtp_messages", "started_at",
    {"account": "account", "domain": "domain", "ip": "host(client_ip)", "sender": "lower(sender)"},
    {"messages": "count(*) FILTER (WHERE verdict = 'accept')",
     "recipients": "coalesce(sum(recipient_count) FILTER (WHERE verdict = 'accept'), 0)",
     "bytes": "coalesce(sum(size) FILTER (WHERE verdict = 'accept'), 0)",
     "deferrals": "count(*) FILTER (WHERE verdict = 'tempfail')",
     "rejects": "count(*) FILTER (WHERE verdict = 'reject')"},
    "hop IS NULL")
_IMAP = Source(
    "imap_sessions", "started_at",
    {"account": "account", "domain": "domain", "ip": "host(client_ip)"},
    {"imap_commands": "coalesce(sum(commands), 0)", "imap_sessions": "count(*)",
     "bytes_out": "coalesce(sum(bytes_out), 0)"})
_AUTH = Source(
    "auth_attempts", "at",
    {"account": "lower(username)", "domain": "domain", "ip": "host(client_ip)"},
    {"auth_failures": "count(*) FILTER (WHERE NOT success)",
     "accounts_tried": "count(DISTINCT lower(username)) FILTER (WHERE NOT success)",
     "ips": "count(DISTINCT client_ip) FILTER (WHERE NOT success)",
     "logins": "count(*) FILTER (WHERE success)"})

METRICS: dict[str, Source] = {
    **dict.fromkeys(("messages", "recipients", "bytes", "deferrals", "rejects"), _SMTP),
    "imap_commands": _IMAP,
    "auth_failures": _AUTH,
}


def columns(metric: str) -> tuple[str, ...]:
    """The columns of a top table for `metric`: subject first, the metric next."""
    source = _source(metric, "account")
    return ("rank", "subject", metric, *(c for c in source.columns if c != metric))


def _source(metric: str, by: str) -> Source:
    source = METRICS.get(metric)
    if source is None:
        raise InvalidInput(f"unknown metric {metric!r}: one of {', '.join(METRICS)}")
    if by not in SUBJECTS:
        raise InvalidInput(f"unknown subject {by!r}: one of {', '.join(SUBJECTS)}")
    if by not in source.keys:
        raise InvalidInput(f"--by {by} does not apply to {metric}: use one of"
                           f" {', '.join(source.keys)}")
    return source


def validate(by: str, metric: str) -> None:
    _source(metric, by)


def _where(source: Source, key: str, span: TimeRange, domain: str | None
           ) -> tuple[str, list[Any]]:
    args: list[Any] = [span.start, span.end]
    sql = (f" WHERE {source.time_column} >= $1 AND {source.time_column} < $2"
           f" AND {key} IS NOT NULL")
    if source.only:
        sql += f" AND {source.only}"
    if domain is not None:
        args.append(domain)
        sql += f" AND domain = ${len(args)}"
    return sql, args


async def top(db: asyncpg.Connection, *, by: str, metric: str, span: TimeRange,
              domain: str | None = None, limit: int = 20) -> list[dict[str, Any]]:
    source = _source(metric, by)
    key = source.keys[by]
    where, args = _where(source, key, span, domain)
    aggregates = ", ".join(f"{sql} AS {name}" for name, sql in source.columns.items())
    args.append(limit)
    rows = await db.fetch(
        f"SELECT {key} AS subject, {aggregates} FROM {source.table}{where}"
        f" GROUP BY 1 HAVING {source.columns[metric]} > 0"
        f" ORDER BY {metric} DESC, 1 LIMIT ${len(args)}", *args)
    return [{"rank": rank, **_plain(dict(row))} for rank, row in enumerate(rows, 1)]


async def top_series(db: asyncpg.Connection, *, by: str, metric: str, span: TimeRange,
                     subjects: list[str], bucket_s: int, domain: str | None = None
                     ) -> dict[str, list[tuple[datetime.datetime, float]]]:
    """The metric per bucket for each subject (buckets without activity omitted)."""
    source = _source(metric, by)
    key = source.keys[by]
    if not subjects:
        return {}
    where, args = _where(source, key, span, domain)
    args += [subjects, bucket_s]
    subject_arg, bucket_arg = len(args) - 1, len(args)
    rows = await db.fetch(
        f"SELECT {key} AS subject,"
        f" date_bin(make_interval(secs => ${bucket_arg}), {source.time_column},"
        f" '2000-01-01 00:00:00+00') AS bucket, {source.columns[metric]} AS value"
        f" FROM {source.table}{where} AND {key} = ANY(${subject_arg}::text[])"
        f" GROUP BY 1, 2 ORDER BY 1, 2", *args)
    series: dict[str, list[tuple[datetime.datetime, float]]] = {s: [] for s in subjects}
    for row in rows:
        series.setdefault(row["subject"], []).append((row["bucket"], float(row["value"])))
    return series


def _plain(row: dict[str, Any]) -> dict[str, Any]:
    # sum(bigint) is numeric in PostgreSQL: whole numbers print as such.
    return {k: int(v) if isinstance(v, decimal.Decimal) else v for k, v in row.items()}
