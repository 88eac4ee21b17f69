"""One plugin connection of the hook server: its IMAP sessions, records and decisions.

An imap process holds one connection; each IMAP session it serves has a `sid` there.
Requests of one connection are handled in order (the plugin waits for each reply).

REQUESTS -> RECORDS AND DECISIONS
    SESSION  imap_sessions row (account = the Dovecot user, domain from it, client
             address as the IMAP Router passed it in its PROXY header, host).  Decision:
             admin blocks (account, domain, IP) and the imap_sessions concurrency limit;
             the lease is held until END.  A user not of the domain of the plugin's
             container (the server's peer, mailfc.peers) is a ProtocolError (ERROR),
             before anything is recorded.  Refused: `NO [LIMIT] ...` (a block:
             `NO [CONTACTADMIN] ...`), the row gets the verdict and ends at once.  A
             resumed session (announced again after a reconnect) is recorded and takes a
             lease but is never refused.  The reply's watch list comes from the kinds of
             the limits that apply (protocol.watch_for): only those commands are asked.
    CMD      imap_commands (every command) and its kind (protocol.COMMAND_KINDS) are
             counted, heavy commands take an imap_heavy_concurrent lease until DONE; the
             database is asked only when a limit of one of those kinds applies; a
             busy session is granted commands counted ahead (grants.py).
             Refused: `NO [LIMIT] <reason>`.  Shadow limits: the command runs; its row
             says what enforcement would have done.
    DONE     imap_commands row: name, tag, start, duration, result (OK/NO/BAD), the
             argument summary, verdict (accept, tempfail, reject) and reason.
    END      ended_at, bytes in and out, reason; leases released.
    Connection closed with sessions open (imap process killed, server stopping): those
    sessions end in the records with a reason saying so; their leases are released.

FAILURE POLICY
    Limit database unavailable: hooks.on_db_error "accept" (default) lets the session
    or command pass and records why; "tempfail" refuses with `NO [UNAVAILABLE]`.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from mailfc.fairness import Admission
from mailfc.peers import Peer
from mailfc.policy.engine import (
    ACCEPT,
    ENFORCE,
    REJECT,
    TEMPFAIL,
    Decision,
    LimitEngine,
    PolicyUnavailable,
    Subject,
    pause_before_refusal,
)
from mailfc.policy.hooks import protocol
from mailfc.policy.hooks.grants import Grants
from mailfc.policy.hooks.protocol import Request
from mailfc.policy.recorder import Recorder, Row, now
from mailfc.policy.replies import RULE_UNAVAILABLE

log = logging.getLogger("mailfc.policy.hooks")

ON_DB_ERROR = ("accept", "tempfail")
CODE_BLOCKED = "CONTACTADMIN"
RULE_PRESSURE = "pressure:heavy_commands"


@dataclass(frozen=True)
class HookPolicy:
    """What the server tells plugins (HELLO) and how it fails itself."""

    timeout_ms: int = 500
    failure: str = protocol.FAILURE_OPEN
    on_db_error: str = "accept"
    # A command over an enforced limit hears NO after this long (see the milter's
    # SLOW REFUSALS); capped at half the plugin's timeout, which would fail it open.
    refusal_delay_s: float = 0.0

    @property
    def longest_wait_s(self) -> float:
        """How long the server may keep a plugin waiting: half its timeout."""
        return self.timeout_ms / 2000

    @property
    def refusal_pause_s(self) -> float:
        return min(self.refusal_delay_s, self.longest_wait_s)


def from_us(microseconds: int) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(microseconds / 1e6, datetime.UTC)


def imap_text(decision: Decision) -> str:
    """The text after `NO ` for a refusing decision: response code, then reason."""
    if decision.rule == RULE_UNAVAILABLE:
        code = protocol.CODE_UNAVAILABLE
    elif decision.verdict == REJECT:
        code = CODE_BLOCKED
    else:
        code = protocol.CODE_LIMIT
    return f"[{code}] {decision.reason}"


@dataclass
class ImapSession:
    sid: int
    subject: Subject
    row: Row
    kinds: frozenset[str] | None      # None: unknown (database was unavailable)
    watch: str
    leases: tuple[int, ...] = ()
    commands: int = 0
    # cid -> (decision to record, leases to release at DONE)
    pending: dict[int, tuple[Decision | None, tuple[int, ...]]] = field(default_factory=dict)
    grants: Grants = field(default_factory=Grants)

    def applies(self, name: str) -> bool:
        """Whether any limit that applies to this session concerns this command."""
        if self.kinds is None:
            return True
        return (protocol.ALL_COMMANDS_KIND in self.kinds
                or protocol.COMMAND_KINDS.get(name, "") in self.kinds
                or (name in protocol.HEAVY_COMMANDS and protocol.HEAVY_KIND in self.kinds))


class HookConnection:
    """The sessions of one plugin connection; handle() answers one request."""

    def __init__(self, engine: LimitEngine, recorder: Recorder, *, host: str,
                 policy: HookPolicy, background: Callable[[asyncio.Task[None]], None],
                 admission: Admission | None = None, peer: Peer | None = None) -> None:
        self.engine = engine
        # The domain container of the imap process (mailfc.peers): its sessions are
        # only of that domain's users.  None: root on this host, trusted.
        self.peer = peer
        self.admission = admission
        self.recorder = recorder
        self.host = host
        self.policy = policy
        self.sessions: dict[int, ImapSession] = {}
        self.orphans = 0
        self._background = background

    async def handle(self, request: Request) -> bytes | None:
        handler = {protocol.SESSION: self._session, protocol.CMD: self._command,
                   protocol.DONE: self._done, protocol.END: self._end}[request.word]
        return await handler(request)

    # -- SESSION ------------------------------------------------------------------

    async def _session(self, request: Request) -> bytes:
        sid = request.number("sid")
        user = request.text("user").strip().lower()
        domain = user.rpartition("@")[2] if "@" in user else None
        if self.peer is not None and domain != self.peer.domain:
            # Refused before anything is recorded or counted; the CMD, DONE and END
            # of this sid then find no session (orphans).
            raise protocol.ProtocolError(
                f"SESSION {sid}: user {user[:80]!r} is not of {self.peer.domain},"
                f" the domain of {self.peer}")
        client_ip = request.text("client_ip") or None
        resumed = request.number("resumed") == 1
        subject = Subject.of(domain, user if domain else None, client_ip)
        row = self.recorder.new(
            "imap_sessions", started_at=from_us(request.number("start_us")), host=self.host,
            domain=domain, account=subject.account, client_ip=client_ip, verdict=ACCEPT,
            reason="resumed after a hook server restart" if resumed else None)
        old = self.sessions.pop(sid, None)
        if old is not None:          # a plugin bug or a replay: never leak its leases
            self._end_session(old, "replaced by a new session with the same sid")
        try:
            check = await self.engine.check(subject, blocks=not resumed,
                                            acquire=(protocol.SESSIONS_KIND,))
        except PolicyUnavailable as error:
            if self.policy.on_db_error == "tempfail" and not resumed:
                decision = Decision(TEMPFAIL, f"the limit database is unavailable: {error}",
                                    RULE_UNAVAILABLE)
                self.recorder.update(row, ended_at=now(), verdict=TEMPFAIL,
                                     reason=decision.reason)
                return protocol.session_no(sid, imap_text(decision))
            # Asking about commands would only meet the same outage; the limit
            # watcher gives the session its watch list once the database answers.
            self.recorder.update(row, reason=f"not checked: {error}")
            self.sessions[sid] = ImapSession(sid, subject, row, None, protocol.WATCH_NONE)
            return protocol.session_ok(sid, protocol.WATCH_NONE)
        decision = check.decision
        if decision.refuses and not resumed:
            self.recorder.update(row, ended_at=now(), verdict=decision.verdict,
                                 reason=decision.reason)
            return protocol.session_no(sid, imap_text(decision))
        if decision.verdict != ACCEPT:
            self.recorder.update(row, reason=f"{decision.mode}: {decision.reason}")
        kinds = frozenset(u.kind for u in check.usage)
        session = ImapSession(sid, subject, row, kinds, protocol.watch_for(kinds),
                              check.leases)
        self.sessions[sid] = session
        return protocol.session_ok(sid, session.watch)

    # -- CMD ------------------------------------------------------------------------

    async def _command(self, request: Request) -> bytes:
        sid, cid = request.number("sid"), request.number("cid")
        name = request.text("name").upper()
        session = self.sessions.get(sid)
        if session is None or not session.applies(name) or name in protocol.ALWAYS_ALLOWED:
            if session is None:
                self.orphans += 1
            return protocol.cmd_ok(sid, cid)
        kind = protocol.COMMAND_KINDS.get(name)
        domain = session.subject.domain
        if name in protocol.HEAVY_COMMANDS and domain and self.admission is not None \
                and not await self.admission.admit(domain):
            decision = Decision(TEMPFAIL, f"the server is busy and {domain} runs more heavy"
                                " commands than its share; try again shortly", RULE_PRESSURE)
            session.pending[cid] = (decision, ())
            return protocol.cmd_no(sid, cid, imap_text(decision))
        # A heavy command takes a lease only where a concurrency limit applies.
        acquire = ((protocol.HEAVY_KIND,) if name in protocol.HEAVY_COMMANDS and (
            session.kinds is None or protocol.HEAVY_KIND in session.kinds) else ())
        counted = [k for k in (protocol.ALL_COMMANDS_KIND, kind) if k is not None]
        # A lease per command cannot be granted ahead.
        grant = 0 if acquire else session.grants.size(name)
        try:
            check = await self.engine.check(
                session.subject, consume=dict.fromkeys(counted, 1 + grant), acquire=acquire)
            if grant and not check.admitted:
                # The limit came nearer than the last call said (other sessions,
                # other hosts): ask again for this one command alone.
                grant = 0
                check = await self.engine.check(
                    session.subject, consume=dict.fromkeys(counted, 1), acquire=acquire)
        except PolicyUnavailable as error:
            # mode "accept": decided by the failure policy, lets the command pass.
            decision = Decision(TEMPFAIL, f"the limit database is unavailable: {error}",
                                RULE_UNAVAILABLE, "accept" if self.policy.on_db_error ==
                                "accept" else ENFORCE)
            session.pending[cid] = (decision, ())
            if decision.refuses:
                return protocol.cmd_no(sid, cid, imap_text(decision))
            return protocol.cmd_ok(sid, cid)
        if not acquire:
            grant = session.grants.counted(name, grant, check, counted)
        decision = check.decision
        session.pending[cid] = (decision if decision.verdict != ACCEPT else None, check.leases)
        if decision.refuses:
            # Only this plugin connection (one imap process of the domain) waits.
            await pause_before_refusal(decision, self.policy.refusal_pause_s)
            return protocol.cmd_no(sid, cid, imap_text(decision))
        return protocol.cmd_ok(sid, cid, grant)

    # -- DONE -----------------------------------------------------------------------

    async def _done(self, request: Request) -> None:
        session = self.sessions.get(request.number("sid"))
        if session is None:
            # Only a plugin that skipped SESSION gets here; nothing to attach it to.
            self.orphans += 1
            return
        decision, leases = session.pending.pop(request.number("cid"), (None, ()))
        self._release(leases)
        reply = request.text("reply")
        result, _, text = reply.partition(" ")
        if decision is None:
            verdict, reason = ACCEPT, (text or None) if result != "OK" else None
        elif decision.refuses:
            verdict, reason = decision.verdict, decision.reason
        elif decision.rule == RULE_UNAVAILABLE:
            verdict, reason = ACCEPT, f"not checked: {decision.reason}"
        else:
            verdict, reason = ACCEPT, f"{decision.mode}: {decision.reason}"
        subject = session.subject
        self.recorder.new(
            "imap_commands", session_id=session.row,
            started_at=from_us(request.number("start_us")),
            duration_ms=request.number("duration_us") / 1000.0, domain=subject.domain,
            account=subject.account, name=request.text("name") or "?",
            tag=request.text("tag") or None, arguments=request.text("args") or None,
            result=result[:16] or None, verdict=verdict, reason=reason)
        session.commands += 1
        self.recorder.update(session.row, commands=session.commands)
        return None

    # -- END ------------------------------------------------------------------------

    async def _end(self, request: Request) -> None:
        session = self.sessions.pop(request.number("sid"), None)
        if session is None:
            self.orphans += 1
            return None
        self.recorder.update(session.row, bytes_in=request.number("bytes_in"),
                             bytes_out=request.number("bytes_out"))
        self._end_session(session, request.text("reason") or None)
        return None

    def _end_session(self, session: ImapSession, reason: str | None) -> None:
        values: dict[str, object] = {"ended_at": now()}
        if reason is not None and session.row.values.get("reason") is None:
            values["reason"] = reason
        self.recorder.update(session.row, **values)
        self._release(session.leases + tuple(
            lease for _, leases in session.pending.values() for lease in leases))
        session.pending.clear()

    def close(self, reason: str) -> None:
        """The connection is gone: end what it left open."""
        for session in self.sessions.values():
            self._end_session(session, reason)
        self.sessions.clear()

    def _release(self, leases: Iterable[int]) -> None:
        ids = tuple(leases)
        if not ids:
            return

        async def release() -> None:
            # A lease that cannot be released expires on its own after lease_s.
            with contextlib.suppress(PolicyUnavailable):
                await self.engine.release(ids)
        # Off the request path: the plugin's next command does not wait for it.
        self._background(asyncio.create_task(release()))

    # -- limit changes ------------------------------------------------------------

    def subjects(self) -> set[Subject]:
        return {s.subject for s in self.sessions.values()}

    def forget_grants(self) -> None:
        """Limits changed: no session gets commands counted ahead under the old ones."""
        for session in self.sessions.values():
            session.grants.clear()

    def rewatch(self, kinds_by_subject: dict[Subject, frozenset[str]]) -> list[bytes]:
        """New limit kinds per subject -> WATCH lines for sessions whose list changed."""
        lines = []
        for session in self.sessions.values():
            kinds = kinds_by_subject.get(session.subject)
            if kinds is None:
                continue
            session.kinds = kinds
            watch = protocol.watch_for(kinds)
            if watch != session.watch:
                session.watch = watch
                lines.append(protocol.watch(session.sid, watch))
        return lines
