"""Filter-Out streams: it runs [filter_out] over a message it holds in a file, sends it
on from there, and tells the next hop IDENT=<peer's domain>:<Postfix's queue id>."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from mailfc import hops
from mailfc.config import Config, parse_config
from mailfc.gateways.filter import FilterService
from mailfc.gateways.filter.checks import EICAR
from mailfc.gateways.listener import CyclingListener
from mailfc.messages import BytesSource, MessageData
from mailfc.protocols.lmtp import XFORWARD_EXTENSION, LmtpClient, xforward_attributes
from mailfc.protocols.smtp_server import Envelope, LmtpServer, ServerConnection, Session

SINK = "unix:mfcf-sink.sock"


@dataclass
class Sink:
    """The next hop: notes what each message came with (never the message itself)."""

    taken: list[dict[str, Any]] = field(default_factory=list)
    extra_verbs = ("XFORWARD",)
    ehlo_extensions = [XFORWARD_EXTENSION]

    async def handle_XFORWARD(self, session: Session, envelope: Envelope,
                              argument: str) -> str:
        envelope.extra["xforward"] = xforward_attributes(argument) or {}
        return "250 2.0.0 OK"

    async def handle_DATA(self, session: Session, envelope: Envelope) -> list[str]:
        assert envelope.message is not None
        digest = hashlib.sha256()
        for chunk in envelope.message.chunks():
            digest.update(chunk)
        self.taken.append({"xforward": envelope.extra.get("xforward", {}),
                           "size": envelope.message.size, "sha256": digest.hexdigest(),
                           "in_memory": envelope.message.in_memory})
        return ["250 2.0.0 taken"] * len(envelope.rcpt_tos)


@pytest.fixture
async def filter_out(tmp_path: Path, cmdb: asyncpg.Pool
                     ) -> AsyncIterator[tuple[FilterService, Sink, Path]]:
    config: Config = parse_config({
        "paths": {"state_dir": str(tmp_path)},
        "filter_out": {"next_hop": SINK},
        "recorder": {"flush_interval_s": 0.05}}, "filter-out test")
    sink = Sink()
    server = LmtpServer(sink, hostname="sink", message_dir=tmp_path / "sink")

    def factory(listener: CyclingListener) -> ServerConnection:
        return server.tracked_by(listener)

    listener = hops.listener(config, "sink", SINK, factory)
    await listener.start()
    socket = tmp_path / "filter-out.sock"
    service = FilterService(config, cmdb, socket=socket)
    await service.start()
    try:
        yield service, sink, socket
    finally:
        await service.stop(1.0)
        await listener.stop(1.0)


async def test_filter_out_streams_and_forwards_the_ident_with_the_peer_domain(
        filter_out: tuple[FilterService, Sink, Path], tmp_path: Path) -> None:
    service, sink, socket = filter_out
    reader, writer = await asyncio.open_unix_connection(str(socket))
    client = LmtpClient(reader, writer, 30.0)
    assert (await client.hello("postfix.example")).ok
    big = MessageData(tmp_path)
    big.write(b"From: ann@f1.example\r\nSubject: big\r\n\r\n")
    for number in range(100_000):
        big.write(b".line %06d of a big message\r\n" % number)
    replies = await client.deliver("ann@f1.example", ["x@remote.example", "y@remote.example"],
                                   big, preamble=["XFORWARD IDENT=4ZtQk3Xyz1"])
    assert [r.code for r in replies.values()] == [250, 250], replies
    infected = BytesSource(b"From: ann@f1.example\r\n\r\n" + EICAR + b"\r\n")
    refused = await client.deliver("ann@f1.example", ["x@remote.example"], infected)
    assert str(refused["x@remote.example"]).startswith("550 5.7.1 infected"), refused
    writer.close()
    digest = hashlib.sha256()
    for chunk in big.chunks():
        digest.update(chunk)
    assert len(sink.taken) == 1
    taken = sink.taken[0]
    # Root on the host connected (a domain's container would give its domain).
    assert taken["xforward"] == {"IDENT": "[host]:4ZtQk3Xyz1"}
    assert taken["size"] == big.size and taken["sha256"] == digest.hexdigest()
    assert taken["in_memory"] is False
    assert service.handler.verdicts == {"accept": 1, "reject": 1}
