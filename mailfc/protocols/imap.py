"""IMAP command syntax for the pre-login dialogue (RFC 9051 / 3501 subset).

The IMAP Router only parses what it handles before login: a tag, a command
name, and arguments that are atoms, quoted strings or literals.  A literal
`{n}` (or non-synchronizing `{n+}`) at the end of a line means the next n
bytes are the argument, after which the command line continues.

`parse_segment(line)` takes one CRLF-terminated line (or the continuation
after a literal) and returns the arguments on it plus the size of a trailing
literal, if any.  The caller reads the literal and the next segment.  A
parenthesized list (ID's) is returned flat, its parentheses dropped.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

MAX_LINE = 8192
MAX_LITERAL = 8192  # pre-login literals are user names and passwords

_TAG = re.compile(rb"^[\x21-\x7e]+$")
_LITERAL = re.compile(rb"\{(\d{1,10})(\+?)\}$")
_ATOM_SPECIALS = b'(){ %*"\\]'


class ImapSyntaxError(ValueError):
    """The client sent something that is not IMAP; answered with BAD."""


@dataclass
class Segment:
    arguments: list[bytes]
    literal: int | None = None
    nonsync: bool = False


def parse_segment(line: bytes) -> Segment:
    """Parse one line of arguments (without CRLF)."""
    arguments: list[bytes] = []
    position = 0
    literal = _LITERAL.search(line)
    end = literal.start() if literal else len(line)
    while position < end:
        char = line[position:position + 1]
        if char in (b" ", b"(", b")"):
            # Lists (only ID's before login) are read flat: their strings in order.
            position += 1
            continue
        if char == b'"':
            value, position = _quoted(line, position + 1, end)
            arguments.append(value)
            continue
        stop = position
        while stop < end and line[stop] not in b" )":
            stop += 1
        atom = line[position:stop]
        if any(c in _ATOM_SPECIALS for c in atom) and not atom.startswith(b"("):
            raise ImapSyntaxError(f"invalid characters in {atom[:40]!r}")
        arguments.append(atom)
        position = stop
    if literal is None:
        return Segment(arguments)
    size = int(literal.group(1))
    if size > MAX_LITERAL:
        raise ImapSyntaxError(f"literal of {size} bytes is too large before login")
    return Segment(arguments, size, bool(literal.group(2)))


def _quoted(line: bytes, position: int, end: int) -> tuple[bytes, int]:
    value = bytearray()
    while position < end:
        char = line[position]
        if char == 0x5C:  # backslash
            if position + 1 >= end or line[position + 1] not in b'"\\':
                raise ImapSyntaxError("invalid escape in quoted string")
            value.append(line[position + 1])
            position += 2
            continue
        if char == 0x22:
            return bytes(value), position + 1
        value.append(char)
        position += 1
    raise ImapSyntaxError("unterminated quoted string")


def split_tag(line: bytes) -> tuple[bytes, bytes, bytes]:
    """`a1 LOGIN bob pw` -> (b"a1", b"LOGIN", b"bob pw")."""
    tag, _, rest = line.partition(b" ")
    if not tag or not _TAG.match(tag) or b"+" in tag:
        raise ImapSyntaxError("missing or invalid tag")
    command, _, arguments = rest.partition(b" ")
    if not command:
        raise ImapSyntaxError("missing command")
    return tag, command.upper(), arguments


def quote(value: str) -> bytes:
    """An IMAP string for `value`: quoted when possible, else a literal."""
    raw = value.encode()
    if b"\r" in raw or b"\n" in raw or len(raw) > 1000 or any(b > 0x7E for b in raw):
        return b"{%d+}\r\n" % len(raw) + raw
    return b'"' + raw.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


async def read_line(reader: asyncio.StreamReader, max_line: int = MAX_LINE) -> bytes:
    """One line without its CRLF, at most max_line bytes."""
    try:
        line = await reader.readuntil(b"\n")
    except asyncio.LimitOverrunError:
        raise ImapSyntaxError("line too long") from None
    if len(line) > max_line:
        raise ImapSyntaxError("line too long")
    return line.rstrip(b"\r\n")


async def read_command(reader: asyncio.StreamReader,
                       go_ahead: Callable[[], Awaitable[None]] | None,
                       *, max_line: int = MAX_LINE, max_total: int | None = None
                       ) -> tuple[bytes, bytes, list[bytes]]:
    """(tag, command, arguments) of one command, its literals read.

    A synchronizing literal `{n}` waits for `go_ahead()` (which sends the
    continuation request); without one only `{n+}` is accepted.  Each line
    is at most max_line bytes; lines and literals together at most max_total
    (None: unbounded), else ImapSyntaxError "command too long".
    """
    line = await read_line(reader, max_line)
    total = len(line)
    tag, command, rest = split_tag(line)
    arguments: list[bytes] = []
    segment = parse_segment(rest)
    while True:
        arguments.extend(segment.arguments)
        if segment.literal is None:
            return tag, command, arguments
        if max_total is not None and total + segment.literal > max_total:
            raise ImapSyntaxError(f"command too long (more than {max_total} bytes)")
        if not segment.nonsync:
            if go_ahead is None:
                raise ImapSyntaxError("synchronizing literal where only {n+} is accepted")
            await go_ahead()
        arguments.append(await reader.readexactly(segment.literal))
        line = await read_line(reader, max_line)
        total += segment.literal + len(line)
        if max_total is not None and total > max_total:
            raise ImapSyntaxError(f"command too long (more than {max_total} bytes)")
        segment = parse_segment(line)
