"""`why`: every decision taken on one mail or session, in words a support agent can read out.

    story = await why(db, "4XyZ1abcD")        # a Postfix queue id
    story = await why(db, "<abc@example.org>") # a Message-ID (angle brackets optional)
    story = await why(db, "1234")              # an SMTP session id (mailfc sessions list)
    story = await why(db, "imap:77")           # an IMAP session id

WHAT IS LOOKED UP
    A Message-ID (it has an @) may name several transactions: a deferred message is
    sent again by the client's server, with the same Message-ID, so the story tells
    each attempt in order ("deferred at 12:03 ..., accepted at 12:20").  A queue id
    names the transaction Postfix queued it under.  A session id names the session
    with all its transactions.

WHAT IS SAID
    For each transaction: who sent it (account, client address), when, to how many
    recipients; every recorded decision (smtp_events) with its stage, what the client
    was told (451 4.7.1 deferred, 550 5.7.1 refused), the reason the engine gave,
    the rule behind it (limit kind, window, scope, mode; admin block; policy database
    unavailable) and where that rule stands now (the limit's current value, the block
    still in force or lifted, and who set it); then the outcome in plain words.
    Rules (see mailfc/policy/engine.py): limit:KIND[/WINDOW]@SCOPE, block:KIND,
    policy:unavailable.
"""

from __future__ import annotations

import datetime
import json
import re
from dataclasses import dataclass
from typing import Any

import asyncpg

from mailfc.durations import format_duration
from mailfc.errors import InvalidInput, NotFound

_QUEUE_ID = re.compile(r"^[0-9A-Za-z]{5,32}$")
_LIMIT_RULE = re.compile(r"^limit:(?P<kind>[a-z_]+)(?:/(?P<window>[0-9a-z]+))?@(?P<scope>\w+)$")

STAGES = {
    "connect": "when the client connected",
    "helo": "at the client's greeting (HELO)",
    "mail": "at MAIL FROM, before any recipient was given",
    "rcpt": "at RCPT TO",
    "data": "at DATA",
    "eom": "at the end of the message, when it was complete",
}
OUTCOMES = {
    "accept": "accepted",
    "tempfail": "deferred (temporary refusal): the sending server keeps the message and"
                " tries again later; nothing is lost",
    "reject": "refused permanently: the sender gets a bounce",
    "aborted": "not sent: the client ended the transaction before it was complete",
    "discard": "accepted and discarded",
}
SCOPES = {"account": "the account's own limit", "domain": "the domain's limit (all its"
          " accounts together)", "account_default": "the domain's default limit for each"
          " account"}


@dataclass(frozen=True)
class Lookup:
    how: str            # session | imap_session | queue id | message id
    value: str | int


def identify(text: str) -> Lookup:
    value = text.strip()
    protocol, colon, rest = value.partition(":")
    if colon and protocol.lower() in ("smtp", "imap") and rest.isdigit():
        return Lookup("session" if protocol.lower() == "smtp" else "imap_session", int(rest))
    if value.isdigit():
        return Lookup("session", int(value))
    if "@" in value:
        return Lookup("message id", value.strip("<>"))
    if _QUEUE_ID.match(value):
        return Lookup("queue id", value)
    raise InvalidInput(f"{text!r} is not a session id (1234, imap:77), a queue id"
                       " (4XyZ1abcD) or a Message-ID (<abc@example.org>)")


async def why(db: asyncpg.Connection, text: str) -> dict[str, Any]:
    lookup = identify(text)
    if lookup.how == "imap_session":
        return await _imap(db, int(lookup.value))
    if lookup.how == "session":
        messages = await db.fetch("SELECT * FROM smtp_messages WHERE session_id = $1"
                                  " ORDER BY started_at, id", lookup.value)
        session_ids = [int(lookup.value)]
    else:
        column = "queue_id" if lookup.how == "queue id" else "message_id"
        args: list[Any] = [lookup.value]
        if column == "message_id":
            args = [[lookup.value, f"<{lookup.value}>"]]
            where = "message_id = ANY($1::text[])"
        else:
            where = "queue_id = $1"
        messages = await db.fetch(f"SELECT * FROM smtp_messages WHERE {where}"
                                  " ORDER BY started_at, id", *args)
        session_ids = sorted({int(m["session_id"]) for m in messages})
    sessions = {int(s["id"]): dict(s) for s in await db.fetch(
        "SELECT * FROM smtp_sessions WHERE id = ANY($1::bigint[])", session_ids)}
    if not sessions and not messages:
        hint = ("mailfc sessions list" if lookup.how == "session"
                else "mailfc abuse account ADDRESS")
        raise NotFound(f"no SMTP {lookup.how} {lookup.value} in the records: see {hint}")
    earliest = min([s["started_at"] for s in sessions.values()]
                   + [m["started_at"] for m in messages])
    events = await db.fetch(
        "SELECT * FROM smtp_events WHERE session_id = ANY($1::bigint[]) AND at >= $2"
        " ORDER BY at, id", session_ids, earliest - datetime.timedelta(minutes=1))
    context = _Context(db)
    attempts = []
    for message in messages:
        decisions = [await context.decision(dict(e)) for e in events
                     if e["message_id"] == message["id"]]
        attempts.append(_attempt(dict(message), decisions))
    loose = [await context.decision(dict(e)) for e in events if e["message_id"] is None
             or e["message_id"] not in {m["id"] for m in messages}]
    story = [line for attempt in attempts for line in attempt["story"]]
    if lookup.how == "session":
        session = sessions.get(int(lookup.value))
        head = [_session_line(session)] if session else []
        story = head + [d["text"] for d in loose] + story
        if session is not None and not messages:
            story.append("no message was started in this session.")
    if len(attempts) > 1 and lookup.how == "message id":
        final = attempts[-1]["verdict"]
        story.append(f"{len(attempts)} attempts in all; the last one was "
                     f"{OUTCOMES.get(final or '', 'not finished').split(':')[0]}.")
    return {"lookup": lookup.how, "value": lookup.value,
            "sessions": list(sessions.values()), "attempts": attempts,
            "session_decisions": loose, "story": story}


def _when(moment: datetime.datetime | None) -> str:
    if moment is None:
        return "at an unknown time"
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


# Hops that record a message again on its way (smtp_messages.hop): no client speaks
# to them, so "unauthenticated client" would be wrong: the client spoke to the hop before.
HOPS = {"filter-out": "Filter-Out, the outbound check of mail the domain's Postfix sends on"}


def _session_line(session: dict[str, Any]) -> str:
    hop = HOPS.get(session.get("component") or "")
    if hop is not None:
        return (f"SMTP session {session['id']} ({session['component']}): {hop}, for a"
                f" message its client sent from"
                f" {session['client_ip'] or 'an address not passed on'},"
                f" {_when(session['started_at'])}: ended"
                f" {OUTCOMES.get(session['verdict'] or '', 'without a verdict').split(':')[0]}.")
    who = f"account {session['account']}" if session.get("account") else "an unauthenticated client"
    return (f"SMTP session {session['id']} ({session['component']}) from {who} at"
            f" {session['client_ip'] or 'an unknown address'}, {_when(session['started_at'])}:"
            f" {_count(session['messages'], 'message')} accepted, ended"
            f" {OUTCOMES.get(session['verdict'] or '', 'without a verdict').split(':')[0]}.")


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _attempt(message: dict[str, Any], decisions: list[dict[str, Any]]) -> dict[str, Any]:
    who = message.get("account") or "an unauthenticated client"
    ids = ", ".join(part for part in (
        f"Message-ID {message['message_id']}" if message.get("message_id") else "",
        f"queue id {message['queue_id']}" if message.get("queue_id") else "") if part)
    recipients = _count(message.get("recipient_count") or 0, "recipient")
    if message.get("hop"):
        # Recorded again on its way: who sent it is in the record of the first hop.
        hop = HOPS.get(message["hop"], message["hop"])
        head = (f"{_when(message['started_at'])}: message from"
                f" <{message.get('sender') or ''}> to {recipients}, checked by {hop}"
                f" (its client sent it from"
                f" {message.get('client_ip') or 'an address not passed on'})"
                f"{' (' + ids + ')' if ids else ''}.")
    else:
        head = (f"{_when(message['started_at'])}: message from"
                f" <{message.get('sender') or ''}> to {recipients}, sent by {who} from"
                f" {message.get('client_ip') or 'an unknown address'}"
                f"{' (' + ids + ')' if ids else ''}.")
    verdict = message.get("verdict")
    outcome = OUTCOMES.get(verdict or "", "not finished (still in progress, or not recorded)")
    if verdict == "accept" and not decisions:
        outcome += "; no limit or rule objected"
    elif verdict == "accept":
        outcome += " (the decisions above did not stop it)"
    story = [head, *(f"  {d['text']}" for d in decisions), f"  Outcome: {outcome}."]
    return {"message": message, "decisions": decisions, "verdict": verdict, "story": story}


class _Context:
    """Where each rule stands now; looked up once per rule."""

    def __init__(self, db: asyncpg.Connection) -> None:
        self.db = db
        self.limits: dict[tuple[str | None, str | None], list[asyncpg.Record]] = {}

    async def decision(self, event: dict[str, Any]) -> dict[str, Any]:
        rule = event.get("rule") or ""
        verdict, mode = event.get("verdict"), event.get("mode") or "enforce"
        stage = STAGES.get(event.get("stage") or "", f"at stage {event.get('stage')}")
        told = {"tempfail": "deferred it (451 4.7.1, try again later)",
                "reject": "refused it permanently (550 5.7.1)"}.get(
            verdict or "", f"decided {verdict}")
        if mode == "shadow":
            told = f"would have {told}, but the rule is in shadow (test) mode, so it passed"
        if rule == "policy:unavailable":
            told = ("could not check the limits (the policy database did not answer) and "
                    + ("deferred it (451 4.3.0)" if verdict == "tempfail"
                       else "let it pass unchecked"))
        detail = event.get("detail")
        if isinstance(detail, str):
            detail = json.loads(detail)
        recipient = ""
        if isinstance(detail, dict) and detail.get("recipient"):
            recipient = f" <{detail['recipient']}>"
        text = (f"{_when(event.get('at'))}, {stage}{recipient}: the platform {told}."
                f" Reason given: {event.get('reason') or '(none recorded)'}.")
        now = await self._now(rule, event)
        if now:
            text += " " + now
        return {"at": event.get("at"), "stage": event.get("stage"), "verdict": verdict,
                "mode": mode, "rule": rule, "reason": event.get("reason"), "now": now,
                "text": text}

    async def _now(self, rule: str, event: dict[str, Any]) -> str:
        match = _LIMIT_RULE.match(rule)
        if match:
            return await self._limit_now(match, event)
        if rule.startswith("block:"):
            return await self._block_now(rule.removeprefix("block:"), event)
        return ""

    async def _limit_now(self, match: re.Match[str], event: dict[str, Any]) -> str:
        kind, window, scope = match["kind"], match["window"], match["scope"]
        session = await self.db.fetchrow(
            "SELECT domain, account FROM smtp_sessions WHERE id = $1", event["session_id"])
        domain = session["domain"] if session else None
        account = session["account"] if session else None
        key = (domain, account)
        if key not in self.limits:
            self.limits[key] = await self.db.fetch(
                "SELECT * FROM mailfc_applicable_limits($1, $2)", domain, account)
        where = SCOPES.get(scope, scope)
        rule_words = (f"The rule was {where}: {kind.replace('_', ' ')}"
                      f"{' per ' + window if window else ''}.")
        for row in self.limits[key]:
            if row["kind"] == kind and row["scope"] == scope:
                per = f" per {format_duration(row['window_s'])}" if row["window_s"] else ""
                return (f"{rule_words} It is now {row['value']}{per} ({row['mode']}) on"
                        f" {row['subject'].replace(':', ' ')}.")
        return f"{rule_words} That limit has been removed since."

    async def _block_now(self, kind: str, event: dict[str, Any]) -> str:
        reason = event.get("reason") or ""
        match = re.search(r"\((\w+) ([^)]+)\)", reason)
        if match is None:
            return ""
        value = match.group(2)
        row = await self.db.fetchrow(
            "SELECT reason, created_at, expires_at FROM blocks WHERE kind = $1 AND value = $2"
            " AND (expires_at IS NULL OR expires_at > now())", kind, value)
        who = await self.db.fetchrow(
            "SELECT actor, at, reason FROM admin_events WHERE kind = $1 AND value = $2"
            " AND action = 'block' AND at <= $3 ORDER BY at DESC LIMIT 1",
            kind, value, event.get("at"))
        by = f" It was set by {who['actor']} at {_when(who['at'])}." if who else ""
        if row is None:
            return f"An administrator's block on the {kind} {value}.{by} It has been lifted since."
        until = f" until {_when(row['expires_at'])}" if row["expires_at"] else ""
        return f"An administrator's block on the {kind} {value}.{by} It is still in force{until}."


async def _imap(db: asyncpg.Connection, session_id: int) -> dict[str, Any]:
    session = await db.fetchrow("SELECT * FROM imap_sessions WHERE id = $1", session_id)
    if session is None:
        raise NotFound(f"no IMAP session {session_id}: see mailfc sessions list --protocol imap")
    refused = await db.fetch(
        "SELECT * FROM imap_commands WHERE session_id = $1 AND started_at >= $2"
        " AND (verdict IS DISTINCT FROM 'accept' AND verdict IS NOT NULL"
        "      OR result IN ('NO', 'BAD')) ORDER BY started_at, id",
        session_id, session["started_at"])
    story = [f"IMAP session {session_id} of {session['account'] or 'an unknown account'} from"
             f" {session['client_ip'] or 'an unknown address'}, {_when(session['started_at'])}:"
             f" {_count(session['commands'], 'command')}."]
    if session["verdict"] not in (None, "accept"):
        story.append(f"  The session itself was {session['verdict']}: {session['reason']}.")
    for command in refused:
        reason = command["reason"] or "(no reason recorded)"
        story.append(f"  {_when(command['started_at'])}: {command['name']} (tag"
                     f" {command['tag']}) answered {command['result'] or '-'}"
                     f"{', ' + command['verdict'] if command['verdict'] else ''}: {reason}.")
    if len(story) == 1:
        story.append("  No command was refused.")
    return {"lookup": "imap session", "value": session_id, "sessions": [dict(session)],
            "attempts": [], "session_decisions": [dict(c) for c in refused], "story": story}
