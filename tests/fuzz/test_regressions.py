"""One test per defect the fuzz suite found, with the minimal input Hypothesis reported.

Each names the parser, what the input did before the fix, and what it gets now.
"""

from __future__ import annotations

import tracemalloc

import pytest

from mailfc.gateways.smtp_out.service import _message_id
from mailfc.messages import BytesSource
from mailfc.policy.hooks import protocol as hooks
from mailfc.protocols.lmtp import MAX_REPLY, LmtpError, read_reply, xforward_attributes
from tests.fuzz.logcheck import Tracebacks, no_traceback
from tests.fuzz.test_dialogues import (
    FakeWriter,
    feed_reader,
    imap_session,
    run,
    serve,
    smtp_servers,
    submission_session,
)


def test_hook_request_with_a_unicode_digit_is_a_protocol_error() -> None:
    # Was: ValueError from int("²") (str.isdigit() takes it), past the plugin
    # connection's `except ProtocolError`.
    with pytest.raises(hooks.ProtocolError, match="sid must be a number"):
        hooks.parse_request("CMD\t²\t1\tx\ty".encode())


def test_imap_authenticate_whose_client_leaves_before_the_response(
        tracebacks: Tracebacks) -> None:
    # Was: IncompleteReadError out of ImapSession.run, a traceback in the log.
    output = run(imap_session([b"a AUTHENTICATE PLAIN\r\n"], True))
    assert output.endswith(b"+ \r\n")
    no_traceback(tracebacks)


def test_imap_authenticate_response_over_the_line_limit(tracebacks: Tracebacks) -> None:
    # Was: ImapSyntaxError("line too long") out of ImapSession.run, a traceback.
    output = run(imap_session([b"a AUTHENTICATE PLAIN\r\n" + b"A" * 70_000 + b"\r\n"], True))
    assert output.endswith(b"a BAD line too long\r\n* BYE Too much data before login.\r\n")
    no_traceback(tracebacks)


def test_submission_auth_whose_client_leaves_at_the_challenge(tracebacks: Tracebacks) -> None:
    # Was: IncompleteReadError out of SubmissionSession.dialogue, a traceback.
    output = run(submission_session([b"AUTH LOGIN\r\n"]))
    assert output.endswith(b"334 VXNlcm5hbWU6\r\n")
    no_traceback(tracebacks)


def test_submission_auth_response_over_the_line_limit(tracebacks: Tracebacks) -> None:
    # Was: InvalidInput("line too long") out of SubmissionSession.dialogue, a traceback.
    output = run(submission_session([b"AUTH PLAIN\r\n" + b"A" * 9000 + b"\r\n"]))
    assert output.endswith(b"334 \r\n500 5.5.6 Line too long\r\n")
    no_traceback(tracebacks)


async def _endless_reply() -> None:
    reader = await feed_reader([b"250-" + b"x" * 1000 + b"\r\n"] * 100 + [b"250 end\r\n"])
    await read_reply(reader)


def test_lmtp_client_stops_reading_an_endless_multi_line_reply() -> None:
    # Was: every "250-" line kept, as long as the peer went on (unbounded memory).
    with pytest.raises(LmtpError, match=f"reply longer than {MAX_REPLY} bytes"):
        run(_endless_reply())


class LeavingWriter(FakeWriter):
    """A client that resets the connection once it was told its login failed."""

    async def drain(self) -> None:
        if b"AUTHENTICATIONFAILED" in self.out or b"535 " in self.out:
            raise ConnectionResetError("Connection lost")


def test_imap_client_that_leaves_during_a_failed_login(tracebacks: Tracebacks) -> None:
    # Was (socket fuzz): ConnectionResetError out of ImapSession.run, "imap session
    # failed" and a traceback in the log for every client that hung up after a NO.
    writer = LeavingWriter()
    run(imap_session([b"a LOGIN bob wrong\r\nb NOOP\r\n"], True, writer))
    assert writer.out.endswith(b"a NO [AUTHENTICATIONFAILED] Authentication failed.\r\n")
    no_traceback(tracebacks)


def test_submission_client_that_leaves_during_a_failed_auth(tracebacks: Tracebacks) -> None:
    # Was (socket fuzz): ConnectionResetError out of SubmissionSession.run, a traceback.
    writer = LeavingWriter()
    run(submission_session([b"AUTH PLAIN AGJvYgB3cm9uZw==\r\nNOOP\r\n"], writer))
    assert writer.out.endswith(b"535 5.7.8 Authentication credentials invalid\r\n")
    no_traceback(tracebacks)


class GoneAfterGreetingWriter(FakeWriter):
    """A client that is gone by the time the router answers its first command."""

    async def drain(self) -> None:
        if self.out.count(b"\r\n") > 1:
            raise ConnectionResetError("Connection lost")


def test_imap_client_gone_before_its_bad_is_sent(tracebacks: Tracebacks) -> None:
    # Was (socket fuzz): ConnectionResetError from sending "* BAD missing command",
    # a traceback in the log.
    writer = GoneAfterGreetingWriter()
    run(imap_session([b"a\r\n"], False, writer))
    assert writer.out.endswith(b"* BAD missing command\r\n")
    no_traceback(tracebacks)


def test_a_control_character_in_a_path_is_a_syntax_error() -> None:
    # Was (socket fuzz): MAIL FROM:<someone@remote.exa\x0bmple> taken; SMTP-Out's bounce
    # to that "domain" failed in PostgreSQL and DNS as a temporary error, retried for
    # the spool's whole lifetime.
    for name, server in smtp_servers().items():
        hello = b"LHLO x\r\n" if name == "lmtp" else b"EHLO x\r\n"
        output, _ = run(serve(server, [hello + b"MAIL FROM:<a@remote.exa\x0bmple>\r\n"
                                       b"MAIL FROM:<a@remote.example>\r\n"
                                       b"RCPT TO:<b\x00@x.example>\r\nQUIT\r\n"]))
        replies = [line[:3] for line in output.split(b"\r\n") if line[3:4] == b" "]
        assert replies[-4:] == [b"501", b"250", b"501", b"221"], (name, output)


def test_message_id_of_a_hostile_header_costs_neither_memory_nor_recursion() -> None:
    # Was (socket fuzz): the email package's header parser on a Message-ID of
    # parentheses: 60 MB and RecursionError, so every delivery of it failed as "next
    # hop unavailable" and was retried; the outbound process grew past 800 MB.
    tracemalloc.start()
    try:
        found = _message_id(BytesSource(b"Message-ID: <" + b"(" * 60_000 + b">\r\n\r\nx"))
        spaced = _message_id(BytesSource(b"Message-ID: " + b"a " * 30_000 + b"\r\n\r\nx"))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert found is not None and found.startswith("<((((") and spaced is not None
    assert peak < 4 << 20, peak
    # What PostgreSQL can store: no NUL, nothing that is not UTF-8.
    assert _message_id(BytesSource(b"Message-ID: <a\xff\x00b@x>\r\n\r\n")) == r"<a\xff\x00b@x>"


def test_xforward_addr_that_is_no_address_is_left_out() -> None:
    # Was (socket fuzz): ADDR=192.0.2.1$PROTO=ESMTP reached smtp_sessions.client_ip
    # (inet), and PostgreSQL refused the whole row.
    assert xforward_attributes("ADDR=192.0.2.1+24PROTO=ESMTP NAME=x") == {"NAME": "x"}
    assert xforward_attributes("ADDR=IPV6:2001:DB8::1") == {"ADDR": "2001:db8::1"}
    assert xforward_attributes("ADDR=192.0.2.7") == {"ADDR": "192.0.2.7"}
