"""SMTP-In as a resident service: listener, filter chain, spool, next hops, engine and
recorder wired up.

The spool hands each message, per recipient domain, to the LMTP Router
(listen.lmtp_router) with XFORWARD ADDR, HELO, PROTO and IDENT=<queue id>: the router
keeps a journal by IDENT and recipient, so a retry after a lost reply is not delivered
twice.  A bounce (a DSN the spool made) to a sender whose domain is not hosted here
goes to SMTP-Out's intake (listen.smtp_out) instead, with IDENT=<its queue id>.

The recipient domains' turns under CPU pressure (handler.py, ADMISSION) are watched
from start() to stop(): smtp_in.pressure_target, pressure_min_rate and
pressure_max_wait_s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl

import asyncpg

from mailfc import hops
from mailfc.anvil import Anvil
from mailfc.config import Config, split_hostport
from mailfc.db.directory import Directory
from mailfc.fairness import Admission
from mailfc.gateways.filter.chain import Chain
from mailfc.gateways.listener import CyclingListener, cycle
from mailfc.gateways.lmtp_hop import LmtpHop
from mailfc.gateways.smtp_in.handler import LimitedDomains, SmtpInHandler
from mailfc.gateways.spool import Envelope, Spool, spool_directory
from mailfc.gateways.spool.store import domain_of
from mailfc.messages import Source
from mailfc.policy.blocks import BlockList
from mailfc.policy.engine import LimitEngine
from mailfc.policy.recorder import Recorder
from mailfc.protocols.lmtp import Reply
from mailfc.protocols.smtp_server import ErrorLimits, ServerConnection, SmtpServer

log = logging.getLogger("mailfc.gateways.smtp_in")


class SmtpInService:
    name = "smtp-in"

    def __init__(self, config: Config, pool: asyncpg.Pool,
                 tls_context: ssl.SSLContext | None) -> None:
        self.config = config
        self.tls_context = tls_context
        self.engine = LimitEngine.from_config(pool, config)
        self.recorder = Recorder.from_config(pool, config, self.name,
                                             holder=self.engine.holder)
        self.hop = LmtpHop(hops.address(config, config.listen.lmtp_router),
                           helo=config.host_name, timeout=config.spool.delivery_timeout_s)
        # Bounces to senders elsewhere (see the module's manual).
        self.out_hop = LmtpHop(hops.address(config, config.listen.smtp_out),
                               helo=config.host_name, timeout=config.spool.delivery_timeout_s)
        self.directory = Directory(pool)
        self.spool = Spool(spool_directory(config.state_dir, config.spool.directory, "smtp-in"),
                           self._deliver, config.spool, hostname=config.host_name)
        self.spool.relay = "lmtp-router"
        self.chain = Chain(self.name, config.filter_in, config)
        smtp_in = config.smtp_in
        self.admission = Admission(target=smtp_in.pressure_target,
                                   min_rate=smtp_in.pressure_min_rate,
                                   max_wait_s=smtp_in.pressure_max_wait_s)
        self.handler = SmtpInHandler(config, self.spool, self.directory, self.engine,
                                     self.recorder, LimitedDomains(pool), BlockList(pool),
                                     self.chain, self.admission)
        errors = ErrorLimits(soft_limit=smtp_in.soft_error_limit,
                             hard_limit=smtp_in.hard_error_limit,
                             sleep_s=smtp_in.error_sleep_s,
                             junk_limit=smtp_in.junk_command_limit)
        # One count of connections per client for every generation of the listener.
        self.anvil = Anvil.for_service(config, self.name)
        self.server = SmtpServer(self.handler, hostname=config.host_name,
                                 data_size_limit=config.messages.size_limit,
                                 message_dir=config.message_dir,
                                 idle_timeout_s=smtp_in.timeout_s, tls_context=tls_context,
                                 errors=errors, anvil=self.anvil)
        host, port = split_hostport(config.listen.smtp_in)
        self.listener = CyclingListener(self.name, host, port, self._protocol)
        self._cycler: asyncio.Task[None] | None = None

    def _protocol(self, listener: CyclingListener) -> ServerConnection:
        return self.server.tracked_by(listener)

    async def _deliver(self, envelope: Envelope, recipients: list[str],
                       message: Source) -> dict[str, Reply]:
        """One domain's recipients of a spooled message to their next hop."""
        if envelope.is_bounce and recipients \
                and not await self.directory.is_hosted(domain_of(recipients[0])):
            return await self.out_hop.deliver(envelope.sender, recipients, message,
                                              mail_options=list(envelope.mail_options),
                                              xforward={"IDENT": envelope.queue_id})
        xforward = {"ADDR": envelope.client_ip or "[UNAVAILABLE]",
                    "HELO": envelope.helo or "[UNAVAILABLE]", "PROTO": "ESMTP",
                    "IDENT": envelope.queue_id}
        return await self.hop.deliver(envelope.sender, recipients, message,
                                      mail_options=list(envelope.mail_options),
                                      xforward=xforward)

    async def start(self) -> None:
        await self.engine.start()
        await self.recorder.start()
        await self.spool.start()
        await self.admission.start()
        await self.listener.start()
        if self.config.smtp_in.cycle_after_s > 0:
            self._cycler = asyncio.create_task(self._cycle_loop())

    async def cycle(self) -> None:
        """Replace the listener now (new socket first, then the old one drains)."""
        self.listener = await cycle(self.listener, self.config.runtime.stop_timeout_s)

    async def _cycle_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.smtp_in.cycle_after_s)
            try:
                await self.cycle()
            except OSError as error:
                log.error("cannot cycle the SMTP-In listener, keeping the old one: %s", error)

    async def stop(self, drain_timeout: float) -> None:
        if self._cycler is not None:
            self._cycler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._cycler
        await self.listener.stop(drain_timeout)
        # Once the listener has drained: until then the sessions' RCPTs keep their turns.
        await self.admission.stop()
        await self.spool.stop(drain_timeout)
        await self.hop.close()
        await self.out_hop.close()
        await self.engine.stop()
        await self.recorder.stop(drain_timeout)
