"""LMTP Router: delivers each recipient through its own domain's container.

LISTENER
    listen.lmtp_router ("unix:lmtp-router.sock": <state_dir>/private/hops/lmtp-router.sock),
    LMTP (RFC 2033), for the spools of SMTP-In and SMTP-Out.

SECURITY
    Whoever reaches this listener delivers into any hosted mailbox past every filter,
    so it is an internal hop (mailfc.hops): its unix socket lets in root and this
    service's user only (SO_PEERCRED, checked before the greeting, refusals logged);
    as "host:port" (a router on another host) only peers with the cluster's
    certificate (mutual TLS).  An address is never enough.  Replaced without refusing
    a connection (gateways/listener.py: the new process renames its socket over the
    old one, which drains).

TRANSACTION
    LHLO, MAIL FROM, RCPT TO...  At RCPT the recipient must be a hosted account
    or alias of an active domain, else `550 5.1.1`.  Aliases expand to their
    hosted destinations (forwarding to other domains needs the sending path).
    At DATA the recipients are grouped by domain; each domain's group goes, in
    parallel with the others, over LMTP to the dispatcher of the domain's host
    (PROXY v2 header naming the domain and the client), which hands it to the
    domain's Dovecot; a dispatcher on this host passes the connection to Dovecot
    back instead, and the router talks to Dovecot directly.  The message streams
    from where the server put it (memory, or a temporary file past 64 KiB) to
    every domain at once, chunk by chunk.  The reply is one line per RCPT, as
    LMTP requires: a recipient whose domain's container cannot start gets
    `451 4.3.0`, the others are unaffected.

XFORWARD
    Between transactions a sender may say `XFORWARD IDENT=<its queue id>` (and
    ADDR, NAME, HELO, PROTO; xtext, Postfix's XFORWARD_README), for the next
    transaction only; LHLO announces it.  Whoever reached this listener passed its
    peer check, so it is believed.  ADDR is the client address of the PROXY header
    of a session the router opens to a domain (else the sender's own address).

IDEMPOTENCE (mailfc.gateways.journal, <state_dir>/journal/lmtp-router.*)
    With an IDENT, each mailbox the message goes to is first looked up in the
    delivered journal under (IDENT, mailbox): one already delivered gets the reply
    Dovecot gave then, and is not delivered again; the others go to Dovecot, and
    each 2xx is recorded before the router answers.  A retry of a message whose
    reply was lost (the router killed after Dovecot's 250, the connection broken)
    is so delivered once.  The same (IDENT, mailbox) arriving twice at once waits
    for the first and is then answered from the journal.  Without an IDENT the
    message is delivered as it comes.
    The router killed after Dovecot took the whole message but before its reply
    arrived: Dovecot saves it all the same.  So an attempt is recorded before each
    delivery, and a retry that finds an attempt without a success looks for the
    message in the mailbox first (maildir files since the attempt whose trace headers
    carry "id <IDENT>", as SMTP-In's Received: does): found, it is answered 250 and
    not delivered again.  (A mailbox on another host is not looked into.)

FAIRNESS
    At most lmtp_router.per_domain_concurrency deliveries are in flight towards
    one domain; a flood to one domain waits on its own semaphore and never
    queues deliveries to other domains.

CONFIGURATION
    lmtp_router.per_domain_concurrency (8), messages.size_limit (50 MiB, plus room
    for trace headers: Config.hop_size_limit),
    delivery_timeout_s (60); journal.keep_s (2 days), journal.max_entries (500000).
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import logging
import os
from pathlib import Path
from typing import Any, cast

from mailfc import hops, logsetup
from mailfc.config import Config
from mailfc.db.directory import Directory
from mailfc.errors import MailfcError
from mailfc.fairness import PerKeyLimit
from mailfc.gateways.journal import DeliveredJournal
from mailfc.messages import Source
from mailfc.protocols import proxy
from mailfc.protocols.lmtp import (
    LmtpClient,
    LmtpError,
    Reply,
)
from mailfc.protocols.smtp_server import (
    R_OK_RCPT,
    Envelope,
    LmtpServer,
    Session,
    TakesXforward,
)
from mailfc.routers.listeners import connect_dispatcher, take_connection

log = logging.getLogger("mailfc.routers.lmtp")

R_NO_SUCH_USER = "550 5.1.1 {address}: no such mailbox here"
R_FOUND = "2.0.0 <{address}> delivered (found in the mailbox after a lost reply)"
# How much of a maildir file in_mailbox reads: its trace headers are at the top.
MAILBOX_PEEK = 16384
SESSION_IDLE_S = 2.0
R_UNAVAILABLE = "4.3.0 mail server for {domain} unavailable, try again later"
R_FORWARD_ONLY = ("451 4.3.0 {address}: forwarding outside this platform is not available "
                  "yet, try again later")


class LmtpRouterHandler(TakesXforward):
    """LMTP server hooks (protocols.smtp_server), named after the verbs they answer."""


    def __init__(self, router: LmtpRouter) -> None:
        self.router = router

    async def handle_RCPT(self, session: Session, envelope: Envelope, address: str,
                          options: list[str]) -> str:
        targets = await self.router.directory.recipient(address)
        if targets is None:
            return R_NO_SUCH_USER.format(address=address)
        envelope.rcpt_tos.append(address)
        expansions: dict[str, dict[str, bool]] = envelope.extra.setdefault("expansions", {})
        expansions[address] = targets
        return R_OK_RCPT

    async def handle_DATA(self, session: Session, envelope: Envelope) -> list[str]:
        expansions: dict[str, dict[str, bool]] = envelope.extra.get("expansions", {})
        forwarded: dict[str, str] = envelope.extra.get("xforward", {})
        peer = session.peer if isinstance(session.peer, tuple) else ("127.0.0.1", 0)
        client = forwarded.get("ADDR")
        if client is not None:
            peer = (client, 0)
        assert envelope.message is not None
        replies = await self.router.deliver(envelope.sender, expansions,
                                            envelope.rcpt_tos, envelope.message, peer,
                                            ident=forwarded.get("IDENT") or None)
        return [replies[rcpt] for rcpt in envelope.rcpt_tos]


class DomainSessions:
    """Idle LMTP sessions to one domain's container, kept for SESSION_IDLE_S.

    Reusing a session saves the connection through the dispatcher, its PROXY
    header and LHLO for every message.  Idle sessions close soon, so they never
    keep an idle container from stopping.
    """

    def __init__(self) -> None:
        self.idle: list[tuple[LmtpClient, asyncio.TimerHandle]] = []

    def take(self) -> LmtpClient | None:
        while self.idle:
            client, timer = self.idle.pop()
            timer.cancel()
            if not client.writer.is_closing() and not client.reader.at_eof():
                return client
        return None

    def give_back(self, client: LmtpClient) -> None:
        loop = asyncio.get_running_loop()
        entry: tuple[LmtpClient, asyncio.TimerHandle]

        def expire() -> None:
            if entry in self.idle:
                self.idle.remove(entry)
            client.writer.close()

        entry = (client, loop.call_later(SESSION_IDLE_S, expire))
        self.idle.append(entry)

    def close_all(self) -> None:
        for client, timer in self.idle:
            timer.cancel()
            client.writer.close()
        self.idle.clear()


class LmtpRouter:
    name = "lmtp-router"

    def __init__(self, config: Config, directory: Directory) -> None:
        self.config = config
        self.directory = directory
        self._limits = PerKeyLimit(config.lmtp_router.per_domain_concurrency)
        self._sessions: dict[str, DomainSessions] = collections.defaultdict(DomainSessions)
        self.journal = DeliveredJournal.of(config, self.name)
        self.lmtp = LmtpServer(LmtpRouterHandler(self), hostname=config.host_name,
                               ident="mailfc LMTP router",
                               data_size_limit=config.hop_size_limit,
                               message_dir=config.message_dir)
        self.listener = hops.listener(config, self.name, config.listen.lmtp_router,
                                      self.lmtp.tracked_by)

    async def start(self) -> None:
        await asyncio.to_thread(self.journal.open)
        await self.listener.start()

    async def stop(self, drain_timeout: float) -> None:
        await self.listener.stop(drain_timeout)
        for sessions in self._sessions.values():
            sessions.close_all()
        self.journal.close()

    async def deliver(self, sender: str, expansions: dict[str, dict[str, bool]],
                      recipients: list[str], message: Source, peer: tuple[Any, ...],
                      ident: str | None = None) -> dict[str, str]:
        """Deliver to every hosted target; one reply line per original recipient.

        With `ident` (the sender's queue id) a target already delivered under it is
        answered from the journal, and each new 2xx is recorded there."""
        targets: list[str] = []
        for recipient in recipients:
            for target, hosted in expansions.get(recipient, {}).items():
                if hosted and target not in targets:
                    targets.append(target)
        results: dict[str, Reply] = {}
        claimed: list[str] = []
        try:
            if ident is not None:
                results, claimed = await self.journal.claim(ident, targets)
                await self._arrived_unheard(ident, claimed, results)
            by_domain: dict[str, list[str]] = collections.defaultdict(list)
            for target in targets:
                if target not in results:
                    by_domain[target.rpartition("@")[2]].append(target)
            outcomes = await asyncio.gather(*(
                self._deliver_domain(domain, sender, group, message, peer, ident)
                for domain, group in by_domain.items()))
        finally:
            if ident is not None:
                self.journal.release(ident, claimed)
        for outcome in outcomes:
            results.update(outcome)
        for target in targets:
            reply = results.get(target)
            if reply is not None:
                status = "sent" if reply.ok else "deferred" if reply.temporary else "bounced"
                logsetup.hop("lmtp-router", ident, f"to=<{target}>, relay="
                             f"{target.rpartition('@')[2]} (dispatcher), status={status}"
                             f" ({reply})")
        replies: dict[str, str] = {}
        for recipient in recipients:
            target_replies = [results[t] for t in expansions.get(recipient, {}) if t in results]
            replies[recipient] = _combine(recipient, target_replies)
        return replies

    async def _arrived_unheard(self, ident: str, claimed: list[str],
                               results: dict[str, Reply]) -> None:
        """Targets whose last delivery under `ident` began but was never answered (this
        router killed while Dovecot saved it): found in the mailbox, they count as
        delivered instead of getting a second copy."""
        for target in claimed:
            since = self.journal.attempted(ident, target)
            if since is None:
                continue
            if await asyncio.to_thread(in_mailbox, self.config.mail_root, target, ident,
                                       since):
                log.info("%s for %s: found in the mailbox after a lost reply, not"
                         " delivered again", ident, target)
                reply = Reply(250, R_FOUND.format(address=target))
                self.journal.record(ident, target, reply)
                results[target] = reply

    def _remember(self, ident: str | None, results: dict[str, Reply]) -> dict[str, Reply]:
        """Record each success before the router answers (see IDEMPOTENCE)."""
        if ident is not None:
            for target, reply in results.items():
                if reply.ok:
                    self.journal.record(ident, target, reply)
        return results

    async def _deliver_domain(self, domain: str, sender: str, targets: list[str],
                              message: Source, peer: tuple[Any, ...],
                              ident: str | None = None) -> dict[str, Reply]:
        async with self._limits.slot(domain):
            if ident is not None:
                for target in targets:
                    self.journal.attempt(ident, target)
            pooled = self._sessions[domain].take()
            try:
                if pooled is not None:
                    try:
                        results = await pooled.deliver(sender, targets, message)
                    except LmtpError as error:
                        pooled.writer.close()
                        if error.message_sent:
                            raise
                        # The kept session had gone stale (container stopped):
                        # nothing was delivered, so a fresh session may retry.
                        pooled = None
                    else:
                        self._sessions[domain].give_back(pooled)
                        return self._remember(ident, results)
                client = await self._open(domain, peer)
                try:
                    results = await client.deliver(sender, targets, message)
                except BaseException:
                    client.writer.close()
                    raise
                self._sessions[domain].give_back(client)
                return self._remember(ident, results)
            except asyncio.CancelledError:
                raise
            except (LmtpError, MailfcError, OSError, TimeoutError) as error:
                log.warning("delivery to %s failed: %s", domain, error)
                self.directory.forget_placement(domain)
                return dict.fromkeys(targets, Reply(451, R_UNAVAILABLE.format(domain=domain)))

    async def _open(self, domain: str, peer: tuple[Any, ...]) -> LmtpClient:
        """A ready LMTP session through the domain's host's dispatcher."""
        timeout = self.config.lmtp_router.delivery_timeout_s
        placement = await self.directory.place(domain)
        reader, writer, on_this_host = await connect_dispatcher(self.config, placement, "lmtp")
        try:
            local = writer.get_extra_info("sockname")
            if on_this_host:
                # A unix socket, without an address of its own; the dispatcher
                # answers with the connection to the container itself.
                local = (self.config.dispatcher.address, 0)
                cast(asyncio.Transport, writer.transport).pause_reading()
            client_ip = peer[0] if peer and _is_ip(peer[0]) else local[0]
            writer.write(proxy.encode(client_ip, int(peer[1]) if len(peer) > 1 else 0,
                                      local[0], local[1], authority=domain))
            if on_this_host:
                try:
                    reader, writer = await asyncio.wait_for(
                        take_connection(reader, writer),
                        self.config.runtime.start_timeout_s + timeout)
                except (ConnectionRefusedError, asyncio.IncompleteReadError) as error:
                    raise LmtpError(f"{domain}'s dispatcher: {error}", message_sent=False) \
                        from None
            # The greeting waits for a cold start: allow for it on top.
            client = LmtpClient(reader, writer, self.config.runtime.start_timeout_s + timeout)
            reply = await client.hello(self.config.host_name)
            if not reply.ok:
                raise LmtpError(f"{domain}'s server said {reply}")
            client.timeout = timeout
            return client
        except BaseException:
            writer.close()
            raise


def in_mailbox(mail_root: Path, target: str, ident: str, since: float) -> bool:
    """Whether a message with `ident` in its trace headers (SMTP-In's Received: ...
    id <ident>) arrived in `target`'s maildir since `since`.  Dovecot names a maildir
    file after its delivery time, so only files of that second on are read, and only
    their first MAILBOX_PEEK bytes.  A mailbox of another host is not here: False."""
    localpart, _, domain = target.rpartition("@")
    maildir = mail_root / domain.lower() / localpart.lower() / "Maildir"
    token = f" id {ident}".encode()
    for folder in ("new", "cur"):
        try:
            names = os.listdir(maildir / folder)
        except OSError:
            continue
        for name in names:
            stamp = name.partition(".")[0]
            if not stamp.isdigit() or int(stamp) < int(since) - 1:
                continue
            try:
                with open(maildir / folder / name, "rb") as handle:
                    if token in handle.read(MAILBOX_PEEK):
                        return True
            except OSError:
                continue     # moved from new/ to cur/ meanwhile: the other listing has it
    return False


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
