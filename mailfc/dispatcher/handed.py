"""IMAP sessions the dispatcher handed to Dovecot, counted until their socket closes.

After a hand-over the session's socket belongs to an imap process in the
container; the dispatcher keeps no copy (a copy would keep the connection open
after Dovecot closed it).  What it keeps is the socket's inode: while the
kernel's socket tables (/proc/self/net/tcp{,6} for routers elsewhere,
/proc/self/net/unix for routers on this host) still list that inode, the
session is open.  `sweep(open_socket_inodes())` returns the containers of the
sessions that ended since the last sweep.

A dispatcher that starts finds the sessions an earlier one handed over
(`held_by_imap`): an imap process of the container (a child of its Dovecot
master) holding a socket of this host's network namespace holds a handed
session, since the container's own sockets live in the container's namespace.
"""

from __future__ import annotations

import os
from pathlib import Path

# (table, column of the inode)
SOCKET_TABLES = (("/proc/self/net/tcp", 9), ("/proc/self/net/tcp6", 9),
                 ("/proc/self/net/unix", 6))


def open_socket_inodes() -> set[int]:
    """Inodes of this network namespace's TCP and unix sockets not yet closed."""
    inodes: set[int] = set()
    for table, column in SOCKET_TABLES:
        try:
            with open(table, "rb") as rows:
                next(rows, None)  # header
                for row in rows:
                    fields = row.split()
                    if len(fields) > column:
                        inodes.add(int(fields[column]))
        except FileNotFoundError:
            continue    # no IPv6 in this kernel
    inodes.discard(0)   # TIME_WAIT and friends: already closed by both owners
    return inodes


def held_by_imap(master_pid: int, host_sockets: set[int]) -> list[int]:
    """Inodes of the sockets in `host_sockets` that the imap processes under the
    Dovecot master `master_pid` hold."""
    held: list[int] = []
    try:
        children = Path(f"/proc/{master_pid}/task/{master_pid}/children").read_text().split()
    except OSError:
        return held     # the container stopped meanwhile
    for child in children:
        try:
            if not Path(f"/proc/{child}/comm").read_text().startswith("imap"):
                continue
            links = [os.readlink(fd) for fd in Path(f"/proc/{child}/fd").iterdir()]
        except OSError:
            continue    # ended meanwhile
        held += [inode for link in links if link.startswith("socket:[")
                 and (inode := int(link[8:-1])) in host_sockets]
    return held


class HandedSessions:
    def __init__(self) -> None:
        self._containers: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self._containers)

    def __contains__(self, inode: int) -> bool:
        return inode in self._containers

    def add(self, inode: int, container: str) -> None:
        self._containers[inode] = container

    def sweep(self, alive: set[int]) -> list[str]:
        """One container name per session whose socket is no longer among `alive`."""
        ended = [inode for inode in self._containers if inode not in alive]
        return [self._containers.pop(inode) for inode in ended]
