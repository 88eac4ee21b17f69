"""The login routers' connection caps (mailfc.anvil): one address gets so many
connections at once and per window on the IMAP Router (143, 993) and the SMTP Router
(587, 465), then `* BYE` / `421`; another address is still served.

The routers run in the test process on ports of their own with small caps (3 at once,
10 per minute); only their greetings are needed, so no container starts.  Clients bind
127.0.0.x source addresses to be different clients.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from mailfc.anvil import IMAP_REFUSAL, SMTP_REFUSAL
from mailfc.db.directory import Directory
from mailfc.routers.imap import ImapRouter
from mailfc.routers.submission import SubmissionRouter
from mailfc.tls import server_context
from tests.routers.conftest import HOST, client_tls, provision, router_config

IMAP, IMAPS, SUBMISSION, SUBMISSIONS = 11144, 11994, 11588, 11466
PER_CLIENT, RATE = 3, 10


@dataclass
class Routers:
    imap: ImapRouter
    submission: SubmissionRouter


@pytest.fixture(scope="module")
async def routers(state_dir: Path, cmdb: asyncpg.Pool) -> AsyncIterator[Routers]:
    await provision(cmdb)
    caps = {"max_per_client": PER_CLIENT, "max_rate_per_client": RATE}
    config = router_config(
        state_dir,
        listen={"imap_router": f"127.0.0.1:{IMAP}", "imap_router_tls": f"127.0.0.1:{IMAPS}",
                "submission": f"127.0.0.1:{SUBMISSION}",
                "submissions": f"127.0.0.1:{SUBMISSIONS}"},
        imap_router_connections=caps, submission_connections=caps)
    directory = Directory(cmdb)
    context = server_context(config)
    started = Routers(ImapRouter(config, directory, context),
                      SubmissionRouter(config, directory, context))
    await started.imap.start()
    await started.submission.start()
    try:
        yield started
    finally:
        await started.imap.stop(2.0)
        await started.submission.stop(2.0)


Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def connect(port: int, source: str, tls: bool = False) -> tuple[Connection, bytes]:
    """A connection from `source` and the first line the router says."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, local_addr=(source, 0),
        ssl=client_tls() if tls else None, server_hostname="" if tls else None)
    line = await asyncio.wait_for(reader.readline(), 10)
    return (reader, writer), line.rstrip(b"\r\n")


async def closed(connection: Connection) -> bool:
    try:
        return await asyncio.wait_for(connection[0].read(), 10) == b""
    except (ConnectionError, ssl.SSLError):
        return True


def close(connections: list[Connection]) -> None:
    for _, writer in connections:
        writer.close()


CASES = [
    # (first port, second port of the same service, greeting, refusal, TLS on the second)
    pytest.param(IMAP, IMAPS, b"* OK ", IMAP_REFUSAL, id="imap-143-993"),
    pytest.param(SUBMISSION, SUBMISSIONS, b"220 ", SMTP_REFUSAL, id="submission-587-465"),
]


@pytest.mark.parametrize(("port", "tls_port", "greeting", "refusal"), CASES)
async def test_past_the_count_refused_on_both_ports_others_served(
        routers: Routers, port: int, tls_port: int, greeting: bytes, refusal: str) -> None:
    source = "127.0.0.40" if port == IMAP else "127.0.0.50"
    held = []
    # The plain and the implicit-TLS port count together.
    for index in range(PER_CLIENT):
        connection, line = await connect(tls_port if index else port, source, tls=index > 0)
        assert line.startswith(greeting), line
        held.append(connection)
    expected = refusal.format(host=HOST, client=source).encode()
    for over_port, tls in ((port, False), (tls_port, True)):
        connection, line = await connect(over_port, source, tls=tls)
        assert line == expected
        assert await closed(connection)
        close([connection])
    other, line = await connect(port, "127.0.0.60")
    assert line.startswith(greeting), line
    close([other])
    # A connection that ends gives its place back.
    close(held[:1])
    await asyncio.sleep(0.2)
    again, line = await connect(port, source)
    assert line.startswith(greeting), line
    close([again, *held[1:]])


@pytest.mark.parametrize(("port", "greeting", "refusal"), [
    pytest.param(IMAP, b"* OK ", IMAP_REFUSAL, id="imap"),
    pytest.param(SUBMISSION, b"220 ", SMTP_REFUSAL, id="submission"),
])
async def test_past_the_rate_refused(routers: Routers, port: int, greeting: bytes,
                                     refusal: str) -> None:
    source = "127.0.0.41" if port == IMAP else "127.0.0.51"
    for _ in range(RATE):
        connection, line = await connect(port, source)
        assert line.startswith(greeting), line
        close([connection])
        await asyncio.sleep(0.01)
    connection, line = await connect(port, source)
    assert line == refusal.format(host=HOST, client=source).encode()
    close([connection])
    other, line = await connect(port, "127.0.0.61")
    assert line.startswith(greeting), line
    close([other])
