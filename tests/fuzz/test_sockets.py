"""Socket-level fuzzing of a whole `mailfc up` (tests/gateways/whole_platform.py).

Mutated real dialogues (tests/fuzz/sockets.py) go to SMTP-In, submission (587 and
465), the IMAP Router (143 and 993), the LMTP Router, the dispatcher's sockets, the
milter and the hook server for FUZZ_SECONDS; then every server must answer a clean
client, no process may have died or restarted, no traceback may be in up.log, and no
process's peak RSS may have grown past its bound.  The seed is fixed under CI=true.

The platform also answers RFC 5321's bare postmaster and refuses DSN parameters it
does not advertise (issue 24's conformance items) on its real port 25.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.fuzz import sockets
from tests.gateways.whole_platform import PASSWORD, WholePlatform, whole_platform

DOMAIN = "fuzz.example"
USER = "fay"
FUZZ_SECONDS = float(os.environ.get("MAILFC_SOCKET_FUZZ_S", "50"))
SEED = 24 if os.environ.get("CI") == "true" else random.randrange(1 << 30)


@pytest.fixture(scope="module")
async def platform(state_dir: Path) -> AsyncIterator[WholePlatform]:
    async with whole_platform(state_dir, "mfcf", "10.121.0.0/24", 33600, DOMAIN,
                              (USER,)) as running:
        yield running


async def dialogue(port: int, lines: list[bytes]) -> list[bytes]:
    """Each line's reply (its last line, then the whole reply), after the greeting."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    replies = []
    try:
        for line in [b"", *lines]:
            if line:
                writer.write(line + b"\r\n")
            reply = b""
            while True:
                got = await asyncio.wait_for(reader.readline(), 30)
                reply += got
                if got[3:4] != b"-":
                    # A multi-line reply whole, its last line first (its code).
                    replies.append(got.rstrip() + b"\n" + reply)
                    break
    finally:
        writer.close()
    return replies[1:]


async def test_mutated_dialogues_leave_every_server_answering(platform: WholePlatform) -> None:
    up = platform.up
    targets = sockets.targets(platform.settings, DOMAIN, USER, PASSWORD)
    before = [await sockets.clean_check(t) for t in targets]
    assert before == [None] * len(targets), before
    health = sockets.Health.before(up.processes(), up.log)
    await sockets.fuzz(targets, FUZZ_SECONDS, random.Random(SEED))
    after = [p for t in targets if (p := await sockets.clean_check(t)) is not None]
    problems = after + health.problems(up.processes())
    summary = f"seed {SEED}\n{sockets.report(targets)}\npeak RSS kB {health.peak_kb}"
    assert not problems, "\n".join(problems) + "\n" + summary + platform.explain()
    assert all(t.tried > 10 for t in targets), summary


async def test_bare_postmaster_is_accepted_on_port_25(platform: WholePlatform) -> None:
    message = (b"DATA", b"Subject: to the postmaster\r\nFrom: <a@remote.example>\r\n\r\nhi\r\n.")
    replies = await dialogue(platform.smtp_in, [
        b"EHLO remote.example", b"MAIL FROM:<a@remote.example>", b"RCPT TO:<postmaster>",
        b"RCPT TO:<Postmaster>", *message, b"QUIT"])
    assert [r[:3] for r in replies] == [b"250", b"250", b"250", b"250", b"354", b"250",
                                        b"221"], replies
    # No [smtp_in] postmaster configured: the message waits in the quarantine.
    quarantine = platform.settings.state_dir / "quarantine"
    held = [p for p in quarantine.glob("*.eml") if b"to the postmaster" in p.read_bytes()]
    assert len(held) == 1 and b"X-Mailfc-Envelope-To: <postmaster>" in held[0].read_bytes()


async def test_dsn_parameters_are_refused_not_dropped(platform: WholePlatform) -> None:
    replies = await dialogue(platform.smtp_in, [
        b"EHLO remote.example", b"MAIL FROM:<a@remote.example> RET=HDRS",
        b"MAIL FROM:<a@remote.example> ENVID=x1", b"MAIL FROM:<a@remote.example>",
        f"RCPT TO:<{USER}@{DOMAIN}> NOTIFY=NEVER".encode(),
        f"RCPT TO:<{USER}@{DOMAIN}> ORCPT=rfc822;{USER}@{DOMAIN}".encode(), b"QUIT"])
    ehlo = replies[0]
    assert b"DSN" not in ehlo
    assert replies[1].startswith(b"555 5.5.4") and replies[2].startswith(b"555 5.5.4")
    assert replies[3].startswith(b"250")
    assert replies[4].startswith(b"555 5.5.4") and replies[5].startswith(b"555 5.5.4")
