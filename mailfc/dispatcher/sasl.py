"""The per-domain Postfix's SASL door, kept locked.

Postfix counts an XCLIENT `LOGIN=` as an authenticated session (and so lets
permit_sasl_authenticated relay it) only when SASL is enabled, and with SASL
enabled every smtpd needs a SASL server that offers at least one mechanism,
or it exits.  The real authentication happens at the SMTP Router against the
CMDB; this server, on a unix socket in the socket directory mounted into
every container (<state_dir>/sockets/auth.sock, /run/mailfc/auth.sock
inside), speaks the server side of Dovecot's auth protocol just far enough:
it offers PLAIN and refuses every AUTH.  So nobody can authenticate at a
domain's Postfix itself, yet the users the Router vouches for with XCLIENT
may send.

PROTOCOL (Dovecot auth, version 1.2, tab separated)
    client: VERSION 1 x / CPID pid
    server: VERSION 1 2 / MECH PLAIN plaintext / SPID 1 / CUID 1 /
            COOKIE hex / DONE
    client: AUTH id mech ...      server: FAIL id reason=...

SECURITY
    Every domain's container reaches this socket, so nothing it answers may tell
    one tenant about the host or another: SPID and CUID are constants (a real
    process id, or a count of connections, would show the host's pids and how
    many smtpd processes every domain starts; Postfix reads neither), the
    cookie is random per connection, and every AUTH gets the same FAIL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
from pathlib import Path

from mailfc.runtime.images import SASL_SOCKET

log = logging.getLogger("mailfc.dispatcher.sasl")

MAX_LINE = 8192


class LockedSaslServer:
    def __init__(self, socket_dir: Path) -> None:
        self.path = socket_dir / SASL_SOCKET
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self._server = await asyncio.start_unix_server(self._serve, str(self.path))
        # Postfix's smtpd runs as the postfix user inside the container.
        os.chmod(self.path, 0o666)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(("VERSION\t1\t2\nMECH\tPLAIN\tplaintext\nSPID\t1\nCUID\t1\n"
                          f"COOKIE\t{secrets.token_hex(16)}\nDONE\n").encode())
            while line := await reader.readline():
                if len(line) > MAX_LINE:
                    break
                fields = line.decode("utf-8", "replace").rstrip("\n").split("\t")
                if fields[0] == "AUTH" and len(fields) > 1:
                    writer.write(f"FAIL\t{fields[1]}\treason=authenticate at the submission"
                                 " port of the platform\n".encode())
                    await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
