"""Two of Dovecot's own local protocols, for handing an IMAP session to it.

Both are line based, tab separated, over a unix socket in Dovecot's base_dir,
and both start with a VERSION line from each side.  A field that contains a
tab, CR, LF, NUL or \\x01 is escaped with \\x01 (Dovecot's str_tabescape).

auth-userdb (Dovecot's auth-master protocol)
    -> VERSION 1 0
    -> USER <id> <user> service=imap
    <- USER <id> <user> uid=... gid=... home=...     found
    <- NOTFOUND <id>  |  FAIL <id> reason=...        not found, failed

imap-master (what imap-hibernate uses to give a session back to imap)
    -> VERSION imap-master 1 0
    -> <user> lip=.. rip=.. userdb_fields=.. client_input=<b64> client_output=<b64>
       with the client's connected socket attached (SCM_RIGHTS)
    <- +            the imap process owns the session now
    <- -<error>     it does not; the socket is still ours to answer on

    imap writes client_output to the client, then runs client_input and what
    the client sends next as commands of a logged-in session.  userdb_fields
    are used as they are (no userdb lookup), so they come from auth-userdb.

Both sockets are root-only files inside the container; only the host's root
(the dispatcher) reaches them, through /proc/<pid>/root.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from mailfc.errors import MailfcError

REPLY_TIMEOUT_S = 10.0
MAX_REPLY = 65536
# The request line carries the pending client input; more than this is not an
# IMAP client that waited for its LOGIN reply.
MAX_CLIENT_INPUT = 65536

_ESCAPES = {"\x01": "\x011", "\t": "\x01t", "\r": "\x01r", "\n": "\x01n", "\0": "\x010"}


class DovecotProtocolError(MailfcError):
    """Dovecot refused or did not answer; the message says which and why."""


def tabescape(value: str) -> str:
    return "".join(_ESCAPES.get(char, char) for char in value)


@dataclass(frozen=True)
class UserdbEntry:
    user: str
    # Still escaped, as they came: they go back to Dovecot unchanged.
    fields: tuple[str, ...]


async def lookup_user(socket_path: str, user: str, service: str = "imap") -> UserdbEntry | None:
    """The userdb entry of `user` from the auth-userdb socket; None when there is none."""
    request = f"VERSION\t1\t0\nUSER\t1\t{tabescape(user)}\tservice={service}\n"
    async with _connected(socket_path) as conn:
        await asyncio.get_running_loop().sock_sendall(conn, request.encode())
        # Skips VERSION and SPID.
        line = await _reply(conn, lambda line: line.startswith(("USER\t1\t", "NOTFOUND\t1",
                                                                "FAIL\t1")))
    kind, _, rest = line.partition("\t")
    rest = rest.partition("\t")[2]
    if kind == "NOTFOUND":
        return None
    if kind == "FAIL":
        raise DovecotProtocolError(f"Dovecot's userdb lookup of {user} failed: {rest}")
    name, *fields = rest.split("\t")
    return UserdbEntry(name, tuple(fields))


async def hand_over_imap(socket_path: str, client_fd: int, entry: UserdbEntry, *,
                         client_ip: str, local_ip: str, client_input: bytes = b"",
                         client_output: bytes = b"") -> None:
    """Give the logged-in IMAP session on socket `client_fd` to an imap process.

    Our copy of the socket stays open; the caller closes it (without shutdown)
    once this returns, and then owns nothing of the session.
    """
    if len(client_input) > MAX_CLIENT_INPUT:
        raise DovecotProtocolError(f"{len(client_input)} bytes of client input before the "
                                   "login reply")
    fields = [
        tabescape(entry.user), f"lip={local_ip}", f"rip={client_ip}",
        "userdb_fields=" + tabescape("\t".join(entry.fields)),
        "client_input=" + base64.b64encode(client_input).decode(),
        "client_output=" + base64.b64encode(client_output).decode(),
    ]
    request = ("VERSION\timap-master\t1\t0\n" + "\t".join(fields) + "\n").encode()
    async with _connected(socket_path) as conn:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * MAX_CLIENT_INPUT)
        # One sendmsg on a fresh socket with room for all of it: it cannot block.
        sent = socket.send_fds(conn, [request], [client_fd])
        if sent != len(request):
            raise DovecotProtocolError(f"imap-master took {sent} of {len(request)} bytes")
        line = await _reply(conn, lambda line: not line.startswith("VERSION\t"))
    if line != "+":
        raise DovecotProtocolError(f"imap-master refused the session: {line.lstrip('-')}")


async def handed_over_pair(auth_userdb: str, imap_master: str, user: str, *,
                           greeting: bytes, client_ip: str = "192.0.2.1",
                           local_ip: str = "192.0.2.2", over_tcp: bool = False
                           ) -> socket.socket:
    """Our end of a socket pair whose other end an imap process now serves as
    `user`'s logged-in session, which starts by sending `greeting`.  For clients
    on the host that talk to a domain's Dovecot without a router in front
    (benchmarks, tests): Dovecot takes no password login from anyone.
    With `over_tcp` the pair is a loopback TCP connection, as a real client's
    session is once a router has handed it over (a unix pair is cheaper per
    round trip than any client's connection could be)."""
    entry = await lookup_user(auth_userdb, user)
    if entry is None:
        raise DovecotProtocolError(f"Dovecot at {auth_userdb} does not know {user}")
    ours, theirs = _tcp_pair() if over_tcp else socket.socketpair()
    try:
        await hand_over_imap(imap_master, theirs.fileno(), entry, client_ip=client_ip,
                             local_ip=local_ip, client_output=greeting)
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    return ours


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        ours = socket.create_connection(listener.getsockname())
        theirs, _ = listener.accept()
    return ours, theirs


@contextlib.asynccontextmanager
async def _connected(path: str) -> AsyncIterator[socket.socket]:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.setblocking(False)
    try:
        try:
            await asyncio.wait_for(asyncio.get_running_loop().sock_connect(conn, path),
                                   REPLY_TIMEOUT_S)
        except (OSError, TimeoutError) as error:
            raise DovecotProtocolError(f"cannot reach Dovecot at {path}: {error}") from None
        yield conn
    finally:
        conn.close()


async def _reply(conn: socket.socket, wanted: Callable[[str], bool]) -> str:
    """The first line Dovecot sends that is `wanted`."""
    loop = asyncio.get_running_loop()
    buffer = b""
    while True:
        while b"\n" in buffer:
            raw, _, buffer = buffer.partition(b"\n")
            line = raw.decode("utf-8", "replace")
            if wanted(line):
                return line
        if len(buffer) > MAX_REPLY:
            raise DovecotProtocolError("Dovecot's reply line is too long")
        try:
            chunk = await asyncio.wait_for(loop.sock_recv(conn, 4096), REPLY_TIMEOUT_S)
        except TimeoutError:
            raise DovecotProtocolError(f"Dovecot did not answer in {REPLY_TIMEOUT_S:g} s") \
                from None
        if not chunk:
            raise DovecotProtocolError("Dovecot closed the connection without a reply")
        buffer += chunk
