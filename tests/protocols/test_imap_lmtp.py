"""IMAP pre-login syntax and the LMTP client's DATA encoding."""

from __future__ import annotations

import asyncio
import random

import pytest

from mailfc.messages import BytesSource
from mailfc.protocols import imap, lmtp


def test_split_tag_and_arguments() -> None:
    assert imap.split_tag(b"a1 login bob pw") == (b"a1", b"LOGIN", b"bob pw")
    segment = imap.parse_segment(b'"bob@example.org" "pa ss\\"word"')
    assert segment.arguments == [b"bob@example.org", b'pa ss"word'] and segment.literal is None


def test_an_id_list_is_read_flat() -> None:
    segment = imap.parse_segment(b'("name" "Thunder bird" "version" NIL) ')
    assert segment.arguments == [b"name", b"Thunder bird", b"version", b"NIL"]
    assert imap.parse_segment(b"NIL").arguments == [b"NIL"]


def test_literals() -> None:
    segment = imap.parse_segment(b"bob {5}")
    assert segment.arguments == [b"bob"] and segment.literal == 5 and not segment.nonsync
    segment = imap.parse_segment(b"{3+}")
    assert segment.arguments == [] and segment.literal == 3 and segment.nonsync


@pytest.mark.parametrize("line", [b'"unterminated', b'"bad \\x escape"', b"{99999999}",
                                  b"bad\\atom"])
def test_bad_syntax(line: bytes) -> None:
    with pytest.raises(imap.ImapSyntaxError):
        imap.parse_segment(line)


@pytest.mark.parametrize("line", [b"", b"+ LOGIN", b"a1", b"a\x01 NOOP"])
def test_bad_tags(line: bytes) -> None:
    with pytest.raises(imap.ImapSyntaxError):
        imap.split_tag(line)


def test_quote() -> None:
    assert imap.quote('say "hi"') == b'"say \\"hi\\""'
    assert imap.quote("line\nbreak").startswith(b"{10+}\r\n")


def test_dot_stuffing() -> None:
    assert lmtp.dot_stuff(b"a\n.b\n..c") == b"a\r\n..b\r\n...c\r\n.\r\n"
    assert lmtp.dot_stuff(b"x\r\n") == b"x\r\n.\r\n"


def whole_message_stuffing(message: bytes) -> bytes:
    """Dot-stuffing of a whole message at once: what the streamed version must equal."""
    text = message.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    if not text.endswith(b"\r\n"):
        text += b"\r\n"
    lines = text.split(b"\r\n")
    return b"\r\n".join(b"." + line if line.startswith(b".") else line
                         for line in lines) + b".\r\n"


def test_streamed_dot_stuffing_matches_whole_message_stuffing() -> None:
    """Whatever the chunk size (one byte included), CR, LF and dots split across chunks
    come out as if the message had been stuffed whole."""
    rng = random.Random(7)
    alphabet = [b"a", b".", b"\r", b"\n", b"\r\n"]
    for _ in range(3000):
        message = b"".join(rng.choice(alphabet) for _ in range(rng.randint(0, 24)))
        if message.endswith(b"\r"):
            message += b"\n"
        for chunk in (1, 2, 3, 7, 64):
            streamed = b"".join(lmtp.dot_stuffed(BytesSource(message), chunk))
            assert streamed == whole_message_stuffing(message), (message, chunk)


async def test_multiline_reply() -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(b"250-first\r\n250 second\r\n")
    reply = await lmtp.read_reply(reader)
    assert reply.code == 250 and reply.text == "first second" and reply.ok
    reader.feed_data(b"garbage\r\n")
    with pytest.raises(lmtp.LmtpError):
        await lmtp.read_reply(reader)


class RefusingHandler:
    """aiosmtpd hooks: refuses RCPT to anyone called `nobody`, records deliveries."""

    def __init__(self, pipelining: bool) -> None:
        self.pipelining = pipelining
        self.delivered: list[tuple[list[str], bytes]] = []

    async def handle_EHLO(self, server: object, session: object, envelope: object,
                          hostname: str, responses: list[str]) -> list[str]:
        session.host_name = hostname  # type: ignore[attr-defined]
        if not self.pipelining:
            return responses
        return [*responses[:-1], "250-" + responses[-1][4:], "250 PIPELINING"]

    async def handle_RCPT(self, server: object, session: object, envelope: object,
                          address: str, options: list[str]) -> str:
        if address.startswith("nobody@"):
            return "550 5.1.1 no such user"
        envelope.rcpt_tos.append(address)  # type: ignore[attr-defined]
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: object, session: object, envelope: object) -> str:
        recipients = list(envelope.rcpt_tos)  # type: ignore[attr-defined]
        self.delivered.append((recipients, envelope.original_content))  # type: ignore[attr-defined]
        return "\r\n".join("250 2.0.0 delivered" for _ in recipients)


@pytest.mark.parametrize("pipelining", [True, False])
async def test_transactions_with_and_without_pipelining(pipelining: bool) -> None:
    from aiosmtpd.lmtp import LMTP

    handler = RefusingHandler(pipelining)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: LMTP(handler), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    client = lmtp.LmtpClient(reader, writer, 10)
    try:
        assert (await client.hello("test")).ok
        assert client.pipelining is pipelining
        results = await client.deliver("a@x.example", ["b@y.example", "nobody@y.example"],
                                       b"Subject: one\r\n\r\nbody\r\n")
        assert results["b@y.example"].code == 250
        assert results["nobody@y.example"].code == 550
        # Nobody accepted: DATA is refused, the session stays usable.
        results = await client.deliver("a@x.example", ["nobody@y.example"], b"x\r\n")
        assert results["nobody@y.example"].code == 550 and not client.data_sent
        results = await client.deliver("a@x.example", ["c@y.example"],
                                       b"Subject: two\r\n\r\n.dot\r\n")
        assert results["c@y.example"].code == 250
        assert [r for r, _ in handler.delivered] == [["b@y.example"], ["c@y.example"]]
        assert handler.delivered[1][1].endswith(b".dot\r\n")
        await client.quit()
    finally:
        writer.close()
        server.close()
