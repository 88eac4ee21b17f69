"""The filter gateway's LMTP side: receive, run the chain, pass on or refuse, record.

One reply per recipient at DATA, as LMTP requires: the next hop's own per-recipient
replies when the message passes, else the chain's verdict for every recipient:

    reject      550 5.7.1 <reason>  (or the milter's own reply, or 550 5.6.0 for headers)
    tempfail    451 4.7.1 <reason>
    discard     250 2.7.0 OK: discarded      (nothing delivered)
    quarantine  250 2.7.0 OK: held for review (written to the quarantine directory)
    next hop down  451 4.4.1 ...             (the spool before us retries)

RECORDS
    Per message an smtp_sessions row (component "filter-in" / "filter-out", the original
    client from XFORWARD) with its smtp_messages row (queue_id = the spool's id from
    XFORWARD IDENT, Message-ID, size, verdict) and an smtp_events row (stage "filter")
    for each check that did not simply accept.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from pathlib import Path

from mailfc.gateways import replies
from mailfc.gateways.filter.checks import Check
from mailfc.gateways.filter.message import ACCEPT, FilterMessage, Verdict
from mailfc.gateways.filter.milter_client import MilterClient, MilterUnavailable
from mailfc.gateways.lmtp_hop import LmtpHop
from mailfc.policy.engine import ENFORCE
from mailfc.policy.recorder import Recorder, now
from mailfc.protocols.lmtp import LmtpError, Reply
from mailfc.protocols.smtp_server import Envelope, Session

log = logging.getLogger("mailfc.gateways.filter")

XFORWARD_ATTRIBUTES = ("NAME", "ADDR", "PROTO", "HELO", "IDENT")


def xtext_decode(value: str) -> str:
    out = bytearray()
    index = 0
    while index < len(value):
        char = value[index]
        if char == "+" and _is_hex(value[index + 1:index + 3]):
            out.append(int(value[index + 1:index + 3], 16))
            index += 3
        else:
            out += char.encode("utf-8")
            index += 1
    return out.decode("utf-8", "replace")


def _is_hex(text: str) -> bool:
    return len(text) == 2 and all(c in "0123456789ABCDEFabcdef" for c in text)


class FilterHandler:
    """LMTP server hooks (protocols.smtp_server), named after the verbs they answer;
    who is hosted is decided before us (SMTP-In) and after us (the router)."""

    extra_verbs = ("XFORWARD",)
    ehlo_extensions = ["XFORWARD " + " ".join(XFORWARD_ATTRIBUTES)]

    def __init__(self, component: str, hostname: str, checks: list[tuple[str, Check]],
                 milters: list[MilterClient], milter_default_action: str, hop: LmtpHop,
                 recorder: Recorder, quarantine_dir: Path) -> None:
        self.component = component
        self.hostname = hostname
        self.checks = checks
        self.milters = milters
        self.milter_default_action = milter_default_action
        self.hop = hop
        self.recorder = recorder
        self.quarantine_dir = quarantine_dir
        self.verdicts: dict[str, int] = {}

    async def handle_XFORWARD(self, session: Session, envelope: Envelope,
                              argument: str) -> str:
        """Attributes of the original client, for the next transaction."""
        if envelope.mail_from is not None:
            return "503 5.5.1 XFORWARD only between transactions"
        attributes: dict[str, str] = {}
        for item in argument.split():
            name, sep, value = item.partition("=")
            if not sep or name.upper() not in XFORWARD_ATTRIBUTES:
                return "501 5.5.4 bad XFORWARD attribute"
            decoded = xtext_decode(value)
            if decoded not in ("[UNAVAILABLE]", "[TEMPUNAVAIL]"):
                attributes[name.upper()] = decoded
        envelope.extra.setdefault("xforward", {}).update(attributes)
        return replies.OK

    async def handle_DATA(self, session: Session, envelope: Envelope) -> list[str]:
        forwarded: dict[str, str] = envelope.extra.get("xforward", {})
        message = FilterMessage.parse(envelope.content, envelope.sender,
                                      list(envelope.rcpt_tos))
        message.client_ip = forwarded.get("ADDR")
        message.client_name = forwarded.get("NAME")
        message.helo = forwarded.get("HELO")
        message.queue_id = forwarded.get("IDENT")
        verdict, findings = await self.run_chain(message)
        rcpts = list(envelope.rcpt_tos)
        results: dict[str, Reply] | None = None
        if verdict.action == "accept":
            try:
                results = await self.hop.deliver(
                    message.sender, rcpts, message.as_bytes(),
                    mail_options=[o for o in envelope.mail_options
                                  if o.upper().startswith(("BODY=", "SMTPUTF8"))])
            except LmtpError as error:
                log.warning("%s: next hop: %s", self.component, error)
                results = dict.fromkeys(rcpts, Reply(451, f"4.4.1 next hop unavailable:"
                                                          f" {error}"))
        elif verdict.action == "quarantine":
            await asyncio.to_thread(self._quarantine, message)
        self._record(message, verdict, findings)
        self.verdicts[verdict.action] = self.verdicts.get(verdict.action, 0) + 1
        if results is not None:
            return [str(results.get(r, Reply(451, "4.3.0 no reply"))) for r in rcpts]
        return [_reply(verdict)] * len(rcpts)

    async def run_chain(self, message: FilterMessage) -> tuple[Verdict, list[Verdict]]:
        """Built-in checks, then each milter, until one gives a final verdict."""
        findings: list[Verdict] = []
        for _, check in self.checks:
            verdict = await check(message)
            if verdict.final:
                findings.append(verdict)
                return verdict, findings
        for milter in self.milters:
            try:
                verdict = await milter.check(message)
            except MilterUnavailable as error:
                log.warning("%s: %s", self.component, error)
                action = "tempfail" if self.milter_default_action == "tempfail" else "accept"
                verdict = Verdict(action, f"content filter unavailable: {error}", milter.rule)
                findings.append(verdict)
                if action == "accept":
                    continue
                return verdict, findings
            if verdict.final:
                findings.append(verdict)
                return verdict, findings
        return ACCEPT, findings

    def _quarantine(self, message: FilterMessage) -> None:
        self.quarantine_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        name = f"{message.queue_id or 'noid'}-{os.urandom(4).hex()}.eml"
        path = self.quarantine_dir / name
        envelope = (f"X-Mailfc-Envelope-From: <{message.sender}>\r\n"
                    + "".join(f"X-Mailfc-Envelope-To: <{r}>\r\n" for r in message.recipients))
        with path.open("xb") as handle:
            handle.write(envelope.encode("utf-8", "replace") + message.as_bytes())
            handle.flush()
            os.fsync(handle.fileno())
        log.info("%s: quarantined %s as %s", self.component, message.queue_id, path)

    def _record(self, message: FilterMessage, verdict: Verdict,
                findings: list[Verdict]) -> None:
        started = now()
        domain = message.recipients[0].rpartition("@")[2].lower() if message.recipients \
            else None
        raw_size = len(message.as_bytes())
        session = self.recorder.new(
            "smtp_sessions", started_at=started, ended_at=started, component=self.component,
            host=self.hostname, domain=domain, client_ip=message.client_ip,
            client_name=message.client_name, helo=(message.helo or "")[:255] or None,
            messages=1, recipients=len(message.recipients), bytes=raw_size,
            verdict=verdict.action, reason=verdict.reason or None)
        message_ids = message.values("Message-ID")
        subjects = message.values("Subject")
        row = self.recorder.new(
            "smtp_messages", session_id=session, started_at=started, ended_at=started,
            domain=domain, client_ip=message.client_ip, queue_id=message.queue_id,
            message_id=message_ids[0].strip()[:998] if message_ids else None,
            subject_digest=hashlib.sha256(subjects[0].strip().encode("utf-8", "replace"))
            .hexdigest()[:16] if subjects else None,
            sender=message.sender, recipients=message.recipients,
            recipient_count=len(message.recipients), size=raw_size,
            verdict=verdict.action, reason=verdict.reason or None)
        for finding in findings:
            self.recorder.new("smtp_events", session_id=session, message_id=row, at=started,
                              stage="filter", verdict=finding.action, reason=finding.reason,
                              rule=finding.rule, mode=ENFORCE, detail=None)


def _reply(verdict: Verdict) -> str:
    if verdict.reply:
        return verdict.reply
    reason = " ".join(verdict.reason.split()) or "refused by content filter"
    if verdict.action == "reject":
        return replies.FILTER_REJECT.format(reason=reason)
    if verdict.action == "tempfail":
        return replies.FILTER_TEMPFAIL.format(reason=reason)
    if verdict.action == "discard":
        return replies.DISCARDED
    return replies.QUARANTINED
