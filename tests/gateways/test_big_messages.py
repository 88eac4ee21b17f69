"""A 40 MB message through port 25 and through 587 arrives intact, on a whole platform.

Inbound: SMTP-In -> spool -> LMTP Router -> Dovecot: the maildir file's body has the
digest of the body sent.  Outbound: submission -> the domain's Postfix -> Filter-Out ->
SMTP-Out -> the remote MX (a sink that keeps the digest of each body it takes).  The
message is a MIME mail with a 40 MB base64 attachment, as large mail is.  Digests are of
the body with LF line ends (bench.platform.body_digest): the maildir stores LF.
"""

from __future__ import annotations

import base64
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bench.platform import (
    ACCEPTED,
    body_digest,
    dot_stuffed,
    maildir_files,
    mark_of,
    send_message,
    trusting_client_tls,
)
from tests.gateways.whole_platform import PASSWORD, WholePlatform, message, until, whole_platform

DOMAIN = "big.example"
USER = f"bea@{DOMAIN}"
SIZE = 40 * 1024 * 1024


@pytest.fixture(scope="module")
async def platform(state_dir: Path) -> AsyncIterator[WholePlatform]:
    async with whole_platform(state_dir, "mfcl", "10.99.0.0/24", 26000, DOMAIN,
                              ("bea",)) as running:
        yield running


def big_body(size: int) -> bytes:
    """A multipart body with a base64 attachment, about `size` bytes in all."""
    raw = os.urandom(size * 3 // 4 - 1024)
    encoded = base64.encodebytes(raw).replace(b"\n", b"\r\n")
    return (b"This is a multi-part message in MIME format.\r\n--b1\r\n"
            b"Content-Type: text/plain; charset=us-ascii\r\n\r\nThe attachment.\r\n--b1\r\n"
            b"Content-Type: application/octet-stream; name=\"big.bin\"\r\n"
            b"Content-Transfer-Encoding: base64\r\n"
            b"Content-Disposition: attachment; filename=\"big.bin\"\r\n\r\n"
            + encoded + b"--b1--\r\n")


def big_message(mark: str, sender: str, recipient: str) -> bytes:
    head, _, _ = message(mark, sender, recipient).partition(b"\r\n\r\n")
    return (head + b"\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b1\""
            b"\r\n\r\n" + big_body(SIZE))


def in_maildir(platform: WholePlatform, address: str, mark: str) -> list[Path]:
    found = []
    for path in maildir_files(platform.mail_root, address):
        with path.open("rb") as handle:
            if mark_of(handle.read(65536).split(b"\n\n", 1)[0]) == mark:
                found.append(path)
    return found


async def test_40_mb_through_port_25_arrives_intact_in_the_maildir(
        platform: WholePlatform) -> None:
    mark = f"big-in-{time.time_ns()}"
    sent = big_message(mark, "someone@remote.example", USER)
    assert len(sent) > SIZE - 4096
    outcome, reply = await send_message("127.0.0.1", platform.smtp_in,
                                        "someone@remote.example", [USER], dot_stuffed(sent),
                                        timeout_s=120)
    assert outcome == ACCEPTED, reply + platform.explain()
    assert await until(lambda: bool(in_maildir(platform, USER, mark)), 90), \
        "the 40 MB message did not arrive in the maildir" + platform.explain()
    [path] = in_maildir(platform, USER, mark)
    # Dovecot renames the file into place once it is whole.
    assert body_digest(path.read_bytes()) == body_digest(sent)


async def test_40_mb_through_587_arrives_intact_at_the_remote_mx(
        platform: WholePlatform) -> None:
    mark = f"big-out-{time.time_ns()}"
    sent = big_message(mark, USER, "friend@remote.example")
    outcome, reply = await send_message("127.0.0.1", platform.submission, USER,
                                        ["friend@remote.example"], dot_stuffed(sent),
                                        tls=trusting_client_tls(), login=(USER, PASSWORD),
                                        timeout_s=180)
    assert outcome == ACCEPTED, reply + platform.explain()

    def arrived() -> list[dict[str, object]]:
        return [entry for entry in platform.sink.records() if entry["mark"] == mark]

    assert await until(lambda: bool(arrived()), 120), \
        "the 40 MB submission did not reach the remote MX" + platform.explain()
    [entry] = arrived()
    assert entry["sha256"] == body_digest(sent)
    assert entry["to"] == ["friend@remote.example"]
