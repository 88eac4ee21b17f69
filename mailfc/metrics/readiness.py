"""Readiness: a child tells the supervisor it is up; the supervisor tells systemd.

CHILD TO SUPERVISOR.  The supervisor starts each child with one end of a pipe
inherited as the file descriptor named by MAILFC_READY_FD.  Once every service
of the child listens, the child writes

    ready\\n

to it and closes it.  End of file without that line means the child did not get
up (it exited, or its start failed).  A process started by hand, without the
variable, writes nothing.

SUPERVISOR TO SYSTEMD.  Under systemd (Type=notify) $NOTIFY_SOCKET names a unix
datagram socket (a leading "@" is the abstract namespace); the supervisor sends
"READY=1" once all its children are ready, "RELOADING=1" / "READY=1" around a
reload, and "STOPPING=1" when it stops (sd_notify(3)).  Without the variable
nothing is sent.
"""

from __future__ import annotations

import contextlib
import os
import socket

READY_FD_ENV = "MAILFC_READY_FD"
READY_LINE = b"ready\n"


def tell_supervisor() -> None:
    """Write the ready line to the supervisor's pipe, once (no pipe: nothing)."""
    value = os.environ.pop(READY_FD_ENV, "")
    if not value.isdigit():
        return
    fd = int(value)
    with contextlib.suppress(OSError):
        os.write(fd, READY_LINE)
    with contextlib.suppress(OSError):
        os.close(fd)


def notify_systemd(state: str) -> bool:
    """sd_notify(`state`, e.g. "READY=1"); whether a notify socket was there."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError:
        return False
    return True
