"""The internal hops: where they listen, who may use them, how the next one is reached.

NAME
    mailfc.hops - listeners and connections of the LMTP hops between mailfc's services

DESCRIPTION
    Mail passes from service to service over LMTP (mailfc.protocols.smtp_server):

        SMTP-In's spool --> LMTP Router (listen.lmtp_router)
        SMTP-In's spool (a bounce to a sender elsewhere) --> SMTP-Out's intake
        Filter-Out --> SMTP-Out's intake (listen.smtp_out) --> LMTP Router (hosted)

    Whoever may use such a hop skips what comes before it: the LMTP Router delivers into
    any mailbox past every check (SMTP-In ran the [filter_in] chain before its 250) and
    trusts the XFORWARD IDENT its journal is keyed by, and SMTP-Out's intake relays to
    any remote MX.  So a hop authenticates its peer with a
    credential, never with an address:

    "unix:<name>"   the socket <name> in Config.hops_dir (<state_dir>/private/hops,
                    mode 0700, owned by the service's user; no container mounts it).
                    Every accepted connection's SO_PEERCRED (the kernel's word on the
                    process that connected) must show uid 0 or the uid this service
                    runs as; anyone else is disconnected before the greeting, and the
                    refusal is logged with the peer's pid and uid (mailfc.peers.root_or_own_user).
    "host:port"     a hop on another host: TLS with the cluster's certificates
                    (mailfc.cluster) both ways.  The listener requires a client
                    certificate signed by the cluster CA; the client checks the
                    listener's against that CA and against the address it connects to
                    (so the host's certificate must name it: dispatcher.address).

    Listeners are CyclingListener (mailfc.gateways.listener): a new process or cycle()
    takes the socket over by an atomic rename, no connection is refused meanwhile.

SECURITY
    Who can connect to a unix socket is decided twice: by the directory (only root and
    the service's user enter it) and by the peer check, which also holds when the
    directory was made too open by hand.  A client never falls back from a unix socket
    to TCP, nor from TLS to plain.

CONFIGURATION
    listen.lmtp_router ("unix:lmtp-router.sock"), listen.smtp_out ("unix:smtp-out.sock");
    filter_out.next_hop ("": listen.smtp_out); [cluster] for the TCP form.
"""

from __future__ import annotations

import asyncio
import os
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mailfc import cluster, netio, peers
from mailfc.config import Config, connect_address, listen_address
from mailfc.errors import ConfigError
from mailfc.gateways.listener import CyclingListener

HOPS_DIR_MODE = 0o700
# struct sockaddr_un's sun_path holds 108 bytes, the terminating NUL included.
MAX_SOCKET_PATH = 107


def hops_dir(config: Config) -> Path:
    """Config.hops_dir, made if missing: this user's, mode 0700."""
    directory = config.hops_dir
    try:
        # <state_dir>/private is root's alone too (mailfc.runtime.storage).
        directory.parent.mkdir(parents=True, exist_ok=True, mode=HOPS_DIR_MODE)
        directory.mkdir(exist_ok=True, mode=HOPS_DIR_MODE)
        status = directory.stat()
        if status.st_uid != os.geteuid():
            raise ConfigError(f"{directory} (the internal hops' sockets) belongs to uid "
                              f"{status.st_uid}, not to this service's user (uid "
                              f"{os.geteuid()}): chown it or remove it")
        if status.st_mode & 0o077:
            directory.chmod(HOPS_DIR_MODE)
    except OSError as error:
        raise ConfigError(f"cannot make {directory} for the internal hops' sockets: "
                          f"{error.strerror or error}: run as root or set paths.state_dir "
                          "to a directory this user owns") from None
    return directory


def socket_path(config: Config, name: str) -> Path:
    path = config.hops_dir / name
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise ConfigError(f"socket path {path} is longer than {MAX_SOCKET_PATH} bytes, "
                          "the most a unix socket allows: shorten paths.state_dir or the "
                          "socket's name")
    return path


def listener(config: Config, name: str, value: str,
             factory: Callable[[CyclingListener], asyncio.Protocol]) -> CyclingListener:
    """The listener of the hop `name` for the listen value `value` (see DESCRIPTION)."""
    where = listen_address(value, config.hops_dir)
    if isinstance(where, Path):
        hops_dir(config)
        return CyclingListener(name, "", 0, factory, path=socket_path(config, where.name),
                               admit=peers.root_or_own_user)
    host, port = where
    return CyclingListener(name, host, port, factory, tls=cluster.server_context(config))


@dataclass(frozen=True)
class HopAddress:
    """Where the next hop listens: its unix socket, or host:port with mutual TLS."""

    path: Path | None
    host: str = ""
    port: int = 0
    tls: ssl.SSLContext | None = None

    def __str__(self) -> str:
        return str(self.path) if self.path is not None else f"{self.host}:{self.port}"

    async def connect(self, connect_timeout: float) -> tuple[asyncio.StreamReader,
                                                             asyncio.StreamWriter]:
        if self.path is not None:
            return await asyncio.wait_for(asyncio.open_unix_connection(
                str(self.path), limit=netio.CHUNK * 4), connect_timeout)
        return await asyncio.wait_for(asyncio.open_connection(
            self.host, self.port, ssl=self.tls, server_hostname=self.host,
            ssl_handshake_timeout=connect_timeout, limit=netio.CHUNK * 4), connect_timeout)


def address(config: Config, value: str) -> HopAddress:
    """How to reach the hop that listens on `value` (a listen value, as its listener
    was given)."""
    where = listen_address(value, config.hops_dir)
    if isinstance(where, Path):
        return HopAddress(socket_path(config, where.name))
    host, port = connect_address(value)
    return HopAddress(None, host, port, cluster.client_context(config))
