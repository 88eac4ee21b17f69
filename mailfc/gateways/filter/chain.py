"""The filter chain of one section ([filter_in] at SMTP-In, [filter_out] at Filter-Out):
built-in checks, then each milter, until one gives a final verdict.

    chain = Chain("smtp-in", config.filter_in, config)
    outcome = await chain.check(envelope.message, sender, recipients, client_ip=...)
    try:
        ... outcome.verdict, outcome.findings, outcome.message.source() ...
    finally:
        outcome.close()

VERDICTS AND REPLIES (reply())
    reject      550 5.7.1 <reason>  (or the milter's own reply, or 550 5.6.0 for headers)
    header too large  552 5.3.4 (the header block over message.HEADER_LIMIT)
    tempfail    451 4.7.1 <reason>  (a milter that cannot be asked, by default)
    discard     250 2.7.0 OK: discarded      (nothing delivered)
    quarantine  250 2.7.0 OK: held for review (written to quarantine_dir first)

QUARANTINE
    <quarantine_dir>/<queue id>-<random>.eml: X-Mailfc-Envelope-From/-To lines, then
    the message as the chain left it, copied in chunks and fsync'd before the 250.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from mailfc.config import Config, FilterSection
from mailfc.gateways import replies
from mailfc.gateways.filter.checks import Check, built_in
from mailfc.gateways.filter.message import (
    ACCEPT,
    HEADER_LIMIT,
    FilterMessage,
    HeaderTooLarge,
    Verdict,
)
from mailfc.gateways.filter.milter_client import MilterClient, MilterUnavailable
from mailfc.messages import Source

log = logging.getLogger("mailfc.gateways.filter")


@dataclass
class Outcome:
    verdict: Verdict
    findings: list[Verdict] = field(default_factory=list)
    # None when the header could not be read (too large).
    message: FilterMessage | None = None

    def close(self) -> None:
        if self.message is not None:
            self.message.close()


class Chain:
    def __init__(self, name: str, section: FilterSection, config: Config) -> None:
        self.name = name
        self.checks: list[tuple[str, Check]] = built_in(
            section.checks, section.dnsbl_zones, dnsbl_timeout_s=section.dnsbl_timeout_s,
            dnsbl_nameservers=section.dnsbl_nameservers)
        self.milters = [MilterClient(spec, timeout=section.milter_timeout_s,
                                     hostname=config.host_name, daemon=name)
                        for spec in section.milters]
        self.milter_default_action = section.milter_default_action
        self.quarantine_dir = Path(section.quarantine_dir) if section.quarantine_dir \
            else config.state_dir / "quarantine"
        self.temporary_dir = config.message_dir
        self.header_limit = HEADER_LIMIT

    async def check(self, data: Source, sender: str, recipients: list[str], *,
                    client_ip: str | None = None, client_name: str | None = None,
                    helo: str | None = None, queue_id: str | None = None) -> Outcome:
        """The chain's verdict on `data`; the caller closes the outcome."""
        try:
            message = FilterMessage.parse(data, sender, recipients,
                                          header_limit=self.header_limit,
                                          temporary_dir=self.temporary_dir)
        except HeaderTooLarge as error:
            verdict = Verdict("reject", str(error), "filter:header_size",
                              f"552 5.3.4 {error}: refused")
            return Outcome(verdict, [verdict])
        message.client_ip = client_ip
        message.client_name = client_name
        message.helo = helo
        message.queue_id = queue_id
        try:
            verdict, findings = await self.run(message)
        except BaseException:
            message.close()
            raise
        return Outcome(verdict, findings, message)

    async def run(self, message: FilterMessage) -> tuple[Verdict, list[Verdict]]:
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
                log.warning("%s: %s", self.name, error)
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

    async def quarantine(self, message: FilterMessage) -> Path:
        return await asyncio.to_thread(self._quarantine, message)

    def _quarantine(self, message: FilterMessage) -> Path:
        self.quarantine_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        name = f"{message.queue_id or 'noid'}-{os.urandom(4).hex()}.eml"
        path = self.quarantine_dir / name
        envelope = (f"X-Mailfc-Envelope-From: <{message.sender}>\r\n"
                    + "".join(f"X-Mailfc-Envelope-To: <{r}>\r\n" for r in message.recipients))
        with path.open("xb") as handle:
            handle.write(envelope.encode("utf-8", "replace"))
            for chunk in message.source().chunks():
                handle.write(chunk)
            handle.flush()
            os.fsync(handle.fileno())
        log.info("%s: quarantined %s as %s", self.name, message.queue_id, path)
        return path


def reply(verdict: Verdict) -> str:
    """The SMTP/LMTP reply for a final verdict (see VERDICTS AND REPLIES)."""
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
