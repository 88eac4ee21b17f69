"""Filter-Out as a resident service: the domains' Postfix -> Filter-Out -> SMTP-Out.

It listens on a unix socket in the directory the domains' Postfix containers mount
(listen.filter_out, "unix:<name>"), where no other local user reaches it, and lets in
only processes of this host's domain containers and the host's root (mailfc.peers:
the kernel's word, SO_PEERCRED and the process's cgroup).  The domain found there is
kept with the connection: it prefixes the IDENT sent on (server.py).
"""

from __future__ import annotations

import asyncio
import weakref
from pathlib import Path

import asyncpg

from mailfc import hops, peers
from mailfc.config import Config
from mailfc.gateways.filter.chain import Chain
from mailfc.gateways.filter.server import FilterHandler
from mailfc.gateways.listener import CyclingListener
from mailfc.gateways.lmtp_hop import LmtpHop
from mailfc.policy.recorder import Recorder
from mailfc.protocols.smtp_server import LmtpServer, ServerConnection


class FilterService:
    def __init__(self, config: Config, pool: asyncpg.Pool, *, socket: Path,
                 name: str = "filter-out") -> None:
        self.name = name
        self.config = config
        section = config.filter_out
        self.recorder = Recorder.from_config(pool, config, name)
        self.hop = LmtpHop(hops.address(config, section.next_hop or config.listen.smtp_out),
                           helo=config.host_name,
                           timeout=config.lmtp_router.delivery_timeout_s
                           + config.runtime.start_timeout_s)
        self.chain = Chain(name, section, config)
        self.handler = FilterHandler(name, config.host_name, self.chain, self.hop,
                                     self.recorder)
        self.lmtp = LmtpServer(self.handler, hostname=config.host_name, ident=f"mailfc {name}",
                               data_size_limit=config.hop_size_limit,
                               message_dir=config.message_dir)
        self.peers = peers.Peers(pool)
        # The domain of each admitted connection (None: root on the host), until its
        # protocol takes it.
        self._domains: weakref.WeakKeyDictionary[asyncio.BaseTransport, str | None] = \
            weakref.WeakKeyDictionary()
        self.listener = CyclingListener(name, "", 0, self._protocol, path=socket,
                                        admit=self._container_or_root)

    async def _container_or_root(self, connection: asyncio.BaseTransport) -> str | None:
        """Filter-Out's peers: a domain's Postfix in a container of this host, or root."""
        peer = await self.peers.identify(connection)
        if peer.kind == peers.CONTAINER or peer.host_root:
            self._domains[connection] = peer.domain
            return None
        return f"{peer} is not a domain's container"

    def _protocol(self, listener: CyclingListener) -> ServerConnection:
        return _IdentifiedConnection(self.lmtp, listener, self._domains)

    async def start(self) -> None:
        await self.recorder.start()
        await self.listener.start()

    async def stop(self, drain_timeout: float) -> None:
        await self.listener.stop(drain_timeout)
        await self.hop.close()
        await self.recorder.stop(drain_timeout)


class _IdentifiedConnection(ServerConnection):
    """A session that starts knowing the domain its peer was admitted as."""

    def __init__(self, server: LmtpServer, listener: CyclingListener,
                 domains: weakref.WeakKeyDictionary[asyncio.BaseTransport, str | None]
                 ) -> None:
        super().__init__(server, listener)
        self.domains = domains

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.session.state = self.domains.pop(transport, None)
        super().connection_made(transport)
