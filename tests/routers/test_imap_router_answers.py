"""The IMAP Router always answers: a long pre-login ID, too much input, a Dovecot that
ends the session at login (over its imap_sessions limit).  Raw sockets."""

from __future__ import annotations

import asyncio
import socket
from types import SimpleNamespace

from mailfc.config import Config
from mailfc.db.directory import Account
from mailfc.routers.imap import MAX_COMMAND, Backend, ImapSession
from tests.routers.conftest import IMAP_PORT, RouterHost


def _id_command(tag: bytes, fields: int, size: int) -> bytes:
    pairs = b" ".join(b'"field%d" "%s"' % (n, b"v" * size) for n in range(fields))
    return tag + b' ID ("name" "test client" ' + pairs + b")\r\n"


def _session(commands: list[bytes]) -> list[bytes]:
    """Send each command, read a line after it; then every line until the server
    closes (a reset raises)."""
    with socket.create_connection(("127.0.0.1", IMAP_PORT), timeout=30) as sock:
        reader = sock.makefile("rb")
        lines = [reader.readline()]
        for command in commands:
            sock.sendall(command)
            lines.append(reader.readline())
        return lines


async def test_a_long_id_before_login_is_answered(router_host: RouterHost) -> None:
    # RFC 2971's most: 30 fields of 1024 bytes (about 32 KB in all).
    command = _id_command(b"a1", 29, 1024)
    assert 30_000 < len(command) < MAX_COMMAND

    def talk() -> list[bytes]:
        with socket.create_connection(("127.0.0.1", IMAP_PORT), timeout=30) as sock:
            reader = sock.makefile("rb")
            lines = [reader.readline()]
            sock.sendall(command)
            lines += [reader.readline(), reader.readline()]
            sock.sendall(b"a2 NOOP\r\n")
            lines.append(reader.readline())
            return lines

    lines = await asyncio.to_thread(talk)
    assert lines[1].startswith(b"* ID (")
    assert lines[2].startswith(b"a1 OK")
    assert lines[3].startswith(b"a2 OK")        # and the session goes on


async def test_an_id_beyond_the_bound_gets_bad_and_bye_not_a_reset(
        router_host: RouterHost) -> None:
    command = _id_command(b"a1", 100, 1000)      # about 100 KB
    assert len(command) > MAX_COMMAND

    def talk() -> list[bytes]:
        with socket.create_connection(("127.0.0.1", IMAP_PORT), timeout=30) as sock:
            reader = sock.makefile("rb")
            lines = [reader.readline()]
            sock.sendall(command)
            sock.sendall(b"a2 NOOP\r\n" * 100)   # still sending when refused
            while line := reader.readline():      # a reset would raise here
                lines.append(line)
            return lines

    lines = await asyncio.to_thread(talk)
    assert lines[1].startswith(b"* BAD") and b"too long" in lines[1]
    assert lines[2].startswith(b"* BYE")
    assert len(lines) == 3


async def test_a_bye_from_dovecot_at_login_is_the_one_answer_and_closes(
        mailfc_config: Config) -> None:
    """Dovecot refuses the session (`* BYE [LIMIT]`, imap_sessions) on a relayed
    login: the client gets that BYE, no NO after it, and the connection closes."""
    router = SimpleNamespace(config=mailfc_config)
    outcome: list[object] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        session = ImapSession(router, reader, writer, implicit_tls=False)  # type: ignore[arg-type]
        dispatcher_end, router_end = socket.socketpair()
        backend_reader, backend_writer = await asyncio.open_unix_connection(sock=router_end)
        dovecot_reader, dovecot_writer = await asyncio.open_unix_connection(
            sock=dispatcher_end)

        async def dovecot() -> None:
            assert (await dovecot_reader.readline()).startswith(b"a1 LOGIN ")
            dovecot_writer.write(b"* BYE [LIMIT] account bob@k.example reached its limit of"
                                 b" 1 imap_sessions\r\n")
            dovecot_writer.close()

        refusing = asyncio.create_task(dovecot())
        account = Account("bob@k.example", "bob", "k.example", "", True)
        outcome.append(await session.backend_login(
            "a1", account, Backend(backend_reader, backend_writer, 0.0)))
        await refusing
        writer.close()      # as the listener does when the session ends

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]

    def client() -> list[bytes]:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            reader = sock.makefile("rb")
            return list(iter(reader.readline, b""))

    try:
        lines = await asyncio.to_thread(client)
    finally:
        server.close()
        await server.wait_closed()
    assert outcome == [False]
    assert lines == [b"* BYE [LIMIT] account bob@k.example reached its limit of 1"
                     b" imap_sessions\r\n"]
