"""Dispatcher: one per container host; hands each routed session to its domain's container.

PROTOCOL
    The routers connect to one listener per service (LMTP, IMAP, SMTP) and
    start with a PROXY v2 header (mailfc.protocols.proxy) whose source is the
    original client and whose AUTHORITY TLV names the mail domain.  The
    dispatcher then

    1. ensures the domain's container for that service runs (the runtime starts
       one if none does, and never hands out one still starting while another
       runs),
    2. connects to the container's unix socket for the service
       (Instance.socket: /proc/<init pid>/root/..., which only the host's
       root can follow; nothing in a container listens on the network): for
       LMTP Dovecot's lmtp socket, for SMTP (submission) Postfix's
       `dispatcher` smtpd, where the SMTP Router passes client address and
       user with XCLIENT (Postfix allows XCLIENT on that socket only),
    3. copies bytes both ways until either side closes.

    IMAP is handed over instead of copied.  The dispatcher greets the router
    (`* OK ...`) once the container runs, reads the router's `tag LOGIN user
    -` (the router checked the password), asks the container's userdb for
    the user and passes the connected socket itself to Dovecot's imap-master
    socket (mailfc.protocols.dovecot), with the client address and `tag OK
    [CAPABILITY ...] Logged in` to send.  From then on the router talks to
    the container's imap process directly: no byte of the session passes
    through the dispatcher, and a dispatcher restart does not cut it (over
    TLS from another host it is copied instead: REMOTE ROUTERS).
        tag NO [UNAVAILABLE] <reason>     the hand-over failed
    A router on this host without TLS state for the client (plain IMAP: a
    webmail on the LAN, a TLS-terminating balancer in front) sends its LOGIN
    with the client's own socket attached (SCM_RIGHTS, netio.send_with_fd)
    and, as the password, a literal with what the client sent after its
    LOGIN (at most imap.MAX_LITERAL bytes, else it keeps the session):
        tag LOGIN user {n+}\r\n<n bytes>\r\n
    That socket is handed over instead, with those bytes as its first input,
    the dispatcher answers `tag OK Handed over.`, and the session runs between
    the client and Dovecot with no mailfc process in between.

    LMTP from a router on this host: after the PROXY header the dispatcher
    connects to the container as above and passes that connection itself
    back, as `+<n>\r\n` followed by the n bytes the container already sent,
    with the socket attached; the router talks LMTP to Dovecot directly.
    Such connections count as open sessions until the router closes them.

    When the container cannot be had in time, the router gets the service's
    own "come back later" and the connection closes:
        IMAP         * BYE [UNAVAILABLE] <reason>
        LMTP, SMTP   421 4.3.0 <reason>

LOCAL ROUTERS
    Routers on the dispatcher's own host connect only to its unix sockets
    (config.dispatcher_socket(service): <state_dir>/dispatcher/lmtp.sock,
    imap.sock, smtp.sock), same protocol.  A unix socket costs the kernel far
    less than loopback TCP, and for IMAP it is the socket handed to Dovecot,
    so every command of the session crosses one cheap socket less.

REMOTE ROUTERS
    Routers on other hosts connect to the TCP ports with mutual TLS
    (mailfc.cluster): the same protocol inside the TLS stream.  An IMAP
    session over TLS cannot be handed to Dovecot as a socket: Dovecot gets
    one end of a socket pair (the same imap-master hand-over) and the
    dispatcher copies between the TLS stream and the other end for the
    session's life; it counts as an open session, like a copied LMTP or SMTP
    session, and a dispatcher restart ends it.

SECURITY
    Whoever gets a PROXY header accepted speaks for any client and domain
    (the router checked the password; the dispatcher does not), so every
    connection proves it is a router before a byte of it is read:
    - unix sockets: the kernel's SO_PEERCRED must name root or the uid the
      dispatcher runs as (mailfc.peers.root_or_own_user); anyone else is logged and
      closed at once.  The sockets (0600) are also in a directory (0700) only
      root may enter.
    - TCP: the TLS handshake requires a client certificate signed by the
      cluster CA (CERT_REQUIRED); a client without one, or with one of another
      CA, is refused in the handshake and never sees a greeting (not logged
      per connection: asyncio drops failed handshakes quietly).
    `dispatcher.allowed_clients` then filters TCP peers by address: an
    additional restriction that authenticates nothing.

FOR THE CONTROLLER
    `open_sessions` (per container name), `latencies` (seconds from header to
    backend connected, recent sessions) and last activity, which is written to
    container_instances.last_activity_at every few seconds.  A handed-over
    IMAP session counts until its socket closes, seen within SWEEP_S
    (mailfc.dispatcher.handed); at start it counts those an earlier dispatcher
    process handed over, from the containers' imap processes.

CONFIGURATION
    dispatcher.address, lmtp_port, imap_port, smtp_port, allowed_clients
    (["127.0.0.0/8"]: a filter, not an authentication), header_timeout_s (5;
    also the TLS handshake's limit), connect_timeout_s (5);
    runtime.start_timeout_s (5); cluster.ca_file, cert_file, key_file
    (mailfc.cluster; empty: created under <state_dir>/cluster on first need).
    The router's LOGIN may take LOGIN_WAIT_S (its password check).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ipaddress
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar, cast

import asyncpg

from mailfc import cluster, netio, peers
from mailfc.addresses import normalize_domain
from mailfc.config import Config
from mailfc.dispatcher.handed import HandedSessions, held_by_imap, open_socket_inodes
from mailfc.dispatcher.sasl import LockedSaslServer
from mailfc.errors import InvalidInput, MailfcError
from mailfc.protocols import dovecot, imap, proxy
from mailfc.runtime.images import DOVECOT_IMAP_CAPABILITY, dovecot_socket
from mailfc.runtime.readiness import process_alive
from mailfc.runtime.starts import Trigger

log = logging.getLogger("mailfc.dispatcher")

SERVICES = ("lmtp", "imap", "smtp")
# Routers on this host reach every service over its unix socket only (SO_PEERCRED
# tells who connected); the TCP ports (mutual TLS) are for routers on other hosts.
LOCAL_SERVICES = SERVICES
ACTIVITY_FLUSH_S = 5.0
# How soon a handed-over IMAP session that ended stops counting.
SWEEP_S = 1.0
# The router checks the password (a slow hash, a failure delay) before its LOGIN.
LOGIN_WAIT_S = 30.0
LATENCY_SAMPLES = 1000
# Short enough that a draining instance gets new sessions for at most this long.
WARM_TTL_S = 2.0
# A remembered instance answers at once or is gone: its socket is on this host.
WARM_CONNECT_TIMEOUT_S = 0.5

Connection = TypeVar("Connection")


class ContainerInstance(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def pid(self) -> int | None: ...

    @property
    def state(self) -> str: ...

    def socket(self, service: str | None = None) -> str: ...


class Containers(Protocol):
    """What the dispatcher needs of the runtime (mailfc.runtime.Runtime)."""

    async def ensure(self, domain: str, service: str, trigger: Any = None) -> Any: ...

    async def instances(self, domain: str | None = None,
                        service: str | None = None) -> list[Any]: ...


def _trigger(service: str, header: proxy.ProxyHeader) -> Trigger:
    """A session's trigger for the start event: its protocol and client."""
    peer = f"{header.source}:{header.source_port}" if header.source else None
    return Trigger("session", protocol=service, peer=peer)


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
        self._handed = HandedSessions()
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
        # First: without the cluster's credentials the dispatcher must not start.
        tls = cluster.server_context(self.config)
        if self.sasl is not None:
            await self.sasl.start()
        address = self.config.dispatcher.address
        for service, port in self.ports().items():
            server = await asyncio.start_server(
                self._handler(service), address, port, reuse_address=True, ssl=tls,
                ssl_handshake_timeout=self.config.dispatcher.header_timeout_s,
                limit=netio.CHUNK * 4)
            self._servers.append(server)
        local = self.config.dispatcher_socket("imap").parent
        local.mkdir(parents=True, exist_ok=True)
        local.chmod(0o700)
        for service in LOCAL_SERVICES:
            path = self.config.dispatcher_socket(service)
            path.unlink(missing_ok=True)
            self._servers.append(await asyncio.start_unix_server(
                self._local_handler(service), str(path), limit=netio.CHUNK * 4))
            path.chmod(0o600)
        await self.recover_handed()
        self._flusher = asyncio.create_task(self._flush_activity_forever())
        log.info("dispatcher listening on %s ports %s", address, self.ports())

    async def stop(self, drain_timeout: float) -> None:
        await netio.stop_sessions(self._servers, self._sessions, drain_timeout)
        for service in LOCAL_SERVICES:
            self.config.dispatcher_socket(service).unlink(missing_ok=True)
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

    def _handler(self, service: str, local: bool = False) -> Callable[
            [asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await netio.run_session(self._sessions, writer,
                                    self._session(service, reader, writer, local),
                                    f"{service} session", log)
        return handle

    def _local_handler(self, service: str) -> Callable[
            [asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None] | None]:
        """The unix socket's: called as a connection is accepted, before a byte of
        it is read; only root and the dispatcher's own user get a session."""
        serve = self._handler(service, local=True)

        def accept(reader: asyncio.StreamReader,
                   writer: asyncio.StreamWriter) -> Awaitable[None] | None:
            refusal = peers.root_or_own_user(writer)
            if refusal is None:
                return serve(reader, writer)
            log.warning("refused %s connection on its unix socket: %s", service, refusal)
            writer.transport.abort()
            return None
        return accept

    def _is_allowed(self, writer: asyncio.StreamWriter) -> bool:
        peer = writer.get_extra_info("peername")
        if not peer:
            return False
        address = ipaddress.ip_address(peer[0])
        return any(address in network for network in self.allowed)

    async def _session(self, service: str, reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter, local: bool) -> None:
        # A TCP peer proved itself in the TLS handshake (a cluster certificate);
        # allowed_clients only narrows where such a peer may connect from.
        if not local and not self._is_allowed(writer):
            log.warning("refused %s connection from %s: not in dispatcher.allowed_clients",
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
        if service == "imap":
            await self._hand_over_imap(domain, header, reader, writer, local)
            return
        started = time.monotonic()
        try:
            instance, (backend_reader, backend_writer) = await self._instance(
                domain, service, self._connect(service), _trigger(service, header))
        except asyncio.CancelledError:
            raise
        except Exception as error:
            await self._unavailable(service, domain, error, writer)
            return
        # The container's sockets take no PROXY header: LMTP needs no client
        # address, and submission's comes with the SMTP Router's XCLIENT.
        self._record(domain, service, instance, started)
        if local and service == "lmtp":
            await self._give_connection(instance.name, writer, backend_reader, backend_writer)
            return
        self._session_opened(instance.name)
        try:
            await netio.splice(reader, writer, backend_reader, backend_writer)
        finally:
            self._session_closed(instance.name)

    async def _give_connection(self, name: str, writer: asyncio.StreamWriter,
                               backend_reader: asyncio.StreamReader,
                               backend_writer: asyncio.StreamWriter) -> None:
        """A router on this host gets the connection to the container itself, with
        what the container already said on it."""
        cast(asyncio.Transport, backend_writer.transport).pause_reading()
        said = netio.take_buffer(backend_reader)
        fd = backend_writer.get_extra_info("socket").fileno()
        try:
            netio.send_with_fd(writer, b"+%d\r\n" % len(said) + said, fd)
        except OSError as error:
            log.warning("could not pass an LMTP connection to the router: %s", error)
            backend_writer.transport.abort()
            return
        self._count_handed(os.fstat(fd).st_ino, name)
        # Our copy closes (no shutdown): the router's keeps the connection open.
        backend_writer.transport.close()

    async def _hand_over_imap(self, domain: str, header: proxy.ProxyHeader,
                              reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                              local: bool) -> None:
        started = time.monotonic()
        try:
            instance, _ = await self._instance(domain, "imap", _reachable,
                                               _trigger("imap", header))
        except asyncio.CancelledError:
            raise
        except Exception as error:
            await self._unavailable("imap", domain, error, writer)
            return
        self._record(domain, "imap", instance, started)
        transport = cast(asyncio.Transport, writer.transport)
        if local:
            transport.pause_reading()   # the LOGIN may come with the client's socket
        writer.write(f"* OK [mailfc] {domain} ready.\r\n".encode())
        try:
            (tag, command, arguments), fds = await asyncio.wait_for(
                self._read_login(reader, writer, local), LOGIN_WAIT_S)
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            return      # the password was wrong, or the router gave up
        except imap.ImapSyntaxError as error:
            writer.write(f"* BAD {error}\r\n".encode())
            return
        # TLS (a router on another host) cannot be handed to Dovecot as a socket:
        # Dovecot gets one end of a socket pair, and the session is copied between
        # the TLS stream and the other end for its life (_relay_imap).
        pair = None if local else socket.socketpair()
        try:
            handed = await self._login(domain, instance, header, tag, command, arguments,
                                       fds, reader, writer, pair[0] if pair else None)
        except BaseException:
            if pair is not None:
                pair[1].close()
            raise
        finally:
            for fd in fds:
                os.close(fd)
            if pair is not None:
                pair[0].close()     # Dovecot holds its own copy
        if pair is not None:
            if handed:
                await self._relay_imap(instance.name, pair[1], reader, writer)
            else:
                pair[1].close()

    async def _relay_imap(self, name: str, ours: socket.socket,
                          reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Copy a handed-over session between the router's TLS stream and our end of
        the socket pair until either side ends; it counts as open meanwhile."""
        try:
            dovecot_reader, dovecot_writer = await asyncio.open_unix_connection(
                sock=ours, limit=netio.CHUNK * 4)
        except BaseException:
            ours.close()
            raise
        self._session_opened(name)
        try:
            await netio.splice(reader, writer, dovecot_reader, dovecot_writer)
        finally:
            self._session_closed(name)

    async def _read_login(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                          local: bool) -> tuple[tuple[bytes, bytes, list[bytes]], list[int]]:
        """The router's LOGIN, and from a router on this host the client's socket
        that may come with it."""
        if not local:
            return await imap.read_command(reader, None), []
        return await netio.read_with_fds(writer, reader, imap.read_command(reader, None))

    async def _login(self, domain: str, instance: ContainerInstance,
                     header: proxy.ProxyHeader, tag: bytes, command: bytes,
                     arguments: list[bytes], fds: list[int], reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter, relay: socket.socket | None = None) -> bool:
        """Hand the session to the container's Dovecot: the client's socket that came
        with the LOGIN, else `relay` (a socket pair's end, for TLS), else the
        router's connection itself.  Whether Dovecot took it."""
        if command != b"LOGIN" or len(arguments) != 2 or len(fds) > 1:
            writer.write(tag + b" BAD Only LOGIN user password is expected here.\r\n")
            return False
        user = arguments[0].decode("utf-8", "replace")
        if fds:
            # The client's own socket; in the password's place, what the client
            # sent after its LOGIN, which the router had read.
            fd, pending = fds[0], arguments[1]
        else:
            cast(asyncio.Transport, writer.transport).pause_reading()
            pending = netio.take_buffer(reader)
            fd = relay.fileno() if relay is not None else \
                writer.get_extra_info("socket").fileno()
        assert instance.pid is not None  # _reachable saw it
        reply = tag.decode("ascii") + f" OK [CAPABILITY {DOVECOT_IMAP_CAPABILITY}] Logged in\r\n"
        try:
            entry = await dovecot.lookup_user(dovecot_socket(instance.pid, "auth-userdb"), user)
            if entry is None:
                raise dovecot.DovecotProtocolError(f"{domain}'s Dovecot does not know {user}")
            await dovecot.hand_over_imap(
                dovecot_socket(instance.pid, "imap-master"), fd, entry,
                client_ip=header.source or self.config.dispatcher.address,
                local_ip=header.destination or self.config.dispatcher.address,
                client_input=pending, client_output=reply.encode())
        except dovecot.DovecotProtocolError as error:
            log.warning("imap for %s: hand-over of %s failed: %s", domain, user, error)
            self.forget(domain)
            writer.write(tag + f" NO [UNAVAILABLE] The mail server for {domain} did not take "
                               "the session; try again later.\r\n".encode())
            return False
        if relay is not None:
            return True     # counted while _relay_imap copies it
        # The imap process owns the session: closing our copy (run_session
        # does, without shutdown; the caller closes a received one) leaves the
        # connection open.
        self._count_handed(os.fstat(fd).st_ino, instance.name)
        if fds:
            writer.write(tag + b" OK Handed over.\r\n")
        return True

    async def _unavailable(self, service: str, domain: str, error: Exception,
                           writer: asyncio.StreamWriter) -> None:
        reason = str(error) or type(error).__name__
        if isinstance(error, MailfcError | OSError | TimeoutError):
            log.warning("%s for %s: container unavailable: %s", service, domain, reason)
        else:
            log.exception("%s for %s: container unavailable", service, domain)
        writer.write(unavailable_reply(
            service, f"mail server for {domain} unavailable, try again later"))
        with contextlib.suppress(ConnectionError):
            await writer.drain()

    def _record(self, domain: str, service: str, instance: ContainerInstance,
                started: float) -> None:
        self.latencies.append(SessionRecord(domain, service, instance.name,
                                            time.monotonic() - started))

    def _session_opened(self, name: str) -> None:
        self.open_sessions[name] += 1
        self._active.add(name)

    def _count_handed(self, inode: int, name: str) -> None:
        """A session that container `name` now serves without us: counted until the
        socket with this inode closes."""
        self._handed.add(inode, name)
        self._session_opened(name)

    def _session_closed(self, name: str) -> None:
        self.open_sessions[name] -= 1
        if self.open_sessions[name] <= 0:
            del self.open_sessions[name]
        self._active.add(name)

    def _connect(self, service: str) -> Callable[[ContainerInstance, float], Awaitable[
            tuple[asyncio.StreamReader, asyncio.StreamWriter]]]:
        async def connect(instance: ContainerInstance, wait_s: float) -> tuple[
                asyncio.StreamReader, asyncio.StreamWriter]:
            return await asyncio.wait_for(asyncio.open_unix_connection(
                instance.socket(service), limit=netio.CHUNK * 4), wait_s)
        return connect

    async def _instance(self, domain: str, service: str,
                        connect: Callable[[ContainerInstance, float], Awaitable[Connection]],
                        trigger: Trigger | None = None
                        ) -> tuple[ContainerInstance, Connection]:
        """The least busy running instance serving (domain, service), and `connect`'s
        result for it."""
        key = (domain, service)
        remembered = self._warm.get(key)
        if remembered is not None and remembered[0] > time.monotonic():
            alive = [i for i in remembered[1] if i.pid and process_alive(i.pid)]
            if alive:
                instance = min(alive, key=lambda i: self.open_sessions[i.name])
                try:
                    return instance, await connect(instance, WARM_CONNECT_TIMEOUT_S)
                except (OSError, TimeoutError):
                    pass  # stopped meanwhile: ask the runtime
        self._warm.pop(key, None)
        first: ContainerInstance = await asyncio.wait_for(
            self.containers.ensure(domain, service, trigger),
            self.config.runtime.start_timeout_s + 1.0)
        running: list[ContainerInstance] = [
            i for i in await self.containers.instances(domain, service)
            if i.state == "running"] or [first]
        instance = min(running, key=lambda i: self.open_sessions[i.name])
        connection = await connect(instance, self.config.dispatcher.connect_timeout_s)
        self._warm[key] = (time.monotonic() + WARM_TTL_S, running)
        return instance, connection

    async def recover_handed(self) -> int:
        """Count the IMAP sessions an earlier dispatcher handed to containers still
        running (handed.held_by_imap); returns how many."""
        try:
            instances = await self.containers.instances(service="imap")
        except Exception as error:  # the CMDB may be down at start: count from now on
            log.warning("cannot look for IMAP sessions handed over before: %s", error)
            return 0
        host_sockets = await asyncio.to_thread(open_socket_inodes)
        found = 0
        for instance in instances:
            if instance.state == "stopped" or not instance.pid:
                continue
            for inode in await asyncio.to_thread(held_by_imap, instance.pid, host_sockets):
                if inode not in self._handed:
                    self._count_handed(inode, instance.name)
                    found += 1
        if found:
            log.info("counting %d IMAP session(s) handed over before this start", found)
        return found

    def forget(self, domain: str) -> None:
        """The domain's instances changed (drained, stopped, scaled out): look again."""
        for key in [k for k in self._warm if k[0] == domain]:
            del self._warm[key]

    async def _flush_activity_forever(self) -> None:
        next_flush = time.monotonic() + ACTIVITY_FLUSH_S
        while True:
            await asyncio.sleep(SWEEP_S)
            if self._handed:
                alive = await asyncio.to_thread(open_socket_inodes)
                for name in self._handed.sweep(alive):
                    self._session_closed(name)
            if time.monotonic() < next_flush:
                continue
            next_flush = time.monotonic() + ACTIVITY_FLUSH_S
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


async def _reachable(instance: ContainerInstance, wait_s: float) -> None:
    """IMAP is handed to the container's Dovecot through /proc/<pid>/root: the
    hand-over itself finds out whether it is still there."""
    if not instance.pid:
        raise ConnectionRefusedError(f"{instance.name} has no process")


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
