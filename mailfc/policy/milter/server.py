"""The milter service: an asyncio server speaking the milter protocol to every Postfix.

LISTENERS
    milter.socket (default <state_dir>/private/sockets/milter.sock): a unix socket in the
    directory the runtime mounts at /run/mailfc in every Postfix container.  With
    milter.tcp = true also listen.milter (127.0.0.1:10030) for MTAs elsewhere.

PROTOCOL
    The milter protocol version 6 (codec.py), one SMTP session per connection at a time
    (session.py says what each stage records and decides).

WHY NOT python-libmilter
    python-libmilter 2.0.0 runs a thread per connection and answers every stage; its
    quirks (setReply() plus a return value sends two replies, recipient macros looked up
    with str keys in a bytes-keyed dict, abort() twice per message) would each need a
    workaround.  Measured here with the same Postfix and smtp-source load (bench/
    milter_postfix.py), a bare accept-everything python-libmilter ThreadFactory milter
    kept 0.44 of Postfix's rate without a milter.  This server negotiates no-reply stages
    (connect, helo, headers, body), so Postfix waits only at MAIL, RCPT and end of
    message, and runs every connection on one event loop with the shared asyncpg pool.

SECURITY
    The socket is mode 0660 with group milter.socket_group (postfix, as the
    containers' user namespace shifts it: runtime.container_id_base + its gid):
    only the containers' Postfix (and root) may connect.  Input is bounded (codec.MAX_PACKET);
    a connection that sends anything else than the protocol is logged and closed, the
    server keeps serving every other connection.  Nothing the MTA sends is executed or
    used as a path; addresses and header values end up only in parameterised SQL.
    Root inside a domain's container can connect as well and send anything, so each
    connection's peer is identified from the kernel's credentials (mailfc.peers:
    SO_PEERCRED, the peer's cgroup, the CMDB):
        a domain's container   its sessions are that domain's; a {daemon_name} naming
                               another domain is ignored (a warning names both), and
                               so is an {auth_authen} of another domain's account
        root on this host      trusted as before: {daemon_name} names the domain
                               (miltertest, MTAs run outside containers)
        anyone else            the connection is closed before the negotiation (a
                               warning says who and why; refused_peers counts them):
                               other users, a peer that exited at once, a container
                               the CMDB does not know or cannot name right now
    A TCP peer (milter.tcp, off by default) carries no credential: whoever reaches
    listen.milter is trusted like root, so only trusted MTAs may reach that address.

CONFIGURATION
    [milter] socket, socket_group (postfix), tcp (false), idle_timeout_s (900)
    [policy] lease_s (60), decision_timeout_s (2), on_db_error_submission (tempfail),
             on_db_error_inbound (accept)
    [recorder] flush_interval_s (0.2), batch_size (2000), max_pending (200000),
             flush_timeout_s (10)
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import logging
import os
from pathlib import Path

import asyncpg

from mailfc import netio, peers
from mailfc.config import Config, split_hostport
from mailfc.policy.engine import LimitEngine
from mailfc.policy.milter import codec
from mailfc.policy.milter.session import DEFAULT_FAILURE, FailurePolicy, MilterSession
from mailfc.policy.recorder import Recorder

log = logging.getLogger("mailfc.policy.milter")

READ_SIZE = 1 << 16


def socket_path(config: Config) -> Path:
    return Path(config.milter.socket) if config.milter.socket else (
        config.container_sockets_dir / "milter.sock")


class MilterServer:
    """Serves milter connections with a given engine and recorder (both started by the caller)."""

    def __init__(self, engine: LimitEngine, recorder: Recorder, *, host: str,
                 socket: Path | None = None, tcp: tuple[str, int] | None = None,
                 socket_group: str = "postfix", container_id_base: int = 0,
                 failure: FailurePolicy = DEFAULT_FAILURE,
                 idle_timeout_s: float = 900.0, refusal_delay_s: float = 0.0,
                 peer_identity: peers.Peers | None = None) -> None:
        self.engine = engine
        self.peer_identity = peer_identity or peers.Peers(engine.pool)
        self.refusal_delay_s = refusal_delay_s
        self.recorder = recorder
        self.host = host
        self.socket = socket
        self.tcp = tcp
        self.socket_group = socket_group
        # The containers' Postfix runs in a user namespace: its postfix group is
        # the host's postfix gid shifted by the base (mailfc.runtime.bundle).
        self.container_id_base = container_id_base
        self.failure = failure
        self.idle_timeout_s = idle_timeout_s
        self.servers: list[asyncio.Server] = []
        self.connections: dict[asyncio.Task[None], asyncio.StreamWriter] = {}
        self.protocol_errors = 0
        self.refused_peers = 0

    async def start(self) -> None:
        if self.socket is not None:
            self.socket.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                self.socket.unlink()
            server = await asyncio.start_unix_server(self._serve, path=str(self.socket))
            self._secure(self.socket)
            self.servers.append(server)
        if self.tcp is not None:
            self.servers.append(await asyncio.start_server(self._serve, *self.tcp))
        log.info("milter listening on %s", ", ".join(
            str(s) for s in ([self.socket] if self.socket else []) + ([self.tcp] if self.tcp
                                                                          else [])))

    def _secure(self, path: Path) -> None:
        if not self.socket_group:
            path.chmod(0o666)
            return
        try:
            gid = grp.getgrnam(self.socket_group).gr_gid
        except KeyError:
            raise RuntimeError(f"milter.socket_group {self.socket_group!r} does not exist on "
                               "this host: apt-get install postfix, or set it empty") from None
        os.chown(path, -1, self.container_id_base + gid)
        path.chmod(0o660)

    async def stop(self, drain_timeout: float = 5.0) -> None:
        for server in self.servers:
            server.close()
        # Open SMTP sessions finish on their own (Postfix sends QUIT at the end of each);
        # whatever is still open after the drain is cut and recorded as closed.
        if self.connections:
            await asyncio.wait(list(self.connections), timeout=drain_timeout)
        # Cut the rest at the transport (not by cancelling: the session then ends
        # through its normal path and records its close).
        for writer in list(self.connections.values()):
            writer.transport.abort()
        await asyncio.gather(*self.connections, return_exceptions=True)
        for server in self.servers:
            await netio.server_closed(server)
        self.servers = []
        if self.socket is not None:
            with contextlib.suppress(FileNotFoundError):
                self.socket.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.connections[task] = writer
        try:
            peer = await self.peer_identity.identify(writer)
            if self._admits(peer):
                await self._converse(reader, writer, MilterSession(
                    self.engine, self.recorder, host=self.host, failure=self.failure,
                    refusal_delay_s=self.refusal_delay_s,
                    peer=peer if peer.kind == peers.CONTAINER else None))
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            self.connections.pop(task, None)

    def _admits(self, peer: peers.Peer) -> bool:
        """SECURITY: a domain's container, root on this host, or (milter.tcp) a TCP peer."""
        if peer.kind in (peers.CONTAINER, peers.REMOTE) or peer.host_root:
            return True
        self.refused_peers += 1
        log.warning("milter: closing a connection from %s: only a domain's container or"
                    " root on this host may use the milter", peer)
        return False

    async def _converse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                        session: MilterSession) -> None:
        decoder = codec.Decoder()
        try:
            while not session.closed:
                data = await asyncio.wait_for(reader.read(READ_SIZE), self.idle_timeout_s)
                if not data:
                    break
                for packet in decoder.feed(data):
                    reply = await session.handle(packet)
                    if reply:
                        writer.write(reply)
                    if session.closed:
                        break
        except codec.ProtocolError as error:
            self.protocol_errors += 1
            log.warning("milter: closing a connection that broke the protocol: %s", error)
        except (ConnectionError, TimeoutError) as error:
            log.info("milter: connection lost: %s", error or type(error).__name__)
        except asyncio.CancelledError:
            raise
        except Exception:
            # A bug in one session must not stop the server: log it, close this one.
            log.exception("milter: session failed")
        finally:
            with contextlib.suppress(Exception):
                await session.close()


class MilterService:
    """The resident service `mailfc up` runs: engine, recorder and server from the config."""

    name = "milter"

    def __init__(self, config: Config, pool: asyncpg.Pool, *, socket: Path | None = None
                 ) -> None:
        policy = config.policy
        self.engine = LimitEngine.from_config(pool, config)
        self.recorder = Recorder.from_config(pool, config, "milter", holder=self.engine.holder)
        self.server = MilterServer(
            self.engine, self.recorder, host=config.host_name,
            socket=socket or socket_path(config),
            tcp=split_hostport(config.listen.milter) if config.milter.tcp else None,
            socket_group=config.milter.socket_group,
            container_id_base=config.runtime.container_id_base,
            failure=FailurePolicy(policy.on_db_error_submission, policy.on_db_error_inbound),
            idle_timeout_s=config.milter.idle_timeout_s,
            refusal_delay_s=policy.refusal_delay_s)

    async def start(self) -> None:
        await self.engine.start()
        await self.recorder.start()
        await self.server.start()

    async def stop(self, drain_timeout: float) -> None:
        await self.server.stop(drain_timeout)
        await self.engine.stop()
        await self.recorder.stop(drain_timeout)
