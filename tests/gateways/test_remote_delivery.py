"""SMTP-Out's remote delivery against real SMTP servers on loopback (aiosmtpd, and a
streaming sink in a process of its own for large messages)."""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from mailfc.config import Config
from mailfc.gateways.smtp_out.remote import RemoteDelivery
from mailfc.gateways.smtp_out.routes import Hop, NoRoute, Router, parse_routes
from mailfc.messages import FileSlice
from mailfc.tls import certificate_paths, server_context
from tests.gateways.stream_sink import PeakMemory, big_message, received, running_sink


class Sink:
    """A remote MX: accepts, or answers what the test tells it to."""

    def __init__(self) -> None:
        self.received: list[tuple[str, list[str], bytes]] = []
        self.rcpt_replies: dict[str, str] = {}
        self.data_reply = "250 2.0.0 queued"
        self.mail_options: list[list[str]] = []

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, options: list[str]) -> str:
        reply = self.rcpt_replies.get(address, "250 2.1.5 OK")
        if reply.startswith("250"):
            envelope.rcpt_tos.append(address)
        return reply

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.data_reply.startswith("250"):
            self.received.append((envelope.mail_from or "", list(envelope.rcpt_tos),
                                  envelope.original_content or b""))
            self.mail_options.append(list(envelope.mail_options))
        return self.data_reply


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
async def sink(mailfc_config: Config) -> AsyncIterator[tuple[Sink, int]]:
    handler = Sink()
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port,
                            tls_context=server_context(mailfc_config))
    await asyncio.to_thread(controller.start)
    try:
        yield handler, port
    finally:
        await asyncio.to_thread(controller.stop)


def delivery(port: int, timeout: float = 5.0) -> RemoteDelivery:
    return RemoteDelivery(Router({"remote.example": Hop("127.0.0.1", port)}),
                          helo="out.test", timeout=timeout)


MESSAGE = b"From: a@hosted.example\r\nSubject: out\r\n\r\nhello\r\n"


async def test_delivers_with_opportunistic_tls(sink: tuple[Sink, int]) -> None:
    handler, port = sink
    replies = await delivery(port).deliver("a@hosted.example",
                                           ["x@remote.example", "y@remote.example"], MESSAGE)
    assert {r: reply.code for r, reply in replies.items()} == {
        "x@remote.example": 250, "y@remote.example": 250}
    assert handler.received[0][1] == ["x@remote.example", "y@remote.example"]


async def test_per_recipient_failures(sink: tuple[Sink, int]) -> None:
    handler, port = sink
    handler.rcpt_replies = {"temp@remote.example": "450 4.2.1 try later",
                            "gone@remote.example": "550 5.1.1 no such user"}
    replies = await delivery(port).deliver(
        "a@hosted.example", ["temp@remote.example", "gone@remote.example", "ok@remote.example"],
        MESSAGE)
    assert replies["temp@remote.example"].code == 450
    assert replies["gone@remote.example"].code == 550
    assert replies["ok@remote.example"].code == 250
    handler.data_reply = "554 5.6.0 content refused"
    replies = await delivery(port).deliver("a@hosted.example", ["ok@remote.example"], MESSAGE)
    assert replies["ok@remote.example"].code == 554


async def test_unreachable_and_hanging_hosts_are_temporary() -> None:
    replies = await delivery(free_port()).deliver("a@hosted.example", ["x@remote.example"],
                                                  MESSAGE)
    assert replies["x@remote.example"].code == 451
    assert replies["x@remote.example"].text.startswith("4.4.1")

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)  # accepts, never greets
    try:
        port = listener.getsockname()[1]
        replies = await delivery(port, timeout=0.5).deliver(
            "a@hosted.example", ["x@remote.example"], MESSAGE)
        assert replies["x@remote.example"].code == 451
    finally:
        listener.close()


def test_static_routes() -> None:
    routes = parse_routes(["remote.example=192.0.2.25:2525", "*=smarthost.example"])
    assert routes["remote.example"] == Hop("192.0.2.25", 2525)
    assert routes["*"] == Hop("smarthost.example", 25)
    with pytest.raises(ValueError):
        parse_routes(["nonsense"])


async def test_null_mx_is_permanent(monkeypatch: Any) -> None:
    router = Router({})

    class Record:
        preference = 0
        exchange = "."

    async def resolve(name: str, kind: str) -> list[Record]:
        return [Record()]

    monkeypatch.setattr(router.resolver, "resolve", resolve)
    with pytest.raises(NoRoute):
        await router.hops("nomail.example")


async def test_announces_size_and_keeps_the_message_intact(sink: tuple[Sink, int]) -> None:
    handler, port = sink
    message = (b"From: a@hosted.example\r\nSubject: dots\r\n\r\n.leading dot\r\n"
               b"..two dots\r\n.\r\nlast line without end")
    replies = await delivery(port).deliver("a@hosted.example", ["x@remote.example"],
                                           message, ("BODY=8BITMIME",))
    assert replies["x@remote.example"].code == 250
    # The message arrives as sent (its last line ended), SIZE and BODY announced.
    assert handler.received[0][2] == message + b"\r\n"
    assert f"SIZE={len(message)}" in handler.mail_options[0]
    assert "BODY=8BITMIME" in handler.mail_options[0]


@pytest.fixture
def stream_sink(mailfc_config: Config, tmp_path: Path) -> Iterator[tuple[Path, int]]:
    """The streaming sink (tests/gateways/stream_sink.py), with STARTTLS."""
    server_context(mailfc_config)       # generates the certificate when missing
    with running_sink(tmp_path, *certificate_paths(mailfc_config)) as sink:
        yield sink


async def test_streams_a_large_message_in_bounded_memory(stream_sink: tuple[Path, int],
                                                         tmp_path: Path) -> None:
    """20 MB from a file to the remote MX over TLS: intact, and this process's peak
    memory rises by far less than the message."""
    output, port = stream_sink
    path = tmp_path / "big.eml"
    digest, _ = await asyncio.to_thread(big_message, path, 20 << 20, str(uuid.uuid4()))
    size = path.stat().st_size
    with PeakMemory() as memory:
        started = time.monotonic()
        replies = await delivery(port, timeout=30).deliver(
            "a@hosted.example", ["x@remote.example"], FileSlice(path, 0, size))
        elapsed = time.monotonic() - started
    assert replies["x@remote.example"].code == 250, replies
    [record] = received(output)
    assert record["sha256"] == digest and record["size"] == size
    assert record["tls"] is True
    assert f"SIZE={size}" in record["options"]
    print(f"20 MB to the remote MX in {elapsed:.2f} s, peak memory"
          f" +{memory.grown_bytes >> 10} KiB")
    assert memory.grown_bytes < 16 << 20, (memory.grown_bytes, elapsed)
