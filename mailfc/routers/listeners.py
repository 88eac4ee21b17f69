"""What the login-taking routers (IMAP, submission) share: two listeners and bookkeeping.

A `LoginRouter` listens on a plain port (STARTTLS) and an implicit-TLS port,
runs one session object per connection (`session_factory(router, reader,
writer, implicit_tls).run()`), throttles failed logins per client IP and per
account, and records every login attempt in auth_attempts without making the
session wait for the database.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

from mailfc import netio
from mailfc.config import Config, split_hostport
from mailfc.db.directory import Directory
from mailfc.routers.throttle import FailureThrottle

SessionFactory = Callable[[Any, asyncio.StreamReader, asyncio.StreamWriter, bool],
                          Any]


class LoginRouter:
    name = "router"
    protocol = ""  # auth_attempts.protocol

    def __init__(self, config: Config, directory: Directory, tls_context: ssl.SSLContext,
                 *, plain: str, implicit_tls: str, max_failures_per_ip: int,
                 max_failures_per_account: int, failure_window_s: float,
                 session_factory: SessionFactory, log: logging.Logger) -> None:
        self.config = config
        self.directory = directory
        self.tls_context = tls_context
        self.ip_throttle = FailureThrottle(max_failures_per_ip, failure_window_s)
        self.account_throttle = FailureThrottle(max_failures_per_account, failure_window_s)
        self._listen = ((plain, False), (implicit_tls, True))
        self._session_factory = session_factory
        self._log = log
        self._servers: list[asyncio.Server] = []
        self._sessions: set[asyncio.Task[None]] = set()
        self._records: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        for address, implicit_tls in self._listen:
            host, port = split_hostport(address)
            self._servers.append(await asyncio.start_server(
                self._handler(implicit_tls), host, port, reuse_address=True, reuse_port=True,
                ssl=self.tls_context if implicit_tls else None,
                ssl_handshake_timeout=30 if implicit_tls else None, limit=netio.CHUNK * 4))

    async def stop(self, drain_timeout: float) -> None:
        for server in self._servers:
            server.close()
        if self._sessions:
            await asyncio.wait(set(self._sessions), timeout=drain_timeout)
        for task in set(self._sessions):
            task.cancel()
        await asyncio.gather(*self._sessions, *self._records, return_exceptions=True)
        self._servers.clear()

    def _handler(self, implicit_tls: bool) -> Callable[
            [asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            session = self._session_factory(self, reader, writer, implicit_tls)
            await netio.run_session(self._sessions, writer, session.run(),
                                    f"{self.protocol} session", self._log)
        return handle

    def record(self, username: str, domain: str | None, client_ip: str | None,
               success: bool, reason: str) -> None:
        async def write() -> None:
            try:
                await self.directory.record_auth(self.protocol, username, domain, client_ip,
                                                 success, reason)
            except Exception as error:
                self._log.warning("could not record login attempt of %r: %s", username, error)
        task = asyncio.create_task(write())
        self._records.add(task)
        task.add_done_callback(self._records.discard)
