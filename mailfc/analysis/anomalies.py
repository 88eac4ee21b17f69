"""Ranked suspects, each with the evidence a human can check.

    suspects = await anomalies(db, Options(window_s=86400, baseline_s=14 * 86400))

The current window is [at - window, at).  An account's baseline is the same
measurement over each of the baseline/window windows before it, zero-filled
(stats.Baseline: median, MAD, earlier peak).  Every rule yields Findings with a
score: 1 when the observation just passes the rule's bound, +1 per doubling beyond
it (stats.severity).  A suspect's score is the sum over its findings, so
independent signals about one account add up.

RULES
    volume        account   messages tried (accepted + refused) in the window above
                            max(median + k*sigma, peak_factor * earlier peak) of its own
                            windows; at least min_messages.  An account that has sent
                            this much before (a weekly newsletter) is measured against
                            that peak and stays quiet.
    fanout        account   recipients addressed, same bound on its own history, at least
                            2 * min_messages, and at least twice its usual recipients per
                            message (more mail to as many people is the volume rule's).
    new_ip_send   account   at least min_messages sent from a client address the account
                            had not used (SMTP, IMAP or a successful login) in the
                            baseline; says when it logged in from there.  Accounts with no
                            history at all are left to the volume rule.
    login_ips     account   logins/sessions from at least min_ips addresses not seen in the
                            baseline, within the window.
    refusals      account   at least min_messages tried, and a refused share (deferred or
                            rejected by limits or blocks) of at least refusal_ratio and
                            3 times its baseline share.
    bounces       account   null-sender messages (bounces) received, at least min_bounces
                            and bounce_ratio of the messages it sent: spam it sent is
                            coming back.
    stuffing      ip        failed logins for at least min_accounts different accounts
                            from one address, above median + k*sigma of the distinct
                            accounts per failing address in the same window.  Accounts
                            that then logged in successfully from it are named.

Rules look only at the window and at its baseline, and each query is bounded by both,
so the partitions outside them are never read.
"""

from __future__ import annotations

import datetime
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from mailfc.analysis.stats import Baseline, mad, median, severity, zero_filled
from mailfc.analysis.timerange import now
from mailfc.durations import format_duration
from mailfc.errors import InvalidInput

# The least bound a ratio rule (refusals, bounces) is measured against: 0.1 %.
RATIO_FLOOR = 0.001


@dataclass(frozen=True)
class Options:
    window_s: int = 86400
    baseline_s: int = 14 * 86400
    at: datetime.datetime | None = None
    k: float = 6.0                  # sigmas above the median that are still ordinary
    peak_factor: float = 1.5        # how far past its earlier peak an account may go
    min_messages: int = 20
    min_ips: int = 5
    min_accounts: int = 5
    min_bounces: int = 10
    bounce_ratio: float = 0.1
    refusal_ratio: float = 0.3
    domain: str | None = None

    def check(self) -> None:
        if self.baseline_s < self.window_s:
            raise InvalidInput(f"--baseline {format_duration(self.baseline_s)} is shorter than"
                               f" --window {format_duration(self.window_s)}: the baseline"
                               " holds whole windows")
        if self.baseline_s // self.window_s > 5000:
            raise InvalidInput("--baseline holds more than 5000 windows: use a longer"
                               " --window or a shorter --baseline")


@dataclass(frozen=True)
class Finding:
    kind: str                       # account | ip
    subject: str
    rule: str
    score: float
    evidence: str
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class Suspect:
    kind: str
    subject: str
    findings: list[Finding]

    @property
    def score(self) -> float:
        return sum(f.score for f in self.findings)

    def as_row(self, rank: int) -> dict[str, Any]:
        return {"rank": rank, "kind": self.kind, "subject": self.subject,
                "score": round(self.score, 1),
                "rules": ", ".join(f.rule for f in self.findings),
                "evidence": [f.evidence for f in self.findings],
                "findings": [{"rule": f.rule, "score": round(f.score, 2),
                              "evidence": f.evidence, **f.data} for f in self.findings]}


@dataclass(frozen=True)
class Frame:
    """The moments the rules share."""

    end: datetime.datetime
    start: datetime.datetime          # of the current window
    base_start: datetime.datetime     # of the baseline
    window_s: int
    windows: int                      # baseline windows

    @staticmethod
    def of(options: Options) -> Frame:
        end = options.at or now()
        windows = options.baseline_s // options.window_s
        return Frame(end, end - datetime.timedelta(seconds=options.window_s),
                     end - datetime.timedelta(seconds=options.window_s * (windows + 1)),
                     options.window_s, windows)

    @property
    def span(self) -> str:
        return format_duration(self.window_s)


def _domain_filter(options: Options, column: str, args: list[Any]) -> str:
    if options.domain is None:
        return ""
    args.append(options.domain)
    return f" AND {column} = ${len(args)}"


async def anomalies(db: asyncpg.Connection, options: Options, limit: int = 50
                    ) -> list[dict[str, Any]]:
    options.check()
    frame = Frame.of(options)
    findings: list[Finding] = []
    findings += await _volume_rules(db, options, frame)
    findings += await _new_ip_send(db, options, frame)
    findings += await _login_ips(db, options, frame)
    findings += await _bounces(db, options, frame)
    findings += await _stuffing(db, options, frame)
    suspects: dict[tuple[str, str], Suspect] = {}
    for finding in findings:
        key = (finding.kind, finding.subject)
        suspects.setdefault(key, Suspect(finding.kind, finding.subject, [])).findings.append(
            finding)
    ranked = sorted(suspects.values(), key=lambda s: (-s.score, s.subject))
    for suspect in ranked:
        suspect.findings.sort(key=lambda f: -f.score)
    return [suspect.as_row(rank) for rank, suspect in enumerate(ranked[:limit], 1)]


async def _volume_rules(db: asyncpg.Connection, options: Options, frame: Frame
                        ) -> list[Finding]:
    """volume, fanout and refusals: one pass over the active accounts' windows."""
    args: list[Any] = [frame.start, frame.end, frame.base_start, float(frame.window_s),
                       options.min_messages]
    domain = _domain_filter(options, "domain", args)
    rows = await db.fetch(
        # Only accounts that reach min_messages in the window can be flagged: their
        # history is read through the (account, started_at) index, nobody else's.
        "WITH active AS (SELECT account FROM smtp_messages"
        "   WHERE started_at >= $1 AND started_at < $2 AND account IS NOT NULL"
        f"  {domain} GROUP BY account HAVING count(*) >= $5"
        "   OR coalesce(sum(recipient_count), 0) >= $5)"
        " SELECT m.account,"
        "   floor(extract(epoch FROM ($2 - m.started_at)) / $4)::int AS k,"
        "   count(*) FILTER (WHERE m.verdict = ANY('{accept,tempfail,reject}')) AS tried,"
        "   count(*) FILTER (WHERE m.verdict = ANY('{tempfail,reject}')) AS refused,"
        "   coalesce(sum(m.recipient_count), 0)::bigint AS recipients"
        " FROM smtp_messages m"
        " WHERE m.started_at >= $3 AND m.started_at < $2"
        "   AND m.account IN (SELECT account FROM active)"
        " GROUP BY 1, 2", *args)
    per: dict[str, dict[int, asyncpg.Record]] = defaultdict(dict)
    for row in rows:
        per[row["account"]][row["k"]] = row
    found: list[Finding] = []
    for account, windows in per.items():
        current = windows.get(0)
        if current is None:
            continue
        before_tried = sum(float(r["tried"]) for k, r in windows.items() if k > 0)
        before_rcpts = sum(float(r["recipients"]) for k, r in windows.items() if k > 0)
        usual_per_message = before_rcpts / before_tried if before_tried else 0.0
        per_message = float(current["recipients"]) / max(float(current["tried"]), 1.0)
        for rule, column, noun, minimum in (
                ("volume", "tried", "messages", options.min_messages),
                ("fanout", "recipients", "recipients", 2 * options.min_messages)):
            observed = float(current[column])
            history = {k: float(r[column]) for k, r in windows.items() if k > 0}
            base = Baseline.of(zero_filled(history, frame.windows))
            bound = max(base.median + options.k * base.sigma, options.peak_factor * base.peak)
            if observed < minimum or observed <= bound:
                continue
            if rule == "volume":
                detail = (f" ({current['tried'] - current['refused']} accepted,"
                          f" {current['refused']} refused)")
            elif per_message < 2 * usual_per_message:
                continue     # more mail, not wider mail: the volume rule speaks for it
            else:
                detail = f" ({per_message:.1f} per message, usually {usual_per_message:.1f})"
            found.append(Finding(
                "account", account, rule, 1 + severity(observed, bound),
                f"{noun} in the last {frame.span}: {int(observed)}{detail}; its usual:"
                f" median {base.median:g}, MAD {base.mad:g}, busiest earlier {frame.span}"
                f" {base.peak:g} (over {frame.windows} windows)",
                {"observed": int(observed), "median": base.median, "mad": base.mad,
                 "peak": base.peak, "bound": round(bound, 1)}))
        tried, refused = current["tried"], current["refused"]
        if tried >= options.min_messages and refused / tried >= options.refusal_ratio:
            before_tried = sum(r["tried"] for k, r in windows.items() if k > 0)
            before_refused = sum(r["refused"] for k, r in windows.items() if k > 0)
            usual = before_refused / before_tried if before_tried else 0.0
            ratio = refused / tried
            bound = max(options.refusal_ratio, 3 * usual)
            if ratio >= bound:
                found.append(Finding(
                    "account", account, "refusals", 1 + severity(ratio, bound, RATIO_FLOOR) * 2,
                    f"{refused} of {tried} messages refused in the last {frame.span}"
                    f" ({ratio:.0%}; usually {usual:.0%})",
                    {"refused": refused, "tried": tried, "usual_ratio": round(usual, 3)}))
    return found


async def _new_ip_send(db: asyncpg.Connection, options: Options, frame: Frame
                       ) -> list[Finding]:
    args: list[Any] = [frame.start, frame.end, options.min_messages]
    domain = _domain_filter(options, "domain", args)
    sent = await db.fetch(
        "SELECT account, client_ip, count(*) AS messages, min(started_at) AS first_at"
        " FROM smtp_messages WHERE started_at >= $1 AND started_at < $2"
        f" AND account IS NOT NULL AND client_ip IS NOT NULL{domain}"
        " GROUP BY 1, 2 HAVING count(*) >= $3", *args)
    if not sent:
        return []
    # Two steps: the planner cannot know how few (account, address) pairs pass the
    # HAVING above, and would read the whole baseline to join them; handed over as
    # arrays, each pair is a few index probes.
    rows = await db.fetch(
        "SELECT s.account, host(s.client_ip) AS ip, s.messages, s.first_at,"
        "   (SELECT min(a.at) FROM auth_attempts a WHERE lower(a.username) = s.account"
        "      AND a.client_ip = s.client_ip AND a.success AND a.at >= $1 AND a.at < $2"
        "   ) AS login_at"
        " FROM unnest($4::text[], $5::inet[], $6::bigint[], $7::timestamptz[])"
        "   AS s(account, client_ip, messages, first_at)"
        " WHERE EXISTS (SELECT 1 FROM smtp_sessions o WHERE o.account = s.account"
        "      AND o.started_at >= $3 AND o.started_at < $1)"
        "   AND NOT EXISTS (SELECT 1 FROM smtp_sessions o WHERE o.account = s.account"
        "      AND o.client_ip = s.client_ip AND o.started_at >= $3 AND o.started_at < $1)"
        "   AND NOT EXISTS (SELECT 1 FROM imap_sessions o WHERE o.account = s.account"
        "      AND o.client_ip = s.client_ip AND o.started_at >= $3 AND o.started_at < $1)"
        "   AND NOT EXISTS (SELECT 1 FROM auth_attempts o WHERE lower(o.username) = s.account"
        "      AND o.client_ip = s.client_ip AND o.success AND o.at >= $3 AND o.at < $1)",
        frame.start, frame.end, frame.base_start, [r["account"] for r in sent],
        [r["client_ip"] for r in sent], [r["messages"] for r in sent],
        [r["first_at"] for r in sent])
    found = []
    for row in rows:
        login = (f"logged in from it at {_clock(row['login_at'])}, "
                 if row["login_at"] is not None else "")
        found.append(Finding(
            "account", row["account"], "new_ip_send",
            1 + severity(row["messages"], options.min_messages),
            f"{login}sent {row['messages']} messages from {row['ip']} from"
            f" {_clock(row['first_at'])} on, an address it had not used in the"
            f" {format_duration(frame.window_s * frame.windows)} before",
            {"ip": row["ip"], "messages": row["messages"],
             "first_at": row["first_at"], "login_at": row["login_at"]}))
    return found


_LOGINS = (
    "SELECT lower(username) AS account, client_ip, at FROM auth_attempts"
    "  WHERE success AND at >= $1 AND at < $2 AND client_ip IS NOT NULL"
    " UNION ALL SELECT account, client_ip, started_at FROM imap_sessions"
    "  WHERE started_at >= $1 AND started_at < $2 AND account IS NOT NULL"
    " UNION ALL SELECT account, client_ip, started_at FROM smtp_sessions"
    "  WHERE started_at >= $1 AND started_at < $2 AND account IS NOT NULL")
# Was (account, ip) seen in [$3, $1)?  One index probe per table (account, time).
_SEEN_BEFORE = (
    "EXISTS (SELECT 1 FROM smtp_sessions o WHERE o.account = n.account"
    "   AND o.client_ip = n.client_ip AND o.started_at >= $3 AND o.started_at < $1)"
    " OR EXISTS (SELECT 1 FROM imap_sessions o WHERE o.account = n.account"
    "   AND o.client_ip = n.client_ip AND o.started_at >= $3 AND o.started_at < $1)"
    " OR EXISTS (SELECT 1 FROM auth_attempts o WHERE lower(o.username) = n.account"
    "   AND o.client_ip = n.client_ip AND o.success AND o.at >= $3 AND o.at < $1)")


async def _login_ips(db: asyncpg.Connection, options: Options, frame: Frame) -> list[Finding]:
    args: list[Any] = [frame.start, frame.end, frame.base_start, options.min_ips]
    domain = ""
    if options.domain is not None:
        args.append("%@" + options.domain)
        domain = f" AND account LIKE ${len(args)}"
    # Only accounts with at least min_ips addresses in the window are probed.
    rows = await db.fetch(
        f"WITH now_ AS (SELECT account, client_ip, min(at) AS first_at FROM ({_LOGINS}) c"
        f"   WHERE client_ip IS NOT NULL{domain} GROUP BY 1, 2),"
        " busy AS (SELECT account FROM now_ GROUP BY 1 HAVING count(*) >= $4)"
        " SELECT n.account, count(*) AS ips,"
        f"   count(*) FILTER (WHERE NOT ({_SEEN_BEFORE})) AS new_ips,"
        "   array_agg(host(n.client_ip) ORDER BY n.first_at)"
        f"     FILTER (WHERE NOT ({_SEEN_BEFORE})) AS new_list"
        " FROM now_ n WHERE n.account IN (SELECT account FROM busy)"
        " GROUP BY 1", *args)
    found = []
    for row in rows:
        if row["new_ips"] < options.min_ips:
            continue
        shown = ", ".join(row["new_list"][:5]) + (", ..." if row["new_ips"] > 5 else "")
        found.append(Finding(
            "account", row["account"], "login_ips",
            1 + severity(row["new_ips"], options.min_ips),
            f"used {row['ips']} addresses in the last {frame.span}, {row['new_ips']} of them"
            f" never seen before: {shown}",
            {"ips": row["ips"], "new_ips": row["new_ips"], "new": row["new_list"]}))
    return found


async def _bounces(db: asyncpg.Connection, options: Options, frame: Frame) -> list[Finding]:
    args: list[Any] = [frame.start, frame.end, options.min_bounces]
    domain = _domain_filter(options, "b.account_domain", args)
    rows = await db.fetch(
        "WITH b AS (SELECT lower(r) AS account, split_part(lower(r), '@', 2)"
        "     AS account_domain, count(*) AS bounces"
        "   FROM smtp_messages, unnest(recipients) AS r"
        "   WHERE started_at >= $1 AND started_at < $2 AND sender = ''"
        "   GROUP BY 1, 2 HAVING count(*) >= $3)"
        " SELECT b.account, b.bounces, (SELECT count(*) FROM smtp_messages m"
        "   WHERE m.account = b.account AND m.started_at >= $1 AND m.started_at < $2"
        "   AND m.verdict = 'accept') AS sent"
        f" FROM b WHERE true{domain}", *args)
    found = []
    for row in rows:
        sent = row["sent"]
        if sent == 0:
            continue     # bounces of mail it did not send here: backscatter, not abuse
        ratio = row["bounces"] / sent
        if ratio < options.bounce_ratio:
            continue
        found.append(Finding(
            "account", row["account"], "bounces",
            1 + severity(ratio, options.bounce_ratio, RATIO_FLOOR),
            f"{row['bounces']} bounces came back for {sent} messages sent in the last"
            f" {frame.span} ({ratio:.0%})",
            {"bounces": row["bounces"], "sent": sent}))
    return found


async def _stuffing(db: asyncpg.Connection, options: Options, frame: Frame) -> list[Finding]:
    args: list[Any] = [frame.start, frame.end]
    domain = _domain_filter(options, "domain", args)
    rows = await db.fetch(
        "SELECT host(client_ip) AS ip, count(*) FILTER (WHERE NOT success) AS failures,"
        "   count(DISTINCT lower(username)) FILTER (WHERE NOT success) AS accounts,"
        "   array_agg(DISTINCT protocol) AS protocols,"
        "   array_agg(DISTINCT lower(username)) FILTER (WHERE success) AS logged_in"
        " FROM auth_attempts WHERE at >= $1 AND at < $2 AND client_ip IS NOT NULL"
        f" {domain} GROUP BY client_ip HAVING count(*) FILTER (WHERE NOT success) > 0",
        *args)
    if not rows:
        return []
    # The platform's own distribution: how many accounts does a failing address try?
    base = Baseline(len(rows), *_median_mad([float(r["accounts"]) for r in rows]), 0.0)
    bound = max(base.median + options.k * base.sigma, float(options.min_accounts) - 0.5)
    found = []
    for row in rows:
        if row["accounts"] < options.min_accounts or row["accounts"] <= bound:
            continue
        logged = [a for a in (row["logged_in"] or []) if a]
        then = (f"; then logged in successfully as {', '.join(logged[:5])}"
                f"{', ...' if len(logged) > 5 else ''} (check these accounts)"
                if logged else "")
        found.append(Finding(
            "ip", row["ip"], "stuffing", 1 + severity(row["accounts"], bound),
            f"{row['failures']} failed logins for {row['accounts']} different accounts in the"
            f" last {frame.span} ({', '.join(sorted(row['protocols']))}); a failing address"
            f" usually tries {base.median:g}{then}",
            {"failures": row["failures"], "accounts": row["accounts"],
             "logged_in": logged}))
    return found


def _median_mad(values: list[float]) -> tuple[float, float]:
    return median(values), mad(values)


def _clock(moment: datetime.datetime | None) -> str:
    if moment is None:
        return "-"
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")

