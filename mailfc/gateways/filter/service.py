"""A filter gateway as a resident service (Filter-In now; Filter-Out takes the same class)."""

from __future__ import annotations

from pathlib import Path

import asyncpg

from mailfc.config import Config, FilterSection, connect_address, split_hostport
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
                 next_hop: str | None = None) -> None:
        self.name = name
        self.config = config
        self.section = section = section or config.filter_in
        self.recorder = Recorder.from_config(pool, config, name)
        hop_host, hop_port = connect_address(section.next_hop or next_hop
                                            or config.listen.lmtp_router)
        self.hop = LmtpHop(hop_host, hop_port, helo=config.host_name,
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
        host, port = split_hostport(listen or config.listen.filter_in)
        self.listener = CyclingListener(name, host, port, self._protocol)

    def _protocol(self, listener: CyclingListener) -> ServerConnection:
        return self.lmtp.tracked_by(listener)

    async def start(self) -> None:
        await self.recorder.start()
        await self.listener.start()

    async def stop(self, drain_timeout: float) -> None:
        await self.listener.stop(drain_timeout)
        await self.hop.close()
        await self.recorder.stop(drain_timeout)
