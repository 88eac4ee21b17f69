"""SMTP-Out in this process: its LMTP intake (XFORWARD IDENT, the delivered journal), its
spool, and remote delivery to a streaming MX sink in a process of its own."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest

from mailfc.config import Config, parse_config
from mailfc.gateways.smtp_out.service import SmtpOutService
from mailfc.gateways.spool import Envelope, SpoolFiles, spool_directory
from mailfc.gateways.spool.store import new_queue_id
from mailfc.messages import BytesSource, FileSlice, Source
from mailfc.protocols.lmtp import LmtpClient, Reply
from mailfc.tls import certificate_paths, server_context
from tests.gateways.stream_sink import PeakMemory, big_message, received, running_sink

MESSAGE = b"From: a@hosted.example\r\nSubject: out\r\n\r\nhello\r\n"


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A state directory with a short path (unix socket paths have a limit)."""
    directory = Path(tempfile.mkdtemp(prefix="mfco"))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def sink(mailfc_config: Config, short_dir: Path) -> Iterator[tuple[Path, int]]:
    server_context(mailfc_config)       # generates the certificate when missing
    with running_sink(short_dir, *certificate_paths(mailfc_config)) as running:
        yield running


def out_config(state_dir: Path, port: int) -> Config:
    return parse_config({
        "paths": {"state_dir": str(state_dir)},
        "host": {"name": "out.test"},
        "listen": {"smtp_out": "unix:out.sock", "lmtp_router": "unix:router.sock"},
        "smtp_out": {"routes": [f"remote.example=127.0.0.1:{port}"], "timeout_s": 30.0},
        "spool": {"retry_base_s": 0.5, "retry_max_s": 2.0, "scan_interval_s": 0.2,
                  "min_free_bytes": 1 << 20},
    }, "smtp-out tests")


@pytest.fixture
async def smtp_out(cmdb: asyncpg.Pool, short_dir: Path, sink: tuple[Path, int]
                   ) -> AsyncIterator[SmtpOutService]:
    service = SmtpOutService(out_config(short_dir / "state", sink[1]), cmdb)
    await service.start()
    try:
        yield service
    finally:
        await service.stop(2.0)


async def send(service: SmtpOutService, recipients: list[str], message: bytes | Source,
               ident: str | None = None) -> dict[str, Reply]:
    """One LMTP transaction into the intake, as Filter-Out sends it."""
    path = service.config.hops_dir / "out.sock"
    reader, writer = await asyncio.open_unix_connection(str(path))
    client = LmtpClient(reader, writer, 60)
    try:
        lhlo = await client.hello("filter-out.test")
        assert lhlo.ok and "XFORWARD" in lhlo.text
        preamble = [f"XFORWARD IDENT={ident}"] if ident is not None else []
        return await client.deliver("a@hosted.example", recipients, message,
                                    preamble=preamble)
    finally:
        writer.close()


async def settled(service: SmtpOutService, output: Path, count: int) -> list[dict[str, object]]:
    """The sink's records once `count` arrived and the spool has nothing left to do."""
    for _ in range(600):
        if len(received(output)) >= count:
            break
        await asyncio.sleep(0.05)
    assert await service.spool.wait_idle(30)
    return received(output)


async def test_the_same_ident_twice_is_queued_once(smtp_out: SmtpOutService,
                                                   sink: tuple[Path, int]) -> None:
    """Filter-Out's retry after a lost reply: same IDENT, same recipients.  The retry
    gets the first reply and nothing is queued again; a new recipient under the same
    IDENT is."""
    output, _ = sink
    ident = f"s.example:{uuid.uuid4().hex[:16].upper()}"
    recipients = ["x@remote.example", "y@remote.example"]
    first = await send(smtp_out, recipients, MESSAGE, ident)
    assert {reply.code for reply in first.values()} == {250}
    assert "queued as" in first["x@remote.example"].text
    second = await send(smtp_out, recipients, MESSAGE, ident)
    assert second == first
    records = await settled(smtp_out, output, 1)
    assert [record["to"] for record in records] == [recipients]

    third = await send(smtp_out, ["x@remote.example", "z@remote.example"], MESSAGE, ident)
    assert third["x@remote.example"] == first["x@remote.example"]
    assert third["z@remote.example"].code == 250
    assert third["z@remote.example"] != first["x@remote.example"]     # a new queue id
    records = await settled(smtp_out, output, 2)
    assert [record["to"] for record in records] == [recipients, ["z@remote.example"]]


async def test_without_ident_each_transaction_is_queued(smtp_out: SmtpOutService,
                                                        sink: tuple[Path, int]) -> None:
    output, _ = sink
    first = await send(smtp_out, ["x@remote.example"], MESSAGE)
    second = await send(smtp_out, ["x@remote.example"], MESSAGE)
    assert first != second and {first["x@remote.example"].code,
                                second["x@remote.example"].code} == {250}
    assert len(await settled(smtp_out, output, 2)) == 2


async def test_a_restarted_intake_knows_the_journal(cmdb: asyncpg.Pool, short_dir: Path,
                                                    sink: tuple[Path, int]) -> None:
    output, port = sink
    config = out_config(short_dir / "state", port)
    ident = f"s.example:{uuid.uuid4().hex[:16].upper()}"
    service = SmtpOutService(config, cmdb)
    await service.start()
    try:
        first = await send(service, ["x@remote.example"], MESSAGE, ident)
        await settled(service, output, 1)
    finally:
        await service.stop(2.0)
    again = SmtpOutService(config, cmdb)
    await again.start()
    try:
        assert await send(again, ["x@remote.example"], MESSAGE, ident) == first
        assert len(await settled(again, output, 1)) == 1
    finally:
        await again.stop(2.0)


async def test_a_message_spooled_but_not_journaled_is_not_sent_twice(
        cmdb: asyncpg.Pool, short_dir: Path, sink: tuple[Path, int]) -> None:
    """A process killed -9 between the spool's commit and the journal's record: the
    message is in the spool, the journal does not know it, Filter-Out never got its
    250 and retries.  The next process must answer that retry from the spool file's
    IDENT, and the remote MX must get the message once."""
    output, port = sink
    config = out_config(short_dir / "state", port)
    ident = f"s.example:{uuid.uuid4().hex[:16].upper()}"
    recipients = ("x@remote.example", "y@remote.example")
    files = SpoolFiles(spool_directory(config.state_dir, config.spool.directory, "smtp-out"))
    files.prepare()
    queue_id = new_queue_id()
    files.commit(Envelope(queue_id, "a@hosted.example", recipients, time.time(),
                          size=len(MESSAGE), ident=ident), BytesSource(MESSAGE))
    files.sync_queue()
    service = SmtpOutService(config, cmdb)
    await service.start()
    try:
        retry = await send(service, list(recipients), MESSAGE, ident)
        assert {str(reply) for reply in retry.values()} == {f"250 2.0.0 queued as {queue_id}"}
        records = await settled(service, output, 1)
        await asyncio.sleep(1.0)        # a second copy would come right behind the first
        assert [record["to"] for record in received(output)] == [list(recipients)], records
    finally:
        await service.stop(2.0)


async def test_a_broken_destination_domain_fails_for_good(smtp_out: SmtpOutService) -> None:
    """A bounce to a forged sender's broken address: 550 at once, not a temporary
    failure retried (and looked up in PostgreSQL and DNS) for the spool's lifetime."""
    envelope = Envelope(new_queue_id(), "", ("x@remote.exa mple",), time.time(),
                        size=len(MESSAGE), is_bounce=True)
    replies = await smtp_out._deliver(envelope, ["x@remote.exa mple", "y@remote.exa mple"],
                                      BytesSource(MESSAGE))
    assert {reply.code for reply in replies.values()} == {550}
    assert replies["x@remote.exa mple"].text.startswith("5.1.2 bad destination")


async def test_a_large_message_streams_to_the_remote_mx(smtp_out: SmtpOutService,
                                                        sink: tuple[Path, int],
                                                        short_dir: Path) -> None:
    """20 MB into the intake, through the spool, to the remote MX over TLS: intact, and
    this process (client, intake, spool and delivery all in it) peaks far below the
    message's size."""
    output, _ = sink
    path = short_dir / "big.eml"
    digest, _ = await asyncio.to_thread(big_message, path, 20 << 20, str(uuid.uuid4()))
    size = path.stat().st_size
    with PeakMemory() as memory:
        replies = await send(smtp_out, ["big@remote.example"], FileSlice(path, 0, size),
                             f"s.example:{uuid.uuid4().hex[:16].upper()}")
        assert replies["big@remote.example"].code == 250, replies
        [record] = await settled(smtp_out, output, 1)
    assert record["sha256"] == digest and record["size"] == size
    assert record["tls"] is True and f"SIZE={size}" in record["options"]
    print(f"20 MB through SMTP-Out: peak memory +{memory.grown_bytes >> 10} KiB")
    assert memory.grown_bytes < 16 << 20
