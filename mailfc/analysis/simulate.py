"""`mailfc limit simulate`: a proposed limit replayed against the recorded history.

    result = await simulate(db, "example.org", "messages", 100, window_s=3600,
                            per_account=True, span=range)

WHAT IS REPLAYED
    The transactions that were accepted in the range (smtp_messages with verdict
    accept, sent by an authenticated account: the traffic the sending path's limits
    apply to).  Transactions that existing limits deferred are left out, since their
    client sent them again later and the accepted retry is in the history.  Only the
    proposed limit is applied, as if it were the only one.

HOW (the engine's own rules, see mailfc/policy/engine.py and 0004_policy.sql)
    messages, recipients, bytes per window
        counted at the end of each transaction (ended_at; started_at if none) in
        sub-buckets of window/12 (at least 1 s); a bucket counts while any part of it
        lies inside the window.  A transaction whose amount would take the usage past
        the value is deferred and counts nothing.
    recipients_per_message
        a transaction with more recipients than the value: its extra recipients are
        refused (counted in `refused_amount`), the transaction itself goes on.
    concurrent_sends
        a transaction that starts while `value` admitted ones of the same subject are
        still open is deferred.

SUBJECTS
    an account                    that account
    a domain                      the domain as a whole (all its accounts together)
    a domain with per_account     each account of the domain on its own (the default
                                  every account without its own limit would get)

The result lists every subject with its transactions and what the limit would have
deferred, the most affected first, and the totals.
"""

from __future__ import annotations

import collections
import datetime
import heapq
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from mailfc.analysis.targets import ACCOUNT, IP, classify, require_account, require_domain
from mailfc.analysis.timerange import TimeRange
from mailfc.db.limits import check_kind
from mailfc.durations import format_duration
from mailfc.errors import InvalidInput

WINDOWED = {"messages": None, "recipients": "recipient_count", "bytes": "size"}
SUPPORTED = (*WINDOWED, "recipients_per_message", "concurrent_sends")


@dataclass(frozen=True)
class Transaction:
    subject: str
    started_at: datetime.datetime
    ended_at: datetime.datetime
    recipients: int
    size: int


def amount(kind: str, txn: Transaction) -> int:
    if kind == "messages":
        return 1
    if kind == "recipients":
        return txn.recipients
    return txn.size


def replay_window(kind: str, value: int, window_s: int, txns: Sequence[Transaction]
                  ) -> list[tuple[Transaction, int]]:
    """The deferred transactions of one subject (in time order) with the usage they met."""
    sub = max(1, window_s // 12)
    buckets: collections.deque[list[float]] = collections.deque()   # [start, amount]
    used = 0.0
    deferred = []
    for txn in sorted(txns, key=lambda t: t.ended_at):
        moment = txn.ended_at.timestamp()
        while buckets and buckets[0][0] <= moment - (window_s + sub):
            used -= buckets.popleft()[1]
        need = amount(kind, txn)
        if used + need > value:
            deferred.append((txn, int(used)))
            continue
        start = (moment // sub) * sub
        if buckets and buckets[-1][0] == start:
            buckets[-1][1] += need
        else:
            buckets.append([start, float(need)])
        used += need
    return deferred


def replay_concurrency(value: int, txns: Sequence[Transaction]) -> list[tuple[Transaction, int]]:
    open_ends: list[datetime.datetime] = []
    deferred = []
    for txn in sorted(txns, key=lambda t: t.started_at):
        while open_ends and open_ends[0] <= txn.started_at:
            heapq.heappop(open_ends)
        if len(open_ends) >= value:
            deferred.append((txn, len(open_ends)))
            continue
        heapq.heappush(open_ends, txn.ended_at)
    return deferred


def replay(kind: str, value: int, window_s: int | None, txns: Sequence[Transaction]
           ) -> dict[str, Any]:
    """What the limit does to one subject's transactions."""
    if kind == "recipients_per_message":
        over = [t for t in txns if t.recipients > value]
        return {"transactions": len(txns), "deferred": 0, "affected": len(over),
                "refused_amount": sum(t.recipients - value for t in over),
                "first_at": min((t.started_at for t in over), default=None),
                "last_at": max((t.started_at for t in over), default=None)}
    if kind == "concurrent_sends":
        hit = replay_concurrency(value, txns)
    else:
        assert window_s is not None
        hit = replay_window(kind, value, window_s, txns)
    return {"transactions": len(txns), "deferred": len(hit), "affected": len(hit),
            "refused_amount": sum(amount(kind, t) for t, _ in hit)
            if kind in WINDOWED else len(hit),
            "first_at": hit[0][0].ended_at if hit else None,
            "last_at": hit[-1][0].ended_at if hit else None}


async def simulate(db: asyncpg.Connection, target: str, kind: str, value: int, *,
                   window_s: int | None, span: TimeRange, per_account: bool = False
                   ) -> dict[str, Any]:
    if kind not in SUPPORTED:
        raise InvalidInput(f"simulate replays SMTP sending limits: one of {', '.join(SUPPORTED)}"
                           f" (not {kind!r})")
    check_kind(kind, window_s, "enforce")
    found = classify(target)
    if found.kind == IP:
        raise InvalidInput(f"limits apply to a domain or an account, not to {target!r}")
    if found.kind == ACCOUNT:
        if per_account:
            raise InvalidInput("--per-account applies to a domain, not to an account")
        subject_sql, filter_sql = "account", "account = $3"
        name = await require_account(db, found.value)
        scope = "account"
    else:
        name = await require_domain(db, found.value)
        subject_sql = "account" if per_account else "domain"
        filter_sql = "domain = $3"
        scope = "account_default" if per_account else "domain"
    rows = await db.fetch(
        f"SELECT {subject_sql} AS subject, started_at, coalesce(ended_at, started_at) AS ended,"
        " recipient_count, coalesce(size, 0) AS size FROM smtp_messages"
        f" WHERE started_at >= $1 AND started_at < $2 AND {filter_sql}"
        " AND account IS NOT NULL AND verdict = 'accept'", span.start, span.end, name)
    by_subject: dict[str, list[Transaction]] = collections.defaultdict(list)
    for row in rows:
        by_subject[row["subject"]].append(Transaction(
            row["subject"], row["started_at"], row["ended"], row["recipient_count"],
            row["size"]))
    subjects = [{"subject": subject, **replay(kind, value, window_s, txns)}
                for subject, txns in by_subject.items()]
    subjects.sort(key=lambda r: (-r["affected"], -r["transactions"], r["subject"]))
    for row in subjects:
        row["share"] = round(row["affected"] / row["transactions"], 4) if row["transactions"] else 0
    return {"limit": {"target": name, "scope": scope, "kind": kind, "value": value,
                      "window": format_duration(window_s) if window_s else None},
            "range": {"start": span.start, "end": span.end},
            "subjects": subjects, "totals": _totals(subjects)}


def _totals(subjects: Iterable[dict[str, Any]]) -> dict[str, int]:
    rows = list(subjects)
    return {"subjects": len(rows), "subjects_affected": sum(1 for r in rows if r["affected"]),
            "transactions": sum(r["transactions"] for r in rows),
            "deferred": sum(r["deferred"] for r in rows),
            "affected": sum(r["affected"] for r in rows),
            "refused_amount": sum(r["refused_amount"] for r in rows)}
