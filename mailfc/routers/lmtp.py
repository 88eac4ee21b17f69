"""LMTP Router: delivers each recipient through its own domain's container.

LISTENER
    listen.lmtp_router (127.0.0.1:24), LMTP (RFC 2033), for the inbound gateways.

TRANSACTION
    LHLO, MAIL FROM, RCPT TO...  At RCPT the recipient must be a hosted account
    or alias of an active domain, else `550 5.1.1`.  Aliases expand to their
    hosted destinations (forwarding to other domains needs the sending path).
    At DATA the recipients are grouped by domain; each domain's group goes, in
    parallel with the others, over LMTP to the dispatcher of the domain's host
    (PROXY v2 header naming the domain), which hands it to the domain's
    Dovecot.  The reply is one line per RCPT, as LMTP requires: a recipient
    whose domain's container cannot start gets `451 4.3.0`, the others are
    unaffected.

FAIRNESS
    At most lmtp_router.per_domain_concurrency deliveries are in flight towards
    one domain; a flood to one domain waits on its own semaphore and never
    queues deliveries to other domains.

CONFIGURATION
    lmtp_router.per_domain_concurrency (8), max_message_size (50 MiB),
    delivery_timeout_s (60).
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import logging
from typing import Any

from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import SMTP, Envelope, Session

from mailfc import netio
from mailfc.config import Config, split_hostport
from mailfc.errors import MailfcError
from mailfc.protocols import proxy
from mailfc.protocols.lmtp import LmtpClient, LmtpError, Reply
from mailfc.routers.directory import Directory

log = logging.getLogger("mailfc.routers.lmtp")

R_NO_SUCH_USER = "550 5.1.1 {address}: no such mailbox here"
R_OK_RCPT = "250 2.1.5 OK"
R_UNAVAILABLE = "4.3.0 mail server for {domain} unavailable, try again later"
R_FORWARD_ONLY = ("451 4.3.0 {address}: forwarding outside this platform is not available "
                  "yet, try again later")


class LmtpRouterHandler:
    """aiosmtpd hooks, named after the LMTP verbs they answer."""

    def __init__(self, router: LmtpRouter) -> None:
        self.router = router

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        targets = await self.router.directory.recipient(address)
        if targets is None:
            return R_NO_SUCH_USER.format(address=address)
        envelope.rcpt_tos.append(address)
        expansions: dict[str, list[str]] = envelope.__dict__.setdefault("expansions", {})
        expansions[address] = targets
        return R_OK_RCPT

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        expansions: dict[str, list[str]] = envelope.__dict__.get("expansions", {})
        message = envelope.original_content or b""
        sender = envelope.mail_from or ""
        peer = session.peer if isinstance(session.peer, tuple) else ("127.0.0.1", 0)
        replies = await self.router.deliver(sender, expansions, envelope.rcpt_tos, message,
                                            peer)
        return "\r\n".join(replies[rcpt] for rcpt in envelope.rcpt_tos)


class LmtpRouter:
    name = "lmtp-router"

    def __init__(self, config: Config, directory: Directory) -> None:
        self.config = config
        self.directory = directory
        self._limits: dict[str, asyncio.Semaphore] = collections.defaultdict(
            lambda: asyncio.Semaphore(config.lmtp_router.per_domain_concurrency))
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        host, port = split_hostport(self.config.listen.lmtp_router)
        handler = LmtpRouterHandler(self)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: LMTP(handler, data_size_limit=self.config.lmtp_router.max_message_size,
                         enable_SMTPUTF8=True, hostname=self.config.host_name,
                         ident="mailfc LMTP router"),
            host, port, reuse_address=True, reuse_port=True)

    async def stop(self, drain_timeout: float) -> None:
        if self._server is not None:
            self._server.close()
            try:
                await asyncio.wait_for(self._server.wait_closed(), drain_timeout)
            except TimeoutError:
                log.warning("LMTP sessions still open after %.0fs", drain_timeout)
            self._server = None

    async def deliver(self, sender: str, expansions: dict[str, list[str]],
                      recipients: list[str], message: bytes,
                      peer: tuple[Any, ...]) -> dict[str, str]:
        """Deliver to every hosted target; one reply line per original recipient."""
        by_domain: dict[str, list[str]] = collections.defaultdict(list)
        for recipient in recipients:
            for target in expansions.get(recipient, []):
                domain = target.rpartition("@")[2]
                if target not in by_domain[domain]:
                    by_domain[domain].append(target)
        hosted = {d: t for d, t in by_domain.items() if await self.directory.is_hosted(d)}
        results: dict[str, Reply] = {}
        outcomes = await asyncio.gather(*(
            self._deliver_domain(domain, sender, targets, message, peer)
            for domain, targets in hosted.items()))
        for outcome in outcomes:
            results.update(outcome)
        replies: dict[str, str] = {}
        for recipient in recipients:
            target_replies = [results[t] for t in expansions.get(recipient, []) if t in results]
            replies[recipient] = _combine(recipient, target_replies)
        return replies

    async def _deliver_domain(self, domain: str, sender: str, targets: list[str],
                              message: bytes, peer: tuple[Any, ...]) -> dict[str, Reply]:
        timeout = self.config.lmtp_router.delivery_timeout_s
        async with self._limits[domain]:
            writer = None
            try:
                placement = await self.directory.place(domain)
                reader, writer = await netio.open_connection(
                    placement.dispatcher_address, placement.lmtp_port,
                    self.config.dispatcher.connect_timeout_s)
                local = writer.get_extra_info("sockname") or ("127.0.0.1", 0)
                client_ip = peer[0] if peer and _is_ip(peer[0]) else local[0]
                writer.write(proxy.encode(client_ip, int(peer[1]) if len(peer) > 1 else 0,
                                          local[0], local[1], authority=domain))
                client = LmtpClient(reader, writer, timeout)
                greeting = await asyncio.wait_for(client.greeting(),
                                                  self.config.runtime.start_timeout_s + timeout)
                if not greeting.ok:
                    raise LmtpError(f"greeting {greeting}")
                results = await client.deliver(self.config.host_name, sender, targets, message)
                await client.quit()
                return results
            except asyncio.CancelledError:
                raise
            except (LmtpError, MailfcError, OSError, TimeoutError) as error:
                log.warning("delivery to %s failed: %s", domain, error)
                reply = Reply(451, R_UNAVAILABLE.format(domain=domain))
                return dict.fromkeys(targets, reply)
            finally:
                if writer is not None:
                    await netio.close(writer)


def _combine(recipient: str, replies: list[Reply]) -> str:
    if not replies:
        return R_FORWARD_ONLY.format(address=recipient)
    for reply in replies:
        if not reply.ok and reply.temporary:
            return f"{reply.code} {reply.text}"
    if all(reply.ok for reply in replies):
        return f"{replies[0].code} {replies[0].text}"
    failed = next(reply for reply in replies if not reply.ok)
    if any(reply.ok for reply in replies):
        # Delivered to some of the alias's mailboxes: saying 5xx would bounce
        # mail that did arrive; the failure is logged instead.
        log.warning("alias %s: some targets refused: %s", recipient, failed)
        ok = next(reply for reply in replies if reply.ok)
        return f"{ok.code} {ok.text}"
    return f"{failed.code} {failed.text}"


def _is_ip(value: object) -> bool:
    try:
        ipaddress.ip_address(str(value))
    except ValueError:
        return False
    return True
