"""The whole platform on one machine: what `mailfc up` runs.

Start order: the CMDB (embedded cluster when no DSN, migrations), this host's
row in the hosts table, then each resident service in turn; each service's
start() returns once it listens.  Stop order is the reverse, each with a
drain timeout.  While running, the host heartbeats in the CMDB (so other hosts
can tell it is alive) and keeps the session partitions prepared.

Resident services implement the `Service` protocol below and are listed in
`_services()`, one per name of SERVICE_NAMES: the milter, the IMAP hook server,
the dispatcher (with this host's container runtime), the controller, the LMTP
Router, the IMAP Router, the SMTP Router (submission), SMTP-In, SMTP-Out and
Filter-Out.  The supervisor (supervisor.py) runs them as a few processes.
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import logging
from pathlib import Path
from typing import Any, Protocol

import asyncpg

from mailfc.config import Config
from mailfc.controller.controller import Controller
from mailfc.db import connect, hosts
from mailfc.db.directory import Directory
from mailfc.dispatcher.server import Dispatcher
from mailfc.errors import ConfigError
from mailfc.gateways.filter import FilterService
from mailfc.gateways.smtp_in import SmtpInService
from mailfc.gateways.smtp_out.service import SmtpOutService
from mailfc.metrics import names as metrics
from mailfc.policy.hooks.server import HookService
from mailfc.policy.milter.server import MilterService
from mailfc.routers.imap import ImapRouter
from mailfc.routers.lmtp import LmtpRouter
from mailfc.routers.submission import SubmissionRouter
from mailfc.runtime import storage
from mailfc.runtime.lifecycle import Runtime
from mailfc.runtime.settings import RuntimeSettings
from mailfc.runtime.settings import from_config as runtime_settings
from mailfc.tls import server_context

log = logging.getLogger("mailfc.platform")

HEARTBEAT_S = 10.0
METRICS_SAMPLE_S = 5.0
MAINTENANCE_S = 3600.0


class Service(Protocol):
    name: str

    async def start(self) -> None: ...

    async def stop(self, drain_timeout: float) -> None: ...


# Services with a socket in the directory every container mounts.
SOCKET_USERS = {"milter", "hook-server", "dispatcher", "filter-out"}
SERVICE_NAMES = ("milter", "hook-server", "dispatcher", "controller", "lmtp-router",
                 "imap-router", "submission-router", "smtp-in", "smtp-out", "filter-out")


class Platform:
    """`services`: which resident services this machine runs (default: all).

    A container host runs at least the dispatcher; routers may run anywhere.
    """

    def __init__(self, config: Config, services: tuple[str, ...] = SERVICE_NAMES,
                 *, runtime_overrides: dict[str, Any] | None = None) -> None:
        unknown = set(services) - set(SERVICE_NAMES)
        if unknown:
            raise ConfigError(f"unknown service(s) {', '.join(sorted(unknown))}: "
                             f"choose from {', '.join(SERVICE_NAMES)}")
        if "controller" in services and "dispatcher" not in services:
            raise ConfigError("the controller acts on the containers of its host's dispatcher:"
                             " run it together with the dispatcher")
        self.wanted = services
        self.runtime_overrides = runtime_overrides or {}
        self.config = config
        self.pool: asyncpg.Pool | None = None
        self.host: dict[str, object] = {}
        self.services: list[Service] = []
        self._tasks: list[asyncio.Task[None]] = []
        self.runtime: Runtime | None = None
        self.controller: Controller | None = None

    async def start(self) -> None:
        if SOCKET_USERS & set(self.wanted):
            # Before the milter or the hook server makes its socket: the socket
            # directory sits in a directory only root may enter.
            storage.prepare_socket_dir(self._runtime_settings())
        self.pool = await connect(self.config)
        if "dispatcher" in self.wanted:
            self.host = await self._register_host()
            log.info("host %s registered (dispatcher %s)", self.host["name"],
                     self.host["dispatcher_address"])
        for service in await self._services():
            try:
                await service.start()
            except OSError as error:
                raise ConfigError(
                    f"{service.name} cannot listen: {error.strerror or error}: stop what holds "
                    "the port or change the listen settings") from None
            self.services.append(service)
            log.info("%s started", service.name)
        self._tasks = [
            asyncio.create_task(self._every(HEARTBEAT_S, self._heartbeat)),
            asyncio.create_task(self._every(MAINTENANCE_S, self._maintain)),
            asyncio.create_task(self._every(METRICS_SAMPLE_S, self._sample_metrics)),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for service in reversed(self.services):
            try:
                await service.stop(self.config.runtime.stop_timeout_s)
            except Exception:
                log.exception("%s did not stop cleanly", service.name)
        self.services.clear()
        if self.runtime is not None:
            # Nothing would stop idle containers once the platform is down, so
            # they drain and stop with it (queues and maildirs persist outside).
            for instance in await self.runtime.instances():
                try:
                    await self.runtime.stop(instance)
                except Exception as error:
                    log.warning("container %s did not stop cleanly: %s", instance.name, error)
            # And those no CMDB row owns any more (a domain removed while its container
            # ran, rows deleted by hand): nothing else would ever stop them.
            try:
                await self.runtime.sweep()
            except Exception as error:
                log.warning("could not remove containers without a CMDB row: %s", error)
            await self.runtime.close()
            self.runtime = None
        if self.pool is not None:
            await self.pool.close()
            self.pool = None

    async def _services(self) -> list[Service]:
        assert self.pool is not None
        services: list[Service] = []
        directory = Directory(self.pool)
        if "milter" in self.wanted:
            # First: every Postfix the dispatcher starts finds its milter listening.
            services.append(MilterService(self.config, self.pool))
        if "hook-server" in self.wanted:
            # Before the dispatcher too: every Dovecot it starts finds its hook server.
            services.append(HookService(self.config, self.pool))
        if "dispatcher" in self.wanted:
            overrides = {"name_prefix": self.config.runtime.name_prefix,
                         **self.runtime_overrides}
            runtime = Runtime(runtime_settings(self.config, **overrides), self.pool)
            await runtime.open()
            await runtime.recover()
            self.runtime = runtime
            dispatcher = Dispatcher(self.config, runtime, self.pool,
                                    socket_dir=runtime.settings.sockets)
            services.append(dispatcher)
            if "controller" in self.wanted:
                self.controller = Controller(self.config, self.pool, runtime, dispatcher)
                services.append(self.controller)
        if "lmtp-router" in self.wanted:
            services.append(LmtpRouter(self.config, directory))
        if "imap-router" in self.wanted:
            services.append(ImapRouter(self.config, directory, server_context(self.config)))
        if "submission-router" in self.wanted:
            services.append(SubmissionRouter(self.config, directory,
                                             server_context(self.config)))
        # SMTP-In after the LMTP Router, its spool's next hop (the [filter_in] chain
        # runs inside SMTP-In, before its 250).
        if "smtp-in" in self.wanted:
            services.append(SmtpInService(self.config, self.pool, server_context(self.config)))
        # Outbound: SMTP-Out listens before Filter-Out, its next hop.
        if "smtp-out" in self.wanted:
            services.append(SmtpOutService(self.config, self.pool))
        if "filter-out" in self.wanted:
            services.append(FilterService(self.config, self.pool,
                                          socket=self._filter_out_socket()))
        return services

    def _runtime_settings(self) -> RuntimeSettings:
        return self.runtime.settings if self.runtime else runtime_settings(
            self.config, **self.runtime_overrides)

    def _filter_out_socket(self) -> Path:
        """Filter-Out's socket (listen.filter_out) in the containers' socket directory."""
        settings = self._runtime_settings()
        return settings.sockets / settings.filter_out_socket

    async def _register_host(self) -> dict[str, object]:
        assert self.pool is not None
        subnet = ipaddress.ip_network(self.config.network.subnet)
        dispatcher = self.config.dispatcher
        async with self.pool.acquire() as db:
            return await hosts.register(
                db, self.config.host_name, dispatcher.address, str(subnet),
                capacity=self.config.host.capacity, lmtp_port=dispatcher.lmtp_port,
                imap_port=dispatcher.imap_port, smtp_port=dispatcher.smtp_port,
            )

    async def _heartbeat(self) -> None:
        assert self.pool is not None
        if not self.host:
            return
        await hosts.heartbeat(self.pool, self.config.host_name)

    async def _sample_metrics(self) -> None:
        """Gauges read now and then (mailfc.metrics.names): pool use, containers."""
        if self.pool is not None:
            metrics.pool_use(self.pool)
        if self.runtime is not None:
            running = collections.Counter(instance.service for instance
                                          in await self.runtime.instances())
            for service in ("imap", "smtp", *running):
                metrics.CONTAINERS_RUNNING.labels(service).set(running.get(service, 0))

    async def _maintain(self) -> None:
        assert self.pool is not None
        created = await self.pool.fetchval("SELECT mailfc_ensure_partitions(1, 7)")
        dropped = await self.pool.fetchval(
            "SELECT mailfc_drop_partitions($1)", self.config.database.retention_days
        )
        if created or dropped:
            log.info("session partitions: %d created, %d dropped", created, dropped)

    async def _every(self, interval: float, job: object) -> None:
        assert callable(job)
        while True:
            try:
                await job()
            except asyncio.CancelledError:
                raise
            except Exception as error:
                log.warning("%s failed: %s (retrying in %.0fs)", getattr(job, "__name__", job),
                            error, interval)
            await asyncio.sleep(interval)
