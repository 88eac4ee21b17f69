"""The hook server on its own: a raw client speaks the line protocol to it."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import pytest

from mailfc.policy.hooks import protocol
from mailfc.policy.hooks.server import HookServer
from tests.hooks.conftest import set_limit

ACCOUNT = "bob@k1.example"


class RawPlugin:
    """What the C plugin does, by hand."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, server: HookServer) -> RawPlugin:
        reader, writer = await asyncio.open_unix_connection(str(server.socket))
        plugin = cls(reader, writer)
        assert await plugin.line() == [protocol.HELLO, str(protocol.VERSION), "700", "open"]
        return plugin

    async def line(self) -> list[str]:
        raw = await asyncio.wait_for(self.reader.readline(), 5)
        return [protocol.unescape(f) for f in raw.decode().rstrip("\n").split("\t")]

    async def send(self, *fields: object) -> None:
        self.writer.write(protocol.encode(*fields))
        await self.writer.drain()

    async def ask(self, *fields: object) -> list[str]:
        await self.send(*fields)
        return await self.line()

    def close(self) -> None:
        self.writer.close()


def micros() -> int:
    return int(time.time() * 1e6)


async def recorded(pool: asyncpg.Pool, sql: str, *args: object) -> object:
    for _ in range(200):
        value = await pool.fetchval(sql, *args)
        if value:
            return value
        await asyncio.sleep(0.05)
    return None


async def test_session_commands_and_end_are_recorded(hook_server: HookServer,
                                                     hooks_db: asyncpg.Pool) -> None:
    plugin = await RawPlugin.connect(hook_server)
    try:
        assert await plugin.ask(protocol.SESSION, 1, micros(), ACCOUNT, "192.0.2.7", 0) == \
            [protocol.SESSION, "1", protocol.OK, protocol.WATCH_NONE]
        start = micros()
        await plugin.send(protocol.DONE, 1, 1, start, 2500, "SELECT", "a1",
                          "OK [READ-WRITE] Select completed.", "INBOX")
        await plugin.send(protocol.DONE, 1, 2, start, 100, "FOO", "a2",
                          "BAD Error in IMAP command FOO: Unknown command.", "")
        await plugin.send(protocol.END, 1, 120, 4567, "Logged out")
        ended = await recorded(hooks_db, "SELECT ended_at IS NOT NULL AND commands = 2"
                               " FROM imap_sessions WHERE account = $1", ACCOUNT)
        assert ended
        session = await hooks_db.fetchrow("SELECT * FROM imap_sessions WHERE account = $1",
                                          ACCOUNT)
        assert (session["domain"], str(session["client_ip"]), session["bytes_in"],
                session["bytes_out"], session["host"], session["reason"]) == (
            "k1.example", "192.0.2.7", 120, 4567, "unit-host", "Logged out")
        rows = await hooks_db.fetch("SELECT * FROM imap_commands WHERE session_id = $1"
                                    " ORDER BY tag", session["id"])
        assert [(r["name"], r["tag"], r["result"], r["verdict"]) for r in rows] == [
            ("SELECT", "a1", "OK", "accept"), ("FOO", "a2", "BAD", "accept")]
        assert [r["duration_ms"] for r in rows] == pytest.approx([2.5, 0.1])
        assert rows[0]["arguments"] == "INBOX" and rows[0]["reason"] is None
        assert rows[1]["reason"] == "Error in IMAP command FOO: Unknown command."
    finally:
        plugin.close()


async def test_search_limit_refuses_and_a_limit_change_is_pushed(
        hook_server: HookServer, hooks_db: asyncpg.Pool) -> None:
    plugin = await RawPlugin.connect(hook_server)
    try:
        reply = await plugin.ask(protocol.SESSION, 5, micros(), ACCOUNT, "", 0)
        assert reply == [protocol.SESSION, "5", protocol.OK, protocol.WATCH_NONE]
        await set_limit(hooks_db, ACCOUNT, "imap_search", 2, window_s=60)
        # The server notices the new limit and tells the plugin what to ask about.
        assert await plugin.line() == [protocol.WATCH, "5",
                                       protocol.watch_for(["imap_search"])]
        answers = [await plugin.ask(protocol.CMD, 5, cid, "UID SEARCH", f"s{cid}")
                   for cid in (1, 2, 3)]
        assert answers[0] == [protocol.CMD, "5", "1", protocol.OK]
        assert [a[3] for a in answers] == [protocol.OK, protocol.OK, protocol.NO]
        assert answers[2][4].startswith("[LIMIT] account bob@k1.example reached its limit "
                                        "of 2 searches per 1m")
        # Unrelated commands are answered without the database.
        assert (await plugin.ask(protocol.CMD, 5, 4, "FETCH", "f"))[3] == protocol.OK
        await plugin.send(protocol.DONE, 5, 3, micros(), 10, "UID SEARCH", "s3",
                          "NO " + answers[2][4], "")
        verdict = await recorded(hooks_db, "SELECT verdict FROM imap_commands"
                                 " WHERE account = $1 AND tag = 's3'", ACCOUNT)
        assert verdict == "tempfail"
    finally:
        plugin.close()


async def test_a_busy_session_is_granted_commands_counted_ahead(
        hook_server: HookServer, hooks_db: asyncpg.Pool) -> None:
    account = ACCOUNT
    await set_limit(hooks_db, account, "imap_search", 10**6, window_s=60)
    plugin = await RawPlugin.connect(hook_server)
    try:
        reply = await plugin.ask(protocol.SESSION, 7, micros(), account, "", 0)
        assert reply[:3] == [protocol.SESSION, "7", protocol.OK]
        asked = 0
        run = 0
        grants = []
        while run < 60:
            asked += 1
            answer = await plugin.ask(protocol.CMD, 7, asked, "UID SEARCH", f"s{asked}")
            assert answer[3] == protocol.OK
            grant = int(answer[4]) if len(answer) > 4 else 0
            grants.append(grant)
            run += 1 + grant       # the plugin runs the granted ones without asking
        assert grants[:3] == [0, 1, 2] and max(grants) <= 32
        assert asked < run / 3
        # Every command run was counted, at most one grant ahead of the commands.
        used = await hooks_db.fetchval(
            "SELECT sum(amount) FROM limit_counters WHERE subject = $1"
            " AND kind = 'imap_search'", f"account:{account}")
        assert used == run
    finally:
        plugin.close()


async def test_garbage_and_oversized_lines_get_error_and_the_connection_goes_on(
        hook_server: HookServer, hooks_db: asyncpg.Pool) -> None:
    plugin = await RawPlugin.connect(hook_server)
    try:
        plugin.writer.write(b"\x00\xff\xfe random bytes\n")
        assert (await plugin.line())[0] == protocol.ERROR
        assert (await plugin.ask("CMD", "only-two"))[0] == protocol.ERROR
        plugin.writer.write(b"DONE\t" + b"x" * (protocol.MAX_LINE * 3) + b"\n")
        error = await plugin.line()
        assert error[0] == protocol.ERROR and "longer than" in error[1]
        # Commands of sessions the server never heard of: allowed, not recorded.
        assert (await plugin.ask(protocol.CMD, 99, 1, "SEARCH", "a"))[3] == protocol.OK
        assert (await plugin.ask(protocol.SESSION, 2, micros(), ACCOUNT, "", 0))[2] == \
            protocol.OK
        assert hook_server.protocol_errors >= 3
    finally:
        plugin.close()


async def test_connection_lost_ends_sessions_and_releases_leases(
        hook_server: HookServer, hooks_db: asyncpg.Pool) -> None:
    await set_limit(hooks_db, ACCOUNT, "imap_sessions", 1)
    first = await RawPlugin.connect(hook_server)
    second = await RawPlugin.connect(hook_server)
    try:
        assert (await first.ask(protocol.SESSION, 1, micros(), ACCOUNT, "", 0))[2] == \
            protocol.OK
        refused = await second.ask(protocol.SESSION, 1, micros(), ACCOUNT, "", 0)
        assert refused[2] == protocol.NO and refused[3].startswith("[LIMIT] ")
        # A resumed session (after a server restart) is never refused.
        assert (await second.ask(protocol.SESSION, 2, micros(), ACCOUNT, "", 1))[2] == \
            protocol.OK
        first.close()
        second.close()
        free = await recorded(hooks_db, "SELECT count(*) = 0 FROM limit_leases"
                              " WHERE subject = $1", "account:" + ACCOUNT)
        assert free
        # The session rows are written in the recorder's next batch.
        assert await recorded(hooks_db, "SELECT count(*) = 3 FROM imap_sessions"
                              " WHERE account = $1 AND ended_at IS NOT NULL", ACCOUNT)
        reasons = await hooks_db.fetch("SELECT verdict, reason, ended_at IS NOT NULL AS ended"
                                       " FROM imap_sessions WHERE account = $1"
                                       " ORDER BY id", ACCOUNT)
        assert sorted(r["verdict"] for r in reasons) == ["accept", "accept", "tempfail"]
        assert all(r["ended"] for r in reasons)
    finally:
        first.close()
        second.close()
