"""LMTP Router: multi-domain, multi-recipient delivery through each domain's own Dovecot."""

from __future__ import annotations

import asyncio
import hashlib
import smtplib
import uuid
from email.message import EmailMessage
from pathlib import Path

from mailfc.messages import FileSlice
from mailfc.protocols.lmtp import LmtpClient
from mailfc.routers.lmtp import LmtpRouter
from tests.gateways.stream_sink import PeakMemory, big_message
from tests.routers.conftest import RouterHost, lmtp_socket, router_config


def message(subject: str) -> bytes:
    mail = EmailMessage()
    mail["From"] = "sender@remote.example"
    mail["To"] = "bob@a.example"
    mail["Subject"] = subject
    mail["Message-ID"] = f"<{uuid.uuid4()}@remote.example>"
    mail.set_content("Hello through the LMTP router.\n.leading dot line\n")
    return mail.as_bytes()


def delivered(mail_root: Path, address: str, subject: str) -> list[Path]:
    localpart, domain = address.split("@")
    new = mail_root / domain / localpart / "Maildir" / "new"
    if not new.exists():
        return []
    return [path for path in new.iterdir() if subject.encode() in path.read_bytes()]


def lmtp_transaction(router_host: RouterHost, recipients: list[str], body: bytes,
                     ident: str | None = None, socket: Path | None = None
                     ) -> tuple[dict[str, tuple[int, bytes]], list[tuple[int, bytes]]]:
    """RCPT replies and the per-recipient DATA replies, read as LMTP defines them;
    with `ident`, XFORWARD IDENT=ident first, as a spool sends it."""
    # smtplib.LMTP takes a host starting with "/" for a unix socket.
    with smtplib.LMTP(str(socket or lmtp_socket(router_host.config)), timeout=30) as client:
        client.ehlo()
        if ident is not None:
            assert client.has_extn("xforward")
            code, text = client.docmd("XFORWARD", f"IDENT={ident} ADDR=192.0.2.7 HELO=mx.test")
            assert code == 250, text
        client.mail("sender@remote.example")
        rcpt_replies = {rcpt: client.rcpt(rcpt) for rcpt in recipients}
        accepted = [r for r, (code, _) in rcpt_replies.items() if code == 250]
        data_replies: list[tuple[int, bytes]] = []
        if accepted:
            data_replies.append(client.data(body))
            for _ in accepted[1:]:
                data_replies.append(client.getreply())
    return rcpt_replies, data_replies


async def test_multi_domain_delivery_with_per_recipient_replies(router_host: RouterHost) -> None:
    subject = f"multi {uuid.uuid4()}"
    recipients = ["bob@a.example", "nobody@a.example", "dave@b.example", "carol@a.example",
                  "x@not-hosted.example"]
    rcpt, data = await asyncio.to_thread(lmtp_transaction, router_host, recipients,
                                         message(subject))
    assert rcpt["nobody@a.example"][0] == 550 and b"5.1.1" in rcpt["nobody@a.example"][1]
    assert rcpt["x@not-hosted.example"][0] == 550
    assert [code for code, _ in data] == [250, 250, 250]
    for address in ("bob@a.example", "dave@b.example", "carol@a.example"):
        assert len(delivered(router_host.mail_root, address, subject)) == 1, address
    # Each domain's mail went through its own container.
    names = {i.domain for i in await router_host.runtime.instances()}
    assert {"a.example", "b.example"} <= names


async def test_alias_expands_across_domains(router_host: RouterHost) -> None:
    subject = f"alias {uuid.uuid4()}"
    rcpt, data = await asyncio.to_thread(lmtp_transaction, router_host, ["info@a.example"],
                                         message(subject))
    assert rcpt["info@a.example"][0] == 250 and [c for c, _ in data] == [250]
    assert len(delivered(router_host.mail_root, "bob@a.example", subject)) == 1
    assert len(delivered(router_host.mail_root, "dave@b.example", subject)) == 1


async def test_cold_path_starts_the_container(router_host: RouterHost) -> None:
    await router_host.stop_containers("b.example")
    assert await router_host.runtime.instances("b.example") == []
    subject = f"cold {uuid.uuid4()}"
    _, data = await asyncio.to_thread(lmtp_transaction, router_host, ["dave@b.example"],
                                      message(subject))
    assert [c for c, _ in data] == [250]
    assert len(delivered(router_host.mail_root, "dave@b.example", subject)) == 1


async def test_unstartable_domain_fails_only_its_recipients(router_host: RouterHost) -> None:
    subject = f"broken {uuid.uuid4()}"
    _, data = await asyncio.to_thread(
        lmtp_transaction, router_host, ["erin@broken.example", "bob@a.example"],
        message(subject))
    codes = [code for code, _ in data]
    assert codes == [451, 250]
    assert b"4.3.0" in data[0][1]
    assert len(delivered(router_host.mail_root, "bob@a.example", subject)) == 1
    assert await router_host.runtime.instances("broken.example") == []


async def test_a_retry_with_the_same_ident_is_delivered_once(router_host: RouterHost) -> None:
    """The spool's retry after a lost reply: same queue id, same recipients.  The retry
    gets the reply Dovecot gave the first time and no second copy; an alias's mailboxes
    are remembered one by one."""
    subject = f"ident {uuid.uuid4()}"
    ident = f"Q{uuid.uuid4().hex[:12].upper()}"
    recipients = ["bob@a.example", "dave@b.example", "info@a.example"]
    _, first = await asyncio.to_thread(lmtp_transaction, router_host, recipients,
                                       message(subject), ident)
    _, second = await asyncio.to_thread(lmtp_transaction, router_host, recipients,
                                        message(subject), ident)
    assert [code for code, _ in first] == [250, 250, 250]
    assert second == first
    # info@a.example expands to bob and dave: each mailbox has the message once.
    for address in ("bob@a.example", "dave@b.example"):
        assert len(delivered(router_host.mail_root, address, subject)) == 1, address
    # Another recipient under the same queue id is a new delivery.
    _, third = await asyncio.to_thread(lmtp_transaction, router_host, ["carol@a.example"],
                                       message(subject), ident)
    assert [code for code, _ in third] == [250]
    assert len(delivered(router_host.mail_root, "carol@a.example", subject)) == 1


async def test_without_ident_every_transaction_delivers(router_host: RouterHost) -> None:
    subject = f"no ident {uuid.uuid4()}"
    for _ in range(2):
        _, data = await asyncio.to_thread(lmtp_transaction, router_host, ["bob@a.example"],
                                          message(subject))
        assert [code for code, _ in data] == [250]
    assert len(delivered(router_host.mail_root, "bob@a.example", subject)) == 2


async def test_the_same_ident_twice_at_once_is_delivered_once(router_host: RouterHost
                                                              ) -> None:
    """A spool that had the message scheduled twice at once: the second transaction
    waits for the first and is answered from the journal."""
    subject = f"twice {uuid.uuid4()}"
    ident = f"Q{uuid.uuid4().hex[:12].upper()}"
    results = await asyncio.gather(*(
        asyncio.to_thread(lmtp_transaction, router_host, ["bob@a.example", "dave@b.example"],
                          message(subject), ident) for _ in range(4)))
    for _, data in results:
        assert [code for code, _ in data] == [250, 250]
    for address in ("bob@a.example", "dave@b.example"):
        assert len(delivered(router_host.mail_root, address, subject)) == 1, address


async def test_a_new_router_knows_the_journal(router_host: RouterHost, state_dir: Path
                                              ) -> None:
    """A router started later (a restart, or the process a listener is handed to)
    reads what the first one recorded, and follows what it records afterwards."""
    subject = f"restart {uuid.uuid4()}"
    ident = f"Q{uuid.uuid4().hex[:12].upper()}"
    _, first = await asyncio.to_thread(lmtp_transaction, router_host, ["bob@a.example"],
                                       message(subject), ident)
    assert [code for code, _ in first] == [250]
    running = next(s for s in router_host.platform.services if isinstance(s, LmtpRouter))
    config = router_config(state_dir, runtime={"name_prefix": "mfcr"},
                           listen={"lmtp_router": "unix:router-tests-lmtp-next.sock"})
    successor = LmtpRouter(config, running.directory)
    await successor.start()
    try:
        socket = lmtp_socket(config).with_name("router-tests-lmtp-next.sock")
        _, again = await asyncio.to_thread(lmtp_transaction, router_host, ["bob@a.example"],
                                           message(subject), ident, socket)
        assert again == first
        assert len(delivered(router_host.mail_root, "bob@a.example", subject)) == 1
        # Delivered by the successor: the first router, still running, knows it too.
        later = f"Q{uuid.uuid4().hex[:12].upper()}"
        _, by_successor = await asyncio.to_thread(
            lmtp_transaction, router_host, ["carol@a.example"], message(subject), later,
            socket)
        _, by_first = await asyncio.to_thread(
            lmtp_transaction, router_host, ["carol@a.example"], message(subject), later)
        assert by_first == by_successor and by_first[0][0] == 250
        assert len(delivered(router_host.mail_root, "carol@a.example", subject)) == 1
    finally:
        await successor.stop(2.0)


async def test_a_large_message_streams_through(router_host: RouterHost, tmp_path: Path
                                               ) -> None:
    """20 MB through the router (running in this process) into two domains' Dovecot at
    once: intact in both mailboxes, and the process's peak memory rises by far less
    than the message."""
    subject = f"large {uuid.uuid4()}"
    path = tmp_path / "large.eml"
    _, stored_digest = await asyncio.to_thread(big_message, path, 20 << 20, subject)
    # Warm up: the containers run, the sessions exist.
    await asyncio.to_thread(lmtp_transaction, router_host, ["bob@a.example", "dave@b.example"],
                            message(f"warm {uuid.uuid4()}"))
    with PeakMemory() as memory:
        reader, writer = await asyncio.open_unix_connection(lmtp_socket(router_host.config))
        client = LmtpClient(reader, writer, 60)
        try:
            assert (await client.hello("test.example")).ok
            replies = await client.deliver(
                "big@remote.example", ["bob@a.example", "dave@b.example"],
                FileSlice(path, 0, path.stat().st_size),
                preamble=[f"XFORWARD IDENT=Q{uuid.uuid4().hex[:12].upper()}"])
        finally:
            writer.close()
    assert all(reply.code == 250 for reply in replies.values()), replies
    for address in ("bob@a.example", "dave@b.example"):
        [stored] = delivered(router_host.mail_root, address, subject)
        assert await asyncio.to_thread(_tail_digest, stored, path) == stored_digest, address
    print(f"20 MB through the router: peak memory +{memory.grown_bytes >> 10} KiB")
    assert memory.grown_bytes < 16 << 20


def _tail_digest(stored: Path, sent: Path) -> str:
    """sha256 of the stored file's end as long as the sent message with LF line ends
    (Dovecot puts its own header lines first)."""
    length = 0
    previous = b""
    with sent.open("rb") as handle:
        while piece := handle.read(1 << 20):
            split_crlf = previous.endswith(b"\r") and piece.startswith(b"\n")
            length += len(piece) - piece.count(b"\r\n") - split_crlf
            previous = piece
    digest = hashlib.sha256()
    with stored.open("rb") as handle:
        handle.seek(stored.stat().st_size - length)
        while piece := handle.read(1 << 20):
            digest.update(piece)
    return digest.hexdigest()
