"""Hypothesis strategies for mailfc's client-facing parsers: valid-ish protocol streams.

Random bytes alone rarely get past a parser's first check, so most strategies here
build streams a real client could send (commands with random arguments, literals,
pipelined groups, STARTTLS in the middle, messages with dots and bare LFs) and then
let `noisy` damage some of them.  `chunked` splits a stream the way the network may:
whole, one byte at a time, or at random points.

Used by tests/fuzz/test_*.py and by bench/fuzz.py (the longer run).
"""

from __future__ import annotations

from hypothesis import strategies as st

# -- splitting ------------------------------------------------------------------------


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    """`data` cut at the given offsets (any order, duplicates and out-of-range ignored)."""
    points = sorted({c for c in cuts if 0 < c < len(data)})
    pieces, start = [], 0
    for point in points:
        pieces.append(data[start:point])
        start = point
    pieces.append(data[start:])
    return [p for p in pieces if p]


@st.composite
def chunked(draw: st.DrawFn, streams: st.SearchStrategy[bytes]) -> list[bytes]:
    """A stream from `streams` as the reads a server may see: whole, bytewise, or cut."""
    data = draw(streams)
    mode = draw(st.sampled_from(("whole", "bytewise", "cuts", "cuts")))
    if mode == "whole" or not data:
        return [data] if data else []
    if mode == "bytewise":
        return [data[i:i + 1] for i in range(len(data))]
    cuts = draw(st.lists(st.integers(0, len(data)), max_size=24))
    return split_at(data, cuts)


@st.composite
def noisy(draw: st.DrawFn, streams: st.SearchStrategy[bytes]) -> bytes:
    """A stream, sometimes damaged: a bit flipped, bytes cut, inserted or repeated."""
    data = bytearray(draw(streams))
    for _ in range(draw(st.integers(0, 3))):
        how = draw(st.sampled_from(("keep", "flip", "cut", "insert", "repeat")))
        if how == "keep":
            continue
        at = draw(st.integers(0, len(data)))
        if how == "flip" and data:
            at = min(at, len(data) - 1)
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif how == "cut":
            del data[at:at + draw(st.integers(1, 64))]
        elif how == "insert":
            data[at:at] = draw(st.binary(max_size=32))
        elif how == "repeat":
            data[at:at] = bytes(data[at:at + draw(st.integers(1, 64))]) * draw(st.integers(1, 8))
    return bytes(data)


# -- pieces of words ----------------------------------------------------------------

TEXT_BYTES = st.binary(max_size=40)
ATOM = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E,
                             blacklist_characters='(){ %*"\\]'), min_size=1, max_size=12)
HOST = st.from_regex(r"\A[a-z0-9-]{1,12}(\.[a-z0-9-]{1,8}){0,3}\Z")
LOCAL = st.from_regex(r'\A([a-zA-Z0-9._+-]{1,16}|"[^"\\\r\n]{0,10}")\Z')
ADDRESS = st.one_of(
    st.builds(lambda local, host: f"{local}@{host}", LOCAL, HOST),
    st.sampled_from(("", "postmaster", "Postmaster", "@relay.example:user@dest.example",
                     "bad address@x", "<nested>@x", "user@[192.0.2.1]", "üser@exämple.org")),
    st.text(max_size=20))
PARAMETER = st.one_of(
    st.sampled_from(("SIZE=1000", "SIZE=99999999999", "SIZE=x", "BODY=8BITMIME", "BODY=7BIT",
                     "BODY=BINARYMIME", "SMTPUTF8", "RET=FULL", "RET=HDRS", "ENVID=abc+2B",
                     "NOTIFY=SUCCESS,FAILURE", "NOTIFY=NEVER", "ORCPT=rfc822;a@b.example",
                     "AUTH=<>", "XYZZY=1", "=", "SIZE=")),
    st.builds(lambda name, value: f"{name}={value}", ATOM, ATOM))


def _line(text: str | bytes) -> bytes:
    return (text.encode("utf-8", "surrogateescape") if isinstance(text, str) else text) + b"\r\n"


# -- SMTP and LMTP ---------------------------------------------------------------------

def _envelope_command(verb: str, keyword: str) -> st.SearchStrategy[bytes]:
    return st.builds(
        lambda spelling, address, params: _line(
            f"{spelling} {keyword}<{address}>" + "".join(" " + p for p in params)),
        st.sampled_from((verb, verb.lower())), ADDRESS, st.lists(PARAMETER, max_size=3))


MESSAGE_BODY = st.lists(
    st.one_of(st.sampled_from((b"Subject: hi", b"", b".", b"..", b".leading dot", b"x" * 300,
                               b"\x80\xff 8-bit", b"bare\nlf", b"\r", b"dot.\r\n.")),
              st.binary(max_size=60)), max_size=12).map(lambda lines: b"\r\n".join(lines))
SMTP_DATA = st.builds(lambda body: b"DATA\r\n" + body + b"\r\n.\r\n", MESSAGE_BODY)
SMTP_COMMAND = st.one_of(
    st.builds(lambda verb, host: _line(f"{verb} {host}"),
              st.sampled_from(("EHLO", "HELO", "LHLO", "ehlo")), HOST),
    _envelope_command("MAIL", "FROM:"),
    _envelope_command("RCPT", "TO:"),
    SMTP_DATA,
    st.sampled_from([_line(v) for v in (
        "DATA", "RSET", "NOOP", "QUIT", "VRFY postmaster", "HELP", "STARTTLS", "EHLO",
        "MAIL FROM:", "RCPT TO:<>", "DATA extra", "XFORWARD NAME=x ADDR=1.2.3.4", "BDAT 10",
        "AUTH PLAIN AGFsaWNlAHNlY3JldA==", "\x00\x01", "", "   ")]),
    st.builds(lambda n: b"NOOP " + b"x" * n + b"\r\n", st.integers(900, 5000)),
    st.builds(_line, TEXT_BYTES))
SMTP_SESSION_START = st.sampled_from((b"EHLO client.example\r\n", b"LHLO client.example\r\n",
                                      b"HELO client.example\r\n", b""))
SMTP_STREAM = st.builds(lambda start, commands: start + b"".join(commands),
                        SMTP_SESSION_START, st.lists(SMTP_COMMAND, max_size=12))


# -- IMAP (before login) ---------------------------------------------------------------

def _quoted(value: bytes) -> bytes:
    return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


IMAP_STRING = st.one_of(
    ATOM.map(str.encode),
    st.binary(max_size=20).filter(lambda b: b"\r" not in b and b"\n" not in b).map(_quoted),
    # A literal whose announced size may or may not be the size sent.
    st.builds(lambda data, plus, delta: b"{%d%s}\r\n" % (max(0, len(data) + delta),
                                                         b"+" if plus else b"") + data,
              st.binary(max_size=40), st.booleans(),
              st.sampled_from((0, 0, 0, 1, -1, 5))),
    st.sampled_from((b"NIL", b"()", b"(", b")", b'"unterminated', b'"bad\\escape"', b"{99999}",
                     b"{4294967296}", b"{3}", b"\\Seen", b"*")))
IMAP_ID_30K = (b"a1 ID (" + b" ".join(b'"field%02d" "%s"' % (i, b"v" * 1000) for i in range(30))
               + b")\r\n")
IMAP_COMMAND = st.one_of(
    st.builds(lambda tag, command, arguments: tag + b" " + command
              + b"".join(b" " + a for a in arguments) + b"\r\n",
              st.one_of(ATOM.map(str.encode), st.sampled_from((b"+", b"*", b"", b"a{1}"))),
              st.sampled_from((b"LOGIN", b"login", b"AUTHENTICATE", b"ID", b"CAPABILITY",
                               b"NOOP", b"LOGOUT", b"SELECT", b"ENABLE", b"STARTTLS", b"XYZ")),
              st.lists(IMAP_STRING, max_size=5)),
    st.builds(lambda n: b"a2 ID (" + b'"k" "' + b"x" * n + b'")\r\n', st.integers(1000, 40000)),
    st.just(IMAP_ID_30K),
    st.just(b"a3 AUTHENTICATE PLAIN\r\nAGJvYgBwdw==\r\n"),
    st.just(b"a3 AUTHENTICATE PLAIN\r\n*\r\n"),
    st.builds(_line, TEXT_BYTES))
IMAP_STREAM = st.lists(IMAP_COMMAND, max_size=8).map(b"".join)


# -- submission (before AUTH) ----------------------------------------------------------

SUBMISSION_COMMAND = st.one_of(
    st.builds(lambda verb, host: _line(f"{verb} {host}"), st.sampled_from(("EHLO", "HELO")),
              HOST),
    st.sampled_from([_line(v) for v in (
        "AUTH PLAIN", "AUTH PLAIN AGFsaWNlAHNlY3JldA==", "AUTH PLAIN =", "AUTH PLAIN *",
        "AUTH LOGIN", "AUTH LOGIN YWxpY2U=", "AUTH CRAM-MD5", "AUTH", "*", "YWxpY2U=",
        "c2VjcmV0", "STARTTLS", "NOOP", "RSET", "MAIL FROM:<a@b.example>", "RCPT TO:<c@d>",
        "DATA", "XCLIENT ADDR=1.2.3.4", "QUIT", "EHLO", "")]),
    st.builds(lambda n: b"AUTH PLAIN " + b"A" * n + b"\r\n", st.integers(100, 6000)),
    st.builds(_line, TEXT_BYTES))
SUBMISSION_STREAM = st.lists(SUBMISSION_COMMAND, max_size=10).map(b"".join)


# -- replies (what the LMTP client reads from the next hop) ----------------------------

REPLY_LINE = st.one_of(
    st.builds(lambda code, sep, text: b"%d%s%s\r\n" % (code, sep, text),
              st.integers(0, 999), st.sampled_from((b" ", b"-", b"", b"x")), TEXT_BYTES),
    st.builds(_line, TEXT_BYTES))
REPLY_STREAM = st.lists(REPLY_LINE, max_size=10).map(b"".join)
