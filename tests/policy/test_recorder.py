"""The recorder: batched, never blocking the caller, never dropping silently; failure policy."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path

import asyncpg
import pytest

from mailfc.policy.milter.session import FailurePolicy
from mailfc.policy.recorder import Recorder, now
from tests.cli.conftest import run_mailfc
from tests.policy.conftest import running_milter, set_limit, wait_for
from tests.policy.mta import MtaClient, reply_text

DEAD_DSN = "postgresql:///none?host=/nonexistent"


async def test_rows_refer_to_each_other_and_are_rewritten(policy_db: asyncpg.Pool) -> None:
    recorder = Recorder(policy_db, flush_interval_s=10)
    session = recorder.new("smtp_sessions", component="test", domain="m1.example")
    message = recorder.new("smtp_messages", session_id=session, domain="m1.example",
                           recipients=["a@m1.example"], recipient_count=1)
    recorder.new("smtp_events", session_id=session, message_id=message, stage="mail",
                 verdict="tempfail", rule="limit:x", detail={"size": 3})
    assert await recorder.flush() == 3
    recorder.update(session, ended_at=now(), messages=1, verdict="accept")
    assert await recorder.flush() == 1
    row = await policy_db.fetchrow(
        "SELECT s.messages, s.verdict, s.ended_at, m.recipients, e.detail, e.message_id"
        " FROM smtp_sessions s JOIN smtp_messages m ON m.session_id = s.id"
        " JOIN smtp_events e ON e.session_id = s.id WHERE s.id = $1", session.id)
    assert (row["messages"], row["verdict"]) == (1, "accept") and row["ended_at"] is not None
    assert row["recipients"] == ["a@m1.example"] and row["message_id"] == message.id
    assert row["detail"] == '{"size": 3}'
    assert recorder.stats().written == 4 and recorder.stats().pending == 0


async def test_a_slow_database_delays_records_but_loses_none(
        policy_db: asyncpg.Pool, state_dir: Path) -> None:
    socket = state_dir / "mfcm-slow" / "milter.sock"
    async with running_milter(policy_db, socket) as milter:
        milter.recorder.flush_timeout_s = 0.5
        # Another transaction holds the session table: every write waits behind it.
        blocker = await policy_db.acquire()
        transaction = blocker.transaction()
        await transaction.start()
        await blocker.execute("LOCK TABLE smtp_sessions IN ACCESS EXCLUSIVE MODE")
        try:
            client = await MtaClient.open(socket, "m1.example")
            started = time.monotonic()
            for _ in range(5):
                assert reply_text(await client.mail("bob@m1.example")) == "c"
                assert reply_text(await client.rcpt("ann@m1.example")) == "c"
                assert reply_text(await client.end_of_message()) == "c"
            # The mail went through at full speed while nothing could be written.
            assert time.monotonic() - started < 2.0
            await client.quit()
            await wait_for(lambda: milter.recorder.stats().failed_flushes >= 1)
            assert milter.recorder.stats().pending >= 6
        finally:
            await transaction.rollback()
            await policy_db.release(blocker)
        await wait_for(lambda: milter.recorder.stats().pending == 0, within=15)
        stats = milter.recorder.stats()
        assert stats.dropped == 0 and stats.last_error is not None
    assert await policy_db.fetchval(
        "SELECT count(*) FROM smtp_messages WHERE domain = 'm1.example'"
        " AND verdict = 'accept'") == 5


async def test_overflow_is_counted_logged_and_exposed(
        policy_db: asyncpg.Pool, caplog: pytest.LogCaptureFixture) -> None:
    dead = await asyncpg.create_pool(DEAD_DSN, min_size=0)
    try:
        recorder = Recorder(dead, max_pending=10, flush_interval_s=10, holder="test/overflow")
        with caplog.at_level(logging.WARNING, "mailfc.policy.recorder"):
            for index in range(25):
                recorder.new("auth_attempts", protocol="imap", username=f"u{index}",
                             success=False)
            with pytest.raises(OSError):
                await recorder.flush()
        stats = recorder.stats()
        assert (stats.pending, stats.dropped, stats.failed_flushes) == (10, 15, 1)
        assert "15 rows dropped" in caplog.text and "cannot write 10 rows" in caplog.text
        # Back on a working database: what was kept is written, the loss is on record.
        recorder.pool = policy_db
        assert await recorder.flush() == 10
        await recorder._write_stats()
        row = await policy_db.fetchrow(
            "SELECT written, dropped, failed_flushes FROM recorder_stats WHERE holder ="
            " 'test/overflow'")
        assert tuple(row) == (10, 15, 1)
        assert await policy_db.fetchval(
            "SELECT array_agg(username ORDER BY id) FROM auth_attempts"
            " WHERE username ~ '^u[0-9]+$'"
        ) == [f"u{index}" for index in range(15, 25)]
    finally:
        await policy_db.execute("DELETE FROM auth_attempts WHERE username ~ '^u[0-9]+$'")
        await policy_db.execute("DELETE FROM recorder_stats WHERE holder = 'test/overflow'")
        await dead.close()


async def test_database_down_policy_per_direction(policy_db: asyncpg.Pool,
                                                  state_dir: Path) -> None:
    await set_limit(policy_db, "m1.example", "messages", 100, window_s=60)
    dead = await asyncpg.create_pool(DEAD_DSN, min_size=0)
    socket = state_dir / "mfcm-down" / "milter.sock"
    try:
        async with running_milter(dead, socket, failure=FailurePolicy()) as milter:
            client = await MtaClient.open(socket, "m1.example", client_ip="198.51.100.4")
            # Authenticated submission: tempfail.
            submitted = reply_text(await client.mail("bob@m1.example", "bob@m1.example"))
            assert submitted.startswith("451 4.3.0 policy service unavailable")
            await client.quit()
            # Inbound (no authenticated user): accepted, recorded once the database is back.
            client = await MtaClient.open(socket, "m1.example", client_ip="198.51.100.5")
            assert reply_text(await client.mail("someone@remote.example")) == "c"
            assert reply_text(await client.rcpt("bob@m1.example")) == "c"
            assert reply_text(await client.end_of_message()) == "c"
            await client.quit()
            await wait_for(lambda: milter.recorder.stats().failed_flushes >= 1)
            milter.recorder.pool = policy_db      # the database is back
            await wait_for(lambda: milter.recorder.stats().pending == 0, within=15)
    finally:
        await dead.close()
    events = await policy_db.fetch(
        "SELECT e.stage, e.verdict, e.rule, s.client_ip FROM smtp_events e"
        " JOIN smtp_sessions s ON s.id = e.session_id WHERE s.domain = 'm1.example'"
        " ORDER BY e.id")
    assert [(e["stage"], e["verdict"], e["rule"], str(e["client_ip"])) for e in events] == [
        ("mail", "tempfail", "policy:unavailable", "198.51.100.4"),
        ("mail", "accept", "policy:unavailable", "198.51.100.5"),
    ]   # (a transaction let in unchecked is not counted at its end either)
    assert await policy_db.fetchval(
        "SELECT verdict FROM smtp_messages WHERE client_ip = '198.51.100.5'") == "accept"


async def test_protocol_garbage_closes_only_that_connection(policy_db: asyncpg.Pool,
                                                            state_dir: Path) -> None:
    socket = state_dir / "mfcm-garbage" / "milter.sock"
    async with running_milter(policy_db, socket) as milter:
        good = await MtaClient.open(socket, "m1.example")
        reader, writer = await asyncio.open_unix_connection(str(socket))
        writer.write(b"\xff\xff\xff\xffGET / HTTP/1.0\r\n\r\n")
        assert await asyncio.wait_for(reader.read(), 5) == b""   # closed on us
        writer.close()
        # A vanished MTA: connection dropped mid-transaction.
        vanished = await MtaClient.open(socket, "m1.example")
        assert reply_text(await vanished.mail("bob@m1.example")) == "c"
        vanished.writer.transport.abort()
        assert reply_text(await good.mail("bob@m1.example")) == "c"
        await good.quit()
        assert milter.server.protocol_errors == 1
        await wait_for(lambda: not milter.server.connections)
    assert await policy_db.fetchval(
        "SELECT count(*) FROM smtp_messages WHERE domain = 'm1.example'"
        " AND verdict = 'aborted'") == 2


# What clients put in the records: a NUL in a HELO or a user name, bytes that are not
# UTF-8 (kept as lone surrogates by surrogateescape), other lone surrogates, keys too
# long for an index, numbers PostgreSQL has no type for.
HOSTILE_NAMES = ("nul\x00user", "bytes\udcff\udcfeuser", "lone\ud800user", "k" * 5000)


async def test_bad_values_are_stored_sanitized_or_set_aside(
        policy_db: asyncpg.Pool, tmp_path: Path, config_file: Path) -> None:
    dead_letter = tmp_path / "dead-letter" / "recorder-test.jsonl"
    recorder = Recorder(policy_db, flush_interval_s=10, holder="test/bad-rows",
                        component="test", dead_letter=dead_letter, batch_size=64)
    try:
        good = [f"g{index}" for index in range(40)]
        for index, name in enumerate(good):
            recorder.new("auth_attempts", protocol="imap", username=name, success=False,
                         reason="bad-rows test")
            if index % 10 == 3:
                recorder.new("auth_attempts", protocol="imap",
                             username=HOSTILE_NAMES[index // 10], success=False,
                             reason="bad-rows test")
        # What PostgreSQL refuses whatever is done to the text: set aside, not retried.
        recorder.new("auth_attempts", protocol="imap", username="bad-address",
                     client_ip="not an address", success=False, reason="bad-rows test")
        session = recorder.new("smtp_sessions", component="test", domain="m1.example",
                               helo="helo\x00with nul", bytes=2 ** 70)   # NOT NULL: refused
        recorder.new("smtp_events", session_id=session, stage="helo", verdict="reject",
                     rule="test", detail={"helo\x00": "x\udcff", "size": float("nan")})
        assert await recorder.flush() == 40 + 4 + 1
        stats = recorder.stats()
        # (the smtp_sessions row was made storable first, then refused for its NULL)
        assert (stats.pending, stats.sanitized, stats.dead_lettered, stats.failed_flushes) == (
            0, 6, 2, 0)
        stored = await policy_db.fetch(
            "SELECT username FROM auth_attempts WHERE reason = 'bad-rows test' ORDER BY id")
        names = [row["username"] for row in stored]
        assert names[:4] == ["g0", "g1", "g2", "g3"] and len(names) == 44
        assert set(good) <= set(names)
        assert "nul\\x00user" in names and "bytes\\xff\\xfeuser" in names
        assert "lone\\ud800user" in names and "k" * 1000 in names
        detail = json.loads(await policy_db.fetchval(
            "SELECT detail FROM smtp_events WHERE session_id = $1", session.id))
        assert detail == {"helo\\x00": "x\\xff", "size": None, "sanitized": True}
        lines = [json.loads(line) for line in dead_letter.read_text().splitlines()]
        assert sorted(line["table"] for line in lines) == ["auth_attempts", "smtp_sessions"]
        refused = {line["table"]: line for line in lines}
        assert refused["auth_attempts"]["row"]["client_ip"] == "not an address"
        assert "InvalidTextRepresentation" in refused["auth_attempts"]["error"]
        assert refused["smtp_sessions"]["row"]["helo"] == "helo\x00with nul"
        assert "NotNullViolation" in refused["smtp_sessions"]["error"]

        # The recorder goes on recording, in its own loop too.
        recorder.flush_interval_s = 0.05
        await recorder.start()
        later = recorder.new("auth_attempts", protocol="imap", username="after\x00wards",
                             success=False, reason="bad-rows test")
        recorder.new("auth_attempts", protocol="imap", username="after", success=True,
                     reason="bad-rows test")
        await wait_for(lambda: recorder.stats().pending == 0)
        assert later.id is not None and await policy_db.fetchval(
            "SELECT username FROM auth_attempts WHERE id = $1", later.id) == "after\\x00wards"
        await recorder.stop()
        assert recorder.stats().written == 47 and recorder.stats().sanitized == 7

        # `mailfc sessions stats` counts them.
        result = await asyncio.to_thread(run_mailfc, config_file, "sessions", "stats", "--json")
        assert result.code == 0, result.err
        row = next(r for r in json.loads(result.out) if r["holder"] == "test/bad-rows")
        assert (row["written"], row["sanitized"], row["dead_lettered"], row["dead_letter"]) == (
            47, 7, 2, str(dead_letter))
        table = await asyncio.to_thread(run_mailfc, config_file, "sessions", "stats")
        assert "dead_lettered" in table.out
    finally:
        await recorder.stop()
        await policy_db.execute("DELETE FROM auth_attempts WHERE reason = 'bad-rows test'")
        await policy_db.execute("DELETE FROM recorder_stats WHERE holder = 'test/bad-rows'")
