"""SMTP-Out as a resident service: LMTP intake from Filter-Out, durable spool, delivery.

INTAKE
    listen.smtp_out ("unix:smtp-out.sock": <state_dir>/private/hops/smtp-out.sock),
    LMTP from Filter-Out: every syntactically valid recipient is accepted (the
    sender's domain Postfix and the milter have decided already); at DATA the
    message is made durable in the spool (<state_dir>/spool/smtp-out) and each
    recipient gets `250 2.0.0 queued as <id>`, or `452 4.3.1` when the disk is full.

SECURITY
    The intake relays to anywhere, so only Filter-Out may reach it: it is an internal
    hop (mailfc.hops), whose unix socket lets in root and this service's user only
    (SO_PEERCRED, checked before the greeting); as "host:port", only a peer with the
    cluster's certificate (mutual TLS).  Hosted recipients go to the LMTP Router
    (listen.lmtp_router) the same way.

DELIVERY (mailfc.gateways.spool: per-domain queues, round-robin, retries, DSNs)
    a hosted recipient domain  -> the LMTP Router (the inbound path)
    any other domain           -> its MX hosts (remote.py, routes.py)
    A 4xx or an unreachable MX is retried with backoff; a 5xx, or a 4xx past
    spool.max_lifetime_s, bounces to the sender with a DSN, which the spool
    delivers like any message (into the sender's own mailbox when hosted).
    Every delivery result is recorded (smtp_events, component smtp-out).
"""

from __future__ import annotations

import email.policy
import logging
from email.parser import BytesHeaderParser

import asyncpg

from mailfc import hops
from mailfc.addresses import normalize_address
from mailfc.config import Config
from mailfc.db.directory import Directory
from mailfc.errors import InvalidInput
from mailfc.gateways.lmtp_hop import LmtpHop
from mailfc.gateways.smtp_out.remote import RemoteDelivery
from mailfc.gateways.smtp_out.routes import Router, parse_routes
from mailfc.gateways.spool import Envelope as SpoolEnvelope
from mailfc.gateways.spool import Spool, spool_directory
from mailfc.gateways.spool.store import SpoolFull, domain_of
from mailfc.protocols.lmtp import Reply
from mailfc.protocols.smtp_server import Envelope, LmtpServer, Session

log = logging.getLogger("mailfc.gateways.smtp_out")


def _message_id(message: bytes) -> str | None:
    head = message.split(b"\r\n\r\n", 1)[0].split(b"\n\n", 1)[0]
    parsed = BytesHeaderParser(policy=email.policy.SMTP).parsebytes(head + b"\r\n\r\n")
    value = parsed.get("Message-ID")
    return str(value).strip() if value else None


class SmtpOutHandler:
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
        try:
            queue_id = await self.service.spool.put(
                envelope.sender, list(envelope.rcpt_tos), envelope.content,
                mail_options=tuple(envelope.mail_options))
        except SpoolFull as error:
            reply = f"452 4.3.1 insufficient system storage: {error}"
        else:
            reply = f"250 2.0.0 queued as {queue_id}"
        return [reply] * len(envelope.rcpt_tos)


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
        self.spool = Spool(spool_directory(config.state_dir, config.spool.directory,
                                           "smtp-out"),
                           self._deliver, config.spool, hostname=config.host_name)
        self.lmtp = LmtpServer(SmtpOutHandler(self), hostname=config.host_name,
                               ident="mailfc SMTP-Out",
                               data_size_limit=settings.max_message_size)
        self.listener = hops.listener(config, self.name, config.listen.smtp_out,
                                      self.lmtp.tracked_by)

    async def _deliver(self, envelope: SpoolEnvelope, recipients: list[str],
                       message: bytes) -> dict[str, Reply]:
        domain = domain_of(recipients[0])
        if await self.directory.is_hosted(domain):
            replies = await self.inbound.deliver(envelope.sender, recipients, message)
        else:
            replies = await self.remote.deliver(envelope.sender, recipients, message)
        await self._record(envelope, domain, replies, _message_id(message))
        return replies

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
        await self.spool.start()
        await self.listener.start()

    async def stop(self, drain_timeout: float) -> None:
        await self.listener.stop(drain_timeout)
        await self.spool.stop(drain_timeout)
        await self.inbound.close()
