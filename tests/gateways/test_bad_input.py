"""SMTP-In against clients that misbehave: a proper reply each time, nothing half-queued."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from mailfc.config import parse_config
from mailfc.gateways.smtp_in import SmtpInService
from mailfc.policy.blocks import BLOCKS_REFRESH_S
from mailfc.tls import server_context
from tests.gateways.conftest import SMTP_PORT, Gateways, gateway_data

DISK_PORT = 18045


class Client:
    """A raw SMTP conversation: what a broken or hostile client really sends."""

    def __init__(self, port: int = SMTP_PORT) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buffer = b""
        self.greeting = self.reply()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> str:
        lines = []
        while True:
            while b"\r\n" not in self.buffer:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return "\n".join(lines) or "(closed)"
                self.buffer += chunk
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            lines.append(line.decode())
            if line[3:4] != b"-":
                return "\n".join(lines)

    def command(self, line: str) -> str:
        self.send(line.encode() + b"\r\n")
        return self.reply()

    def transaction(self, rcpt: str = "bob@g1.example", mail_args: str = "") -> None:
        assert self.command("EHLO client.example").startswith("250")
        assert self.command(f"MAIL FROM:<ann@remote.example>{mail_args}").startswith("250")
        assert self.command(f"RCPT TO:<{rcpt}>").startswith("250")

    def close(self) -> None:
        self.sock.close()


def conversation(steps: object) -> object:
    client = Client()
    try:
        assert callable(steps)
        return steps(client)
    finally:
        client.close()


async def run(steps: object) -> object:
    return await asyncio.to_thread(conversation, steps)


async def test_protocol_errors_get_coded_replies(gateways: Gateways) -> None:
    def steps(c: Client) -> dict[str, str]:
        out = {"greeting": c.greeting, "data_first": c.command("DATA")}
        c.command("EHLO client.example")
        out["rcpt_first"] = c.command("RCPT TO:<bob@g1.example>")
        out["long"] = c.command("MAIL FROM:<" + "a" * 2000 + "@remote.example>")
        out["bad_address"] = c.command("MAIL FROM:<not an address>")
        c.command("MAIL FROM:<ann@remote.example>")
        out["data_no_rcpt"] = c.command("DATA")
        out["bad_rcpt"] = c.command("RCPT TO:<bob@@g1.example>")
        out["quit"] = c.command("QUIT")
        return out

    out = await run(steps)
    assert isinstance(out, dict)
    assert out["greeting"].startswith("220 ")
    assert out["data_first"].startswith("503 5.5.1")
    assert out["rcpt_first"].startswith("503 5.5.1")
    assert out["long"].startswith("500 5.5.2")
    assert out["bad_address"][:3] in ("501", "553") and out["bad_address"][4:5] == "5"
    assert out["data_no_rcpt"].startswith("503 5.5.1")
    assert out["bad_rcpt"][:5] in ("501 5", "553 5")
    assert out["quit"].startswith("221 2.0.0")


async def test_bare_lf_8bit_and_pipelined_data_are_refused(gateways: Gateways) -> None:
    before = set(gateways.queued())

    def steps(c: Client) -> dict[str, str]:
        out = {}
        c.transaction()
        c.command("DATA")
        c.send(b"Subject: smuggle\r\n\r\nline one\n.\nMAIL FROM:<x@y.example>\r\n.\r\n")
        out["bare_lf"] = c.reply()
        c.transaction()
        c.command("DATA")
        c.send("Subject: 8bit\r\n\r\nGr\u00fc\u00dfe\r\n.\r\n".encode())
        out["eight_bit"] = c.reply()
        c.transaction()
        c.send(b"DATA\r\nSubject: early\r\n\r\nbody\r\n.\r\n")
        out["pipelined"] = c.reply()
        return out

    out = await run(steps)
    assert isinstance(out, dict)
    assert out["bare_lf"].startswith("554 5.5.2")
    assert out["eight_bit"].startswith("554 5.6.0")
    assert out["pipelined"].startswith("554 5.5.0")
    assert set(gateways.queued()) <= before


async def test_disconnect_mid_data_and_tls_garbage_queue_nothing(gateways: Gateways) -> None:
    before = set(gateways.queued())

    def mid_data(c: Client) -> None:
        c.transaction()
        assert c.command("DATA").startswith("354")
        c.send(b"Subject: cut off\r\n\r\nhalf a message")

    def tls_garbage(c: Client) -> str:
        c.command("EHLO client.example")
        assert c.command("STARTTLS").startswith("220")
        c.send(b"\x16\x03\x01\x00\x05garbagegarbage" * 10)
        with contextlib.suppress(OSError):
            return c.reply()
        return "(reset)"

    await run(mid_data)
    await run(tls_garbage)
    await asyncio.sleep(0.5)
    assert set(gateways.queued()) <= before
    # The server is fine after both.
    assert (await run(lambda c: c.command("NOOP"))).startswith("250")  # type: ignore[union-attr]


async def test_commands_sent_in_the_clear_after_starttls_are_dropped(
        gateways: Gateways) -> None:
    """RFC 3207 section 5: a MAIL an attacker slipped in behind STARTTLS in the clear
    must not count inside TLS; the TLS session starts again from EHLO."""
    def steps(c: Client) -> tuple[str, str, str, str]:
        ehlo = c.command("EHLO client.example")
        c.send(b"STARTTLS\r\nMAIL FROM:<injected@remote.example>\r\n")
        started = c.reply()
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        c.sock = context.wrap_socket(c.sock)
        rcpt = c.command("RCPT TO:<bob@g1.example>")
        again = c.command("EHLO client.example")
        return ehlo, started, rcpt, again

    ehlo, started, rcpt, again = await run(steps)  # type: ignore[misc]
    assert "STARTTLS" in ehlo
    assert started.startswith("220 2.0.0")
    assert rcpt.startswith("503 5.5.1")
    assert again.startswith("250-") and "STARTTLS" not in again


async def test_pipelined_commands_get_every_reply_in_order(gateways: Gateways) -> None:
    """Replies to pipelined commands are written together (CoalescedReplies): none is
    lost, not the ones before an error, nor the ones before QUIT closes."""
    def steps(c: Client) -> list[str]:
        c.command("EHLO client.example")
        c.send(b"MAIL FROM:<ann@remote.example>\r\nRCPT TO:<bob@g1.example>\r\n"
               b"RCPT TO:<nobody@g1.example>\r\nRSET\r\nNOOP\r\nQUIT\r\n")
        return [c.reply()[:3] for _ in range(6)] + [c.reply()]

    codes = await run(steps)
    assert codes == ["250", "250", "550", "250", "250", "221", "(closed)"]


async def test_admin_blocks_refuse_with_550_5_7_1(gateways: Gateways, cmdb: asyncpg.Pool
                                                   ) -> None:
    """SMTP-In applies the blocks it reads every BLOCKS_REFRESH_S, by the same rule
    as the limit engine's SQL: sender domain, exact sender, client CIDR; an expired
    block no longer applies."""
    await cmdb.execute(
        "INSERT INTO blocks (kind, value, reason, expires_at) VALUES"
        " ('sender_domain', 'spammer.example', 'test block', NULL),"
        " ('sender', 'bad@remote.example', 'one sender', NULL),"
        " ('sender', 'old@remote.example', 'expired', now() - interval '1 minute')")
    try:
        await asyncio.sleep(BLOCKS_REFRESH_S + 0.2)

        def steps(c: Client) -> list[str]:
            c.command("EHLO client.example")
            replies = []
            for sender in ("x@SPAMMER.example", "bad@remote.example", "old@remote.example",
                           "ann@remote.example"):
                replies.append(c.command(f"MAIL FROM:<{sender}>"))
                c.command("RSET")
            return replies

        domain, sender, expired, fine = await run(steps)  # type: ignore[misc]
        assert domain.startswith("550 5.7.1") and "test block" in domain
        assert sender.startswith("550 5.7.1") and "one sender" in sender
        assert expired.startswith("250") and fine.startswith("250")
        await cmdb.execute("INSERT INTO blocks (kind, value, reason) VALUES"
                           " ('ip', '127.0.0.0/8', 'loopback test')")
        await asyncio.sleep(BLOCKS_REFRESH_S + 0.2)
        by_ip = await run(lambda c: (c.command("EHLO client.example"),
                                     c.command("MAIL FROM:<ann@remote.example>"))[1])
        assert by_ip.startswith("550 5.7.1") and "loopback test" in by_ip  # type: ignore[union-attr]
    finally:
        await cmdb.execute("DELETE FROM blocks WHERE reason IN ('test block', 'one sender',"
                           " 'expired', 'loopback test')")
        await asyncio.sleep(BLOCKS_REFRESH_S + 0.2)


@pytest.fixture
async def small_disk_smtp_in(state_dir: Path, cmdb: asyncpg.Pool
                             ) -> AsyncIterator[tuple[SmtpInService, Path]]:
    """An SMTP-In whose spool is a 2 MiB tmpfs: a real full disk."""
    spool = state_dir / "mfcg-small-spool"
    spool.mkdir(exist_ok=True)
    await asyncio.to_thread(subprocess.run, ["mount", "-t", "tmpfs", "-o", "size=2m",
                                             "mfcg-spool", str(spool)], check=True)
    data = gateway_data(state_dir, listen={"smtp_in": f"127.0.0.1:{DISK_PORT}",
                                           "lmtp_router": "unix:mfcg-nowhere.sock"},
                        spool={"directory": str(spool), "min_free_bytes": 0})
    config = parse_config(data, "disk full")
    service = SmtpInService(config, cmdb, server_context(config))
    await service.start()
    try:
        yield service, spool
    finally:
        await service.stop(1.0)
        await asyncio.to_thread(subprocess.run, ["umount", str(spool)], check=False)


async def test_disk_full_answers_452_and_leaves_nothing(
        small_disk_smtp_in: tuple[SmtpInService, Path]) -> None:
    _, spool = small_disk_smtp_in

    def steps(c: Client) -> str:
        c.transaction()
        assert c.command("DATA").startswith("354")
        line = b"x" * 998 + b"\r\n"
        c.send(b"From: ann@remote.example\r\nSubject: big\r\n\r\n" + line * 3000 + b".\r\n")
        return c.reply()

    reply = await asyncio.to_thread(lambda: conversation_on(DISK_PORT, steps))
    assert reply.startswith("452 4.3.1")
    assert list((spool / "smtp-in" / "tmp").iterdir()) == []
    assert list((spool / "smtp-in" / "queue").iterdir()) == []


def conversation_on(port: int, steps: object) -> str:
    client = Client(port)
    try:
        assert callable(steps)
        result = steps(client)
        assert isinstance(result, str)
        return result
    finally:
        client.close()
