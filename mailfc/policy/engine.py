"""The limit engine: admin blocks and flow limits, shared by every host through PostgreSQL.

Used in-process by the milter, SMTP-In, the submission path and the IMAP hook
server.  It knows nothing of SMTP or IMAP: a caller names a Subject (domain,
account, client IP) and what it wants to take (a concurrency slot), check
(a windowed amount) or count (a windowed amount), and gets back Decisions.

    engine = LimitEngine(pool, holder="host/1234", lease_s=60)
    await engine.start()                          # lease renewal, housekeeping
    check = await engine.check(subject, blocks=True, acquire=("concurrent_sends",),
                               peek={"messages": 1, "recipients": 1, "bytes": size})
    check.decision                                # the one to answer with
    check.exceeds({"recipients_per_message": n})  # instant caps, no database
    done = await engine.check(subject, consume={"messages": 1, "recipients": n,
                                                "bytes": size}, release=check.leases)
    await engine.release(check.leases)            # abort, close
    await engine.stop()                           # gives back every lease it holds

LIMITS (rows of the `limits` table, set with `mailfc limit set`)
    scope    domain: the domain as a whole; account: one account; account_default:
             each account of the domain without its own row of that kind.
    kind     mailfc.policy.kinds.KINDS; mode enforce | shadow.

COUNTING RULES (what the SMTP side does with them; IMAP does the same with its kinds)
    concurrent_sends        a lease is taken at MAIL and given back at end of message,
                            abort or close.  While held it is renewed every lease_s/3;
                            if the holder dies it expires after lease_s and the slot
                            returns.
    messages / recipients / bytes per window
                            checked at MAIL without counting (used + 1 message, + 1
                            recipient, + the SIZE= the client announced); recipients are
                            checked again at each RCPT against the usage seen at MAIL plus
                            the recipients accepted so far; counted atomically at end of
                            message (1 message, the accepted recipients, the measured size),
                            where the check is repeated and an enforced limit that would be
                            exceeded refuses the message (nothing counted).
    recipients_per_message  checked at each RCPT, in process (no database).
    Windows slide in 12 sub-buckets: see 0004_policy.sql.  In shadow mode a limit is
    decided and reported (Decision.mode == "shadow", verdict tempfail) but passes, and the
    transaction counts and holds slots as an accepted one does, so shadow figures are the
    ones enforcement would see.

ATOMICITY
    Every decision point is one call of the SQL function mailfc_policy_check(): advisory
    locks per (subject, kind) in sorted order, then count and take, in one transaction.
    Limit rows are read at every call: a changed limit applies at the next transaction.

FAIRNESS
    At most per_domain_calls decisions per domain are at the database at once in one
    process; the rest of that domain's wait on their own.  A flood (50 senders of one
    domain, each asking at MAIL, RCPT and end of message, its calls serialised on its
    own advisory locks) would otherwise hold every connection of the pool, and a quiet
    domain's decision would queue behind all of them.

FAILURES
    Database unreachable, or slower than timeout_s: PolicyUnavailable (a TemporaryFailure);
    the caller applies its failure policy (policy.on_db_error_* in the configuration).
    Renewal failures are logged once per outage; leases then expire as if we had crashed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import asyncpg

from mailfc.durations import format_duration
from mailfc.errors import TemporaryFailure
from mailfc.fairness import PerKeyLimit
from mailfc.metrics import names as metrics

if TYPE_CHECKING:
    from mailfc.config import Config

log = logging.getLogger("mailfc.policy.engine")

ACCEPT = "accept"
TEMPFAIL = "tempfail"
REJECT = "reject"
ENFORCE = "enforce"
SHADOW = "shadow"

HOUSEKEEPING_S = 60.0


class PolicyUnavailable(TemporaryFailure):
    """The shared state (PostgreSQL) cannot be asked now."""


@dataclass(frozen=True)
class Subject:
    """Who a decision is about.  Names lower-case; account as user@domain."""

    domain: str | None
    account: str | None = None
    client_ip: str | None = None

    @staticmethod
    def of(domain: str | None, account: str | None = None,
           client_ip: str | None = None) -> Subject:
        return Subject(domain.lower() if domain else None,
                       account.lower() if account else None, client_ip or None)


@dataclass(frozen=True)
class Decision:
    """A verdict with its reason and the rule behind it.

    `mode` "shadow": the rule said `verdict`, but only for the record; the caller lets
    the stage pass.  `retry_after_s`: when a retry can succeed, if known.
    """

    verdict: str = ACCEPT
    reason: str = ""
    rule: str | None = None
    mode: str = ENFORCE
    retry_after_s: int | None = None

    @property
    def refuses(self) -> bool:
        """True when the caller must refuse the stage."""
        return self.verdict != ACCEPT and self.mode == ENFORCE

    @property
    def over_limit(self) -> bool:
        """An enforced flow limit refuses (not a block, not the failure policy)."""
        return self.refuses and (self.rule or "").startswith("limit:")


ACCEPTED = Decision()


@dataclass(frozen=True)
class Usage:
    scope: str
    subject: str
    kind: str
    value: int
    window_s: int | None
    mode: str
    used: int | None


@dataclass(frozen=True)
class Check:
    """The outcome of one decision point.

    `decisions`: one per block or limit that is over (enforced and shadow alike), the
    enforced ones first.  `leases`: slots taken (to release later).  `usage`: every
    applicable limit with what was used, for later in-process checks (exceeds()).
    """

    admitted: bool
    decisions: tuple[Decision, ...] = ()
    leases: tuple[int, ...] = ()
    usage: tuple[Usage, ...] = ()

    @property
    def decision(self) -> Decision:
        """What to answer: the first refusing decision, else the first shadow one, else accept."""
        return self.decisions[0] if self.decisions else ACCEPTED

    def exceeds(self, amounts: Mapping[str, int], subject: Subject | None = None
                ) -> list[Decision]:
        """Limits that `amounts` on top of the usage seen at this check would exceed.

        For instant caps (recipients_per_message) the amount is the whole value; for
        windowed kinds it is added to what was used when the check ran.
        """
        found = [
            _decision(u.__dict__ | {"amount": amount, "retry_after_s": None})
            for u in self.usage
            for kind, amount in amounts.items()
            if u.kind == kind and (u.used or 0) + amount > u.value
        ]
        return sorted(found, key=lambda d: not d.refuses)


def _who(subject: str) -> str:
    scope, _, name = subject.partition(":")
    return f"{scope} {name}"


def _size(amount: int) -> str:
    for unit, size in (("GB", 1 << 30), ("MB", 1 << 20), ("kB", 1 << 10)):
        if amount >= size:
            return f"{amount / size:.1f} {unit}"
    return f"{amount} bytes"


def _retry_text(seconds: int | None) -> str:
    if seconds is None:
        return "try again later"
    if seconds < 120:
        return f"try again in {max(1, seconds)}s"
    return f"try again in {(seconds + 59) // 60} minutes"


# What the windowed kinds count, in words: "its limit of 1 message", "of 2 searches".
LIMIT_NOUNS: dict[str, tuple[str, str]] = {
    "messages": ("message", "messages"),
    "recipients": ("recipient", "recipients"),
    "received_messages": ("received message", "received messages"),
    "imap_commands": ("command", "commands"),
    "imap_search": ("search", "searches"),
    "imap_fetch": ("fetch", "fetches"),
    "imap_append": ("append", "appends"),
    "imap_store": ("store", "stores"),
    "imap_copy": ("copy", "copies"),
}


def _decision(over: Mapping[str, Any]) -> Decision:
    """A readable Decision from one row of mailfc_policy_check()'s 'over' list."""
    kind, value, window = over["kind"], int(over["value"]), over["window_s"]
    who = _who(over["subject"])
    retry = over.get("retry_after_s")
    retry_s = int(retry + 0.999) if retry is not None else None
    per = f" per {format_duration(int(window))}" if window else ""
    if kind in ("concurrent_sends", "imap_sessions", "imap_heavy_concurrent"):
        what = {"concurrent_sends": "messages in transit", "imap_sessions": "IMAP sessions open",
                "imap_heavy_concurrent": "heavy IMAP commands running"}[kind]
        reason = (f"{who} has {over['used']} {what} (limit {value} at once);"
                  " try again when one has finished")
    elif kind == "recipients_per_message":
        reason = (f"too many recipients for one message (limit {value} for {who});"
                  " send to the others in another message")
    elif kind == "bytes":
        reason = (f"{who} sent {_size(int(over['used']))} in the last {format_duration(window)}"
                  f" (limit {_size(value)}{per}); {_retry_text(retry_s)}")
    else:
        singular, plural = LIMIT_NOUNS.get(kind, (kind.replace("_", " "),) * 2)
        reason = (f"{who} reached its limit of {value} {singular if value == 1 else plural}"
                  f"{per} ({over['used']} used); {_retry_text(retry_s)}")
    rule = f"limit:{kind}{'/' + format_duration(int(window)) if window else ''}@{over['scope']}"
    return Decision(TEMPFAIL, reason, rule, over["mode"], retry_s)


def block_decision(block: Mapping[str, Any]) -> Decision:
    why = f": {block['reason']}" if block.get("reason") else ""
    return Decision(REJECT, f"blocked by the administrator ({block['kind']} {block['value']})"
                    f"{why}", f"block:{block['kind']}", ENFORCE)


async def pause_before_refusal(decision: Decision, delay_s: float) -> None:
    """SLOW REFUSALS (policy.milter.session): a refusal by an enforced flow limit is
    answered only after delay_s, so a flood that retries at once costs little."""
    if decision.over_limit and delay_s > 0:
        await asyncio.sleep(delay_s)


def _fairness_key(subject: Subject) -> str:
    return subject.domain or subject.account or subject.client_ip or ""


def default_holder() -> str:
    return f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:8]}"


@dataclass
class LimitEngine:
    pool: asyncpg.Pool
    holder: str = field(default_factory=default_holder)
    lease_s: float = 60.0
    timeout_s: float = 2.0
    per_domain_calls: int = 3
    held: set[int] = field(default_factory=set)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _renew_failing: bool = False

    @classmethod
    def from_config(cls, pool: asyncpg.Pool, config: Config) -> LimitEngine:
        return cls(pool, lease_s=config.policy.lease_s,
                   timeout_s=config.policy.decision_timeout_s,
                   per_domain_calls=config.policy.per_domain_calls)

    def __post_init__(self) -> None:
        # FAIRNESS (module documentation): one domain's decisions never hold the
        # whole pool.
        self._calls = PerKeyLimit(self.per_domain_calls)

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self._renew_loop()),
                       asyncio.create_task(self._housekeeping_loop())]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self.held:
            with contextlib.suppress(PolicyUnavailable):
                await self.release(tuple(self.held))

    async def check(self, subject: Subject, *, blocks: bool = False,
                    acquire: Sequence[str] = (), peek: Mapping[str, int] | None = None,
                    consume: Mapping[str, int] | None = None,
                    release: Iterable[int] = (), sender: str | None = None) -> Check:
        """One atomic decision point; see the module documentation."""
        peek = peek or {}
        consume = consume or {}
        released = list(release)
        try:
            async with asyncio.timeout(self.timeout_s), self._calls.slot(_fairness_key(subject)):
                raw = await self.pool.fetchval(
                    "SELECT mailfc_policy_check($1, $2, $3::inet, $4, $5, $6, $7, $8, $9,"
                    " $10, $11, $12, $13)",
                    subject.domain, subject.account, subject.client_ip, sender, blocks,
                    list(acquire), list(peek), list(peek.values()), list(consume),
                    list(consume.values()), released, self.holder, self.lease_s)
        except asyncio.CancelledError:
            raise
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
            raise PolicyUnavailable(f"limit database unavailable: {error or type(error).__name__}"
                                    ) from None
        self.held.difference_update(released)
        result = json.loads(raw)
        leases = tuple(int(x) for x in result["leases"])
        self.held.update(leases)
        if "block" in result:
            metrics.count_decisions((block_decision(result["block"]),))
            return Check(False, (block_decision(result["block"]),))
        decisions = sorted((_decision(over) for over in result["over"]),
                           key=lambda d: not d.refuses)
        metrics.count_decisions(decisions)
        usage = tuple(Usage(u["scope"], u["subject"], u["kind"], int(u["value"]),
                            u["window_s"], u["mode"], u["used"]) for u in result["usage"])
        return Check(bool(result["admitted"]), tuple(decisions), leases, usage)

    async def release(self, leases: Iterable[int]) -> None:
        ids = list(leases)
        if not ids:
            return
        self.held.difference_update(ids)
        try:
            await asyncio.wait_for(
                self.pool.execute("DELETE FROM limit_leases WHERE id = ANY($1)", ids),
                self.timeout_s)
        except asyncio.CancelledError:
            raise
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
            # The leases expire on their own; the slot returns after lease_s.
            raise PolicyUnavailable(f"cannot release leases (they expire in {self.lease_s:.0f}s)"
                                    f": {error or type(error).__name__}") from None

    async def _renew_loop(self) -> None:
        while True:
            await asyncio.sleep(self.lease_s / 3)
            if not self.held:
                continue
            try:
                await asyncio.wait_for(self.pool.execute(
                    "UPDATE limit_leases SET expires_at = clock_timestamp()"
                    " + make_interval(secs => $2) WHERE id = ANY($1)",
                    list(self.held), self.lease_s), self.timeout_s)
                if self._renew_failing:
                    log.warning("lease renewal works again")
                self._renew_failing = False
            except asyncio.CancelledError:
                raise
            except Exception as error:
                if not self._renew_failing:
                    log.warning("cannot renew %d leases (they expire after %.0fs): %s",
                                len(self.held), self.lease_s, error)
                self._renew_failing = True

    async def _housekeeping_loop(self) -> None:
        while True:
            try:
                await self.pool.fetchval("SELECT mailfc_policy_expire()")
            except asyncio.CancelledError:
                raise
            except Exception as error:
                log.debug("limit housekeeping failed: %s", error)
            await asyncio.sleep(HOUSEKEEPING_S)
