"""The filter chain reads a message in chunks: EICAR scan, header parse, milters."""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mailfc.config import Config, parse_config
from mailfc.gateways.filter.chain import Chain, reply
from mailfc.gateways.filter.checks import EICAR, has_eicar
from mailfc.gateways.filter.message import FilterMessage, HeaderTooLarge
from mailfc.gateways.filter.scan import Scanner
from mailfc.messages import BytesSource, MessageData, Prefixed, read_all
from tests.gateways.milter import REJECT_REPLY, REPLACED_BODY, TestMilter

MILTER_PORT = 18893


def encoded_lines(payload: bytes) -> bytes:
    return base64.encodebytes(payload).replace(b"\n", b"\r\n")


def multipart(*parts: tuple[str, bytes], boundary: str = "=_outer") -> bytes:
    head = (f"From: ann@remote.example\r\nTo: bob@g1.example\r\nSubject: parts\r\n"
            f"MIME-Version: 1.0\r\nContent-Type: multipart/mixed;\r\n"
            f' boundary="{boundary}"\r\n\r\npreamble\r\n').encode()
    body = b""
    for encoding, content in parts:
        body += (f"--{boundary}\r\nContent-Type: application/octet-stream\r\n"
                 f"Content-Transfer-Encoding: {encoding}\r\n\r\n").encode() + content
    return head + body + f"--{boundary}--\r\nepilogue\r\n".encode()


def message_data(data: bytes, directory: Path) -> MessageData:
    message = MessageData(directory)
    for start in range(0, len(data), 50_000):
        message.write(data[start:start + 50_000])
    return message


def test_eicar_in_a_base64_part_spanning_many_chunks(tmp_path: Path) -> None:
    # 3 MB of noise with the signature in the middle, at an odd offset: its base64
    # form crosses a 64 KiB chunk border for some chunk size below.
    noise = os.urandom(3 << 20)
    payload = noise[:1_500_001] + EICAR + noise[1_500_001:]
    infected = message_data(multipart(("7bit", b"hello\r\n"), ("base64", encoded_lines(payload))),
                            tmp_path)
    clean = message_data(multipart(("base64", encoded_lines(noise))), tmp_path)
    assert not infected.in_memory and infected.size > 4 << 20
    assert EICAR not in infected.getvalue()       # only the decoded part has it
    for chunk in (1000, 4096, 65536, 65537):
        assert Scanner(EICAR).scan(infected.chunks(chunk)), chunk
        assert not Scanner(EICAR).scan(clean.chunks(chunk)), chunk
    assert has_eicar(infected) and not has_eicar(clean)


def test_eicar_raw_across_chunks_quoted_printable_and_nested(tmp_path: Path) -> None:
    raw = b"Subject: x\r\n\r\n" + b"a" * 65530 + EICAR + b"\r\n"
    assert Scanner(EICAR).scan(BytesSource(raw).chunks(65536))
    assert Scanner(EICAR).scan(BytesSource(raw).chunks(7))
    # Quoted-printable with soft line breaks inside the signature and escapes.
    qp = binascii.b2a_qp(b"text " + EICAR + b" more", istext=False).replace(b"\n", b"\r\n")
    folded = b"=\r\n".join(qp[i:i + 20] for i in range(0, len(qp), 20)) + b"\r\n"
    qp_message = multipart(("quoted-printable", folded))
    assert EICAR not in qp_message
    for chunk in (3, 64, 65536):
        assert Scanner(EICAR).scan(BytesSource(qp_message).chunks(chunk)), chunk
    # A message/rfc822 part whose own multipart has the base64 part; padding before it.
    inner = multipart(("base64", b"QQ==" + encoded_lines(EICAR)), boundary="inner")
    outer = (b"From: a@b.example\r\nContent-Type: multipart/mixed; boundary=outer\r\n\r\n"
             b"--outer\r\nContent-Type: message/rfc822\r\n\r\n" + inner + b"--outer--\r\n")
    assert EICAR not in outer
    assert Scanner(EICAR).scan(BytesSource(outer).chunks(100))
    # A delimiter of a boundary this message does not have ends nothing.
    quoted = multipart(("7bit", b"--=_other\r\n\r\n"), ("base64", encoded_lines(EICAR)))
    assert Scanner(EICAR).scan(BytesSource(quoted).chunks(65536))
    # A plain message mentioning base64 is no reason to decode anything.
    plain = b"Subject: about base64\r\n\r\n" + encoded_lines(EICAR)
    assert not Scanner(EICAR).scan(BytesSource(plain).chunks())


def test_a_header_is_parsed_and_the_body_left_where_it_is(tmp_path: Path) -> None:
    head = b"Received: by x\r\nFrom: ann@remote.example\r\nSubject: big\r\n folded\r\n\r\n"
    body = b"line\r\n" * 200_000
    data = message_data(head[16:] + body, tmp_path)
    source = Prefixed(head[:16], data)
    message = FilterMessage.parse(source, "ann@remote.example", ["bob@g1.example"])
    assert [name for name, _ in message.headers] == ["Received", "From", "Subject"]
    assert message.values("subject") == [" big\r\n folded"]
    assert message.body_offset == len(head) and message.body_size == len(body)
    assert message.source() is source
    pieces = list(message.body_chunks(65535))
    assert max(map(len, pieces)) <= 65535 and b"".join(pieces) == body
    message.add_header("X-Added", "yes")
    changed = read_all(message.source())
    assert changed == head[:-2] + b"X-Added: yes\r\n\r\n" + body
    message.replace_body(b"new body\r\n")
    assert read_all(message.source()).endswith(b"X-Added: yes\r\n\r\nnew body\r\n")
    message.close()
    # More header than the limit: refused, never read further.
    endless = message_data(b"X-Long: " + b"y" * 70_000 + b"\r\n" + body, tmp_path)
    with pytest.raises(HeaderTooLarge):
        FilterMessage.parse(endless, "", ["bob@g1.example"], header_limit=65536)
    # A message that is all header is fine.
    only = FilterMessage.parse(BytesSource(b"From: a@b.example\r\n"), "", ["x@y.example"])
    assert only.values("From") == [" a@b.example"] and only.body_size == 0


@pytest.fixture
async def milter() -> AsyncIterator[TestMilter]:
    milter = TestMilter(MILTER_PORT)
    await milter.start()
    try:
        yield milter
    finally:
        await milter.stop()


def chain_config(tmp_path: Path, milter: TestMilter) -> Config:
    return parse_config({"paths": {"state_dir": str(tmp_path)},
                         "filter_in": {"milters": [milter.spec], "milter_timeout_s": 10.0}},
                        "filter test")


async def test_milters_get_the_body_in_chunks_and_may_replace_it(
        tmp_path: Path, milter: TestMilter) -> None:
    config = chain_config(tmp_path, milter)
    chain = Chain("test", config.filter_in, config)
    body = b"".join(b"body line %07d\r\n" % n for n in range(200_000))    # 3.6 MB
    for subject, action in (("milter-plain", "accept"), ("milter-reject-me", "reject"),
                            ("milter-replace-body", "accept")):
        data = message_data(f"From: ann@remote.example\r\nSubject: {subject}\r\n\r\n"
                            .encode() + body, tmp_path)
        outcome = await chain.check(data, "ann@remote.example", ["bob@g1.example"],
                                    client_ip="192.0.2.7", queue_id="Q1")
        try:
            assert outcome.verdict.action == action, outcome.verdict
            seen = milter.seen[subject]
            assert seen.body_bytes == len(body) and seen.biggest_chunk <= 65535
            assert seen.packets >= len(body) // 65535
            assert outcome.message is not None
            result = outcome.message.source()
            if subject == "milter-reject-me":
                assert reply(outcome.verdict) == REJECT_REPLY
            elif subject == "milter-replace-body":
                assert result.size < 2 * len(REPLACED_BODY)
                text = read_all(result)
                assert text.endswith(b"\r\n\r\n" + REPLACED_BODY)
                assert b"X-Test-Milter: replaced\r\n" in text
            else:
                assert result.size == data.size + len(b"X-Test-Milter: seen\r\n")
        finally:
            outcome.close()
            data.close()


async def test_the_chain_rejects_eicar_and_headers_with_their_replies(tmp_path: Path) -> None:
    config = parse_config({"paths": {"state_dir": str(tmp_path)}}, "filter test")
    chain = Chain("test", config.filter_in, config)
    cases = {
        b"From: a@b.example\r\n\r\n" + EICAR + b"\r\n": "550 5.7.1 infected",
        b"Subject: no from\r\n\r\nbody\r\n": "550 5.6.0 message header rejected: no From",
        b"From: a@b.example\r\nFrom: c@d.example\r\n\r\nx\r\n": "550 5.6.0",
        b"From: a@b.example\r\n" + (b"X-Pad: " + b"p" * 990 + b"\r\n") * 1100 + b"\r\nx\r\n":
            "552 5.3.4 message header exceeds",
    }
    for raw, expected in cases.items():
        outcome = await chain.check(BytesSource(raw), "a@b.example", ["bob@g1.example"])
        outcome.close()
        assert reply(outcome.verdict).startswith(expected), (raw[:40], outcome.verdict)
