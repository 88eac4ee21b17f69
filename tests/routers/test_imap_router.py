"""IMAP Router: real imaplib clients, through router and dispatcher, into each domain's Dovecot."""

from __future__ import annotations

import asyncio
import contextlib
import imaplib
import socket
import time
import uuid

import pytest

from mailfc.dispatcher.handed import HandedSessions
from tests.conftest import eventually
from tests.routers.conftest import IMAP_PORT, IMAPS_PORT, PASSWORD, RouterHost, client_tls
from tests.routers.test_lmtp_router import lmtp_transaction, message


def imap_starttls() -> imaplib.IMAP4:
    client = imaplib.IMAP4("127.0.0.1", IMAP_PORT, timeout=30)
    client.starttls(ssl_context=client_tls())
    return client


def read_mail(address: str, subject: str) -> dict[str, object]:
    client = imap_starttls()
    try:
        typ, data = client.login(address, PASSWORD)
        assert typ == "OK"
        capabilities = client.capabilities
        typ, _ = client.select("INBOX")
        assert typ == "OK"
        typ, found = client.search(None, "SUBJECT", f'"{subject}"')
        numbers = found[0].split()
        assert typ == "OK" and len(numbers) == 1
        typ, fetched = client.fetch(numbers[0], "(BODY.PEEK[HEADER.FIELDS (SUBJECT)] FLAGS)")
        assert typ == "OK"
        typ, _ = client.store(numbers[0], "+FLAGS", "(\\Flagged)")
        assert typ == "OK"
        typ, flags = client.fetch(numbers[0], "(FLAGS)")
        client.logout()
        return {"capabilities": capabilities, "fetched": fetched, "flags": flags,
                "login": data}
    finally:
        with contextlib.suppress(OSError):
            client.shutdown()


@pytest.fixture(scope="module")
async def mail_in_both_domains(router_host: RouterHost) -> str:
    subject = f"imap {uuid.uuid4()}"
    _, data = await asyncio.to_thread(lmtp_transaction, router_host,
                                      ["bob@a.example", "dave@b.example"], message(subject))
    assert [code for code, _ in data] == [250, 250]
    return subject


async def test_login_select_search_fetch_store_two_domains(
        router_host: RouterHost, mail_in_both_domains: str) -> None:
    for address in ("bob@a.example", "dave@b.example"):
        result = await asyncio.to_thread(read_mail, address, mail_in_both_domains)
        assert mail_in_both_domains.encode() in result["fetched"][0][1]  # type: ignore[index]
        assert b"\\Flagged" in result["flags"][0]  # type: ignore[index]
        # After login the client sees Dovecot's own capabilities, not the router's.
        assert b"Logged in" in result["login"][0]  # type: ignore[index]
        assert "STARTTLS" not in result["capabilities"]  # type: ignore[operator]


async def test_session_is_handed_to_dovecot(router_host: RouterHost) -> None:
    """The dispatcher passes the logged-in session to the domain's imap process:
    the LOGIN reply's capabilities are the ones Dovecot reports, the session is
    counted for the controller while open, and no dispatcher task carries it."""
    dispatcher = next(s for s in router_host.platform.services if s.name == "dispatcher")
    await sessions_ended(dispatcher)    # those of earlier tests
    client = await asyncio.to_thread(imap_starttls)
    typ, data = await asyncio.to_thread(client.login, "bob@a.example", PASSWORD)
    assert typ == "OK"
    advertised = data[0].split(b"[CAPABILITY ", 1)[1].split(b"]", 1)[0].split()
    typ, reported = await asyncio.to_thread(client.capability)
    assert typ == "OK" and reported[0].split() == advertised
    instance = next(i for i in await router_host.runtime.instances("a.example")
                    if i.state == "running")
    assert dispatcher.open_sessions[instance.name] == 1  # type: ignore[attr-defined]
    # The session goes on without the dispatcher.
    await eventually(lambda: not dispatcher._sessions)  # type: ignore[attr-defined]
    typ, _ = await asyncio.to_thread(client.select, "INBOX")
    assert typ == "OK"
    await asyncio.to_thread(client.logout)
    await sessions_ended(dispatcher)


async def test_dispatcher_restart_finds_sessions_handed_before(router_host: RouterHost
                                                               ) -> None:
    """A dispatcher that starts counts the sessions an earlier one handed over (from
    the imap processes of the containers), and they keep working."""
    dispatcher = next(s for s in router_host.platform.services if s.name == "dispatcher")
    await sessions_ended(dispatcher)
    client = await asyncio.to_thread(imap_starttls)
    await asyncio.to_thread(client.login, "bob@a.example", PASSWORD)
    try:
        before = dict(dispatcher.open_sessions)  # type: ignore[attr-defined]
        assert sum(before.values()) == 1
        # What a new dispatcher process starts with: nothing counted.
        dispatcher._handed = HandedSessions()  # type: ignore[attr-defined]
        dispatcher.open_sessions.clear()  # type: ignore[attr-defined]
        assert await dispatcher.recover_handed() == 1  # type: ignore[attr-defined]
        assert dict(dispatcher.open_sessions) == before  # type: ignore[attr-defined]
        typ, _ = await asyncio.to_thread(client.select, "INBOX")
        assert typ == "OK"
    finally:
        await asyncio.to_thread(client.logout)
    await sessions_ended(dispatcher)


async def sessions_ended(dispatcher: object) -> None:
    """Handed-over sessions stop counting within the dispatcher's sweep interval."""
    await eventually(lambda: not dispatcher.open_sessions)  # type: ignore[attr-defined]


async def test_implicit_tls_and_idle(router_host: RouterHost, mail_in_both_domains: str) -> None:
    def session() -> list[bytes]:
        raw = socket.create_connection(("127.0.0.1", IMAPS_PORT), timeout=30)
        tls = client_tls().wrap_socket(raw)
        reader = tls.makefile("rb")
        lines = [reader.readline()]
        tls.sendall(f'a1 LOGIN "bob@a.example" "{PASSWORD}"\r\n'.encode())
        while not (line := reader.readline()).startswith(b"a1 "):
            pass
        lines.append(line)
        tls.sendall(b"a2 SELECT INBOX\r\n")
        while not (line := reader.readline()).startswith(b"a2 "):
            pass
        tls.sendall(b"a3 IDLE\r\n")
        lines.append(reader.readline())
        tls.sendall(b"DONE\r\n")
        while not (line := reader.readline()).startswith(b"a3 "):
            pass
        lines.append(line)
        tls.sendall(b"a4 LOGOUT\r\n")
        tls.close()
        return lines

    greeting, login, idling, idle_done = await asyncio.to_thread(session)
    assert greeting.startswith(b"* OK") and b"AUTH=PLAIN" in greeting
    assert login.startswith(b"a1 OK")
    assert idling.startswith(b"+ ")
    assert idle_done.startswith(b"a3 OK")


async def test_authenticate_plain_sasl_ir(router_host: RouterHost) -> None:
    def session() -> str:
        client = imap_starttls()
        typ, _ = client.authenticate(
            "PLAIN", lambda _: f"\0dave@b.example\0{PASSWORD}".encode())
        client.logout()
        return typ

    assert await asyncio.to_thread(session) == "OK"


async def test_wrong_password_unknown_user_and_suspended(router_host: RouterHost) -> None:
    def attempt(user: str, password: str) -> tuple[str, float]:
        client = imap_starttls()
        started = time.monotonic()
        try:
            client.login(user, password)
        except imaplib.IMAP4.error as error:
            return str(error), time.monotonic() - started
        finally:
            client.shutdown()
        return "OK", 0.0

    await router_host.pool.execute(
        "UPDATE accounts SET state = 'suspended' WHERE localpart = 'carol'")
    try:
        for user, password in (("bob@a.example", "wrong"), ("nobody@a.example", PASSWORD),
                               ("not-an-address", PASSWORD), ("carol@a.example", PASSWORD)):
            error, elapsed = await asyncio.to_thread(attempt, user, password)
            assert "AUTHENTICATIONFAILED" in error, user
            assert elapsed >= router_host.config.imap_router.auth_failure_delay_s
    finally:
        await router_host.pool.execute(
            "UPDATE accounts SET state = 'active' WHERE localpart = 'carol'")
    # Attempts are recorded in batches (the session recorder's flush interval).
    wanted = {"wrong password", "unknown user", "suspended"}
    deadline = time.monotonic() + 5
    while True:
        rows = await router_host.pool.fetch(
            "SELECT username, success, reason FROM auth_attempts WHERE NOT success")
        if wanted <= {row["reason"] for row in rows} or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    assert wanted <= {row["reason"] for row in rows}


async def test_plaintext_login_refused_before_tls(router_host: RouterHost) -> None:
    def session() -> tuple[bytes, str]:
        client = imaplib.IMAP4("127.0.0.1", IMAP_PORT, timeout=30)
        greeting = client.welcome
        try:
            client.login("bob@a.example", PASSWORD)
        except imaplib.IMAP4.error as error:
            return greeting, str(error)
        finally:
            client.shutdown()
        return greeting, "OK"

    greeting, error = await asyncio.to_thread(session)
    assert b"LOGINDISABLED" in greeting and b"STARTTLS" in greeting
    assert "PRIVACYREQUIRED" in error


def raw_session(commands: list[bytes], *, tls: bool = True) -> list[bytes]:
    raw = socket.create_connection(("127.0.0.1", IMAPS_PORT if tls else IMAP_PORT), timeout=30)
    sock: socket.socket = client_tls().wrap_socket(raw) if tls else raw
    reader = sock.makefile("rb")
    replies = [reader.readline()]
    for command in commands:
        sock.sendall(command)
        replies.append(reader.readline())
    sock.close()
    return replies


async def test_bad_input_before_login(router_host: RouterHost) -> None:
    replies = await asyncio.to_thread(raw_session, [
        b"a1 SELECT INBOX\r\n", b"a2 FROBNICATE\r\n", b"\r\n", b"a3 LOGIN onlyone\r\n",
        b"a4 NOOP\r\n", b"a5 LOGIN {99999999}\r\n",
    ])
    assert replies[1].startswith(b"a1 NO Log in first")
    assert replies[2].startswith(b"a2 BAD")
    assert replies[3].startswith(b"* BAD")
    assert replies[4].startswith(b"a3 BAD")
    assert replies[5].startswith(b"a4 OK")
    assert replies[6].startswith(b"* BAD") and b"literal" in replies[6]


async def test_literal_login_and_client_vanishing(router_host: RouterHost) -> None:
    def session() -> list[bytes]:
        raw = socket.create_connection(("127.0.0.1", IMAPS_PORT), timeout=30)
        sock = client_tls().wrap_socket(raw)
        reader = sock.makefile("rb")
        lines = [reader.readline()]
        sock.sendall(b"a1 LOGIN {13}\r\n")
        lines.append(reader.readline())
        sock.sendall(b"bob@a.example {%d+}\r\n%s\r\n" % (len(PASSWORD), PASSWORD.encode()))
        lines.append(reader.readline())
        # Vanish in the middle of a command.
        sock.sendall(b"a2 SELECT IN")
        sock.close()
        return lines

    lines = await asyncio.to_thread(session)
    assert lines[1].startswith(b"+ ")
    assert lines[2].startswith(b"a1 OK")
    # The router is still serving.
    replies = await asyncio.to_thread(raw_session, [b"a1 NOOP\r\n"])
    assert replies[1].startswith(b"a1 OK")
    # Every session above has ended: no task or backend connection is left.
    router = next(s for s in router_host.platform.services if s.name == "imap-router")
    dispatcher = next(s for s in router_host.platform.services if s.name == "dispatcher")
    await eventually(lambda: not router._sessions)  # type: ignore[attr-defined]
    await sessions_ended(dispatcher)


async def test_backend_dying_mid_session_says_bye(router_host: RouterHost) -> None:
    client = await asyncio.to_thread(imap_starttls)
    await asyncio.to_thread(client.login, "carol@a.example", PASSWORD)
    await asyncio.to_thread(client.select, "INBOX")
    await router_host.stop_containers("a.example")

    def next_reply() -> bytes:
        client.sock.settimeout(30)
        client.send(b"a9 NOOP\r\n")
        data = b""
        while b"BYE" not in data:
            chunk = client.sock.recv(4096)
            if not chunk:
                break
            data += chunk
        return data

    data = await asyncio.to_thread(next_reply)
    assert b"* BYE" in data
    await asyncio.to_thread(client.shutdown)


async def test_unstartable_container_is_unavailable(router_host: RouterHost) -> None:
    def session() -> str:
        client = imap_starttls()
        try:
            client.login("erin@broken.example", PASSWORD)
        except imaplib.IMAP4.error as error:
            return str(error)
        finally:
            client.shutdown()
        return "OK"

    started = time.monotonic()
    error = await asyncio.to_thread(session)
    assert "UNAVAILABLE" in error
    assert time.monotonic() - started < router_host.config.runtime.start_timeout_s + 10


async def test_dispatcher_refuses_strangers_and_garbage(router_host: RouterHost) -> None:
    def garbage(sock: socket.socket) -> bytes:
        with sock:
            sock.settimeout(30)
            sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
            try:
                return sock.recv(1024)
            except ConnectionResetError:
                return b""

    # TCP is for routers of other hosts, with a cluster certificate in TLS: a
    # stranger's bytes end the connection without a word in clear.
    answer = await asyncio.to_thread(
        garbage, socket.create_connection(("127.0.0.1", 12143), timeout=30))
    assert answer[:1] in (b"", b"\x15"), answer
    # On the unix socket, past the peer check (root), garbage is not a PROXY header.
    local = socket.socket(socket.AF_UNIX)
    local.connect(str(router_host.config.dispatcher_socket("imap")))
    assert (await asyncio.to_thread(garbage, local)).startswith(b"* BYE")

