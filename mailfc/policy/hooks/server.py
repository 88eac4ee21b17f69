"""The hook server: an asyncio unix server for the Dovecot plugin of every per-domain Dovecot.

LISTENER
    hooks.socket (default <state_dir>/private/sockets/hooks.sock): the directory the runtime
    mounts at /run/mailfc in every container, where the rendered dovecot.conf points
    the plugin (mailfc_hooks_socket = /run/mailfc/hooks.sock).

PROTOCOL
    The line protocol of protocol.py (and plugins/dovecot_hooks/README.md).  Each
    connection is greeted with HELLO (version, hooks.timeout_ms, hooks.failure); what each
    request records and decides is in session.py.

LIMIT CHANGES
    Every hooks.limits_poll_s the server looks at the limits table (row count, newest
    change, highest id).  When it changed, it asks the engine which limit kinds now apply
    to every subject with an open session and sends WATCH to the sessions whose list of
    commands to ask about changed; the counting itself always reads the current rows.  So
    a limit set, changed or removed with `mailfc limit` applies to running sessions within
    about a second, without restarting Dovecot, and the grants of commands counted
    ahead (grants.py) are dropped.

ADMISSION
    While the host is short of CPU, a domain running more heavy commands (SEARCH,
    SORT, THREAD, COPY, MOVE) than its share waits for its turn, at most half of
    hooks.timeout_ms, then hears NO [LIMIT] (mailfc.fairness; the domains with
    open sessions count in the share).  Recorded as rule pressure:heavy_commands.

SECURITY
    The socket is mode 0660, group hooks.socket_gid (the gid the containers' imap
    processes run as, the runtime's vmail_gid, shifted by runtime.container_id_base
    as their user namespace maps it): only they and root can connect.  Input is
    bounded (protocol.MAX_LINE); garbage, unknown words and oversized lines are answered
    with ERROR and logged (the first few per connection), never fatal for the server or
    the connection.  Nothing from the plugin is executed or used as a path; names end up
    only in parameterised SQL.
    Root inside a domain's container can connect as well and name any user, so each
    connection's peer is identified from the kernel's credentials (mailfc.peers:
    SO_PEERCRED, the peer's cgroup, the CMDB).  A domain's container reports sessions of
    that domain's users only: a SESSION naming any other user is answered with ERROR
    like other bad input, nothing is recorded or counted for it, and the plugin's other
    sessions go on (the plugin logs the ERROR and, without a SESSION reply, lets that
    session run by its failure policy after hooks.timeout_ms).  Root on this host is
    trusted as before.  Anyone else is disconnected before HELLO with a warning saying
    who and why (refused_peers counts them).

CONFIGURATION ([hooks])
    socket (""), socket_gid (5000), timeout_ms (500), failure ("open"), on_db_error
    ("accept"), limits_poll_s (1.0), pressure_target (0.15), pressure_min_rate (2);
    plus [policy] lease_s, decision_timeout_s and [recorder] as for the milter.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path

import asyncpg

from mailfc import netio, peers
from mailfc.config import Config
from mailfc.fairness import Admission
from mailfc.policy.engine import LimitEngine, PolicyUnavailable, Subject
from mailfc.policy.hooks import protocol
from mailfc.policy.hooks.session import HookConnection, HookPolicy
from mailfc.policy.recorder import Recorder

log = logging.getLogger("mailfc.policy.hooks")

LOGGED_ERRORS_PER_CONNECTION = 5


def socket_path(config: Config) -> Path:
    return Path(config.hooks.socket) if config.hooks.socket else (
        config.container_sockets_dir / "hooks.sock")


class HookServer:
    """Serves plugin connections with a given engine and recorder (started by the caller)."""

    def __init__(self, engine: LimitEngine, recorder: Recorder, pool: asyncpg.Pool, *,
                 host: str, socket: Path, socket_gid: int | None = 5000,
                 policy: HookPolicy | None = None, limits_poll_s: float = 1.0,
                 admission: Admission | None = None,
                 peer_identity: peers.Peers | None = None) -> None:
        self.engine = engine
        self.peer_identity = peer_identity or peers.Peers(pool)
        # The inode of the socket this server bound (None: not listening).
        self._inode: int | None = None
        self.recorder = recorder
        self.pool = pool
        self.host = host
        self.socket = socket
        self.socket_gid = socket_gid
        self.policy = policy or HookPolicy()
        self.limits_poll_s = limits_poll_s
        # Heavy commands under CPU pressure; the domains with open sessions count in
        # the fair share though their commands are not asked about.
        self.admission = admission
        if admission is not None:
            admission.present = self._domains_present
        self.server: asyncio.Server | None = None
        self.connections: dict[asyncio.Task[None], tuple[HookConnection,
                                                         asyncio.StreamWriter]] = {}
        self.protocol_errors = 0
        self.refused_peers = 0
        self._background: set[asyncio.Task[None]] = set()
        self._watcher: asyncio.Task[None] | None = None
        self._limits_version: tuple[object, ...] | None = None

    # -- life cycle ---------------------------------------------------------------

    async def start(self) -> None:
        self.socket.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()
        self.server = await asyncio.start_unix_server(
            self._serve, path=str(self.socket), limit=protocol.MAX_READ)
        self._inode = self.socket.stat().st_ino
        if self.socket_gid is None:
            self.socket.chmod(0o666)
        else:
            os.chown(self.socket, -1, self.socket_gid)
            self.socket.chmod(0o660)
        self._watcher = asyncio.create_task(self._watch_limits())
        if self.admission is not None:
            await self.admission.start()
        log.info("hook server listening on %s", self.socket)

    def _domains_present(self) -> set[str]:
        return {session.subject.domain for connection, _ in self.connections.values()
                for session in connection.sessions.values() if session.subject.domain}

    async def stop(self, drain_timeout: float = 5.0) -> None:
        if self.admission is not None:
            await self.admission.stop()
        if self.server is not None:
            self.server.close()
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
            self._watcher = None
        # Plugin connections live as long as their imap process: there is nothing to
        # drain but what was already read.  Cut them; each records its open sessions.
        for _, writer in list(self.connections.values()):
            writer.transport.abort()
        await asyncio.gather(*self.connections, return_exceptions=True)
        if self._background:
            await asyncio.wait(set(self._background), timeout=drain_timeout)
        if self.server is not None:
            await netio.server_closed(self.server)
            self.server = None
        # A process cycled in to replace this one has bound the path anew: its
        # socket stays.
        with contextlib.suppress(FileNotFoundError):
            if self.socket.stat().st_ino == self._inode:
                self.socket.unlink()

    def _keep(self, task: asyncio.Task[None]) -> None:
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- one plugin connection ------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = await self.peer_identity.identify(writer)
        if self.server is None or not self.server.is_serving():
            writer.close()      # stopped while the peer was looked at
            return
        if peer.kind != peers.CONTAINER and not peer.host_root:
            self.refused_peers += 1
            log.warning("hook server: closing a connection from %s: only a domain's"
                        " container or root on this host may report sessions", peer)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            return
        task = asyncio.current_task()
        assert task is not None
        connection = HookConnection(self.engine, self.recorder, host=self.host,
                                    policy=self.policy, background=self._keep,
                                    admission=self.admission,
                                    peer=peer if peer.kind == peers.CONTAINER else None)
        self.connections[task] = (connection, writer)
        splitter = protocol.LineSplitter()
        errors = 0
        reason = "the imap process closed its hook connection without ending the session"
        try:
            writer.write(protocol.hello(self.policy.timeout_ms, self.policy.failure))
            while True:
                data = await reader.read(protocol.MAX_READ)
                if not data:
                    break
                for line in splitter.feed(data):
                    try:
                        if isinstance(line, protocol.Oversized):
                            raise protocol.ProtocolError(
                                f"line of {line.size} bytes is longer than "
                                f"{protocol.MAX_LINE}: discarded")
                        reply = await connection.handle(protocol.parse_request(line))
                    except protocol.ProtocolError as error:
                        self.protocol_errors += 1
                        errors += 1
                        if errors <= LOGGED_ERRORS_PER_CONNECTION:
                            log.warning("hook connection: %s%s", error,
                                        " (further errors of this connection not logged)"
                                        if errors == LOGGED_ERRORS_PER_CONNECTION else "")
                        reply = protocol.error(str(error))
                    if reply:
                        writer.write(reply)
        except ConnectionError as error:
            log.info("hook connection lost: %s", error)
        except asyncio.CancelledError:
            reason = "the hook server stopped while the session was open"
            raise
        except Exception:
            # A bug in one connection must not stop the server: log it, close this one.
            log.exception("hook connection failed")
        finally:
            if self.server is None or not self.server.is_serving():
                reason = "the hook server stopped while the session was open"
            connection.close(reason)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            self.connections.pop(task, None)

    # -- limit changes ------------------------------------------------------------

    async def _watch_limits(self) -> None:
        while True:
            await asyncio.sleep(self.limits_poll_s)
            try:
                await self.refresh_watches()
            except asyncio.CancelledError:
                raise
            except Exception as error:
                log.debug("limit watch failed: %s", error)

    async def refresh_watches(self, force: bool = False) -> int:
        """Push WATCH where the commands to ask about changed; returns lines sent."""
        version = tuple(await self.pool.fetchrow(
            "SELECT count(*), max(updated_at), max(id) FROM limits"))
        unknown = any(s.kinds is None for c, _ in self.connections.values()
                      for s in c.sessions.values())
        if version == self._limits_version and not force and not unknown:
            return 0
        if version != self._limits_version:
            for connection, _ in self.connections.values():
                connection.forget_grants()
        subjects: set[Subject] = set()
        for connection, _ in self.connections.values():
            subjects |= connection.subjects()
        kinds: dict[Subject, frozenset[str]] = {}
        for subject in subjects:
            try:
                # No acquire, peek or consume: reads which limits apply, takes nothing.
                check = await self.engine.check(subject)
            except PolicyUnavailable:
                return 0        # try again at the next tick
            kinds[subject] = frozenset(u.kind for u in check.usage)
        self._limits_version = version
        sent = 0
        for connection, writer in list(self.connections.values()):
            for line in connection.rewatch(kinds):
                writer.write(line)
                sent += 1
        return sent


class HookService:
    """The resident service `mailfc up` runs: engine, recorder and server from the config."""

    name = "hook-server"

    def __init__(self, config: Config, pool: asyncpg.Pool, *, socket: Path | None = None
                 ) -> None:
        hooks = config.hooks
        policy = HookPolicy(hooks.timeout_ms, hooks.failure, hooks.on_db_error,
                            config.policy.refusal_delay_s)
        self.engine = LimitEngine.from_config(pool, config)
        self.recorder = Recorder.from_config(pool, config, "hook-server",
                                             holder=self.engine.holder)
        self.server = HookServer(
            self.engine, self.recorder, pool, host=config.host_name,
            socket=socket or socket_path(config),
            socket_gid=config.runtime.outside_id(hooks.socket_gid),
            policy=policy, limits_poll_s=hooks.limits_poll_s,
            admission=Admission(target=hooks.pressure_target, min_rate=hooks.pressure_min_rate,
                                max_wait_s=policy.longest_wait_s))

    async def start(self) -> None:
        await self.engine.start()
        await self.recorder.start()
        await self.server.start()

    async def stop(self, drain_timeout: float) -> None:
        await self.server.stop(drain_timeout)
        await self.engine.stop()
        await self.recorder.stop(drain_timeout)
