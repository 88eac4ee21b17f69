"""SMTP-In against a recipient harvester and a connection flood, as Postfix's smtpd and
anvil answer them: errors slow the session down, then end it; one address gets so many
connections at once and per window, the others are still served.

SMTP-In runs as its own process (`mailfc up --services smtp-in`) on a port of its own
with small limits, so the test takes seconds: soft limit 5, hard limit 10, 0.3 s per
reply past the soft limit; 5 connections per client, 30 per minute.  Clients bind
127.0.0.x source addresses to be different clients.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from mailfc.anvil import SMTP_REFUSAL
from mailfc.config import Config
from mailfc.protocols.smtp_server import POSTFIX_ERRORS, R_TOO_MANY_ERRORS, SmtpServer
from tests.gateways.conftest import HOST, gateway_data, provision, wait_port, write_toml

PORT = 18225
SOFT, HARD, SLEEP_S = 5, 10, 0.3
PER_CLIENT, RATE = 5, 30
TOO_MANY_ERRORS = R_TOO_MANY_ERRORS.format(host=HOST).encode()


def start(config_file: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as handle:
        return subprocess.Popen(
            [sys.executable, "-m", "mailfc", "--config", str(config_file), "up",
             "--services", "smtp-in"], stdout=handle, stderr=subprocess.STDOUT,
            env={**os.environ})


@pytest.fixture(scope="module")
async def smtp_in(state_dir: Path, cmdb: asyncpg.Pool) -> AsyncIterator[int]:
    await provision(cmdb)
    data = gateway_data(
        state_dir,
        listen={"smtp_in": f"127.0.0.1:{PORT}"},
        spool={"directory": str(state_dir / "mfcg-abuse-spool")},
        filter_in={"milters": []},
        smtp_in={"soft_error_limit": SOFT, "hard_error_limit": HARD,
                 "error_sleep_s": SLEEP_S},
        smtp_in_connections={"max_per_client": PER_CLIENT, "max_rate_per_client": RATE,
                             "rate_window_s": 60.0})
    config_file = write_toml(state_dir / "mfcg-abuse.toml", data)
    process = await asyncio.to_thread(start, config_file, state_dir / "mfcg-abuse-smtp-in.log")
    try:
        await asyncio.to_thread(wait_port, PORT, 60, process)
        yield PORT
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(process.wait, 30)
        except subprocess.TimeoutExpired:
            process.kill()
            await asyncio.to_thread(process.wait, 10)


class Client:
    """A raw SMTP client from a source address of its own."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, source: str) -> Client:
        reader, writer = await asyncio.open_connection("127.0.0.1", PORT,
                                                       local_addr=(source, 0))
        return cls(reader, writer)

    async def reply(self) -> bytes:
        """One whole reply (its last line); b"" once the server closed."""
        while True:
            line = await asyncio.wait_for(self.reader.readline(), 10)
            if not line or line[3:4] != b"-":
                return line.rstrip(b"\r\n")

    async def command(self, line: str) -> bytes:
        self.writer.write(line.encode() + b"\r\n")
        await self.writer.drain()
        return await self.reply()

    async def closed(self) -> bool:
        return await asyncio.wait_for(self.reader.read(), 10) == b""

    def close(self) -> None:
        self.writer.close()


def test_the_defaults_are_postfixs() -> None:
    settings = Config().smtp_in
    assert (settings.soft_error_limit, settings.hard_error_limit, settings.error_sleep_s,
            settings.junk_command_limit) == (10, 20, 1.0, 100)
    assert (POSTFIX_ERRORS.soft_limit, POSTFIX_ERRORS.hard_limit, POSTFIX_ERRORS.sleep_s,
            POSTFIX_ERRORS.junk_limit) == (10, 20, 1.0, 100)
    assert POSTFIX_ERRORS.count_refusals

    class Handler:
        async def handle_DATA(self, session: object, envelope: object) -> str:
            return "250 2.0.0 OK"

    assert SmtpServer(Handler(), hostname="mx.test").errors == POSTFIX_ERRORS


async def test_unknown_recipients_are_slowed_down_then_the_session_ends(
        smtp_in: int, cmdb: asyncpg.Pool) -> None:
    client = await Client.connect("127.0.0.10")
    assert (await client.reply()).startswith(b"220 ")
    assert (await client.command("EHLO harvester.example")).startswith(b"250 ")
    assert (await client.command("MAIL FROM:<h@harvester.example>")).startswith(b"250 ")
    # The harvester's list has 30 names; the server answers HARD of them.
    times: list[float] = []
    replies: list[bytes] = []
    for index in range(HARD):
        started = time.monotonic()
        replies.append(await client.command(f"RCPT TO:<nobody{index}@g1.example>"))
        times.append(time.monotonic() - started)
    assert all(r.startswith(b"550 5.1.1") for r in replies), replies
    # The first SOFT at full speed, every later one after SLEEP_S.
    assert max(times[:SOFT]) < SLEEP_S, times
    assert min(times[SOFT:]) >= SLEEP_S * 0.95, times
    # Then 421 at once, without waiting for the next command, and the end.
    assert await client.reply() == TOO_MANY_ERRORS
    assert await client.closed()
    client.close()
    # The end is recorded with the session.
    deadline = time.monotonic() + 10
    while True:
        found = await cmdb.fetchval(
            "SELECT count(*) FROM smtp_events e JOIN smtp_sessions s ON s.id = e.session_id"
            " WHERE s.client_ip = '127.0.0.10' AND e.rule = 'smtp:errors'"
            " AND e.stage = 'session'")
        if found or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    assert found == 1


async def test_pipelined_harvest_gets_the_same(smtp_in: int) -> None:
    client = await Client.connect("127.0.0.11")
    assert (await client.reply()).startswith(b"220 ")
    started = time.monotonic()
    commands = ["EHLO harvester.example", "MAIL FROM:<h@harvester.example>",
                *(f"RCPT TO:<nobody{index}@g1.example>" for index in range(30))]
    client.writer.write("".join(f"{c}\r\n" for c in commands).encode())
    await client.writer.drain()
    replies = []
    while reply := await client.reply():
        replies.append(reply)
    assert replies[-1] == TOO_MANY_ERRORS
    assert [r[:9] for r in replies[2:-1]] == [b"550 5.1.1"] * HARD
    # Each reply past the soft limit waited, pipelined or not.
    assert time.monotonic() - started >= (HARD - SOFT) * SLEEP_S * 0.95
    client.close()


async def test_syntax_errors_and_unknown_commands_count_too(smtp_in: int) -> None:
    client = await Client.connect("127.0.0.12")
    assert (await client.reply()).startswith(b"220 ")
    replies = [await client.command(c) for c in
               ["FOO", "MAIL FROM:<x@y>", "EHLO", "RCPT TO:<a@b>", "DATA"] * 2]
    assert all(r[:1] == b"5" for r in replies), replies
    assert await client.reply() == TOO_MANY_ERRORS
    assert await client.closed()
    client.close()


async def test_connections_past_the_count_get_421_and_others_are_served(
        smtp_in: int) -> None:
    held = [await Client.connect("127.0.0.20") for _ in range(PER_CLIENT)]
    for client in held:
        assert (await client.reply()).startswith(b"220 ")
    over = await Client.connect("127.0.0.20")
    assert await over.reply() == SMTP_REFUSAL.format(host=HOST, client="127.0.0.20").encode()
    assert await over.closed()
    over.close()
    other = await Client.connect("127.0.0.21")
    assert (await other.reply()).startswith(b"220 ")
    assert (await other.command("QUIT")).startswith(b"221")
    other.close()
    # A connection that ends gives its place back.
    assert (await held[0].command("QUIT")).startswith(b"221")
    held[0].close()
    await asyncio.sleep(0.2)
    again = await Client.connect("127.0.0.20")
    assert (await again.reply()).startswith(b"220 ")
    for client in [again, *held[1:]]:
        client.close()


async def test_connections_past_the_rate_get_421(smtp_in: int) -> None:
    for _ in range(RATE):
        client = await Client.connect("127.0.0.30")
        assert (await client.reply()).startswith(b"220 ")
        client.close()
    over = await Client.connect("127.0.0.30")
    assert await over.reply() == SMTP_REFUSAL.format(host=HOST, client="127.0.0.30").encode()
    over.close()
    other = await Client.connect("127.0.0.31")
    assert (await other.reply()).startswith(b"220 ")
    other.close()
