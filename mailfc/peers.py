"""Who is at the other end of a unix socket: the kernel's word, never the peer's.

NAME
    mailfc.peers - identify the peer of an accepted connection on a shared socket

SUMMARY
    peers = Peers(pool)                      # one per service; caches container domains
    peer = await peers.identify(writer)      # writer: asyncio.StreamWriter of the connection
    peer.kind      "container" | "host" | "unknown" | "remote"
    peer.domain    the domain of the peer's container (kind "container")
    peer.host_root a host process running as root (kind "host", uid 0)
    peer.why       why the peer is "unknown" (for the refusal's log line)

DESCRIPTION
    The resident services (milter, hook server) listen on unix sockets in the directory
    every domain container sees at /run/mailfc.  Root inside one container can connect
    there and name any domain in what it sends, so a service learns who connects from
    credentials the kernel keeps for the connection:

    1. SO_PEERCRED: pid, uid and gid of the process that connected.
    2. SO_PEERPIDFD (Linux 6.5): a pidfd of that very process.  After /proc has been
       read, the process is asked to be still alive through it: a live process still
       owns its pid, so what /proc said was about the peer and not about a process
       that got the pid after the peer exited.  Older kernels: the short window between
       accept and the /proc reads is left open (the pid would have to be reused there).
    3. /proc/<pid>/cgroup: the runtime runs container <prefix>-<token> in the cgroup
       /<prefix>/<prefix>-<token> of every hierarchy (RuntimeSettings.cgroup_parent,
       Runtime.cgroup_path; the tokens are hex).  A process below such a path is that
       container's.  A container cannot leave its cgroup: it has neither
       CAP_SYS_ADMIN nor a cgroup file system.  Any prefix is recognised, so a service
       need not know the runtime's name_prefix (tests run several at once).
    4. The container's domain: container_instances by name in the CMDB, cached per
       name (a container never changes domain; a name is never used twice).
    5. Not in a container: a "host" process when it shares this process's pid
       namespace, else "unknown" (a container this host's runtime did not make, or
       one whose cgroup layout this module does not know: refused, never trusted).

    A peer that exited before it was looked at, lookups that fail (the CMDB does not
    answer within timeout_s, /proc unreadable) and container names the CMDB does not
    know all give "unknown": the caller refuses.  A TCP connection carries no
    credential and gives "remote": the caller decides what an address may do.

    The /proc reads (a few microseconds, procfs never waits on a disk) run on the
    loop: a thread would queue behind whatever else fills the loop's default
    pool.  A connection is identified once, when accepted.

SECURITY
    Reading another process's namespaces needs root (the services run as root).  In a
    container without a user namespace, root there is uid 0 here too: "host_root" is
    the cgroup and namespace test plus uid 0, never the uid alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import re
import signal
import socket
import struct
from dataclasses import dataclass
from typing import Any, Protocol

import asyncpg

CONTAINER = "container"
HOST = "host"
UNKNOWN = "unknown"
REMOTE = "remote"

# Python 3.11's socket module does not name it yet; the generic Linux value.
SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)
_UCRED = struct.Struct("3i")    # struct ucred: pid, uid, gid
# RuntimeSettings: name_prefix is 1-12 letters or digits; tokens are secrets.token_hex().
_PREFIX = re.compile(r"[^\W_]{1,12}")
_TOKEN = re.compile(r"[0-9a-f]+")
_DELETED = " (deleted)"
MAX_CACHED = 10_000   # cgroup v2: the peer's cgroup was removed meanwhile

DOMAIN_OF_CONTAINER = """
    SELECT d.name FROM container_instances i JOIN domains d ON d.id = i.domain_id
     WHERE i.name = $1"""


@dataclass(frozen=True)
class Peer:
    kind: str
    pid: int = 0
    uid: int = -1
    gid: int = -1
    container: str | None = None
    domain: str | None = None
    why: str = ""

    @property
    def host_root(self) -> bool:
        return self.kind == HOST and self.uid == 0

    def __str__(self) -> str:
        if self.kind == CONTAINER:
            return f"container {self.container} ({self.domain}), pid {self.pid}"
        if self.kind == HOST:
            return f"host process pid {self.pid} uid {self.uid}"
        if self.kind == REMOTE:
            return "a TCP peer"
        return f"unidentified peer pid {self.pid} uid {self.uid}: {self.why}"


class CgroupsDisagree(ValueError):
    """The hierarchies of one process name different containers."""


def container_in(cgroup_text: str) -> str | None:
    """The mailfc container named by the text of /proc/<pid>/cgroup, None for none.

    Lines are `hierarchy:controllers:path` (v1, one per hierarchy; hybrid adds the
    `0::path` of the unified one; pure v2 has only that).  Raises CgroupsDisagree
    when two lines name different containers.
    """
    found: set[str] = set()
    for line in cgroup_text.splitlines():
        _hierarchy, _, rest = line.partition(":")
        _controllers, _, path = rest.partition(":")
        name = container_of_path(path.removesuffix(_DELETED))
        if name is not None:
            found.add(name)
    if len(found) > 1:
        raise CgroupsDisagree(f"cgroups of several containers: {', '.join(sorted(found))}")
    return found.pop() if found else None


def container_of_path(path: str) -> str | None:
    """`<prefix>-<token>` when the cgroup path has /<prefix>/<prefix>-<token> in it.

    Matched anywhere in the path, not only at its start: a path relative to a cgroup
    namespace (/../..) or a cgroup below the container's still names the container.
    """
    parts = path.split("/")
    for parent, child in itertools.pairwise(parts):
        prefix, dash, token = child.partition("-")
        if (dash and prefix == parent and _PREFIX.fullmatch(prefix)
                and _TOKEN.fullmatch(token)):
            return child
    return None


@dataclass(frozen=True)
class _Seen:
    container: str | None
    own_pid_namespace: bool


def _inspect(pid: int, pidfd: int | None) -> _Seen:
    """Read the peer's cgroup and pid namespace; owns (and closes) pidfd.

    Raises ProcessLookupError (or FileNotFoundError) when the peer is gone.
    """
    try:
        with open(f"/proc/{pid}/cgroup") as handle:
            container = container_in(handle.read())
        own = os.readlink(f"/proc/{pid}/ns/pid") == os.readlink("/proc/self/ns/pid")
        if pidfd is not None:
            # ProcessLookupError: gone.  PermissionError: alive, only not ours to signal.
            with contextlib.suppress(PermissionError):
                signal.pidfd_send_signal(pidfd, 0)
        return _Seen(container, own)
    finally:
        if pidfd is not None:
            os.close(pidfd)


def credentials(sock: socket.socket) -> tuple[int, int, int]:
    """SO_PEERCRED of a connected unix socket: (pid, uid, gid) of the peer at connect()."""
    return _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))


def _pidfd(sock: socket.socket) -> int | None:
    try:
        return int(sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD))
    except OSError:
        return None     # ENOPROTOOPT before Linux 6.5; ESRCH: the peer is gone (seen later)


class Peers:
    """Identifies peers of accepted unix connections (see the module's manual)."""

    def __init__(self, pool: asyncpg.Pool, *, timeout_s: float = 2.0) -> None:
        self.pool = pool
        self.timeout_s = timeout_s
        self._domains: dict[str, str] = {}

    async def identify(self, connection: Connection) -> Peer:
        sock = connection.get_extra_info("socket")
        if sock is None or sock.family != socket.AF_UNIX:
            return Peer(REMOTE)
        try:
            pid, uid, gid = credentials(sock)
        except OSError as error:
            return Peer(UNKNOWN, why=f"no peer credentials: {error}")
        if pid <= 0:
            return Peer(UNKNOWN, pid, uid, gid, why="the peer's process is not visible here")
        # Taken on the loop's thread, where the socket cannot be closed under us.
        pidfd = _pidfd(sock)
        try:
            seen = _inspect(pid, pidfd)
        except (ProcessLookupError, FileNotFoundError):
            return Peer(UNKNOWN, pid, uid, gid, why="the peer's process exited")
        except (OSError, CgroupsDisagree) as error:
            return Peer(UNKNOWN, pid, uid, gid, why=str(error))
        if seen.container is None:
            if seen.own_pid_namespace:
                return Peer(HOST, pid, uid, gid)
            return Peer(UNKNOWN, pid, uid, gid,
                        why="in another pid namespace but not in a mailfc container")
        try:
            domain = await self.domain_of(seen.container)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
            return Peer(UNKNOWN, pid, uid, gid, seen.container,
                        why=f"the CMDB did not say the domain of {seen.container}:"
                            f" {error or type(error).__name__}")
        if domain is None:
            return Peer(UNKNOWN, pid, uid, gid, seen.container,
                        why=f"container {seen.container} is not in the CMDB")
        return Peer(CONTAINER, pid, uid, gid, seen.container, domain)

    async def domain_of(self, container: str) -> str | None:
        """The domain of a container by name (CMDB, cached); None when unknown."""
        domain = self._domains.get(container)
        if domain is None:
            async with asyncio.timeout(self.timeout_s):
                domain = await self.pool.fetchval(DOMAIN_OF_CONTAINER, container)
            if domain is not None:
                if len(self._domains) >= MAX_CACHED:
                    self._domains.clear()   # names of containers long gone, mostly
                self._domains[container] = domain
        return domain


class Connection(Protocol):
    """An accepted connection: a transport or a stream writer."""

    def get_extra_info(self, name: str, default: Any = None) -> Any: ...


def root_or_own_user(connection: Connection) -> str | None:
    """The rule of the sockets only mailfc's own processes may use (the dispatcher's,
    the internal hops'): None for root and for this process's own user, else why the
    peer is refused."""
    sock = connection.get_extra_info("socket")
    try:
        if sock is None:
            raise OSError("no socket under this connection")
        pid, uid, _ = credentials(sock)
    except OSError as error:
        return f"no peer credentials: {error}"
    own = os.geteuid()
    if uid in (0, own):
        return None
    return f"process {pid} runs as uid {uid}; only root or uid {own} (this service's) may connect"

