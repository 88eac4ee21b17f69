"""IMAP sessions the dispatcher handed to Dovecot, counted until their socket closes.

After a hand-over the session's socket belongs to an imap process in the
container; the dispatcher keeps no copy (a copy would keep the connection open
after Dovecot closed it).  What it keeps is the socket's inode: while the
kernel's socket tables (/proc/self/net/tcp{,6} for routers elsewhere,
/proc/self/net/unix for routers on this host) still list that inode, the
session is open.  `sweep()` reads the table and returns the containers of the
sessions that ended since the last sweep.
"""

from __future__ import annotations

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


class HandedSessions:
    def __init__(self) -> None:
        self._containers: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self._containers)

    def add(self, inode: int, container: str) -> None:
        self._containers[inode] = container

    def containers(self) -> set[str]:
        return set(self._containers.values())

    def sweep(self) -> list[str]:
        """One container name per session that ended since the last sweep."""
        if not self._containers:
            return []
        alive = open_socket_inodes()
        ended = [inode for inode in self._containers if inode not in alive]
        return [self._containers.pop(inode) for inode in ended]
