"""Dispatcher: one per container host; hands each routed session to its domain's container.

PROTOCOL
    The routers connect to one listener per service (LMTP, IMAP, SMTP) and
    start with a PROXY v2 header (mailfc.protocols.proxy) whose source is the
    original client and whose AUTHORITY TLV names the mail domain.  The
    dispatcher then

    1. ensures the domain's container for that service runs (the runtime starts
       one if none does, and never hands out one still starting while another
       runs),
    2. connects to the container's PROXY-speaking port and sends a fresh PROXY
       v2 header with the same client address, so Dovecot sees the real client
       (IMAP, LMTP); for SMTP (submission) it connects to Postfix's plain port,
       and the SMTP Router passes client address and user with XCLIENT,
    3. copies bytes both ways until either side closes.

    When the container cannot be had in time, the router gets the service's
    own "come back later" and the connection closes:
        IMAP         * BYE [UNAVAILABLE] <reason>
        LMTP, SMTP   421 4.3.0 <reason>

SECURITY
    Only addresses in `dispatcher.allowed_clients` may connect (the routers);
    anyone else is disconnected at once.  The PROXY header is the trust
    boundary, so it is accepted from those addresses only.

FOR THE CONTROLLER
    `open_sessions` (per container name), `latencies` (seconds from header to
    backend connected, recent sessions) and last activity, which is written to
    container_instances.last_activity_at every few seconds.

CONFIGURATION
    dispatcher.address, lmtp_port, imap_port, smtp_port, allowed_clients,
    header_timeout_s (5), connect_timeout_s (5); runtime.start_timeout_s (5).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import asyncpg

from mailfc import netio
from mailfc.addresses import normalize_domain
from mailfc.config import Config
from mailfc.dispatcher.sasl import LockedSaslServer
from mailfc.errors import InvalidInput, MailfcError
from mailfc.protocols import proxy
from mailfc.runtime.readiness import process_alive

log = logging.getLogger("mailfc.dispatcher")

SERVICES = ("lmtp", "imap", "smtp")
# Services whose container port takes the client address from a PROXY header.
# Submission (smtp) does not: the SMTP Router passes the address and the
# authenticated user with XCLIENT, which Postfix accepts only from the
# dispatcher's own address, so the dispatcher must not hide behind a header.
PROXY_SERVICES = ("lmtp", "imap")
ACTIVITY_FLUSH_S = 5.0
LATENCY_SAMPLES = 1000
# Short enough that a draining instance gets new sessions for at most this long.
WARM_TTL_S = 2.0
# A remembered instance answers at once or is gone: it is on this host's bridge.
WARM_CONNECT_TIMEOUT_S = 0.5


class ContainerInstance(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def address(self) -> object: ...

    @property
    def pid(self) -> int | None: ...

    @property
    def state(self) -> str: ...

    def port(self, service: str | None = None, *, proxy: bool = False) -> int: ...


class Containers(Protocol):
    """What the dispatcher needs of the runtime (mailfc.runtime.Runtime)."""

    async def ensure(self, domain: str, service: str) -> Any: ...

    async def instances(self, domain: str | None = None,
                        service: str | None = None) -> list[Any]: ...


def unavailable_reply(service: str, reason: str) -> bytes:
    text = reason.replace("\r", " ").replace("\n", " ")[:200]
    if service == "imap":
        return f"* BYE [UNAVAILABLE] {text}\r\n".encode()
    return f"421 4.3.0 {text}\r\n".encode()


@dataclass
class SessionRecord:
    domain: str
    service: str
    container: str
    dispatch_s: float


class Dispatcher:
    name = "dispatcher"

    def __init__(self, config: Config, containers: Containers,
                 pool: asyncpg.Pool | None = None, *, socket_dir: Path | None = None) -> None:
        self.config = config
        self.containers = containers
        self.pool = pool
        self.allowed = [ipaddress.ip_network(n, strict=False)
                        for n in config.dispatcher.allowed_clients]
        self.open_sessions: collections.Counter[str] = collections.Counter()
        self.latencies: collections.deque[SessionRecord] = collections.deque(
            maxlen=LATENCY_SAMPLES)
        self._active: set[str] = set()
        # (domain, service) -> (until, instance): the runtime's answer is
        # remembered briefly, sparing two CMDB queries per session.
        self._warm: dict[tuple[str, str], tuple[float, list[ContainerInstance]]] = {}
        self._servers: list[asyncio.Server] = []
        self._sessions: set[asyncio.Task[None]] = set()
        self._flusher: asyncio.Task[None] | None = None
        # The containers' Postfix needs a SASL server to honour XCLIENT LOGIN.
        self.sasl = LockedSaslServer(socket_dir) if socket_dir is not None else None

    def ports(self) -> dict[str, int]:
        settings = self.config.dispatcher
        return {"lmtp": settings.lmtp_port, "imap": settings.imap_port,
                "smtp": settings.smtp_port}

    async def start(self) -> None:
        if self.sasl is not None:
            await self.sasl.start()
        address = self.config.dispatcher.address
        for service, port in self.ports().items():
            server = await asyncio.start_server(
                self._handler(service), address, port, reuse_address=True,
                limit=netio.CHUNK * 4)
            self._servers.append(server)
        self._flusher = asyncio.create_task(self._flush_activity_forever())
        log.info("dispatcher listening on %s ports %s", address, self.ports())

    async def stop(self, drain_timeout: float) -> None:
        await netio.stop_sessions(self._servers, self._sessions, drain_timeout)
        for server in self._servers:
            with contextlib.suppress(Exception):
                await netio.server_closed(server)
        self._servers.clear()
        if self._flusher:
            self._flusher.cancel()
            await asyncio.gather(self._flusher, return_exceptions=True)
        await self._flush_activity()
        if self.sasl is not None:
            await self.sasl.stop()

    def _handler(self, service: str) -> Callable[
            [asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await netio.run_session(self._sessions, writer,
                                    self._session(service, reader, writer),
                                    f"{service} session", log)
        return handle

    def _is_allowed(self, writer: asyncio.StreamWriter) -> bool:
        peer = writer.get_extra_info("peername")
        if not peer:
            return False
        address = ipaddress.ip_address(peer[0])
        return any(address in network for network in self.allowed)

    async def _session(self, service: str, reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter) -> None:
        if not self._is_allowed(writer):
            log.warning("refused %s connection from %s: not a router",
                        service, writer.get_extra_info("peername"))
            return
        try:
            header = await asyncio.wait_for(
                read_proxy_header(reader), self.config.dispatcher.header_timeout_s)
            domain = normalize_domain(header.authority or "")
        except (TimeoutError, proxy.ProxyError, InvalidInput, asyncio.IncompleteReadError) as err:
            log.warning("%s session without a valid PROXY header: %s", service, err)
            writer.write(unavailable_reply(service, "protocol error: PROXY v2 header with the "
                                                    "domain expected"))
            return
        started = time.monotonic()
        try:
            instance, backend_reader, backend_writer = await self._backend(domain, service)
        except asyncio.CancelledError:
            raise
        except Exception as error:
            reason = str(error) or type(error).__name__
            if isinstance(error, MailfcError | OSError | TimeoutError):
                log.warning("%s for %s: container unavailable: %s", service, domain, reason)
            else:
                log.exception("%s for %s: container unavailable", service, domain)
            writer.write(unavailable_reply(
                service, f"mail server for {domain} unavailable, try again later"))
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            return
        dispatch_s = time.monotonic() - started
        self.latencies.append(SessionRecord(domain, service, instance.name, dispatch_s))
        if service in PROXY_SERVICES:
            client = header.source or "127.0.0.1"
            local = header.destination or self.config.dispatcher.address
            backend_writer.write(proxy.encode(
                client, header.source_port, local if _same_family(client, local) else client,
                header.destination_port))
        self.open_sessions[instance.name] += 1
        self._active.add(instance.name)
        try:
            await netio.splice(reader, writer, backend_reader, backend_writer)
        finally:
            self.open_sessions[instance.name] -= 1
            if self.open_sessions[instance.name] <= 0:
                del self.open_sessions[instance.name]
            self._active.add(instance.name)

    async def _backend(self, domain: str, service: str) -> tuple[
            ContainerInstance, asyncio.StreamReader, asyncio.StreamWriter]:
        """A connection to the least busy running instance serving (domain, service)."""
        key = (domain, service)
        remembered = self._warm.get(key)
        if remembered is not None and remembered[0] > time.monotonic():
            alive = [i for i in remembered[1] if i.pid and process_alive(i.pid)]
            if alive:
                instance = min(alive, key=lambda i: self.open_sessions[i.name])
                try:
                    reader, writer = await netio.open_connection(
                        str(instance.address),
                        instance.port(service, proxy=service in PROXY_SERVICES),
                        WARM_CONNECT_TIMEOUT_S)
                    return instance, reader, writer
                except (OSError, TimeoutError):
                    pass  # stopped meanwhile: ask the runtime
        self._warm.pop(key, None)
        first: ContainerInstance = await asyncio.wait_for(
            self.containers.ensure(domain, service), self.config.runtime.start_timeout_s + 1.0)
        running: list[ContainerInstance] = [
            i for i in await self.containers.instances(domain, service)
            if i.state == "running"] or [first]
        instance = min(running, key=lambda i: self.open_sessions[i.name])
        reader, writer = await netio.open_connection(
            str(instance.address), instance.port(service, proxy=service in PROXY_SERVICES),
            self.config.dispatcher.connect_timeout_s)
        self._warm[key] = (time.monotonic() + WARM_TTL_S, running)
        return instance, reader, writer

    def forget(self, domain: str) -> None:
        """The domain's instances changed (drained, stopped, scaled out): look again."""
        for key in [k for k in self._warm if k[0] == domain]:
            del self._warm[key]

    async def _flush_activity_forever(self) -> None:
        while True:
            await asyncio.sleep(ACTIVITY_FLUSH_S)
            try:
                await self._flush_activity()
            except asyncio.CancelledError:
                raise
            except Exception as error:
                log.warning("could not record container activity: %s", error)

    async def _flush_activity(self) -> None:
        # Containers with open sessions are active right now, too.
        names = self._active | set(self.open_sessions)
        self._active = set()
        if not names or self.pool is None:
            return
        await self.pool.execute(
            "UPDATE container_instances SET last_activity_at = now()"
            " WHERE name = ANY($1::text[]) AND state <> 'stopped'", sorted(names))


def _same_family(a: str, b: str) -> bool:
    return ipaddress.ip_address(a).version == ipaddress.ip_address(b).version


async def read_proxy_header(reader: asyncio.StreamReader) -> proxy.ProxyHeader:
    """Read exactly one PROXY v2 header, never a byte of what follows it."""
    data = await reader.readexactly(proxy.HEADER_FIXED)
    result = proxy.decode(data)
    if result is None:
        length = int.from_bytes(data[14:16], "big")
        if proxy.HEADER_FIXED + length > proxy.MAX_HEADER:
            raise proxy.ProxyError(f"PROXY header of {length} bytes is too long")
        data += await reader.readexactly(length)
        result = proxy.decode(data)
    if result is None:
        raise proxy.ProxyError("incomplete PROXY header")
    return result[0]
