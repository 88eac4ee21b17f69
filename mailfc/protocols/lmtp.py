"""An LMTP client over asyncio streams (RFC 2033), for the LMTP Router.

LMTP differs from SMTP where it matters here: after DATA the server answers
once per accepted recipient, so one transaction can succeed for some
recipients and fail for others.  `deliver()` returns a Reply per recipient; a session can carry many
transactions one after another (`hello()` once, then `deliver()` each time).

Reply codes are (code, enhanced text) pairs; a connection problem while
talking raises LmtpError, which the caller turns into a temporary failure for
every recipient it had not got a reply for.

PIPELINING (RFC 2920, which RFC 2033 requires of LMTP servers): when the
server's LHLO reply lists it, MAIL, every RCPT and DATA go out in one write
and their replies are read after; the message follows only a 354.  A
transaction then costs two round trips instead of three plus one per
recipient, which is most of its cost through the router and dispatcher.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import re
from collections.abc import Iterator
from dataclasses import dataclass

from mailfc.messages import CHUNK, BytesSource, Source, as_source

BARE_LF = re.compile(rb"(?<!\r)\n")


class LmtpError(Exception):
    """The LMTP conversation broke off (connection lost, garbage, timeout).

    `message_sent` tells whether the message data had gone out: before that,
    retrying on another connection cannot deliver twice.
    """

    def __init__(self, text: str, *, message_sent: bool = True) -> None:
        super().__init__(text)
        self.message_sent = message_sent


@dataclass(frozen=True)
class Reply:
    code: int
    text: str

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 300

    @property
    def temporary(self) -> bool:
        return 400 <= self.code < 500

    def __str__(self) -> str:
        return f"{self.code} {self.text}"


# A multi-line reply longer than this is not a mail server's (Postfix's EHLO reply is
# under 1 KB): the reader stops there instead of collecting lines for ever.
MAX_REPLY = 65536


async def read_reply(reader: asyncio.StreamReader) -> Reply:
    lines: list[str] = []
    size = 0
    while True:
        try:
            raw = await reader.readuntil(b"\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError) as error:
            raise LmtpError(f"connection lost while reading a reply: {error}") from None
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        if len(line) < 3 or not line[:3].isdigit():
            raise LmtpError(f"malformed reply {line[:80]!r}")
        lines.append(line[4:])
        size += len(raw)
        if size > MAX_REPLY:
            raise LmtpError(f"reply longer than {MAX_REPLY} bytes")
        if line[3:4] != "-":
            return Reply(int(line[:3]), " ".join(lines))


def xtext(value: str) -> str:
    """RFC 3461 xtext (XCLIENT and XFORWARD attribute values): `+`, `=`, controls,
    space and non-ASCII as +HH."""
    return "".join(
        f"+{byte:02X}" if byte < 33 or byte > 126 or byte in (43, 61) else chr(byte)
        for byte in value.encode("utf-8", "replace"))


def xtext_decode(value: str) -> str:
    """The inverse of xtext(): +HH back to its byte; anything else as it is."""
    if "+" not in value:
        return value
    out = bytearray()
    index = 0
    while index < len(value):
        hexdigits = value[index + 1:index + 3]
        if value[index] == "+" and len(hexdigits) == 2 \
                and all(c in "0123456789ABCDEFabcdef" for c in hexdigits):
            out.append(int(hexdigits, 16))
            index += 3
        else:
            out += value[index].encode("utf-8")
            index += 1
    return out.decode("utf-8", "replace")


# Postfix's XFORWARD (XFORWARD_README): what a proxy tells the next hop of the
# original client and of the message (IDENT: the sender's queue id).
XFORWARD_ATTRIBUTES = ("NAME", "ADDR", "PROTO", "HELO", "IDENT")
XFORWARD_EXTENSION = "XFORWARD " + " ".join(XFORWARD_ATTRIBUTES)


def xforward_attributes(argument: str) -> dict[str, str] | None:
    """An XFORWARD command's attributes, decoded; None when one is not a known
    attribute.  Values Postfix sends for "not known" ([UNAVAILABLE], [TEMPUNAVAIL])
    are left out."""
    attributes: dict[str, str] = {}
    for item in argument.split():
        name, sep, value = item.partition("=")
        if not sep or name.upper() not in XFORWARD_ATTRIBUTES:
            return None
        decoded = xtext_decode(value)
        if decoded in ("[UNAVAILABLE]", "[TEMPUNAVAIL]"):
            continue
        if name.upper() == "ADDR":
            address = client_address(decoded)
            if address is None:
                continue        # unknown, rather than an address nobody can use
            decoded = address
        attributes[name.upper()] = decoded
    return attributes


def client_address(value: str) -> str | None:
    """XFORWARD ADDR as an IP address (Postfix writes IPv6 as "IPV6:<address>"), None
    when it is not one."""
    if value[:5].upper() == "IPV6:":
        value = value[5:]
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        return None


def dot_stuff(message: bytes) -> bytes:
    """The DATA payload: CRLF line ends, leading dots doubled, final `.` line."""
    return b"".join(dot_stuffed(BytesSource(message)))


def dot_stuffed(message: Source, chunk: int = CHUNK) -> Iterator[bytes]:
    """The DATA payload of a message read chunk by chunk (never whole in memory): bare
    LF made CRLF, leading dots doubled, the final `.` line."""
    carry = b""
    line_start = True
    ended = False
    for piece in message.chunks(chunk):
        data = carry + piece
        # A CR at the end may start a CRLF the next chunk ends: decide it then.
        if data.endswith(b"\r"):
            data, carry = data[:-1], b"\r"
        else:
            carry = b""
        if not data:
            continue
        if data.count(b"\n") != data.count(b"\r\n"):
            # Bare LFs (rare: the look-behind costs ~10 ms per MB, counting nothing).
            data = BARE_LF.sub(b"\r\n", data)
        data = data.replace(b"\r\n.", b"\r\n..")
        if line_start and data.startswith(b"."):
            data = b"." + data
        line_start = ended = data.endswith(b"\r\n")
        yield data
    if carry:
        yield carry + b"\n"
    elif not ended:
        yield b"\r\n"
    yield b".\r\n"


def _check_preamble(line: str, reply: Reply) -> None:
    if not reply.ok:
        raise LmtpError(f"{line.split()[0]} refused: {reply}", message_sent=False)


class LmtpClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 timeout: float) -> None:
        self.reader = reader
        self.writer = writer
        self.timeout = timeout
        self.data_sent = False
        self.pipelining = False

    async def command(self, line: str) -> Reply:
        await self._send(line + "\r\n")
        return await self._reply(line.split()[0])

    async def _send(self, text: str) -> None:
        self.writer.write(text.encode("utf-8"))
        try:
            await self.writer.drain()
        except (ConnectionError, OSError) as error:
            raise LmtpError(f"connection lost: {error}") from None

    async def _reply(self, after: str) -> Reply:
        # asyncio.timeout, not wait_for: on 3.11 wait_for runs the read in a task of
        # its own, and a hop reads four replies per message.
        try:
            async with asyncio.timeout(self.timeout):
                return await read_reply(self.reader)
        except (ConnectionError, OSError) as error:
            raise LmtpError(f"connection lost: {error}") from None
        except TimeoutError:
            raise LmtpError(f"no reply to {after} within {self.timeout:.0f}s") from None

    async def greeting(self) -> Reply:
        try:
            async with asyncio.timeout(self.timeout):
                return await read_reply(self.reader)
        except TimeoutError:
            raise LmtpError("no greeting") from None

    async def hello(self, helo: str) -> Reply:
        """Greeting and LHLO; the session is then ready for transactions."""
        greeting = await self.greeting()
        if not greeting.ok:
            return greeting
        return await self.lhlo(helo)

    async def lhlo(self, helo: str) -> Reply:
        """LHLO; its (joined) reply tells which extensions the server has."""
        reply = await self.command(f"LHLO {helo}")
        self.pipelining = reply.ok and "PIPELINING" in reply.text.upper().split()
        return reply

    async def deliver(self, sender: str, recipients: list[str], message: bytes | Source,
                      mail_options: list[str] | None = None,
                      preamble: list[str] | None = None) -> dict[str, Reply]:
        """One transaction on a ready session; a Reply for every recipient.

        `preamble`: commands before MAIL (XFORWARD) that must succeed, else
        LmtpError (nothing sent; the session is not reusable).
        """
        try:
            return await self._transaction(sender, recipients, as_source(message),
                                           mail_options, preamble or [])
        except LmtpError as error:
            if not self.data_sent:
                error.message_sent = False
            raise

    async def _transaction(self, sender: str, recipients: list[str], message: Source,
                           mail_options: list[str] | None,
                           preamble: list[str]) -> dict[str, Reply]:
        self.data_sent = False
        options = "".join(" " + option for option in mail_options or [])
        if self.pipelining:
            return await self._pipelined(preamble, f"MAIL FROM:<{sender}>{options}",
                                         recipients, message)
        for line in preamble:
            _check_preamble(line, await self.command(line))
        results: dict[str, Reply] = {}
        reply = await self.command(f"MAIL FROM:<{sender}>{options}")
        if not reply.ok:
            await self.command("RSET")
            return dict.fromkeys(recipients, reply)
        accepted: list[str] = []
        for recipient in recipients:
            reply = await self.command(f"RCPT TO:<{recipient}>")
            if reply.ok:
                accepted.append(recipient)
            else:
                results[recipient] = reply
        if not accepted:
            await self.command("RSET")
            return results
        reply = await self.command("DATA")
        if reply.code != 354:
            results.update(dict.fromkeys(accepted, reply))
            await self.command("RSET")
            return results
        return await self._message(message, accepted, results)

    async def _message(self, message: Source, accepted: list[str],
                       results: dict[str, Reply]) -> dict[str, Reply]:
        """After 354: the message chunk by chunk (waiting for the peer to take each,
        so memory stays bounded), then one reply per accepted recipient."""
        self.data_sent = True
        # Pieces go out together up to CHUNK: a small message and its final dot are
        # one write (one read for the server), not two.
        pending: list[bytes] = []
        pending_size = 0
        for data in dot_stuffed(message):
            pending.append(data)
            pending_size += len(data)
            if pending_size < CHUNK:
                continue
            self.writer.write(b"".join(pending))
            pending.clear()
            pending_size = 0
            if self.writer.transport.get_write_buffer_size() > CHUNK:
                try:
                    async with asyncio.timeout(self.timeout):
                        await self.writer.drain()
                except (ConnectionError, OSError) as error:
                    raise LmtpError(f"connection lost: {error}") from None
                except TimeoutError:
                    raise LmtpError(f"message not taken within {self.timeout:.0f}s") from None
        self.writer.write(b"".join(pending))
        for recipient in accepted:
            results[recipient] = await self._reply("DATA")
        return results

    async def _pipelined(self, preamble: list[str], mail: str, recipients: list[str],
                         message: Source) -> dict[str, Reply]:
        commands = [*preamble, mail, *(f"RCPT TO:<{recipient}>" for recipient in recipients),
                    "DATA"]
        await self._send("".join(c + "\r\n" for c in commands))
        for line in preamble:
            _check_preamble(line, await self._reply(line.split()[0]))
        mail_reply = await self._reply("MAIL")
        results: dict[str, Reply] = {}
        accepted: list[str] = []
        for recipient in recipients:
            reply = await self._reply("RCPT")
            if reply.ok and mail_reply.ok:
                accepted.append(recipient)
            else:
                results[recipient] = reply if mail_reply.ok else mail_reply
        data_reply = await self._reply("DATA")
        if data_reply.code == 354 and not accepted:
            # A server that takes DATA without recipients gets an empty message.
            self.writer.write(b".\r\n")
            await self._reply("DATA")
        if data_reply.code != 354 or not accepted:
            results.update(dict.fromkeys(accepted, data_reply))
            await self.command("RSET")
            return results
        return await self._message(message, accepted, results)

    async def quit(self) -> None:
        with contextlib.suppress(LmtpError):
            await self.command("QUIT")
