"""A filter gateway as a resident service (Filter-In now; Filter-Out takes the same class).

Filter-In listens on listen.filter_in, an internal hop (mailfc.hops: by default a
unix socket only root and this service's user may use); Filter-Out, given `socket`,
on that unix socket in the directory the domains' Postfix containers mount
(listen.filter_out, "unix:<name>"), where no other local user reaches it, and
lets in only processes of this host's domain containers and the host's root
(mailfc.peers: the kernel's word, SO_PEERCRED and the process's cgroup).
"""

from __future__ import annotations

from pathlib import Path

import asyncpg

from mailfc import hops, peers
from mailfc.config import Config, FilterSection
from mailfc.gateways.filter.checks import built_in
from mailfc.gateways.filter.milter_client import MilterClient
from mailfc.gateways.filter.server import FilterHandler
from mailfc.gateways.listener import CyclingListener
from mailfc.gateways.lmtp_hop import LmtpHop
from mailfc.policy.recorder import Recorder
from mailfc.protocols.smtp_server import LmtpServer, ServerConnection


class FilterService:
    def __init__(self, config: Config, pool: asyncpg.Pool, *, name: str = "filter-in",
                 section: FilterSection | None = None, listen: str | None = None,
                 socket: Path | None = None, next_hop: str | None = None) -> None:
        self.name = name
        self.config = config
        self.section = section = section or config.filter_in
        self.recorder = Recorder.from_config(pool, config, name)
        self.hop = LmtpHop(hops.address(config, section.next_hop or next_hop
                                        or config.listen.lmtp_router),
                           helo=config.host_name,
                           timeout=config.lmtp_router.delivery_timeout_s
                           + config.runtime.start_timeout_s)
        milters = [MilterClient(spec, timeout=section.milter_timeout_s,
                                hostname=config.host_name, daemon=name)
                   for spec in section.milters]
        quarantine = Path(section.quarantine_dir) if section.quarantine_dir else (
            config.state_dir / "quarantine")
        self.handler = FilterHandler(name, config.host_name,
                                     built_in(section.checks, section.dnsbl_zones), milters,
                                     section.milter_default_action, self.hop, self.recorder,
                                     quarantine)
        self.lmtp = LmtpServer(self.handler, hostname=config.host_name, ident=f"mailfc {name}",
                               data_size_limit=section.max_message_size)
        self.peers = peers.Peers(pool)
        self.listener = CyclingListener(name, "", 0, self._protocol, path=socket,
                                        admit=self._container_or_root) if socket \
            else hops.listener(config, name, listen or config.listen.filter_in, self._protocol)

    async def _container_or_root(self, connection: peers.Connection) -> str | None:
        """Filter-Out's peers: a domain's Postfix in a container of this host, or root."""
        peer = await self.peers.identify(connection)
        if peer.kind == peers.CONTAINER or peer.host_root:
            return None
        return f"{peer} is not a domain's container"

    def _protocol(self, listener: CyclingListener) -> ServerConnection:
        return self.lmtp.tracked_by(listener)

    async def start(self) -> None:
        await self.recorder.start()
        await self.listener.start()

    async def stop(self, drain_timeout: float) -> None:
        await self.listener.stop(drain_timeout)
        await self.hop.close()
        await self.recorder.stop(drain_timeout)
