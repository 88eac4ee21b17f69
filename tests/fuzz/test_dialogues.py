"""Property tests of the dialogues: the SMTP/LMTP server core, the IMAP command reader,
the IMAP and submission routers before login, the LMTP client's reply reader.

Each is driven without sockets (a fake transport, or a StreamReader fed the stream in
the pieces Hypothesis chose) on a private event loop, and must: answer every command
with a well-formed reply, end on its own (no hang), raise nothing but its protocol's
error, log no traceback, and hold no more input than its limit.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Coroutine
from types import SimpleNamespace
from typing import Any, TypeVar

from hypothesis import example, given
from hypothesis import strategies as st

from mailfc.protocols import imap
from mailfc.protocols.lmtp import MAX_REPLY, LmtpError, read_reply
from mailfc.protocols.smtp_server import (
    MAX_PENDING_INPUT,
    ErrorLimits,
    LmtpServer,
    ServerConnection,
    SmtpServer,
)
from mailfc.routers.imap import MAX_COMMAND, ImapSession
from mailfc.routers.submission import MAX_LINE as SUBMISSION_MAX_LINE
from mailfc.routers.submission import SubmissionSession
from tests.fuzz.logcheck import Tracebacks, no_traceback
from tests.fuzz.strategies import (
    IMAP_ID_30K,
    IMAP_STREAM,
    REPLY_STREAM,
    SMTP_STREAM,
    SUBMISSION_STREAM,
    chunked,
    noisy,
)

T = TypeVar("T")
SESSION_TIMEOUT_S = 10.0
REPLY = re.compile(rb"^[2-5]\d\d[ -]")

_loop = asyncio.new_event_loop()


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    """One example on the module's own loop (pytest-asyncio's session loop is not
    running during a sync test, and must not be replaced)."""
    return _loop.run_until_complete(asyncio.wait_for(coroutine, SESSION_TIMEOUT_S))


# -- the SMTP and LMTP server core --------------------------------------------------------

class FakeTransport(asyncio.Transport):
    """What ServerConnection needs of a transport: writes kept, reading paused or not."""

    def __init__(self) -> None:
        super().__init__()
        self.out = bytearray()
        self.closed = False
        self.paused = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.out += data

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("192.0.2.7", 40000) if name == "peername" else default


class Handler:
    """Takes every message (SMTP: one reply, LMTP: one per recipient)."""

    def __init__(self, lmtp: bool) -> None:
        self.lmtp = lmtp

    async def handle_DATA(self, session: Any, envelope: Any) -> str | list[str]:
        assert envelope.message is not None and envelope.message.size <= DATA_LIMIT
        if self.lmtp:
            return ["250 2.0.0 delivered"] * len(envelope.rcpt_tos)
        return "250 2.0.0 queued"


DATA_LIMIT = 2048
NO_SLEEP = ErrorLimits(sleep_s=0.0)


def smtp_servers() -> dict[str, SmtpServer | LmtpServer]:
    return {
        "smtp": SmtpServer(Handler(False), hostname="mx.test", data_size_limit=DATA_LIMIT,
                           idle_timeout_s=5.0, errors=NO_SLEEP),
        "lmtp": LmtpServer(Handler(True), hostname="lmtp.test", data_size_limit=DATA_LIMIT,
                           idle_timeout_s=5.0),
    }


async def serve(server: SmtpServer | LmtpServer, pieces: list[bytes]) -> tuple[bytes, int]:
    """Feed `pieces` to one connection as reads, honouring pause_reading; (what the
    server wrote, the most input it held)."""
    connection = ServerConnection(server)
    transport = FakeTransport()
    connection.connection_made(transport)
    peak = 0
    for piece in pieces:
        if transport.closed:
            break
        for _ in range(100):
            if not transport.paused:
                break
            await asyncio.sleep(0)
        assert not transport.paused, "the session stopped reading for good"
        connection.data_received(piece)
        peak = max(peak, len(connection._buffer))
        for _ in range(3):
            await asyncio.sleep(0)
    connection.eof_received()
    if connection._task is not None:
        await connection._task
    connection.connection_lost(None)
    return bytes(transport.out), peak


def assert_replies(output: bytes) -> None:
    assert output.endswith(b"\r\n")
    for line in output[:-2].split(b"\r\n"):
        assert REPLY.match(line), f"not an SMTP reply: {line[:100]!r}"


@given(st.sampled_from(("smtp", "lmtp")), chunked(st.one_of(SMTP_STREAM, noisy(SMTP_STREAM))))
@example("smtp", [b"EHLO a\r\nNOOP " + b"x" * 300_000 + b"\r\nQUIT\r\n"])
@example("lmtp", [b"LHLO a\r\nMAIL FROM:<>\r\nRCPT TO:<b@c>\r\nDATA\r\n" + b"y" * 300_000])
@example("smtp", [b"\n" * 30])
def test_smtp_server_answers_every_stream_within_its_bounds(
        tracebacks: Tracebacks, dialect: str, pieces: list[bytes]) -> None:
    server = smtp_servers()[dialect]
    output, peak = run(serve(server, pieces))
    assert_replies(output)
    assert output.startswith(b"220 ")
    largest = max((len(p) for p in pieces), default=0)
    assert peak <= max(MAX_PENDING_INPUT, server.max_command_line + 1) + largest
    no_traceback(tracebacks)


# -- the IMAP command reader (before login) -------------------------------------------------

async def feed_reader(pieces: list[bytes], limit: int = 2 ** 16) -> asyncio.StreamReader:
    reader = asyncio.StreamReader(limit=limit)
    for piece in pieces:
        reader.feed_data(piece)
    reader.feed_eof()
    return reader


async def read_imap_commands(pieces: list[bytes]) -> list[tuple[bytes, bytes, list[bytes]]]:
    reader = await feed_reader(pieces)
    commands = []
    go_aheads = 0

    async def go_ahead() -> None:
        nonlocal go_aheads
        go_aheads += 1

    while not reader.at_eof():
        try:
            tag, command, arguments = await imap.read_command(
                reader, go_ahead, max_line=MAX_COMMAND, max_total=MAX_COMMAND)
        except imap.ImapSyntaxError:
            if len(reader._buffer) > MAX_COMMAND:  # type: ignore[attr-defined]
                break       # the router says BYE here
            continue
        except asyncio.IncompleteReadError:
            break
        assert sum(len(a) for a in arguments) <= MAX_COMMAND
        commands.append((tag, command, arguments))
    return commands


@given(chunked(st.one_of(IMAP_STREAM, noisy(IMAP_STREAM))))
@example([IMAP_ID_30K])
def test_imap_read_command_raises_only_syntax_errors_and_stays_bounded(
        pieces: list[bytes]) -> None:
    run(read_imap_commands(pieces))


def test_imap_id_of_30_kb_is_read_as_one_command() -> None:
    commands = run(read_imap_commands([IMAP_ID_30K]))
    assert [(tag, command) for tag, command, _ in commands] == [(b"a1", b"ID")]
    assert len(commands[0][2]) == 60


# -- the routers' sessions before login ----------------------------------------------------

class FakeWriter:
    """What the routers' sessions need of a StreamWriter."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.transport = SimpleNamespace(abort=lambda: None)

    def write(self, data: bytes) -> None:
        self.out += data

    async def drain(self) -> None:
        await asyncio.sleep(0)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("192.0.2.7", 40000), "sockname": ("127.0.0.1", 143)}.get(name,
                                                                                     default)

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        pass

    async def start_tls(self, *args: Any, **kwargs: Any) -> None:
        raise OSError("no TLS in this test")


class RefusingRouter:
    """A router whose every login fails (the dialogue before it is what is fuzzed)."""

    def __init__(self) -> None:
        self.tls_context = None
        self.config = SimpleNamespace(
            host_name="router.test",
            imap_router=SimpleNamespace(login_timeout_s=5.0, allow_plaintext_auth=True,
                                        auth_failure_delay_s=0.0),
            submission=SimpleNamespace(login_timeout_s=5.0, auth_failure_delay_s=0.0),
            messages=SimpleNamespace(size_limit=10_000_000))
        self.send_limits = SimpleNamespace(get=self._no_limits)
        self.logins = 0

    async def _no_limits(self) -> dict[str, int]:
        return {}

    async def authenticate(self, *args: Any) -> Any:
        self.logins += 1
        return SimpleNamespace(failure="wrong password", account=None, backend=None)


async def imap_session(pieces: list[bytes], implicit_tls: bool,
                       writer: FakeWriter | None = None) -> bytes:
    reader = await feed_reader(pieces, limit=MAX_COMMAND + 1024)
    writer = writer or FakeWriter()
    session = ImapSession(RefusingRouter(), reader, writer, implicit_tls)  # type: ignore[arg-type]
    await session.run()
    return bytes(writer.out)


@given(chunked(st.one_of(IMAP_STREAM, noisy(IMAP_STREAM))), st.booleans())
@example([IMAP_ID_30K + b"a2 LOGOUT\r\n"], False)
@example([b"a AUTHENTICATE PLAIN\r\n" + b"A" * 70_000 + b"\r\n"], True)
@example([b"a AUTHENTICATE PLAIN\r\n"], True)
def test_imap_router_answers_every_pre_login_stream(
        tracebacks: Tracebacks, pieces: list[bytes], implicit_tls: bool) -> None:
    output = run(imap_session(pieces, implicit_tls))
    assert output.startswith(b"* OK ")
    for line in output.split(b"\r\n")[:-1]:
        assert re.match(rb"^(\* |\+ |[\x21-\x7e]+ (OK|NO|BAD) )", line), line[:100]
    no_traceback(tracebacks)


def test_imap_router_answers_a_30_kb_id_like_dovecot() -> None:
    output = run(imap_session([IMAP_ID_30K + b"a2 LOGOUT\r\n"], False))
    assert b'* ID ("name" "mailfc")\r\na1 OK ID completed.\r\n' in output
    assert output.endswith(b"a2 OK Logout completed.\r\n")


async def submission_session(pieces: list[bytes], writer: FakeWriter | None = None) -> bytes:
    reader = await feed_reader(pieces, limit=SUBMISSION_MAX_LINE + 1024)
    writer = writer or FakeWriter()
    session = SubmissionSession(RefusingRouter(), reader, writer, True)  # type: ignore[arg-type]
    await session.run()
    return bytes(writer.out)


@given(chunked(st.one_of(SUBMISSION_STREAM, noisy(SUBMISSION_STREAM))))
@example([b"AUTH LOGIN\r\n"])
@example([b"AUTH PLAIN\r\n" + b"A" * 9000 + b"\r\n"])
def test_submission_router_answers_every_pre_auth_stream(
        tracebacks: Tracebacks, pieces: list[bytes]) -> None:
    output = run(submission_session(pieces))
    assert_replies(output)
    no_traceback(tracebacks)


# -- the LMTP client's reply reader ---------------------------------------------------------

async def read_replies(pieces: list[bytes], limit: int) -> int:
    reader = await feed_reader(pieces, limit=limit)
    replies = 0
    while True:
        try:
            reply = await read_reply(reader)
        except LmtpError:
            return replies
        assert 0 <= reply.code <= 999 and len(reply.text) <= MAX_REPLY
        replies += 1


@given(chunked(st.one_of(REPLY_STREAM, noisy(REPLY_STREAM))))
@example([b"250-" + b"x" * 1000 + b"\r\n"] * 100)
def test_lmtp_reply_reader_raises_only_lmtp_error(pieces: list[bytes]) -> None:
    run(read_replies(pieces, 2 ** 16))
