"""Inbound end to end: real clients -> SMTP-In (own process; the [filter_in] chain with
OpenDKIM at end of data) -> spool -> LMTP Router -> each domain's Dovecot container ->
maildirs."""

from __future__ import annotations

import asyncio
import smtplib
import subprocess
import sys
import uuid
from email.message import EmailMessage

import asyncpg

from tests.conftest import require_binary
from tests.gateways.conftest import SMTP_PORT, Gateways, delivered, wait_for

EICAR = r"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"


def message(marker: str, body: str = "Hello through SMTP-In.\n", sender: str =
            "ann@remote.example") -> EmailMessage:
    mail = EmailMessage()
    mail["From"] = sender
    mail["To"] = "bob@g1.example"
    mail["Subject"] = marker
    mail["Message-ID"] = f"<{uuid.uuid4()}@remote.example>"
    mail.set_content(body)
    return mail


def send(mail: EmailMessage, recipients: list[str], sender: str = "ann@remote.example"
         ) -> dict[str, tuple[int, bytes]]:
    with smtplib.SMTP("127.0.0.1", SMTP_PORT, timeout=30) as client:
        return client.send_message(mail, from_addr=sender, to_addrs=recipients)


async def test_swaks_and_smtplib_deliver_to_two_domains_signed(gateways: Gateways) -> None:
    swaks = require_binary("swaks", "swaks")
    marker = f"multi-{uuid.uuid4()}"
    refused = await asyncio.to_thread(
        send, message(marker), ["bob@g1.example", "carol@g1.example", "dave@g2.example"])
    assert refused == {}
    swaks_marker = f"swaks-{uuid.uuid4()}"
    result = await asyncio.to_thread(
        subprocess.run,
        [swaks, "--server", f"127.0.0.1:{SMTP_PORT}", "--from", "ann@remote.example",
         "--to", "dave@g2.example,bob@g1.example", "--header", f"Subject: {swaks_marker}",
         "--header", "From: ann@remote.example", "--pipeline"],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "250 2.0.0 OK: queued as" in result.stdout
    assert "PIPELINING" in result.stdout and "ENHANCEDSTATUSCODES" in result.stdout
    root = gateways.config.mail_root
    for address in ("bob@g1.example", "carol@g1.example", "dave@g2.example"):
        await wait_for(lambda a=address: len(delivered(root, a, marker)) == 1)
    for address in ("bob@g1.example", "dave@g2.example"):
        await wait_for(lambda a=address: len(delivered(root, a, swaks_marker)) == 1)
    copy = delivered(root, "dave@g2.example", marker)[0]
    assert b"DKIM-Signature:" in copy and b"d=remote.example" in copy
    assert b"by gateway-host (mailfc SMTP-In)" in copy


async def test_relay_unknown_user_and_size_refused_at_the_door(gateways: Gateways) -> None:
    def talk() -> tuple[tuple[int, bytes], tuple[int, bytes], tuple[int, bytes]]:
        with smtplib.SMTP("127.0.0.1", SMTP_PORT, timeout=30) as client:
            client.ehlo("client.example")
            client.mail("ann@remote.example")
            relay = client.rcpt("someone@elsewhere.example")
            unknown = client.rcpt("nobody@g1.example")
            client.rset()
            size = client.mail("ann@remote.example", ["SIZE=999999999999"])
            return relay, unknown, size

    relay, unknown, size = await asyncio.to_thread(talk)
    assert relay[0] == 554 and relay[1].startswith(b"5.7.1")
    assert unknown[0] == 550 and unknown[1].startswith(b"5.1.1")
    assert size[0] == 552 and size[1].startswith(b"5.3.4")


async def test_eicar_is_refused_at_end_of_data_and_nobody_gets_a_bounce(
        gateways: Gateways, cmdb: asyncpg.Pool) -> None:
    """The sender hears it in the reply: nothing is queued, so no bounce, even to a
    hosted sender."""
    marker = f"eicar-{uuid.uuid4()}"
    mail = message(marker, body=f"see attachment\n{EICAR}\n", sender="bob@g1.example")
    before = set(gateways.queued())
    try:
        await asyncio.to_thread(send, mail, ["dave@g2.example"], "bob@g1.example")
        raise AssertionError("EICAR was accepted")
    except smtplib.SMTPDataError as error:
        assert error.smtp_code == 550 and error.smtp_error.startswith(b"5.7.1 infected")
    assert set(gateways.queued()) <= before
    await asyncio.sleep(1.0)
    root = gateways.config.mail_root
    assert delivered(root, "dave@g2.example", marker) == []
    assert delivered(root, "bob@g1.example", marker) == []
    verdicts = await cmdb.fetch(
        "SELECT e.verdict, e.stage, m.verdict AS message_verdict FROM smtp_events e"
        " JOIN smtp_sessions s ON s.id = e.session_id"
        " JOIN smtp_messages m ON m.id = e.message_id"
        " WHERE s.component = 'smtp-in' AND e.rule = 'filter:eicar'")
    assert verdicts and all(row["stage"] == "filter" and row["verdict"] == "reject"
                            and row["message_verdict"] == "reject" for row in verdicts)


async def test_next_hop_down_then_up_and_queue_cli(gateways: Gateways) -> None:
    await gateways.router.stop(1.0)
    marker = f"hop-down-{uuid.uuid4()}"
    try:
        assert await asyncio.to_thread(send, message(marker), ["bob@g1.example"]) == {}
        await wait_for(lambda: len(gateways.queued()) >= 1, within=10)
        listing = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "mailfc", "--config", str(gateways.config_file),
                             "queue", "list",
                             "--json"], capture_output=True, text=True, timeout=30)
        assert listing.returncode == 0, listing.stderr
        assert "g1.example" in listing.stdout and "4.4.1" in listing.stdout
    finally:
        await gateways.router.start()
    await wait_for(lambda: len(delivered(gateways.config.mail_root, "bob@g1.example",
                                         marker)) == 1)
    await wait_for(lambda: gateways.queued() == [])


async def test_kill_9_with_a_full_spool_delivers_everything_exactly_once(
        gateways: Gateways) -> None:
    await gateways.router.stop(1.0)
    markers = [f"crash-{i}-{uuid.uuid4()}" for i in range(12)]
    try:
        for index, marker in enumerate(markers):
            rcpts = ["bob@g1.example", "dave@g2.example"] if index % 2 else ["carol@g1.example"]
            assert await asyncio.to_thread(send, message(marker), rcpts) == {}
        assert len(gateways.queued()) == len(markers)
        await asyncio.to_thread(gateways.kill_smtp_in)
    finally:
        await gateways.router.start()
    await asyncio.to_thread(gateways.start_smtp_in)
    root = gateways.config.mail_root
    for index, marker in enumerate(markers):
        rcpts = ["bob@g1.example", "dave@g2.example"] if index % 2 else ["carol@g1.example"]
        for address in rcpts:
            await wait_for(lambda a=address, m=marker: len(delivered(root, a, m)) >= 1)
    await wait_for(lambda: gateways.queued() == [])
    await asyncio.sleep(1.0)     # anything delivered twice would have arrived by now
    for index, marker in enumerate(markers):
        rcpts = ["bob@g1.example", "dave@g2.example"] if index % 2 else ["carol@g1.example"]
        for address in rcpts:
            assert len(delivered(root, address, marker)) == 1, (address, marker)


async def test_starttls_delivers_and_the_session_says_tls(gateways: Gateways,
                                                          cmdb: asyncpg.Pool) -> None:
    swaks = require_binary("swaks", "swaks")
    marker = f"tls-{uuid.uuid4()}"
    result = await asyncio.to_thread(
        subprocess.run,
        [swaks, "--server", f"127.0.0.1:{SMTP_PORT}", "--from", "ann@remote.example",
         "--to", "bob@g1.example", "--header", f"Subject: {marker}", "--tls",
         "--ehlo", "tls-client.example"],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "220 2.0.0 Ready to start TLS" in result.stdout
    root = gateways.config.mail_root
    await wait_for(lambda: len(delivered(root, "bob@g1.example", marker)) == 1)
    copy = delivered(root, "bob@g1.example", marker)[0]
    assert b"from tls-client.example" in copy and b"with ESMTPS id" in copy

    async def recorded() -> bool:
        return bool(await cmdb.fetchval(
            "SELECT tls FROM smtp_sessions WHERE component = 'smtp-in'"
            " AND helo = 'tls-client.example' AND ended_at IS NOT NULL"))

    deadline = asyncio.get_running_loop().time() + 10
    while not await recorded():
        assert asyncio.get_running_loop().time() < deadline, "no TLS session recorded"
        await asyncio.sleep(0.1)
