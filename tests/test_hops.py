"""The internal hops' peer check (mailfc.hops): the kernel's word on who connected.

The sockets here sit in a directory anyone may enter, so that `nobody` reaches them
and only the peer check (SO_PEERCRED) keeps it out: closed before a greeting, while
root is greeted.  A hop on TCP talks only to a peer with the cluster's certificate.
tests/gateways/test_hop_peers.py and tests/sending/test_hop_peers.py try the same
against running platforms.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest

from mailfc import cluster, hops, peers
from mailfc.config import parse_config
from mailfc.gateways.listener import CyclingListener
from mailfc.gateways.lmtp_hop import LmtpHop
from mailfc.protocols.smtp_server import Envelope, LmtpServer
from tests.conftest import require_root
from tests.intruder import intrude, kept_out

GREETING = b"220 hop ready\r\n"
TCP_HOP_PORT = 18057


class Greeter(asyncio.Protocol):
    """Greets, then echoes one line: enough to tell a usable session."""

    def __init__(self, listener: CyclingListener) -> None:
        self.listener = listener

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(GREETING)

    def data_received(self, data: bytes) -> None:
        self.transport.write(b"250 " + data)


@pytest.fixture
def open_directory() -> Iterator[Path]:
    """A directory anyone may enter (unlike the hops' own)."""
    require_root()
    directory = Path(tempfile.mkdtemp(prefix="mailfc-hops-", dir="/tmp"))
    directory.chmod(0o755)
    yield directory
    for entry in directory.iterdir():
        entry.unlink()
    directory.rmdir()


async def test_nobody_is_closed_before_the_greeting_root_is_greeted(
        open_directory: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = open_directory / "hop.sock"
    listener = CyclingListener("test-hop", "", 0, Greeter, path=path,
                               admit=peers.root_or_own_user)
    await listener.start()
    try:
        with caplog.at_level(logging.WARNING, "mailfc.gateways.listener"):
            outcome = await asyncio.to_thread(intrude, [f"unix:{path}"], "a@b.example",
                                              "c@d.example", "never")
        assert outcome == {f"unix:{path}": "closed"}
        assert "test-hop: refused a connection" in caplog.text
        assert "uid 65534" in caplog.text
        reader, writer = await asyncio.open_unix_connection(str(path))
        assert await reader.readline() == GREETING
        writer.write(b"NOOP\r\n")
        assert await reader.readline() == b"250 NOOP\r\n"
        writer.close()
    finally:
        await listener.stop(1.0)


async def test_a_check_that_takes_time_holds_what_the_peer_sent(open_directory: Path) -> None:
    """An awaitable verdict (Filter-Out's peer identity asks /proc and the CMDB)."""
    decided = asyncio.Event()

    async def slow(transport: asyncio.BaseTransport) -> str | None:
        await decided.wait()
        return peers.root_or_own_user(transport)

    path = open_directory / "slow.sock"
    listener = CyclingListener("slow-hop", "", 0, Greeter, path=path, admit=slow)
    await listener.start()
    try:
        reader, writer = await asyncio.open_unix_connection(str(path))
        writer.write(b"EARLY\r\n")
        await asyncio.sleep(0.2)
        assert reader._buffer == b""  # type: ignore[attr-defined]  # nothing yet
        decided.set()
        assert await reader.readline() == GREETING
        assert await reader.readline() == b"250 EARLY\r\n"
        writer.close()
        outcome = await asyncio.to_thread(intrude, [f"unix:{path}"], "a@b.example",
                                          "c@d.example", "never")
        assert kept_out(outcome[f"unix:{path}"]), outcome
    finally:
        await listener.stop(1.0)


def test_hop_listen_values_and_their_sockets(tmp_path: Path) -> None:
    config = parse_config({"paths": {"state_dir": str(tmp_path)}}, "test")
    assert config.listen.lmtp_router == "unix:lmtp-router.sock"
    router = hops.address(config, config.listen.lmtp_router)
    assert router.path == tmp_path / "private" / "hops" / "lmtp-router.sock"
    listener = hops.listener(config, "lmtp-router", config.listen.lmtp_router, Greeter)
    assert listener.path == router.path and listener.admit is peers.root_or_own_user
    assert (tmp_path / "private" / "hops").stat().st_mode & 0o777 == 0o700
    with pytest.raises(Exception, match="unix:<socket name>"):
        parse_config({"listen": {"smtp_out": "unix:../elsewhere.sock"}}, "test")


class Accepting:
    """An LMTP server's hooks that take every message (protocols.smtp_server)."""

    async def handle_DATA(self, session: object, envelope: Envelope) -> list[str]:
        return ["250 2.0.0 taken"] * len(envelope.rcpt_tos)


async def no_greeting(port: int, context: ssl.SSLContext | None) -> bytes:
    """What a client gets from the TCP hop at `port` (TLS with `context`, if any)."""
    try:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=context, server_hostname="127.0.0.1" if context else None)
    except (OSError, ssl.SSLError):
        return b""
    try:
        if context is None:
            writer.write(b"LHLO plain\r\n")
        return await asyncio.wait_for(reader.read(100), 10)
    except (OSError, ssl.SSLError, asyncio.IncompleteReadError):
        return b""
    finally:
        writer.close()


async def test_a_tcp_hop_speaks_mutual_tls_with_the_cluster_certificates(
        tmp_path: Path) -> None:
    config = parse_config({"paths": {"state_dir": str(tmp_path)}, "host": {"name": "hop-host"},
                           "listen": {"lmtp_router": f"127.0.0.1:{TCP_HOP_PORT}"}}, "test")
    server = LmtpServer(Accepting(), hostname="hop-host")
    listener = hops.listener(config, "lmtp-router", config.listen.lmtp_router,
                             server.tracked_by)
    assert listener.path is None and listener.tls is not None
    await listener.start()
    try:
        hop = LmtpHop(hops.address(config, config.listen.lmtp_router), helo="test",
                      timeout=10)
        replies = await hop.deliver("a@b.example", ["c@d.example"], b"Subject: x\r\n\r\nhi\r\n")
        assert replies["c@d.example"].ok, replies
        await hop.close()
        # No TLS; TLS without a client certificate; a certificate of another CA.
        assert await no_greeting(TCP_HOP_PORT, None) == b""
        anonymous = ssl.create_default_context(cafile=str(tmp_path / "cluster" / "ca.pem"))
        assert await no_greeting(TCP_HOP_PORT, anonymous) == b""
        foreign = tmp_path / "foreign"
        foreign.mkdir()
        cluster.new_ca(foreign / "ca.pem", foreign / "ca.key")
        cluster.issue(foreign / "ca.pem", foreign / "ca.key", "intruder", "127.0.0.1",
                      foreign / "cert.pem", foreign / "key.pem")
        stranger = ssl.create_default_context(cafile=str(tmp_path / "cluster" / "ca.pem"))
        stranger.load_cert_chain(foreign / "cert.pem", foreign / "key.pem")
        assert await no_greeting(TCP_HOP_PORT, stranger) == b""
    finally:
        await listener.stop(1.0)
