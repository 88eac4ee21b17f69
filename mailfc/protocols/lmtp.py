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
from dataclasses import dataclass


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


async def read_reply(reader: asyncio.StreamReader) -> Reply:
    lines: list[str] = []
    while True:
        try:
            raw = await reader.readuntil(b"\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError) as error:
            raise LmtpError(f"connection lost while reading a reply: {error}") from None
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        if len(line) < 3 or not line[:3].isdigit():
            raise LmtpError(f"malformed reply {line[:80]!r}")
        lines.append(line[4:])
        if line[3:4] != "-":
            return Reply(int(line[:3]), " ".join(lines))


def xtext(value: str) -> str:
    """RFC 3461 xtext (XCLIENT and XFORWARD attribute values): `+`, `=`, controls,
    space and non-ASCII as +HH."""
    return "".join(
        f"+{byte:02X}" if byte < 33 or byte > 126 or byte in (43, 61) else chr(byte)
        for byte in value.encode("utf-8", "replace"))


def dot_stuff(message: bytes) -> bytes:
    """The DATA payload: CRLF line ends, leading dots doubled, final `.` line."""
    text = message.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    if not text.endswith(b"\r\n"):
        text += b"\r\n"
    lines = text.split(b"\r\n")
    stuffed = b"\r\n".join(b"." + line if line.startswith(b".") else line for line in lines)
    return stuffed + b".\r\n"


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

    async def deliver(self, sender: str, recipients: list[str], message: bytes,
                      mail_options: list[str] | None = None,
                      preamble: list[str] | None = None) -> dict[str, Reply]:
        """One transaction on a ready session; a Reply for every recipient.

        `preamble`: commands before MAIL (XFORWARD) that must succeed, else
        LmtpError (nothing sent; the session is not reusable).
        """
        try:
            return await self._transaction(sender, recipients, message, mail_options,
                                           preamble or [])
        except LmtpError as error:
            if not self.data_sent:
                error.message_sent = False
            raise

    async def _transaction(self, sender: str, recipients: list[str], message: bytes,
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

    async def _message(self, message: bytes, accepted: list[str],
                       results: dict[str, Reply]) -> dict[str, Reply]:
        """After 354: the message, then one reply per accepted recipient."""
        self.data_sent = True
        self.writer.write(dot_stuff(message))
        for recipient in accepted:
            results[recipient] = await self._reply("DATA")
        return results

    async def _pipelined(self, preamble: list[str], mail: str, recipients: list[str],
                         message: bytes) -> dict[str, Reply]:
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
