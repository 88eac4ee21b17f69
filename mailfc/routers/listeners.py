"""What the login-taking routers (IMAP, submission) share: listeners and the login.

A `LoginRouter` listens on a plain port (STARTTLS) and an implicit-TLS port,
runs one session object per connection (`session_factory(router, reader,
writer, implicit_tls).run()`), and checks logins (`authenticate`): a login
from a banned address (mailfc.db.bans), or from an address past its failure
limits (mailfc.routers.throttle), is refused unchecked; the account's own
failure count only delays (a right password from an address without
failures logs in at once); an address failing for many accounts is banned;
an unknown or suspended account's password is checked against a dummy hash,
so its failure takes as long as a wrong password's; an
active account's backend session starts opening while its password is
checked, so a cold start overlaps the check; every attempt is recorded in
auth_attempts without making the session wait for the database (the session
recorder, mailfc.policy.recorder: batched, so a flood of logins costs the
database one write per flush, not a commit per attempt).  The
protocol's own replies (and the delay before a failure's) stay with the
session.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from mailfc import cluster, netio
from mailfc.anvil import Anvil
from mailfc.config import Config, LoginSection, split_hostport
from mailfc.db.directory import PASSWORD_CHECKS, Account, Directory
from mailfc.db.placement import Placement
from mailfc.metrics import names as metrics
from mailfc.passwords import verify_dummy
from mailfc.policy.recorder import Recorder
from mailfc.routers.throttle import (
    BanList,
    LoginThrottle,
    ThrottleLimits,
    account_key,
    delay_failure,
)


async def connect_dispatcher(config: Config, placement: Placement, service: str
                             ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bool]:
    """A connection to the dispatcher of the domain's host, and whether it is local.

    On this host: its unix socket only (mailfc.dispatcher.server, LOCAL
    ROUTERS; the dispatcher lets in root and its own user).  On another host:
    TCP with mutual TLS (mailfc.cluster): this host's cluster certificate, and
    the dispatcher's verified against the cluster CA and its address."""
    timeout = config.dispatcher.connect_timeout_s
    if placement.host == config.host_name:
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(
            str(config.dispatcher_socket(service)), limit=netio.CHUNK * 4), timeout)
        return reader, writer, True
    reader, writer = await asyncio.wait_for(asyncio.open_connection(
        placement.dispatcher_address, placement.port(service),
        ssl=cluster.client_context(config), server_hostname=placement.dispatcher_address,
        ssl_handshake_timeout=timeout, limit=netio.CHUNK * 4), timeout)
    return reader, writer, False


async def take_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                          ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """The connection to the container that a dispatcher on this host passes back
    (`+<n>` and what the container said, with the socket: LMTP, see
    mailfc.dispatcher.server); the channel to the dispatcher is closed after.
    The channel's transport must have been paused before the PROXY header went
    out.  ConnectionRefusedError with the dispatcher's words when it has none."""
    async def preamble() -> bytes:
        line = await reader.readuntil(b"\n")
        if not line.startswith(b"+") or not line[1:].strip().isdigit():
            raise ConnectionRefusedError(line.decode("utf-8", "replace").strip())
        return await reader.readexactly(int(line[1:].strip()))

    try:
        already, fds = await netio.read_with_fds(writer, reader, preamble())
    finally:
        writer.close()
    if len(fds) != 1:
        for fd in fds:
            os.close(fd)
        raise ConnectionRefusedError("the dispatcher passed no connection")
    conn = socket.socket(fileno=fds[0])
    loop = asyncio.get_running_loop()
    container_reader = asyncio.StreamReader(limit=netio.CHUNK * 4)
    container_reader.feed_data(already)     # before anything the socket brings
    protocol = asyncio.StreamReaderProtocol(container_reader)
    transport, _ = await loop.create_connection(lambda: protocol, sock=conn)
    return container_reader, asyncio.StreamWriter(transport, protocol, container_reader, loop)


SessionFactory = Callable[[Any, asyncio.StreamReader, asyncio.StreamWriter, bool],
                          Any]
B = TypeVar("B", bound="HasWriter")


class HasWriter(Protocol):
    writer: asyncio.StreamWriter


@dataclass
class Login(Generic[B]):
    """The outcome of `authenticate`: exactly one of the three cases."""

    account: Account | None = None
    backend: B | None = None
    # The password was not accepted (or not checked): why, for the record.
    failure: str | None = None
    # The password was right but the domain's server could not be reached.
    unavailable: BaseException | None = None


def peer_and_local(writer: asyncio.StreamWriter) -> tuple[tuple[str, int], tuple[str, int]]:
    peer = writer.get_extra_info("peername") or ("0.0.0.0", 0)
    local = writer.get_extra_info("sockname") or ("0.0.0.0", 0)
    return (peer[0], peer[1]), (local[0], local[1])


class LoginRouter:
    name = "router"
    protocol = ""  # auth_attempts.protocol

    def __init__(self, config: Config, directory: Directory, tls_context: ssl.SSLContext,
                 *, settings: LoginSection, plain: str, implicit_tls: str,
                 session_factory: SessionFactory, log: logging.Logger) -> None:
        self.config = config
        self.settings = settings
        self.directory = directory
        self.tls_context = tls_context
        self.throttle = LoginThrottle(ThrottleLimits.of(settings))
        self.bans = BanList(directory.pool, settings.ban_refresh_s)
        self._listen = ((plain, False), (implicit_tls, True))
        self._session_factory = session_factory
        self._log = log
        self._servers: list[asyncio.Server] = []
        self._sessions: set[asyncio.Task[None]] = set()
        self.recorder = Recorder.from_config(directory.pool, config, self.name)

    async def start(self) -> None:
        await self.recorder.start()
        # Connections per client (mailfc.anvil), one count for both ports.
        self.anvil = Anvil.for_service(self.config, self.name)
        for address, implicit_tls in self._listen:
            host, port = split_hostport(address)
            self._servers.append(await asyncio.start_server(
                self._handler(implicit_tls), host, port, reuse_address=True, reuse_port=True,
                ssl=self.tls_context if implicit_tls else None,
                ssl_handshake_timeout=30 if implicit_tls else None, limit=netio.CHUNK * 4))

    async def stop(self, drain_timeout: float) -> None:
        await netio.stop_sessions(self._servers, self._sessions, drain_timeout)
        await self.recorder.stop()
        self._servers.clear()

    def _handler(self, implicit_tls: bool) -> Callable[
            [asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            # Admission before anything is said: past its count or rate a client gets
            # the protocol's refusal (421 / BYE) instead of the greeting.
            ticket = self.anvil.connect(peer_and_local(writer)[0][0])
            if ticket.refusal is not None:
                with contextlib.suppress(ConnectionError):
                    writer.write(self.anvil.refusal_line(ticket.client))
                await netio.close(writer)
                return
            try:
                session = self._session_factory(self, reader, writer, implicit_tls)
                await netio.run_session(self._sessions, writer, session.run(),
                                        f"{self.protocol} session", self._log)
            finally:
                ticket.release()
        return handle

    async def authenticate(self, username: str, password: str, client_ip: str,
                           open_backend: Callable[[Account], Coroutine[Any, Any, B]],
                           unavailable: tuple[type[BaseException], ...]) -> Login[B]:
        if (await self.bans.get()).match(client_ip) is not None:
            return self._failed(username, None, client_ip, "banned")
        name = account_key(username)
        verdict = self.throttle.check(client_ip, name)
        if verdict.refused is not None:
            await self._count_failure(client_ip, name, checked=False)
            return self._failed(username, None, client_ip, "throttled")
        self.throttle.begin(client_ip)
        try:
            if not verdict.clean and verdict.delay_s > 0:
                # This address failed before: no answer, not even a right one,
                # sooner than the account's delay.
                await delay_failure(verdict.delay_s)
            login = await self._check(username, password, client_ip, open_backend,
                                      unavailable)
        finally:
            self.throttle.end(client_ip)
        if login.failure is None:
            self.throttle.succeeded(client_ip, name)
            return login
        await self._count_failure(client_ip, name, checked=True)
        if verdict.clean and verdict.delay_s > 0:
            await delay_failure(verdict.delay_s)
        return login

    async def _check(self, username: str, password: str, client_ip: str,
                     open_backend: Callable[[Account], Coroutine[Any, Any, B]],
                     unavailable: tuple[type[BaseException], ...]) -> Login[B]:
        account = await self.directory.account(username)
        opening: asyncio.Task[B] | None = None
        if account is not None and account.active:
            opening = asyncio.create_task(open_backend(account))
            ok = await self.directory.verify(account, password)
        else:
            # As long as a wrong password for a real account takes: the time
            # tells a prober nothing about which accounts exist.
            await asyncio.get_running_loop().run_in_executor(
                PASSWORD_CHECKS, verify_dummy, password)
            ok = False
        if not ok or account is None or opening is None:
            if opening is not None:
                opening.cancel()
                with contextlib.suppress(BaseException):
                    await netio.close((await opening).writer)
            reason = "unknown user" if account is None else (
                "suspended" if not account.active else "wrong password")
            return self._failed(username, account.domain if account else None, client_ip,
                                reason)
        try:
            backend = await opening
        except unavailable as error:
            self._log.warning("%s login of %s: backend unavailable: %s", self.protocol,
                              account.address, error)
            self.record(account.address, account.domain, client_ip, True,
                        f"backend unavailable: {error}")
            return Login(account=account, unavailable=error)
        self.record(account.address, account.domain, client_ip, True, "ok")
        return Login(account=account, backend=backend)

    async def _count_failure(self, client_ip: str, name: str, *, checked: bool) -> None:
        """Count a failure; an address that failed for spray_accounts distinct
        accounts in the window is banned for spray_ban_s, on every router."""
        accounts = self.throttle.failed(client_ip, name, checked=checked)
        if accounts < self.settings.spray_accounts:
            return
        reason = (f"password spraying: failed logins for {accounts} accounts within "
                  f"{self.settings.failure_window_s} s")
        self._log.warning("%s: banning %s for %d s: %s", self.protocol, client_ip,
                          self.settings.spray_ban_s, reason)
        await self.bans.add(client_ip, reason, self.settings.spray_ban_s,
                            host=self.config.host_name)

    def _failed(self, username: str, domain: str | None, client_ip: str,
                reason: str) -> Login[Any]:
        self.record(username, domain, client_ip, False, reason)
        return Login(failure=reason)

    def record(self, username: str, domain: str | None, client_ip: str | None,
               success: bool, reason: str) -> None:
        metrics.LOGINS.labels(self.protocol, "ok" if success else reason.split(":")[0],
                              metrics.domain_label(domain)).inc()
        self.recorder.new("auth_attempts", protocol=self.protocol, username=username[:320],
                          domain=domain, client_ip=client_ip, success=success, reason=reason)
