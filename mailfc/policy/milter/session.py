"""One MTA connection of the milter: protocol stages to records, decisions and replies.

NEGOTIATION
    We ask for no message changes (actions 0 plus SMFIF_SETSYMLIST, to name the macros
    we need) and for these stages, replying only where a decision is taken:

        connect, helo, headers, end of headers, body    no reply (SMFIP_NR_*)
        MAIL, RCPT, end of message                      a reply each
        DATA, unknown commands                          not sent (SMFIP_NODATA, NOUNKNOWN)

    Macros asked for: connect `{daemon_name} j {client_addr} {client_name}`, MAIL
    `{auth_authen} {auth_type} i`, end of message `i`.  The domain is the one of the
    container the MTA runs in (the server identifies the peer, mailfc.peers); a
    {daemon_name} or an {auth_authen} of another domain is ignored with a warning.  An
    MTA trusted by the server (root on this host, TCP) names its domain with
    {daemon_name} (the per-domain Postfix sets milter_macro_daemon_name to its domain),
    falling back to the domain of the authenticated account.  The queue id comes from
    `i` at end of message: Postfix has none yet at MAIL.

STAGES -> RECORDS
    connect       smtp_sessions row (client address and name as Postfix got them from
                  XCLIENT or PROXY, component "postfix", host)
    helo          smtp_sessions.helo
    MAIL          decision (blocks, concurrent_sends, windows); smtp_messages row (sender,
                  account from {auth_authen}, SIZE); started_at is when the decision was
                  taken, so accepted transactions lie inside their concurrency lease
    RCPT          decision (recipients_per_message, recipients window); accepted ones go
                  to smtp_messages.recipients
    headers       Message-ID, Subject digest (sha256, 16 hex digits), header bytes
    end of msg    decision (windows counted); queue id, size (header + body bytes as
                  received), recipient count, verdict; ended_at; lease released
    abort         verdict "aborted" on an open transaction (an abort without one, e.g. the
                  second one Postfix sends around a message, changes nothing); lease released
    close         smtp_sessions.ended_at and totals; any lease still held released
    Decisions other than a plain accept (limits over, blocks, shadow, failure policy)
    each become an smtp_events row with the rule and mode; a shadow rule once per
    transaction (it is reported at MAIL, RCPT and end of message alike).

SLOW REFUSALS
    A transaction over an enforced limit hears its 451 after policy.refusal_delay_s (1 s;
    Postfix's smtpd_error_sleep_time for the same reason): a flood's senders that retry
    at once would otherwise cost the shared parts (router TLS, dispatcher, database)
    a whole session each, many times a second, at the expense of every other domain.
    The wait holds only the flooding domain's own smtpd and this connection's task.

FAILURE POLICY
    When the limit database cannot answer, an authenticated session (submission) gets
    `451 4.3.0` when policy.on_db_error_submission is "tempfail" (default), any other
    (inbound) passes when policy.on_db_error_inbound is "accept" (default); either way
    the event is recorded (the recorder keeps it until the database is back).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field

from mailfc.peers import Peer
from mailfc.policy.engine import (
    ACCEPT,
    REJECT,
    SHADOW,
    TEMPFAIL,
    Check,
    Decision,
    LimitEngine,
    PolicyUnavailable,
    Subject,
    pause_before_refusal,
)
from mailfc.policy.milter import codec
from mailfc.policy.recorder import Recorder, Row, now
from mailfc.policy.replies import RULE_UNAVAILABLE, smtp_reply

log = logging.getLogger("mailfc.policy.milter")

OUR_PROTOCOL = (codec.SMFIP_NR_CONN | codec.SMFIP_NR_HELO | codec.SMFIP_NR_HDR
                | codec.SMFIP_NR_EOH | codec.SMFIP_NR_BODY | codec.SMFIP_NODATA
                | codec.SMFIP_NOUNKNOWN)
SMFIF_SETSYMLIST = 0x100
MACROS = {
    codec.SMFIM_CONNECT: ("{daemon_name}", "j", "{client_addr}", "{client_name}"),
    codec.SMFIM_ENVFROM: ("{auth_authen}", "{auth_type}", "i"),
    codec.SMFIM_EOM: ("i",),
}
MAIL_PEEK_KINDS = ("messages", "recipients", "bytes")
SEVERITY = {ACCEPT: 0, TEMPFAIL: 1, REJECT: 2}


@dataclass(frozen=True)
class FailurePolicy:
    submission: str = "tempfail"   # tempfail | accept
    inbound: str = "accept"


DEFAULT_FAILURE = FailurePolicy()


@dataclass
class Transaction:
    row: Row
    subject: Subject
    check: Check | None              # None: decided without the database (failure policy)
    recipients: list[str] = field(default_factory=list)
    size: int = 0
    size_announced: int | None = None
    # Shadow rules recorded for this transaction already: the same limit is reported
    # again at each RCPT and at end of message, but would have refused it once.
    shadowed: set[str] = field(default_factory=set)


class MilterSession:
    """Consumes decoded packets, returns the reply bytes (b"" when none is due).

    One instance per MTA connection; after SMFIC_QUIT_NC a new SMTP session starts on
    the same instance.  Raises codec.ProtocolError on input that is not the protocol.
    """

    def __init__(self, engine: LimitEngine, recorder: Recorder, *, host: str,
                 failure: FailurePolicy = DEFAULT_FAILURE, component: str = "postfix",
                 refusal_delay_s: float = 0.0, peer: Peer | None = None) -> None:
        self.engine = engine
        # The domain container the MTA runs in (mailfc.peers); None: a trusted MTA
        # (root on this host, milter.tcp), whose {daemon_name} names the domain.
        self.peer = peer
        self.refusal_delay_s = refusal_delay_s
        self.recorder = recorder
        self.host = host
        self.failure = failure
        self.component = component
        self.protocol = OUR_PROTOCOL
        self.macros: dict[str, str] = {}
        self.session: Row | None = None
        self.txn: Transaction | None = None
        self.worst: Decision | None = None
        self.domain: str | None = None
        self.account: str | None = None
        self.client_ip: str | None = None
        self.closed = False

    # -- dispatch ---------------------------------------------------------------------

    async def handle(self, packet: codec.Packet) -> bytes:
        command, data = packet.command, packet.data
        if command == codec.SMFIC_MACRO:
            _stage, macros = codec.decode_macros(data)
            self.macros.update(macros)
            return b""
        if command == codec.SMFIC_OPTNEG:
            return self._optneg(codec.decode_optneg(data))
        if command == codec.SMFIC_CONNECT:
            self._connect(codec.decode_connect(data))
            return self._reply_unless(codec.SMFIP_NR_CONN)
        if command == codec.SMFIC_HELO:
            self._helo(codec.decode_helo(data))
            return self._reply_unless(codec.SMFIP_NR_HELO)
        if command == codec.SMFIC_MAIL:
            return await self._mail(codec.decode_envelope(data))
        if command == codec.SMFIC_RCPT:
            return self._rcpt(codec.decode_envelope(data))
        if command == codec.SMFIC_HEADER:
            self._header(*codec.decode_header(data))
            return self._reply_unless(codec.SMFIP_NR_HDR)
        if command == codec.SMFIC_EOH:
            if self.txn is not None:
                self.txn.size += 2
            return self._reply_unless(codec.SMFIP_NR_EOH)
        if command == codec.SMFIC_BODY:
            if self.txn is not None:
                self.txn.size += len(data)
            return self._reply_unless(codec.SMFIP_NR_BODY)
        if command == codec.SMFIC_BODYEOB:
            if data and self.txn is not None:
                self.txn.size += len(data)
            return await self._end_of_message()
        if command == codec.SMFIC_ABORT:
            await self._abort()
            return b""
        if command in (codec.SMFIC_DATA, codec.SMFIC_UNKNOWN):
            return codec.CONTINUE
        if command == codec.SMFIC_QUIT_NC:
            await self.close()
            self.closed = False
            self.macros = {}
            return b""
        if command == codec.SMFIC_QUIT:
            await self.close()
            return b""
        raise codec.ProtocolError(f"unknown milter command {command!r}")

    def _reply_unless(self, no_reply_flag: int) -> bytes:
        return b"" if self.protocol & no_reply_flag else codec.CONTINUE

    # -- stages ------------------------------------------------------------------------

    def _optneg(self, offer: codec.OptNeg) -> bytes:
        if offer.version < 6:
            raise codec.ProtocolError(f"milter protocol version {offer.version}, need 6")
        # Ask only for what the MTA offers; an MTA without no-reply support gets replies.
        self.protocol = OUR_PROTOCOL & offer.protocol
        actions = SMFIF_SETSYMLIST & offer.actions
        return codec.encode_optneg(actions, self.protocol, MACROS if actions else None)

    def _connect(self, info: codec.Connect) -> None:
        if self.session is not None:
            # A second CONNECT without QUIT (Postfix after XCLIENT): a new client.
            self._finish_session()
        self.client_ip = info.address if info.family in ("4", "6") else None
        self.domain = self._domain()
        self.account = None
        self.worst = None
        self.session = self.recorder.new(
            "smtp_sessions", started_at=now(), component=self.component, host=self.host,
            domain=self.domain, client_ip=self.client_ip,
            client_name=info.hostname or None)

    def _helo(self, helo: str) -> None:
        if self.session is not None:
            self.recorder.update(self.session, helo=helo[:255])

    async def _mail(self, envelope: codec.Envelope) -> bytes:
        if self.session is None:
            self._connect(codec.Connect("", "U", None, None))
        assert self.session is not None
        if self.txn is not None:
            await self._abort()      # MAIL without an abort first: the old one is over
        account = self._account()
        if account:
            self.account = account
            if self.domain is None and "@" in self.account:
                self.domain = self.account.rpartition("@")[2]
            self.recorder.update(self.session, account=self.account, domain=self.domain)
        subject = Subject.of(self.domain, self.account, self.client_ip)
        size = envelope.arguments.get("SIZE", "")
        announced = int(size) if size.isdigit() else None
        peek = {"messages": 1, "recipients": 1, "bytes": announced or 0}
        check: Check | None
        try:
            check = await self.engine.check(subject, blocks=True, acquire=("concurrent_sends",),
                                            peek=peek, sender=envelope.address)
            decisions = list(check.decisions)
        except PolicyUnavailable as error:
            check = None
            decisions = [self._unavailable(error)]
        row = self.recorder.new(
            "smtp_messages", session_id=self.session, started_at=now(), domain=self.domain,
            account=self.account, client_ip=self.client_ip, sender=envelope.address,
            size=announced)
        self.txn = Transaction(row, subject, check, size_announced=announced)
        refusal = self._record("mail", decisions, detail={"size": announced})
        if refusal is not None:
            await self._close_transaction(refusal.verdict, refusal.reason)
            await pause_before_refusal(refusal, self.refusal_delay_s)
            return self._replycode(refusal)
        return codec.CONTINUE

    def _rcpt(self, envelope: codec.Envelope) -> bytes:
        txn = self.txn
        if txn is None:
            return codec.CONTINUE
        decisions: list[Decision] = []
        if txn.check is not None:
            count = len(txn.recipients) + 1
            decisions = txn.check.exceeds({"recipients_per_message": count,
                                           "recipients": count})
        refusal = self._record("rcpt", decisions, detail={"recipient": envelope.address})
        if refusal is not None:
            return self._replycode(refusal)
        txn.recipients.append(envelope.address)
        self.recorder.update(txn.row, recipients=list(txn.recipients),
                             recipient_count=len(txn.recipients))
        return codec.CONTINUE

    def _header(self, name: str, value: str) -> None:
        txn = self.txn
        if txn is None:
            return
        txn.size += len(name) + len(value) + 4    # "name: value\r\n" as received
        lower = name.lower()
        if lower == "message-id":
            self.recorder.update(txn.row, message_id=value.strip()[:998])
        elif lower == "subject":
            digest = hashlib.sha256(value.strip().encode("utf-8", "replace")).hexdigest()
            self.recorder.update(txn.row, subject_digest=digest[:16])

    async def _end_of_message(self) -> bytes:
        txn = self.txn
        if txn is None:
            return codec.CONTINUE
        ended = now()
        queue_id = self.macros.get("i") or None
        self.recorder.update(txn.row, queue_id=queue_id, size=txn.size,
                             recipient_count=len(txn.recipients), ended_at=ended)
        decisions: list[Decision] = []
        # Nothing to count and no slot to give back: no database call (a limit set
        # since MAIL applies from the next transaction on).
        if txn.check is not None and (txn.check.leases or any(
                u.window_s for u in txn.check.usage)):
            try:
                done = await self.engine.check(
                    txn.subject, consume={"messages": 1, "recipients": len(txn.recipients),
                                          "bytes": txn.size},
                    release=txn.check.leases)
                decisions = list(done.decisions)
                txn.check = None      # the leases went back with the consume call
            except PolicyUnavailable as error:
                decisions = [self._unavailable(error)]
        refusal = self._record("eom", decisions, detail={"size": txn.size,
                                                         "queue_id": queue_id})
        if refusal is not None:
            await self._close_transaction(refusal.verdict, refusal.reason, ended)
            return self._replycode(refusal)
        assert self.session is not None
        values = self.session.values
        self.recorder.update(self.session, messages=values["messages"] + 1,
                             recipients=values["recipients"] + len(txn.recipients),
                             bytes=values["bytes"] + txn.size)
        await self._close_transaction(ACCEPT, None, ended)
        return codec.CONTINUE

    async def _abort(self) -> None:
        if self.txn is not None:
            await self._close_transaction("aborted", "the client ended the transaction")

    async def close(self) -> None:
        """QUIT, QUIT_NC, or the MTA went away: finish the session's records."""
        if self.closed:
            return
        self.closed = True
        await self._abort()
        self._finish_session()

    # -- helpers -----------------------------------------------------------------------

    def _domain(self) -> str | None:
        daemon = self.macros.get("daemon_name", "").lower()
        claimed = daemon if "." in daemon else None
        if self.peer is None:
            return claimed
        if claimed is not None and claimed != self.peer.domain:
            log.warning("milter: %s names {daemon_name} %s: ignored, the session is %s's",
                        self.peer, claimed, self.peer.domain)
        return self.peer.domain

    def _account(self) -> str | None:
        account = (self.macros.get("auth_authen") or "").lower() or None
        if account and self.peer is not None and (
                account.rpartition("@")[2] != self.peer.domain):
            # The routers hand a login only to its own domain's Postfix.
            log.warning("milter: %s names {auth_authen} %s, not of %s: ignored",
                        self.peer, account, self.peer.domain)
            return None
        return account

    async def _close_transaction(self, verdict: str, reason: str | None,
                                 ended: object = None) -> None:
        txn, self.txn = self.txn, None
        # The queue id belongs to this transaction only; the next one gets its own.
        self.macros.pop("i", None)
        if txn is None:
            return
        if txn.check is not None and txn.check.leases:
            try:
                await self.engine.release(txn.check.leases)
            except PolicyUnavailable as error:
                log.warning("%s", error)
        if txn.row.values.get("verdict") is None:
            self.recorder.update(txn.row, verdict=verdict, reason=reason,
                                 ended_at=ended or now())

    def _finish_session(self) -> None:
        if self.session is None:
            return
        worst = self.worst
        self.recorder.update(self.session, ended_at=now(),
                             verdict=worst.verdict if worst else ACCEPT,
                             reason=worst.reason if worst else None)
        self.session = None

    def _unavailable(self, error: PolicyUnavailable) -> Decision:
        submission = self.account is not None
        policy = self.failure.submission if submission else self.failure.inbound
        direction = "submission" if submission else "inbound"
        verdict = TEMPFAIL if policy == "tempfail" else ACCEPT
        reason = (f"policy service unavailable, try again later ({direction})"
                  if verdict == TEMPFAIL else f"accepted unchecked ({direction}): {error}")
        return Decision(verdict, reason, RULE_UNAVAILABLE)

    def _record(self, stage: str, decisions: list[Decision],
                detail: dict[str, object]) -> Decision | None:
        """Record every decision that is not a plain accept; return the refusing one."""
        refusal = None
        for decision in decisions:
            if decision.verdict == ACCEPT and decision.rule is None:
                continue
            if decision.mode == SHADOW and self.txn is not None:
                if decision.rule in self.txn.shadowed:
                    continue
                self.txn.shadowed.add(decision.rule or "")
            self.recorder.new(
                "smtp_events", session_id=self.session,
                message_id=self.txn.row if self.txn else None, at=now(), stage=stage,
                verdict=decision.verdict, reason=decision.reason, rule=decision.rule,
                mode=decision.mode, detail=detail)
            if decision.refuses and refusal is None:
                refusal = decision
            if decision.mode != SHADOW and (
                    self.worst is None
                    or SEVERITY.get(decision.verdict, 0) > SEVERITY.get(self.worst.verdict, 0)):
                self.worst = decision
        return refusal

    @staticmethod
    def _replycode(decision: Decision) -> bytes:
        code, status, text = smtp_reply(decision)
        return codec.encode_replycode(code, status, text)
