"""IMAP pre-login syntax and the LMTP client's DATA encoding."""

from __future__ import annotations

import asyncio

import pytest

from mailfc.protocols import imap, lmtp


def test_split_tag_and_arguments() -> None:
    assert imap.split_tag(b"a1 login bob pw") == (b"a1", b"LOGIN", b"bob pw")
    segment = imap.parse_segment(b'"bob@example.org" "pa ss\\"word"')
    assert segment.arguments == [b"bob@example.org", b'pa ss"word'] and segment.literal is None


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


async def test_multiline_reply() -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(b"250-first\r\n250 second\r\n")
    reply = await lmtp.read_reply(reader)
    assert reply.code == 250 and reply.text == "first second" and reply.ok
    reader.feed_data(b"garbage\r\n")
    with pytest.raises(lmtp.LmtpError):
        await lmtp.read_reply(reader)
