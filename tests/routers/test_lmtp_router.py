"""LMTP Router: multi-domain, multi-recipient delivery through each domain's own Dovecot."""

from __future__ import annotations

import asyncio
import smtplib
import uuid
from email.message import EmailMessage
from pathlib import Path

from tests.routers.conftest import RouterHost, lmtp_socket


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


def lmtp_transaction(router_host: RouterHost, recipients: list[str], body: bytes
                     ) -> tuple[dict[str, tuple[int, bytes]], list[tuple[int, bytes]]]:
    """RCPT replies and the per-recipient DATA replies, read as LMTP defines them."""
    # smtplib.LMTP takes a host starting with "/" for a unix socket.
    with smtplib.LMTP(str(lmtp_socket(router_host.config)), timeout=30) as client:
        client.ehlo()
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
