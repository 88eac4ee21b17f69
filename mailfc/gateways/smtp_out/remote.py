"""One delivery attempt to a remote domain's MX hosts, the message streamed from its file.

For the recipients of one domain: try each hop in order until one answers; EHLO (HELO
when EHLO is refused), STARTTLS when offered (opportunistic: encrypt if the peer can,
never refuse if it cannot; an MX certificate is not verified, as between MTAs without
DANE/MTA-STS), MAIL FROM (with SIZE=<the message's size> when the MX announces SIZE,
BODY=8BITMIME and SMTPUTF8 when the message was sent with them and the MX has them),
RCPT TO each recipient (a reply each), DATA.  Every recipient gets a Reply:

    2xx at DATA            delivered
    4xx/5xx at RCPT/DATA   that reply (the spool retries 4xx, bounces 5xx)
    no hop reachable       451 4.4.1 (retried); a hop that greets with 4xx/5xx or
                           refuses EHLO and HELO counts as unreachable (next hop)
    hop hangs              451 4.4.2 after smtp_out.timeout_s (retried)

STREAMING
    The message (a mailfc.messages.Source: the spool's file) goes out after 354 chunk
    by chunk, dot-stuffed on the way (mailfc.protocols.lmtp.dot_stuffed), waiting for
    the connection to take each chunk before reading the next: a 40 MB message costs
    a few chunks of memory, never the whole of it.  smtp_out.timeout_s bounds every
    wait: connect, each reply, each chunk taken.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl

from mailfc.errors import PermanentFailure, TemporaryFailure
from mailfc.gateways.smtp_out.routes import Hop, Router
from mailfc.messages import CHUNK, Source, as_source
from mailfc.protocols.lmtp import Reply, dot_stuffed

log = logging.getLogger("mailfc.gateways.smtp_out")

# A reply longer than this many lines is not from an MTA.
MAX_REPLY_LINES = 100
READ_LIMIT = 64 * 1024
QUIT_WAIT_S = 2.0
PASSED_OPTIONS = {"BODY=8BITMIME": "8BITMIME", "SMTPUTF8": "SMTPUTF8"}


def _opportunistic_tls() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


class HopFailed(Exception):
    """This hop cannot take mail now (refused the session, broke off): try the next."""


class SmtpSession:
    """An SMTP client session on asyncio streams: commands, replies, a streamed DATA."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 timeout: float) -> None:
        self.reader = reader
        self.writer = writer
        self.timeout = timeout
        self.extensions: dict[str, str] = {}

    async def reply(self) -> tuple[Reply, list[str]]:
        """The next reply: its code and joined text, and its lines (for EHLO)."""
        lines: list[str] = []
        async with asyncio.timeout(self.timeout):
            while len(lines) < MAX_REPLY_LINES:
                try:
                    raw = await self.reader.readuntil(b"\n")
                except asyncio.IncompleteReadError:
                    raise HopFailed("connection closed by the server") from None
                except asyncio.LimitOverrunError:
                    raise HopFailed("reply line too long") from None
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                if len(line) < 3 or not line[:3].isdigit():
                    raise HopFailed(f"malformed reply {line[:80]!r}")
                lines.append(line[4:])
                if line[3:4] != "-":
                    return Reply(int(line[:3]), " ".join(lines).strip()), lines
        raise HopFailed(f"reply of more than {MAX_REPLY_LINES} lines")

    async def command(self, line: str) -> Reply:
        self.writer.write(line.encode("utf-8") + b"\r\n")
        await self._drain()
        reply, _ = await self.reply()
        return reply

    async def reset(self) -> None:
        """RSET after a refusal; the refusal is the answer even if RSET fails."""
        with contextlib.suppress(HopFailed, OSError, TimeoutError):
            await self.command("RSET")

    async def hello(self, helo: str) -> None:
        """EHLO (its keywords into self.extensions), else HELO; HopFailed if neither."""
        self.writer.write(f"EHLO {helo}\r\n".encode())
        await self._drain()
        reply, lines = await self.reply()
        self.extensions = {}
        if reply.ok:
            for line in lines[1:]:
                keyword, _, value = line.strip().partition(" ")
                self.extensions[keyword.upper()] = value
            return
        reply = await self.command(f"HELO {helo}")
        if not reply.ok:
            raise HopFailed(f"refused EHLO and HELO: {reply}")

    async def data(self, message: Source) -> Reply:
        """After 354: the message, then the server's reply to it."""
        for chunk in dot_stuffed(message):
            self.writer.write(chunk)
            if self.writer.transport.get_write_buffer_size() > CHUNK:
                await self._drain()
        await self._drain()
        reply, _ = await self.reply()
        return reply

    async def _drain(self) -> None:
        async with asyncio.timeout(self.timeout):
            await self.writer.drain()

    def quit_now(self) -> None:
        """QUIT and close at once, the answer unread (the transaction is over)."""
        with contextlib.suppress(Exception):
            self.writer.write(b"QUIT\r\n")
        self.writer.close()

    async def close(self) -> None:
        """QUIT, without waiting long for its answer, and close."""
        with contextlib.suppress(Exception):
            self.writer.write(b"QUIT\r\n")
            async with asyncio.timeout(QUIT_WAIT_S):
                await self.writer.drain()
                await self.reader.readuntil(b"\n")
        self.writer.close()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(QUIT_WAIT_S):
                await self.writer.wait_closed()


class RemoteDelivery:
    def __init__(self, router: Router, *, helo: str, timeout: float) -> None:
        self.router = router
        self.helo = helo
        self.timeout = timeout
        self.tls = _opportunistic_tls()

    async def deliver(self, sender: str, recipients: list[str], message: bytes | Source,
                      mail_options: tuple[str, ...] | list[str] = ()) -> dict[str, Reply]:
        source = as_source(message)
        domain = recipients[0].rpartition("@")[2]
        try:
            hops = await self.router.hops(domain)
        except PermanentFailure as error:
            return dict.fromkeys(recipients, Reply(550, f"5.1.2 {error}"))
        except TemporaryFailure as error:
            return dict.fromkeys(recipients, Reply(451, f"4.4.3 {error}"))
        last = Reply(451, f"4.4.1 no MX host of {domain} reachable")
        for hop in hops:
            try:
                return await self._attempt(hop, sender, recipients, source, mail_options)
            except (HopFailed, OSError) as error:
                last = Reply(451, f"4.4.1 {hop.host}:{hop.port}: "
                                  f"{getattr(error, 'strerror', None) or error}")
            except TimeoutError:
                last = Reply(451, f"4.4.2 {hop.host}:{hop.port} did not answer within"
                                  f" {self.timeout:g} s")
            log.info("delivery to %s via %s failed: %s", domain, hop.host, last)
        return dict.fromkeys(recipients, last)

    async def _attempt(self, hop: Hop, sender: str, recipients: list[str], message: Source,
                       mail_options: tuple[str, ...] | list[str]) -> dict[str, Reply]:
        async with asyncio.timeout(self.timeout):
            reader, writer = await asyncio.open_connection(hop.host, hop.port,
                                                           limit=READ_LIMIT)
        session = SmtpSession(reader, writer, self.timeout)
        try:
            greeting, _ = await session.reply()
            if not greeting.ok:
                raise HopFailed(f"greeted {greeting}")
            await session.hello(self.helo)
            if "STARTTLS" in session.extensions:
                reply = await session.command("STARTTLS")
                if reply.code == 220:
                    async with asyncio.timeout(self.timeout):
                        await writer.start_tls(self.tls, server_hostname=hop.host)
                    await session.hello(self.helo)
            results = await self._transaction(session, sender, recipients, message,
                                              mail_options)
        except BaseException:
            await session.close()
            raise
        # The replies are final once the server has given them: the spool records them
        # now.  Waiting for QUIT's 221 first would leave a window in which a killed
        # process has had the message taken but not recorded, and its successor would
        # send it again.
        session.quit_now()
        return results

    @staticmethod
    async def _transaction(session: SmtpSession, sender: str, recipients: list[str],
                           message: Source, mail_options: tuple[str, ...] | list[str]
                           ) -> dict[str, Reply]:
        options = ""
        if "SIZE" in session.extensions:
            options += f" SIZE={message.size}"
        for option in mail_options:
            extension = PASSED_OPTIONS.get(option.upper())
            if extension is not None and extension in session.extensions:
                options += " " + option.upper()
        results: dict[str, Reply] = {}
        reply = await session.command(f"MAIL FROM:<{sender}>{options}")
        if not reply.ok:
            await session.reset()
            return dict.fromkeys(recipients, reply)
        accepted = []
        for recipient in recipients:
            reply = await session.command(f"RCPT TO:<{recipient}>")
            if reply.ok:
                accepted.append(recipient)
            else:
                results[recipient] = reply
        if not accepted:
            await session.reset()
            return results
        reply = await session.command("DATA")
        if reply.code == 354:
            reply = await session.data(message)
        results.update(dict.fromkeys(accepted, reply))
        return results
