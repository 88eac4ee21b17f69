"""The plugin in a real per-domain Dovecot, with imaplib through the IMAP Router."""

from __future__ import annotations

import asyncio
import imaplib
import socket
import time

import asyncpg
import pytest

from mailfc.fairness import Bucket
from mailfc.policy.hooks.server import HookService
from tests.conftest import eventually
from tests.hooks.conftest import (
    IMAP_PORT,
    PASSWORD,
    HooksHost,
    imap_close,
    imap_login,
    set_limit,
)
from tests.routers.test_imap_router import sessions_ended

MESSAGE = b"From: a@example.org\r\nSubject: hooks test\r\n\r\nHello.\r\n"


def session_commands(address: str, commands: int = 3) -> list[tuple[str, bytes]]:
    client = imap_login(address)
    try:
        results = [("SELECT", client.select("INBOX")[0].encode())]
        typ, _ = client.append("INBOX", None, None, MESSAGE)
        results.append(("APPEND", typ.encode()))
        for _ in range(commands):
            typ, data = client.uid("SEARCH", "ALL")
            results.append(("UID SEARCH", typ.encode() + b" " + (data[0] or b"")))
        typ, _ = client.select("NoSuchFolder")
        results.append(("SELECT", typ.encode()))
        client.noop()
        return results
    finally:
        imap_close(client)


async def test_commands_are_recorded_with_results_and_durations(
        hooks_host: HooksHost, hooks_db: asyncpg.Pool) -> None:
    await asyncio.to_thread(session_commands, "bob@k1.example")
    ended = await hooks_host.wait_recorded(
        "SELECT count(*) FROM imap_sessions WHERE account = $1 AND ended_at IS NOT NULL",
        "bob@k1.example")
    assert ended == 1
    session = await hooks_db.fetchrow("SELECT * FROM imap_sessions WHERE account = $1",
                                      "bob@k1.example")
    # The client address as the router passed it on (the PROXY header).
    assert str(session["client_ip"]) == "127.0.0.1"
    assert 0 < session["bytes_in"] < session["bytes_out"]
    rows = await hooks_db.fetch("SELECT * FROM imap_commands WHERE session_id = $1"
                                " ORDER BY started_at, id", session["id"])
    names = [(r["name"], r["result"]) for r in rows]
    assert names == [("SELECT", "OK"), ("APPEND", "OK"), ("UID SEARCH", "OK"),
                     ("UID SEARCH", "OK"), ("UID SEARCH", "OK"), ("SELECT", "NO"),
                     ("NOOP", "OK"), ("LOGOUT", "OK")]
    assert session["commands"] == len(rows)
    assert all(r["duration_ms"] is not None and 0 <= r["duration_ms"] < 5000 for r in rows)
    assert rows[1]["duration_ms"] > 0
    assert rows[0]["arguments"] == '"INBOX"' or "INBOX" in rows[0]["arguments"]
    assert rows[5]["reason"] and "NoSuchFolder" not in (rows[5]["verdict"] or "")
    assert all(r["verdict"] == "accept" and r["tag"] for r in rows)


def searches_with_limit(address: str) -> list[tuple[str, str]]:
    client = imap_login(address)
    try:
        client.select("INBOX")
        replies = []
        for _ in range(4):
            typ, data = client.search(None, "ALL")
            replies.append((typ, (data[0] or b"").decode()))
        # The session goes on: other commands still work.
        typ, data = client.fetch("1", "(FLAGS)")
        replies.append((typ, "fetch"))
        return replies
    finally:
        imap_close(client)


async def test_fourth_search_in_a_minute_is_refused_and_the_session_goes_on(
        hooks_host: HooksHost, hooks_db: asyncpg.Pool) -> None:
    await asyncio.to_thread(session_commands, "carol@k1.example", 0)   # one message
    await set_limit(hooks_db, "carol@k1.example", "imap_search", 3, window_s=60)
    replies = await asyncio.to_thread(searches_with_limit, "carol@k1.example")
    assert [typ for typ, _ in replies] == ["OK", "OK", "OK", "NO", "OK"]
    assert replies[3][1].startswith("[LIMIT] account carol@k1.example reached its limit of 3"
                                    " searches per 1m")
    refused = await hooks_host.wait_recorded(
        "SELECT count(*) FROM imap_commands WHERE account = $1 AND name = 'SEARCH'"
        " AND verdict = 'tempfail' AND result = 'NO'", "carol@k1.example")
    assert refused == 1


def raw_session(address: str) -> tuple[socket.socket, object]:
    sock = socket.create_connection(("127.0.0.1", IMAP_PORT), timeout=30)
    reader = sock.makefile("rb")
    reader.readline()
    sock.sendall(f'l LOGIN "{address}" "{PASSWORD}"\r\n'.encode())
    while not (line := reader.readline()).startswith(b"l "):
        pass
    assert line.startswith(b"l OK"), line
    return sock, reader


def tagged(reader: object, tag: bytes) -> bytes:
    while True:
        line = reader.readline()  # type: ignore[attr-defined]
        if not line:
            raise ConnectionError("server closed the connection")
        if line.startswith(tag + b" "):
            return bytes(line)


def refused_appends(address: str) -> list[bytes]:
    """A refused APPEND, with a synchronising literal (imaplib) and a LITERAL+ one."""
    out: list[bytes] = []
    client = imap_login(address)
    try:
        typ, data = client.append("INBOX", None, None, MESSAGE)
        out.append(typ.encode() + b" " + data[0])
        # In step: the next command is answered as itself.
        out.append(client.noop()[0].encode())
    finally:
        imap_close(client)
    sock, reader = raw_session(address)
    try:
        body = MESSAGE + b"a2 SELECT INBOX\r\n"     # would run if the literal were skipped
        sock.sendall(b"a1 APPEND INBOX (\\Seen) {%d+}\r\n" % len(body) + body + b"\r\n"
                     b"a3 NOOP\r\n")
        out.append(tagged(reader, b"a1"))
        out.append(tagged(reader, b"a3"))
        sock.sendall(b"a4 LOGOUT\r\n")
        out.append(tagged(reader, b"a4"))
    finally:
        sock.close()
    return out


async def test_refused_append_with_a_literal_leaves_the_connection_in_step(
        hooks_host: HooksHost, hooks_db: asyncpg.Pool) -> None:
    await set_limit(hooks_db, "bob@k2.example", "imap_append", 0, window_s=3600)
    out = await asyncio.to_thread(refused_appends, "bob@k2.example")
    assert out[0].startswith(b"NO [LIMIT] account bob@k2.example reached its limit of 0 append")
    assert out[1] == b"OK"
    assert out[2].startswith(b"a1 NO [LIMIT]")
    assert out[3].startswith(b"a3 OK") and out[4].startswith(b"a4 OK")
    names = await hooks_host.wait_recorded(
        "SELECT string_agg(name, ',' ORDER BY started_at) FROM imap_commands"
        " WHERE account = $1 AND verdict = 'tempfail'", "bob@k2.example",
        expect="APPEND,APPEND")
    assert names == "APPEND,APPEND"
    # Nothing of the refused literal ran as a command.
    assert not await hooks_db.fetchval(
        "SELECT count(*) FROM imap_commands WHERE account = $1 AND tag = 'a2'",
        "bob@k2.example")


async def test_concurrent_session_limit(hooks_host: HooksHost, hooks_db: asyncpg.Pool) -> None:
    await set_limit(hooks_db, "k2.example", "imap_sessions", 1)
    first = await asyncio.to_thread(imap_login, "carol@k2.example")
    try:
        with pytest.raises(imaplib.IMAP4.abort, match=r"\[LIMIT\] domain k2.example has 1"
                           r" IMAP sessions open \(limit 1 at once\)"):
            second = await asyncio.to_thread(imap_login, "bob@k2.example")
            imap_close(second)
        assert (await asyncio.to_thread(first.noop))[0] == "OK"
    finally:
        await asyncio.to_thread(imap_close, first)
    # The slot comes back when the first session ends.
    for _ in range(50):
        if not await hooks_db.fetchval("SELECT count(*) FROM limit_leases"
                                       " WHERE subject = 'domain:k2.example'"):
            break
        await asyncio.sleep(0.1)
    third = await asyncio.to_thread(imap_login, "bob@k2.example")
    await asyncio.to_thread(imap_close, third)
    refused = await hooks_host.wait_recorded(
        "SELECT reason FROM imap_sessions WHERE account = 'bob@k2.example'"
        " AND verdict = 'tempfail'")
    assert "IMAP sessions open" in str(refused)


def noop_select_search(client: imaplib.IMAP4) -> list[str]:
    return [client.noop()[0], client.select("INBOX")[0], client.search(None, "ALL")[0]]


async def test_hook_server_down_commands_work_and_the_log_says_why(
        hooks_host: HooksHost, hooks_db: asyncpg.Pool) -> None:
    await set_limit(hooks_db, "bob@k1.example", "imap_search", 1000, window_s=60)
    service = hooks_host.hooks
    client = await asyncio.to_thread(imap_login, "bob@k1.example")
    try:
        await service.server.stop(1.0)
        assert await asyncio.to_thread(noop_select_search, client) == ["OK", "OK", "OK"]
        log = hooks_host.dovecot_log("k1.example")
        assert f"mailfc_hooks: hook server {'/run/mailfc/hooks.sock'} unavailable" in log
        assert "failing open" in log
        # A session that starts while the server is down works too.
        other = await asyncio.to_thread(imap_login, "carol@k1.example")
        assert await asyncio.to_thread(noop_select_search, other) == ["OK", "OK", "OK"]
        await asyncio.to_thread(imap_close, other)
        # The server comes back: the plugin reconnects and announces its session again.
        await service.server.start()
        await asyncio.sleep(1.1)        # the plugin retries at most once a second
        assert await asyncio.to_thread(noop_select_search, client) == ["OK", "OK", "OK"]
    finally:
        await asyncio.to_thread(imap_close, client)
    resumed = await hooks_host.wait_recorded(
        "SELECT commands FROM imap_sessions WHERE account = 'bob@k1.example'"
        " AND reason = 'resumed after a hook server restart' AND ended_at IS NOT NULL")
    assert resumed and resumed >= 3
    assert "reachable again" in hooks_host.dovecot_log("k1.example")


def searches_over_time(client: imaplib.IMAP4, count: int) -> list[str]:
    return [client.search(None, "ALL")[0] for _ in range(count)]


async def test_limit_change_applies_to_a_running_session(
        hooks_host: HooksHost, hooks_db: asyncpg.Pool) -> None:
    client = await asyncio.to_thread(imap_login, "carol@k2.example")
    try:
        await asyncio.to_thread(client.select, "INBOX")
        assert await asyncio.to_thread(searches_over_time, client, 3) == ["OK"] * 3
        await set_limit(hooks_db, "carol@k2.example", "imap_search", 2, window_s=60)
        deadline = time.monotonic() + 10
        # Within the watch interval the running session learns of the limit.
        while time.monotonic() < deadline:
            if (await asyncio.to_thread(searches_over_time, client, 1)) == ["NO"]:
                break
            await asyncio.sleep(0.2)
        else:
            pytest.fail("the new limit never applied to the running session")
        await set_limit(hooks_db, "carol@k2.example", "imap_search", 1000, window_s=60)
        await asyncio.sleep(1.0)
        assert await asyncio.to_thread(searches_over_time, client, 1) == ["OK"]
    finally:
        await asyncio.to_thread(imap_close, client)


def test_service_type() -> None:
    assert HookService.name == "hook-server"


async def test_plain_session_runs_between_client_and_dovecot_alone(
        hooks_host: HooksHost) -> None:
    """Plain IMAP through a router on the dispatcher's host: after LOGIN the
    client's own socket belongs to the domain's imap process; neither the router
    nor the dispatcher carries the session, and the dispatcher still counts it."""
    services = {s.name: s for s in hooks_host.platform.services}
    router, dispatcher = services["imap-router"], services["dispatcher"]
    await sessions_ended(dispatcher)    # those of earlier tests
    client = await asyncio.to_thread(imap_login, "bob@k1.example")
    try:
        typ, _ = await asyncio.to_thread(client.select, "INBOX")
        assert typ == "OK"
        await eventually(lambda: not router._sessions  # type: ignore[attr-defined]
                         and not dispatcher._sessions)  # type: ignore[attr-defined]
        assert sum(dispatcher.open_sessions.values()) == 1  # type: ignore[attr-defined]
        typ, _ = await asyncio.to_thread(client.noop)
        assert typ == "OK"
    finally:
        await asyncio.to_thread(imap_close, client)
    await sessions_ended(dispatcher)


async def test_commands_pipelined_after_login_go_along(hooks_host: HooksHost) -> None:
    """A client that pipelines after LOGIN: the router had read those bytes, and
    they reach Dovecot with the hand-over, in order."""
    def session() -> list[bytes]:
        with socket.create_connection(("127.0.0.1", IMAP_PORT), timeout=30) as sock:
            reader = sock.makefile("rb")
            reader.readline()
            sock.sendall(f'a LOGIN "bob@k1.example" "{PASSWORD}"\r\nb SELECT INBOX\r\n'
                         'c NOOP\r\nd LOGOUT\r\n'.encode())
            return [line for line in iter(reader.readline, b"")
                    if line[:2] in (b"a ", b"b ", b"c ", b"d ")]

    tagged = await asyncio.to_thread(session)
    assert [line.split()[:2] for line in tagged] == [
        [b"a", b"OK"], [b"b", b"OK"], [b"c", b"OK"], [b"d", b"OK"]]
    assert b"[CAPABILITY " in tagged[0]


async def test_a_domain_spaced_out_under_pressure_hears_no_limit_for_heavy_commands(
        hooks_host: HooksHost, hooks_db: asyncpg.Pool) -> None:
    """Admission (mailfc.fairness) in the hook server: a heavy command of a domain
    spaced out under CPU pressure that gets no turn within half the plugin's timeout
    is refused with NO [LIMIT]; the session goes on, and once the domain is free
    again its searches run."""
    await asyncio.to_thread(session_commands, "bob@k2.example", 0)     # one message
    # A heavy-command limit far away: the plugin asks about SEARCH.
    await set_limit(hooks_db, "bob@k2.example", "imap_heavy_concurrent", 50)
    admission = hooks_host.hooks.server.admission
    admission.buckets["k2.example"] = Bucket(rate=0.01, tokens=0.0)
    try:
        replies = await asyncio.to_thread(searches_with_limit, "bob@k2.example")
    finally:
        admission.buckets.pop("k2.example", None)
    assert [typ for typ, _ in replies] == ["NO", "NO", "NO", "NO", "OK"]
    assert replies[0][1].startswith("[LIMIT] the server is busy and k2.example runs more")
    refused = await hooks_host.wait_recorded(
        "SELECT count(*) FROM imap_commands WHERE account = $1 AND name = 'SEARCH'"
        " AND verdict = 'tempfail' AND reason LIKE 'the server is busy%'",
        "bob@k2.example", expect=4)
    assert refused == 4
    replies = await asyncio.to_thread(searches_with_limit, "bob@k2.example")
    assert [typ for typ, _ in replies] == ["OK"] * 5
