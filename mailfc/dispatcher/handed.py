"""IMAP sessions the dispatcher handed to Dovecot, counted until their socket closes.

After a hand-over the session's socket belongs to an imap process in the
container; the dispatcher keeps no copy (a copy would keep the connection open
after Dovecot closed it).  What it keeps is the socket's inode: while the
kernel's TCP table (/proc/self/net/tcp{,6}) still lists that inode, the
session is open.  `sweep()` reads the table and returns the containers of the
sessions that ended since the last sweep.
"""

from __future__ import annotations

TCP_TABLES = ("/proc/self/net/tcp", "/proc/self/net/tcp6")
INODE_COLUMN = 9


def open_tcp_inodes() -> set[int]:
    """Inodes of this network namespace's TCP sockets that are not yet closed."""
    inodes: set[int] = set()
    for table in TCP_TABLES:
        try:
            with open(table, "rb") as rows:
                next(rows, None)  # header
                for row in rows:
                    fields = row.split()
                    if len(fields) > INODE_COLUMN:
                        inodes.add(int(fields[INODE_COLUMN]))
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
        alive = open_tcp_inodes()
        ended = [inode for inode in self._containers if inode not in alive]
        return [self._containers.pop(inode) for inode in ended]
