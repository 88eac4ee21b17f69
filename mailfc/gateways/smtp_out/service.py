"""SMTP-Out as a resident service: LMTP intake from Filter-Out, durable spool, delivery.

INTAKE
    listen.smtp_out ("unix:smtp-out.sock": <state_dir>/private/hops/smtp-out.sock),
    LMTP from Filter-Out (and SMTP-In's bounces to outside senders): every
    syntactically valid recipient is accepted (the sender's domain Postfix and the
    milter have decided already); at DATA the message, which the server wrote to a
    temporary file as it arrived, is copied in chunks into the spool
    (<state_dir>/spool/smtp-out) and made durable, and each recipient gets
    `250 2.0.0 queued as <id>`, or `452 4.3.1` when the disk is full.

IDEMPOTENCE (mailfc.gateways.journal, <state_dir>/journal/smtp-out.*)
    Between transactions the sender may say `XFORWARD IDENT=<its queue id>` (Filter-Out:
    <domain>:<Postfix queue id>; SMTP-In's bounces: the spool's queue id; ADDR, NAME,
    HELO, PROTO are taken and ignored).  A recipient already taken into the spool under
    that IDENT gets the reply recorded then (`250 2.0.0 queued as <id>`) and is not
    queued again; the others are queued, and recorded once the spool has committed.
    So a retry after a lost reply (SMTP-Out killed after the commit, a broken
    connection) sends the message once.  The spool file keeps the IDENT too: a process
    killed between the commit and the record leaves a message the journal does not
    know, and the next process, taking the spool over before it listens, records every
    queued message's IDENT and recipients that the journal lacks.

SECURITY
    The intake relays to anywhere, so only Filter-Out may reach it: it is an internal
    hop (mailfc.hops), whose unix socket lets in root and this service's user only
    (SO_PEERCRED, checked before the greeting); as "host:port", only a peer with the
    cluster's certificate (mutual TLS).  Hosted recipients go to the LMTP Router
    (listen.lmtp_router) the same way.

DELIVERY (mailfc.gateways.spool: per-domain queues, round-robin, retries, DSNs)
    a hosted recipient domain  -> the LMTP Router (the inbound path)
    any other domain           -> its MX hosts (remote.py, routes.py), the message
                                  streamed from the spool's file
    A 4xx or an unreachable MX is retried with backoff; a 5xx, or a 4xx past
    spool.max_lifetime_s, bounces to the sender with a DSN, which the spool
    delivers like any message (into the sender's own mailbox when hosted).
    Every delivery result is recorded (smtp_events, component smtp-out).  Hosted
    recipients go with XFORWARD IDENT=<queue id>, so the router's journal keeps a
    retry from delivering twice.

CONFIGURATION
    smtp_out.routes ([]), timeout_s (60), dns_timeout_s (10); messages.size_limit
    (50 MiB); [spool] as for SMTP-In (its directory: <state_dir>/spool/smtp-out);
    journal.keep_s (2 days), journal.max_entries (500000).
"""

from __future__ import annotations

import asyncio
import logging

import asyncpg

from mailfc import hops, logsetup
from mailfc.addresses import normalize_address, normalize_domain
from mailfc.config import Config
from mailfc.db.directory import Directory
from mailfc.errors import InvalidInput
from mailfc.gateways.filter.message import FilterMessage, HeaderTooLarge
from mailfc.gateways.journal import DeliveredJournal
from mailfc.gateways.lmtp_hop import LmtpHop
from mailfc.gateways.smtp_out.remote import RemoteDelivery
from mailfc.gateways.smtp_out.routes import Router, parse_routes
from mailfc.gateways.spool import Envelope as SpoolEnvelope
from mailfc.gateways.spool import Spool, spool_directory
from mailfc.gateways.spool.store import SpoolFull, domain_of
from mailfc.messages import Source
from mailfc.policy.recorder import storable_text
from mailfc.protocols.lmtp import Reply
from mailfc.protocols.smtp_server import Envelope, LmtpServer, Session, TakesXforward

log = logging.getLogger("mailfc.gateways.smtp_out")


# Enough of a message to find its Message-ID in the header.
HEADER_PREFIX = 64 * 1024


def _message_id(message: Source) -> str | None:
    """The raw Message-ID, as the filter chain reads header fields: the email package's
    parser is not for hostile input (a header of 100,000 parentheses costs it 60 MB and
    ends in RecursionError)."""
    try:
        parsed = FilterMessage.parse(message, "", [], header_limit=HEADER_PREFIX)
    except HeaderTooLarge:
        return None
    values = parsed.values("Message-ID")
    return storable_text(values[0].strip()[:998]) if values else None


class SmtpOutHandler(TakesXforward):
    """LMTP server hooks (protocols.smtp_server) for the intake, named after the verbs."""


    def __init__(self, service: SmtpOutService) -> None:
        self.service = service

    async def handle_RCPT(self, session: Session, envelope: Envelope, address: str,
                          options: list[str]) -> str:
        try:
            envelope.rcpt_tos.append(normalize_address(address))
        except InvalidInput as error:
            return f"501 5.1.3 {error}"
        return "250 2.1.5 OK"

    async def handle_DATA(self, session: Session, envelope: Envelope) -> list[str]:
        rcpts = list(envelope.rcpt_tos)
        assert envelope.message is not None
        ident = envelope.extra.get("xforward", {}).get("IDENT") or None
        journal = self.service.journal
        if ident is None:
            reply = await self._queue(envelope, envelope.message, rcpts, None)
            return [reply] * len(rcpts)
        answered, claimed = await journal.claim(ident, rcpts)
        replies = {rcpt: str(reply) for rcpt, reply in answered.items()}
        try:
            if claimed:
                reply = await self._queue(envelope, envelope.message, claimed, ident)
                replies.update(dict.fromkeys(claimed, reply))
        finally:
            journal.release(ident, claimed)
        return [replies[rcpt] for rcpt in rcpts]

    async def _queue(self, envelope: Envelope, message: Source, recipients: list[str],
                     ident: str | None) -> str:
        """Into the spool (durable when put returns); with ident, recorded after."""
        try:
            queue_id = await self.service.spool.put(
                envelope.sender, recipients, message,
                mail_options=tuple(envelope.mail_options), ident=ident)
        except SpoolFull as error:
            return f"452 4.3.1 insufficient system storage: {error}"
        reply = Reply(250, f"2.0.0 queued as {queue_id}")
        logsetup.hop("smtp-out", queue_id, f"from=<{envelope.sender}>, size={message.size},"
                     f" nrcpt={len(recipients)}, orig_queue_id={ident or '-'}")
        if ident is not None:
            for recipient in recipients:
                self.service.journal.record(ident, recipient, reply)
        return str(reply)


class SmtpOutService:
    name = "smtp-out"

    def __init__(self, config: Config, pool: asyncpg.Pool) -> None:
        self.config = config
        self.pool = pool
        settings = config.smtp_out
        self.directory = Directory(pool)
        self.remote = RemoteDelivery(
            Router(parse_routes(settings.routes), timeout=settings.dns_timeout_s),
            helo=config.host_name, timeout=settings.timeout_s)
        self.inbound = LmtpHop(hops.address(config, config.listen.lmtp_router),
                               helo=config.host_name,
                               timeout=config.lmtp_router.delivery_timeout_s
                               + config.runtime.start_timeout_s)
        self.journal = DeliveredJournal.of(config, self.name)
        self.spool = Spool(spool_directory(config.state_dir, config.spool.directory,
                                           "smtp-out"),
                           self._deliver, config.spool, hostname=config.host_name)
        self.spool.on_resume = self._journal_resumed
        # Delivery results on their way to PostgreSQL (see _deliver).
        self._recording: set[asyncio.Task[None]] = set()
        self.lmtp = LmtpServer(SmtpOutHandler(self), hostname=config.host_name,
                               ident="mailfc SMTP-Out",
                               data_size_limit=config.hop_size_limit,
                               message_dir=config.message_dir)
        self.listener = hops.listener(config, self.name, config.listen.smtp_out,
                                      self.lmtp.tracked_by)

    async def _deliver(self, envelope: SpoolEnvelope, recipients: list[str],
                       message: Source) -> dict[str, Reply]:
        domain = domain_of(recipients[0])
        try:
            normalize_domain(domain)
        except InvalidInput as error:
            # A bounce to a forged sender's broken address, say: no retry mends it.
            return dict.fromkeys(recipients, Reply(550, f"5.1.2 bad destination: {error}"))
        # Read now: the spool may remove the file as soon as it has the replies.
        message_id = await asyncio.to_thread(_message_id, message)
        if await self.directory.is_hosted(domain):
            replies = await self.inbound.deliver(envelope.sender, recipients, message,
                                                 xforward={"IDENT": envelope.queue_id})
        else:
            replies = await self.remote.deliver(envelope.sender, recipients, message,
                                                envelope.mail_options)
        # Recorded after the spool has the replies, not before: the spool's own record
        # is what keeps a killed process from delivering again, so nothing may stand
        # between the next hop's reply and it.
        task = asyncio.ensure_future(self._record(envelope, domain, replies, message_id))
        self._recording.add(task)
        task.add_done_callback(self._recording.discard)
        return replies

    def _journal_resumed(self, envelope: SpoolEnvelope) -> None:
        """A message found on taking over the spool: make sure the journal answers its
        sender's retry (see IDEMPOTENCE)."""
        if envelope.ident is None:
            return
        reply = Reply(250, f"2.0.0 queued as {envelope.queue_id}")
        for recipient in envelope.recipients:
            if self.journal.get(envelope.ident, recipient) is None:
                self.journal.record(envelope.ident, recipient, reply)

    async def _record(self, envelope: SpoolEnvelope, domain: str,
                      replies: dict[str, Reply], message_id: str | None) -> None:
        try:
            await self.pool.executemany(
                # session_id 0: the delivery belongs to no SMTP session of ours; the
                # Message-ID ties it to the message the milter recorded.
                "INSERT INTO smtp_events (session_id, at, stage, verdict, reason, rule, detail)"
                " VALUES (0, now(), 'delivery', $1, $2, 'smtp-out', jsonb_build_object("
                "'queue_id', $3::text, 'recipient', $4::text, 'domain', $5::text,"
                " 'message_id', $6::text, 'sender', $7::text))",
                [("delivered" if reply.ok else "deferred" if reply.temporary else "bounced",
                  str(reply), envelope.queue_id, recipient, domain, message_id,
                  envelope.sender)
                 for recipient, reply in replies.items()])
        except (asyncpg.PostgresError, OSError) as error:
            log.warning("could not record delivery results of %s: %s", envelope.queue_id,
                        error)

    async def start(self) -> None:
        await asyncio.to_thread(self.journal.open)
        await self.spool.start()
        await self.listener.start()

    async def stop(self, drain_timeout: float) -> None:
        await self.listener.stop(drain_timeout)
        await self.spool.stop(drain_timeout)
        if self._recording:
            await asyncio.wait(set(self._recording), timeout=drain_timeout)
        await self.inbound.close()
        self.journal.close()
