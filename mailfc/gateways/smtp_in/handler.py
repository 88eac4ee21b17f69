"""SMTP-In's decisions, one server hook per stage (protocols.smtp_server), and what
each stage records.

STAGES
    connect   smtp_sessions row (component "smtp-in", client address, host)
    EHLO      (the server announces SIZE, PIPELINING, 8BITMIME, SMTPUTF8,
              ENHANCEDSTATUSCODES and, before TLS, STARTTLS; no AUTH: this is an MX)
              records the HELO name
    MAIL      admin blocks (client IP/CIDR, sender, sender domain: 550 5.7.1), from a
              list read every few seconds (mailfc.policy.blocks); room in the spool for
              SIZE= (452 4.3.1); smtp_messages row
    RCPT      <postmaster> without a domain (RFC 5321 4.5.1) is always taken: it
              stands for smtp_in.postmaster when set (then checked as that address),
              else the message is written to the [filter_in] quarantine for it;
              syntax (501 5.1.3), hosted domain (554 5.7.1 relaying denied), mailbox or
              alias (550 5.1.1), too many (452 4.5.3), the domain's spool queue over
              smtp_in.max_queued_per_domain (451 4.7.1: limit only when needed), the
              domain's turn while the host is short of CPU (ADMISSION), and the
              received_messages limits where any is configured: the domain's, and each
              receiving account's own or its domain's per-account default (451 4.7.1,
              answered after policy.refusal_delay_s).  A refused recipient of a hosted
              domain names that domain in the session's record.
    DATA      the message streamed to a MessageData as it arrives (over
              messages.size_limit: 552 5.3.4, the rest read and dropped); then, at end
              of data and before any reply: bare LF (554 5.5.2), 8-bit data without
              BODY=8BITMIME (554 5.6.0); a Received: header put in front; the
              [filter_in] chain (gateways/filter/chain.py: eicar, headers, dnsbl, then
              each milter), each verdict an smtp_events row with stage "filter":
                  reject    550 5.7.1 <reason> (a milter's own reply as it gave it;
                            550 5.6.0 for headers; 552 5.3.4 for a header over 1 MiB)
                  tempfail  451 4.7.1 <reason> (a milter down: milter_default_action)
                  discard   250 2.7.0, nothing queued
                  quarantine 250 2.7.0 once written to filter_in.quarantine_dir
              the received_messages limits counted; the message (with what milters
              changed) copied into the spool in chunks and committed (452 4.3.1 when
              it cannot be), then 250 with the queue id.  So a refused message never
              leaves a bounce behind: its sender hears it in the reply.
    close     smtp_sessions totals and verdict; a session closed at the hard error
              limit (protocols/smtp_server.py, ERRORS) gets an smtp_events row with
              stage "session", rule smtp:errors

ADMISSION (mailfc.fairness; limit only when needed)
    Each recipient of a hosted domain, once known to exist, waits for its domain's
    turn: while the host's CPU pressure is above smtp_in.pressure_target, a domain
    receiving more recipients than its fair share gets them at a rate of its own
    (at least smtp_in.pressure_min_rate a second); a RCPT without a turn within
    smtp_in.pressure_max_wait_s hears
        451 4.7.1 <domain> is receiving more mail than its share now, try again later
    and the sending MTA tries that recipient again later (the 451 counts as an error,
    protocols/smtp_server.py ERRORS).  The other domains' recipients, in the same
    session too, pass at once.  Recorded as rule pressure:recipients (stage rcpt,
    verdict tempfail).

Refusals by policy become smtp_events rows with the rule (block:ip, limit:..., relay,
unknown_user, queue_busy, pressure:recipients, bare_lf, ...).  When the limit database
is down, inbound mail follows policy.on_db_error_inbound ("accept" by default: recorded
as accepted unchecked).
"""

from __future__ import annotations

import email.utils
import logging
from dataclasses import dataclass, field

import asyncpg

from mailfc import logsetup
from mailfc.addresses import split_address
from mailfc.config import Config
from mailfc.db.directory import Directory
from mailfc.errors import InvalidInput
from mailfc.fairness import Admission
from mailfc.gateways import replies
from mailfc.gateways.filter.chain import Chain, Outcome
from mailfc.gateways.filter.chain import reply as chain_reply
from mailfc.gateways.filter.message import FilterMessage, Verdict
from mailfc.gateways.spool import Spool, SpoolFull
from mailfc.gateways.spool.store import new_queue_id
from mailfc.messages import Prefixed
from mailfc.metrics import names as metrics
from mailfc.policy.blocks import BlockList
from mailfc.policy.engine import (
    ACCEPT,
    ENFORCE,
    REJECT,
    TEMPFAIL,
    Decision,
    LimitEngine,
    PolicyUnavailable,
    Subject,
    block_decision,
    pause_before_refusal,
)
from mailfc.policy.recorder import Recorder, Row, now
from mailfc.policy.replies import RULE_UNAVAILABLE, smtp_reply
from mailfc.policy.snapshot import Snapshot
from mailfc.protocols.smtp_server import Envelope, Session

log = logging.getLogger("mailfc.gateways.smtp_in")

LIMITED_REFRESH_S = 5.0
# RFC 5321 4.5.1's recipient without a domain, as it stands in envelope.rcpt_tos when no
# smtp_in.postmaster is configured (its message then goes to the quarantine).
BARE_POSTMASTER = "postmaster"
COMPONENT = "smtp-in"
# ADMISSION: the rule of a recipient whose domain got no turn in time.
RULE_PRESSURE = "pressure:recipients"


@dataclass
class Transaction:
    row: Row
    recipients: list[str] = field(default_factory=list)
    limited_domains: set[str] = field(default_factory=set)
    # Recipient accounts with a received_messages limit of their own or by their
    # domain's per-account default, checked at RCPT and counted at end of data.
    limited_accounts: set[str] = field(default_factory=set)


@dataclass
class SessionState:
    row: Row
    client_ip: str | None
    worst: Decision | None = None
    txn: Transaction | None = None


class LimitedDomains(Snapshot[frozenset[str]]):
    """Which domains have a received_messages limit: the engine is asked only for those.

    A name as is: a limit of the domain as a whole; "@" + the name: a limit of one of
    its accounts, or a per-account default.

    Read every LIMITED_REFRESH_S, so a limit set with `mailfc limit set` applies
    within seconds and unlimited domains cost no database call per recipient.
    """

    what = "received_messages limits"

    def __init__(self, pool: asyncpg.Pool) -> None:
        super().__init__(pool, frozenset(), LIMITED_REFRESH_S)

    async def read(self) -> frozenset[str]:
        rows = await self.pool.fetch(
            "SELECT DISTINCT CASE WHEN l.scope = 'domain' THEN '' ELSE '@' END || d.name"
            " AS name FROM limits l JOIN domains d ON d.id = l.domain_id"
            " WHERE l.kind = 'received_messages'")
        return frozenset(row["name"] for row in rows)


class SmtpInHandler:
    def __init__(self, config: Config, spool: Spool, directory: Directory,
                 engine: LimitEngine, recorder: Recorder, limited: LimitedDomains,
                 blocks: BlockList, chain: Chain, admission: Admission | None = None) -> None:
        self.config = config
        self.spool = spool
        self.chain = chain
        self.directory = directory
        self.engine = engine
        self.recorder = recorder
        self.limited = limited
        self.blocks = blocks
        # Each recipient domain's turn under CPU pressure (ADMISSION); None: no turns.
        self.admission = admission
        self.hostname = config.host_name
        self.on_db_error = config.policy.on_db_error_inbound
        self.refusal_delay_s = config.policy.refusal_delay_s

    # -- the connection --------------------------------------------------------------

    def connected(self, session: Session) -> None:
        peer = session.peer if isinstance(session.peer, tuple) else None
        client_ip = str(peer[0]) if peer else None
        row = self.recorder.new("smtp_sessions", started_at=now(), component=COMPONENT,
                                host=self.hostname, client_ip=client_ip)
        session.state = SessionState(row, client_ip)

    def disconnected(self, session: Session) -> None:
        state = _state(session)
        if state.txn is not None:
            self._close_txn(state, "aborted", "the client ended the transaction")
        worst = state.worst
        metrics.SESSIONS.labels(COMPONENT, worst.verdict if worst else ACCEPT).inc()
        self.recorder.update(state.row, ended_at=now(), tls=session.tls,
                             verdict=worst.verdict if worst else ACCEPT,
                             reason=worst.reason if worst else None)

    def _record_domain(self, state: SessionState, txn: Transaction, domain: str) -> None:
        """The session's and message's domain: the first hosted recipient domain."""
        if not state.row.values.get("domain"):
            self.recorder.update(state.row, domain=domain)
        if not txn.row.values.get("domain"):
            self.recorder.update(txn.row, domain=domain)

    def refused(self, session: Session, rule: str, reason: str) -> None:
        """A refusal by the server itself (improper pipelining, size; "errors": the
        session reached the hard error limit): an event, and the end of the
        transaction."""
        metrics.REFUSALS.labels(COMPONENT, rule).inc()
        self._refuse_data(_state(session), rule, reason,
                          stage="session" if rule == "errors" else "data")

    # -- the server's hooks (protocols.smtp_server) -------------------------------------

    async def handle_HELO(self, session: Session, hostname: str) -> None:
        self.recorder.update(_state(session).row, helo=hostname[:255])

    async def handle_MAIL(self, session: Session, envelope: Envelope, sender: str,
                          mail_options: list[str]) -> str:
        """`sender` is "" for the null reverse path (a bounce)."""
        state = _state(session)
        if sender:
            try:
                split_address(sender)
            except InvalidInput:
                return replies.BAD_ADDRESS
        size = envelope.declared_size
        block = (await self.blocks.get()).match(state.client_ip, sender, now())
        decisions = [block_decision(block.as_row())] if block is not None else []
        row = self.recorder.new("smtp_messages", session_id=state.row, started_at=now(),
                                client_ip=state.client_ip, sender=sender, size=size or None)
        state.txn = Transaction(row)
        refusal = self._decide(state, "mail", decisions, {"sender": sender})
        if refusal is not None:
            self._close_txn(state, refusal.verdict, refusal.reason)
            return await self._refusal_reply(refusal)
        if not self.spool.has_room(size):
            self._event(state, "mail", Decision(TEMPFAIL, "spool storage low",
                                                "spool:storage"), {"size": size})
            self._close_txn(state, TEMPFAIL, "spool storage low")
            return replies.STORAGE
        return replies.OK_SENDER

    async def handle_RCPT(self, session: Session, envelope: Envelope, address: str,
                          rcpt_options: list[str]) -> str:
        state = _state(session)
        txn = state.txn
        if txn is None:
            return replies.NEED_MAIL
        if len(envelope.rcpt_tos) >= self.config.smtp_in.max_recipients:
            return replies.TOO_MANY_RECIPIENTS
        if address.lower() == BARE_POSTMASTER:
            if not self.config.smtp_in.postmaster:
                if BARE_POSTMASTER not in envelope.rcpt_tos:
                    envelope.rcpt_tos.append(BARE_POSTMASTER)
                    txn.recipients.append(BARE_POSTMASTER)
                return replies.OK_RCPT
            address = self.config.smtp_in.postmaster
        try:
            localpart, domain = split_address(address)
        except InvalidInput:
            return replies.BAD_ADDRESS
        detail: dict[str, object] = {"recipient": address}
        targets = await self.directory.recipient(address)
        if targets is None:
            hosted = await self.directory.pool.fetchval(
                "SELECT state FROM domains WHERE name = $1", domain)
            if hosted is not None:
                # A refusal for a hosted domain is that domain's record (sessions list
                # --domain, abuse top --by domain); a relay attempt names no domain of ours.
                self._record_domain(state, txn, domain)
            if hosted is None:
                self._event(state, "rcpt", Decision(REJECT, "relaying denied", "smtp:relay"),
                            detail)
                return replies.RELAY_DENIED.format(address=address)
            self._event(state, "rcpt", Decision(REJECT, "no such mailbox",
                                                "smtp:unknown_user"), detail)
            return replies.NO_SUCH_USER.format(address=address)
        self._record_domain(state, txn, domain)
        if self.spool.queued(domain) >= self.config.smtp_in.max_queued_per_domain:
            self._event(state, "rcpt", Decision(TEMPFAIL, f"spool queue of {domain} is full",
                                                "spool:queue_busy"), detail)
            return replies.QUEUE_BUSY.format(domain=domain)
        # Before the limits' database calls: while a domain waits for its turn it
        # costs the busy host nothing more.
        if self.admission is not None and not await self.admission.admit(domain):
            metrics.REFUSALS.labels(COMPONENT, RULE_PRESSURE).inc()
            self._event(state, "rcpt", Decision(
                TEMPFAIL, f"the server is short of CPU and {domain} receives more than its"
                " share", RULE_PRESSURE), detail)
            return replies.DOMAIN_BUSY.format(domain=domain)
        limited = await self.limited.get()
        # The domain as a whole once per message; each account it delivers to (the
        # mailbox, or an alias's mailboxes in this domain) once too, against its own
        # limit or the domain's per-account default.
        subjects = []
        if domain not in txn.limited_domains and domain in limited:
            subjects.append(Subject.of(domain))
        if "@" + domain in limited:
            subjects += [Subject.of(None, target) for target, hosted in sorted(targets.items())
                         if hosted and target.rpartition("@")[2] == domain
                         and target not in txn.limited_accounts]
        for subject in subjects:
            try:
                check = await self.engine.check(subject, peek={"received_messages": 1})
                decisions = list(check.decisions)
            except PolicyUnavailable as error:
                decisions = [self._unavailable(error)]
            refusal = self._decide(state, "rcpt", decisions, detail)
            if refusal is not None:
                return await self._refusal_reply(refusal)
        for subject in subjects:
            if subject.account is None:
                txn.limited_domains.add(domain)
            else:
                txn.limited_accounts.add(subject.account)
        recipient = f"{localpart}@{domain}"
        envelope.rcpt_tos.append(recipient)
        txn.recipients.append(recipient)
        self.recorder.update(txn.row, recipients=list(txn.recipients),
                             recipient_count=len(txn.recipients))
        return replies.OK_RCPT

    async def handle_DATA(self, session: Session, envelope: Envelope) -> str:
        state = _state(session)
        txn = state.txn
        assert txn is not None and envelope.message is not None
        if envelope.bare_lf:
            self._refuse_data(state, "bare_lf", "bare LF in message data")
            return replies.BARE_LF
        declared = {o.upper() for o in envelope.mail_options}
        if (self.config.smtp_in.require_8bitmime and envelope.eight_bit
                and "BODY=8BITMIME" not in declared and "SMTPUTF8" not in declared):
            self._refuse_data(state, "8bit", "8-bit data without BODY=8BITMIME")
            return replies.EIGHT_BIT
        queue_id, received = _received(self.hostname, session, state, envelope)
        # The Received: line in front of the message as it lies (nothing copied): what
        # the milters see and what the spool stores.
        outcome = await self.chain.check(
            Prefixed(received, envelope.message), envelope.sender, list(envelope.rcpt_tos),
            client_ip=state.client_ip, helo=session.host_name, queue_id=queue_id)
        try:
            return await self._after_checks(session, state, txn, envelope, queue_id, outcome)
        finally:
            outcome.close()

    async def _quarantined(self, state: SessionState, message: FilterMessage) -> bool:
        """Kept in the quarantine; False (the transaction refused with a 451 for the
        storage) when it could not be written."""
        try:
            await self.chain.quarantine(message)
        except OSError as error:
            log.error("quarantine: %s", error)
            self._refuse_data(state, "storage", f"quarantine: {error}", verdict=TEMPFAIL)
            return False
        return True

    async def _after_checks(self, session: Session, state: SessionState, txn: Transaction,
                            envelope: Envelope, queue_id: str, outcome: Outcome) -> str:
        verdict, message = outcome.verdict, outcome.message
        for finding in outcome.findings:
            self._filter_event(state, finding)
        if verdict.action in ("reject", "tempfail") or message is None:
            self._close_txn(state, verdict.action, verdict.reason)
            return chain_reply(verdict)
        for subject in ([Subject.of(d) for d in sorted(txn.limited_domains)]
                        + [Subject.of(None, a) for a in sorted(txn.limited_accounts)]):
            domain = subject.account or subject.domain or ""
            try:
                done = await self.engine.check(subject, consume={"received_messages": 1})
                decisions = list(done.decisions)
            except PolicyUnavailable as error:
                decisions = [self._unavailable(error)]
            refusal = self._decide(state, "data", decisions, {"domain": domain})
            if refusal is not None:
                self._close_txn(state, refusal.verdict, refusal.reason)
                return await self._refusal_reply(refusal)
        source = message.source()
        if verdict.action == "discard":
            self._accepted(state, txn, None, source.size, verdict)
            return chain_reply(verdict)
        if verdict.action == "quarantine":
            if not await self._quarantined(state, message):
                return replies.STORAGE
            self._accepted(state, txn, None, source.size, verdict)
            return chain_reply(verdict)
        recipients = list(envelope.rcpt_tos)
        if BARE_POSTMASTER in recipients:
            # RCPT TO:<postmaster> with no smtp_in.postmaster: kept for the admin.
            if not await self._quarantined(state, message):
                return replies.STORAGE
            recipients.remove(BARE_POSTMASTER)
            if not recipients:
                self._accepted(state, txn, None, source.size, verdict)
                return replies.QUEUED.format(queue_id=queue_id)
        try:
            queue_id = await self.spool.put(
                envelope.sender, recipients, source, queue_id=queue_id,
                mail_options=tuple(o for o in envelope.mail_options
                                   if o.startswith(("BODY=", "SMTPUTF8"))),
                client_ip=state.client_ip, helo=session.host_name)
        except SpoolFull as error:
            log.error("spool: %s", error)
            self._refuse_data(state, "storage", str(error), verdict=TEMPFAIL)
            return replies.STORAGE
        self._accepted(state, txn, queue_id, source.size, verdict)
        logsetup.hop("smtp-in", queue_id, f"from=<{envelope.sender}>, size={source.size},"
                     f" nrcpt={len(envelope.rcpt_tos)}, client={state.client_ip}")
        return replies.QUEUED.format(queue_id=queue_id)

    async def handle_RSET(self, session: Session, envelope: Envelope) -> None:
        """The transaction went away without a message (RSET, a new EHLO)."""
        state = _state(session)
        if state.txn is not None:
            self._close_txn(state, "aborted", "RSET")

    # -- helpers -----------------------------------------------------------------------

    async def _refusal_reply(self, refusal: Decision) -> str:
        """The reply, after policy.refusal_delay_s when a limit refuses (it holds only
        this session)."""
        await pause_before_refusal(refusal, self.refusal_delay_s)
        return _reply(refusal)

    def _unavailable(self, error: PolicyUnavailable) -> Decision:
        if self.on_db_error == "tempfail":
            return Decision(TEMPFAIL, "policy service unavailable, try again later",
                            RULE_UNAVAILABLE)
        return Decision(ACCEPT, f"accepted unchecked (inbound): {error}", RULE_UNAVAILABLE)

    def _decide(self, state: SessionState, stage: str, decisions: list[Decision],
                detail: dict[str, object]) -> Decision | None:
        refusal = None
        for decision in decisions:
            if decision.verdict == ACCEPT and decision.rule is None:
                continue
            self._event(state, stage, decision, detail)
            if decision.refuses and refusal is None:
                refusal = decision
        return refusal

    def _event(self, state: SessionState, stage: str, decision: Decision,
               detail: dict[str, object]) -> None:
        self.recorder.new("smtp_events", session_id=state.row,
                          message_id=state.txn.row if state.txn else None, at=now(),
                          stage=stage, verdict=decision.verdict, reason=decision.reason,
                          rule=decision.rule, mode=decision.mode, detail=detail)
        if decision.refuses:
            self._note_worst(state, decision)

    @staticmethod
    def _note_worst(state: SessionState, decision: Decision) -> None:
        severity = {ACCEPT: 0, TEMPFAIL: 1, REJECT: 2}
        if state.worst is None or severity.get(decision.verdict, 0) \
                > severity.get(state.worst.verdict, 0):
            state.worst = decision

    def _accepted(self, state: SessionState, txn: Transaction, queue_id: str | None,
                  size: int, verdict: Verdict) -> None:
        """The message is taken (queued, or discarded / quarantined by the chain)."""
        values = state.row.values
        self.recorder.update(state.row, messages=values["messages"] + 1,
                             recipients=values["recipients"] + len(txn.recipients),
                             bytes=values["bytes"] + size)
        self.recorder.update(txn.row, queue_id=queue_id, size=size)
        self._close_txn(state, verdict.action if verdict.final else ACCEPT,
                        verdict.reason or None)

    def _filter_event(self, state: SessionState, finding: Verdict) -> None:
        """A check that did not simply accept (stage "filter", as Filter-In recorded)."""
        self.recorder.new("smtp_events", session_id=state.row,
                          message_id=state.txn.row if state.txn else None, at=now(),
                          stage="filter", verdict=finding.action, reason=finding.reason,
                          rule=finding.rule, mode=ENFORCE, detail=None)
        if finding.action in (REJECT, TEMPFAIL):
            self._note_worst(state, Decision(finding.action, finding.reason, finding.rule))

    def _refuse_data(self, state: SessionState, rule: str, reason: str,
                     verdict: str = REJECT, stage: str = "data") -> None:
        self._event(state, stage, Decision(verdict, reason, f"smtp:{rule}"), {})
        self._close_txn(state, verdict, reason)

    def _close_txn(self, state: SessionState, verdict: str, reason: str | None) -> None:
        txn, state.txn = state.txn, None
        if txn is not None and txn.row.values.get("verdict") is None:
            metrics.MESSAGES.labels(COMPONENT, verdict,
                                    metrics.domain_label(txn.row.values.get("domain"))).inc()
            self.recorder.update(txn.row, verdict=verdict, reason=reason, ended_at=now())


def _state(session: Session) -> SessionState:
    state = session.state
    assert isinstance(state, SessionState), "session not announced by the server"
    return state


def _reply(decision: Decision) -> str:
    code, status, text = smtp_reply(decision)
    return f"{code} {status} {' '.join(text.split())}"


def _received(hostname: str, session: Session, state: SessionState,
              envelope: Envelope) -> tuple[str, bytes]:
    """The queue id the message will get and its Received: header (RFC 5321 4.4)."""
    queue_id = new_queue_id()
    helo = _clean(session.host_name or "unknown")
    protocol = "ESMTPS" if session.tls else ("ESMTP" if session.extended else "SMTP")
    recipient = envelope.rcpt_tos[0] if len(envelope.rcpt_tos) == 1 else None
    header = (f"Received: from {helo} ([{state.client_ip or 'unknown'}])\r\n"
              f"\tby {hostname} (mailfc SMTP-In) with {protocol} id {queue_id}"
              + (f"\r\n\tfor <{_clean(recipient)}>" if recipient else "")
              + f"; {email.utils.formatdate(localtime=False)}\r\n")
    return queue_id, header.encode("utf-8", "replace")


def _clean(text: str) -> str:
    return "".join(c for c in text if c.isprintable() and c not in "()<>;\\")[:200]

