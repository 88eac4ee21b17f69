"""Filter-Out's LMTP side: receive, run the chain, pass on or refuse, record.

One reply per recipient at DATA, as LMTP requires: the next hop's own per-recipient
replies when the message passes, else the chain's verdict for every recipient
(chain.py lists them); the next hop down: 451 4.4.1 (the domain's Postfix retries).

STREAMING
    The message arrives in a MessageData (protocols.smtp_server: memory up to its
    first 64 KiB, then an unlinked file), the chain reads its header and scans it in
    chunks, and it is sent on from there (FilterMessage.source()): a 50 MB message
    costs this process no more memory than a small one.

IDENT
    To the next hop (SMTP-Out's intake) goes XFORWARD IDENT=<domain>:<Postfix's queue
    id>: the domain is the one of the container that connected, as the kernel says
    (mailfc.peers, when the connection was admitted; "[host]" for root on the host),
    the queue id what that Postfix sent in its own XFORWARD IDENT.  So SMTP-Out's
    intake recognises a retry of a message whose reply was lost, and no domain can
    name another's messages.

RECORDS
    Per message an smtp_sessions row (component "filter-out", the original client from
    XFORWARD) with its smtp_messages row (queue_id = Postfix's id from XFORWARD IDENT,
    Message-ID, size, verdict, hop "filter-out": the message was recorded already by
    the hop its client spoke to, and is counted there only) and an smtp_events row
    (stage "filter") for each check that did not simply accept.
"""

from __future__ import annotations

import hashlib
import logging

from mailfc.gateways.filter.chain import Chain, Outcome, reply
from mailfc.gateways.lmtp_hop import LmtpHop
from mailfc.policy.engine import ENFORCE
from mailfc.policy.recorder import Recorder, now
from mailfc.protocols.lmtp import LmtpError, Reply
from mailfc.protocols.smtp_server import Envelope, Session, TakesXforward

log = logging.getLogger("mailfc.gateways.filter")


class FilterHandler(TakesXforward):
    """LMTP server hooks (protocols.smtp_server), named after the verbs they answer;
    who is hosted is decided before us (the domain's Postfix) and after us (SMTP-Out).

    `session.state` is the peer's domain (None: root on the host), set when the
    connection was admitted (service.py)."""


    def __init__(self, component: str, hostname: str, chain: Chain, hop: LmtpHop,
                 recorder: Recorder) -> None:
        self.component = component
        self.hostname = hostname
        self.chain = chain
        self.hop = hop
        self.recorder = recorder
        self.verdicts: dict[str, int] = {}

    async def handle_DATA(self, session: Session, envelope: Envelope) -> list[str]:
        forwarded: dict[str, str] = envelope.extra.get("xforward", {})
        rcpts = list(envelope.rcpt_tos)
        assert envelope.message is not None
        outcome = await self.chain.check(
            envelope.message, envelope.sender, rcpts, client_ip=forwarded.get("ADDR"),
            client_name=forwarded.get("NAME"), helo=forwarded.get("HELO"),
            queue_id=forwarded.get("IDENT"))
        try:
            verdict = outcome.verdict
            results: dict[str, Reply] | None = None
            if verdict.action == "accept" and outcome.message is not None:
                ident = forwarded.get("IDENT")
                xforward = {"IDENT": f"{session.state or '[host]'}:{ident}"} if ident \
                    else None
                try:
                    results = await self.hop.deliver(
                        envelope.sender, rcpts, outcome.message.source(),
                        mail_options=[o for o in envelope.mail_options
                                      if o.upper().startswith(("BODY=", "SMTPUTF8"))],
                        xforward=xforward)
                except LmtpError as error:
                    log.warning("%s: next hop: %s", self.component, error)
                    results = dict.fromkeys(rcpts, Reply(451, f"4.4.1 next hop unavailable:"
                                                              f" {error}"))
            elif verdict.action == "quarantine" and outcome.message is not None:
                await self.chain.quarantine(outcome.message)
            self._record(envelope, forwarded, outcome)
        finally:
            outcome.close()
        self.verdicts[verdict.action] = self.verdicts.get(verdict.action, 0) + 1
        if results is not None:
            return [str(results.get(r, Reply(451, "4.3.0 no reply"))) for r in rcpts]
        return [reply(verdict)] * len(rcpts)

    def _record(self, envelope: Envelope, forwarded: dict[str, str],
                outcome: Outcome) -> None:
        started = now()
        verdict, message = outcome.verdict, outcome.message
        recipients = list(envelope.rcpt_tos)
        domain = recipients[0].rpartition("@")[2].lower() if recipients else None
        size = message.size if message is not None else (
            envelope.message.size if envelope.message is not None else 0)
        client_ip = forwarded.get("ADDR")
        session = self.recorder.new(
            "smtp_sessions", started_at=started, ended_at=started, component=self.component,
            host=self.hostname, domain=domain, client_ip=client_ip,
            client_name=forwarded.get("NAME"), helo=(forwarded.get("HELO") or "")[:255] or None,
            messages=1, recipients=len(recipients), bytes=size,
            verdict=verdict.action, reason=verdict.reason or None)
        message_ids = message.values("Message-ID") if message is not None else []
        subjects = message.values("Subject") if message is not None else []
        row = self.recorder.new(
            "smtp_messages", session_id=session, started_at=started, ended_at=started,
            domain=domain, client_ip=client_ip, queue_id=forwarded.get("IDENT"),
            message_id=message_ids[0].strip()[:998] if message_ids else None,
            subject_digest=hashlib.sha256(subjects[0].strip().encode("utf-8", "replace"))
            .hexdigest()[:16] if subjects else None,
            sender=envelope.sender, recipients=recipients,
            recipient_count=len(recipients), size=size,
            verdict=verdict.action, reason=verdict.reason or None, hop=self.component)
        for finding in outcome.findings:
            self.recorder.new("smtp_events", session_id=session, message_id=row, at=started,
                              stage="filter", verdict=finding.action, reason=finding.reason,
                              rule=finding.rule, mode=ENFORCE, detail=None)
