"""The next hop of a gateway over LMTP: pooled sessions, one Reply per recipient.

SMTP-In's spool hands messages to the LMTP Router (a bounce to a sender elsewhere to
SMTP-Out's intake) this way, and Filter-Out hands them on to SMTP-Out's intake.  The
message (bytes or a mailfc.messages Source) is sent in chunks as it is read.  A session
is kept open for the next message (greeting and LHLO cost as much as a small message);
a kept session that went stale before the message was sent is replaced once, so that
never turns into a failure.

XFORWARD (Postfix's extension: ADDR, NAME, HELO, PROTO, IDENT, each xtext-encoded) tells
the next hop who the original client was and, with IDENT, which message this is (its
journal recognises a retry by it).  It is sent only when the server announced it in
its LHLO reply, pipelined with the transaction when the server has PIPELINING
(mailfc.protocols.lmtp).

The hop is reached at a mailfc.hops.HopAddress: its unix socket (the listener checks
who connects), or host:port with mutual TLS for a hop on another host.

Failures are LmtpError (connection refused, lost, timed out); the spool turns that into
a temporary failure of every recipient and retries later.
"""

from __future__ import annotations

import asyncio
import contextlib

from mailfc.hops import HopAddress
from mailfc.messages import Source
from mailfc.protocols.lmtp import LmtpClient, LmtpError, Reply, xtext

IDLE_KEEP = 16


class LmtpHop:
    def __init__(self, address: HopAddress, *, helo: str, timeout: float,
                 connect_timeout: float = 5.0) -> None:
        self.address = address
        self.helo = helo
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._idle: list[tuple[LmtpClient, bool]] = []

    async def deliver(self, sender: str, recipients: list[str], message: bytes | Source, *,
                      mail_options: list[str] | None = None,
                      xforward: dict[str, str] | None = None) -> dict[str, Reply]:
        while self._idle:
            client, xforward_ok = self._idle.pop()
            if client.writer.is_closing() or client.reader.at_eof():
                continue
            try:
                return await self._transaction(client, xforward_ok, sender, recipients,
                                               message, mail_options, xforward)
            except LmtpError as error:
                client.writer.close()
                if error.message_sent:
                    raise
                # Stale kept session, nothing sent yet: a fresh one may try.
        client, xforward_ok = await self._open()
        return await self._transaction(client, xforward_ok, sender, recipients, message,
                                       mail_options, xforward)

    async def _transaction(self, client: LmtpClient, xforward_ok: bool, sender: str,
                           recipients: list[str], message: bytes | Source,
                           mail_options: list[str] | None,
                           xforward: dict[str, str] | None) -> dict[str, Reply]:
        preamble = []
        if xforward and xforward_ok:
            preamble.append("XFORWARD " + " ".join(f"{k}={xtext(v)}"
                                                   for k, v in xforward.items()))
        try:
            results = await client.deliver(sender, recipients, message, mail_options,
                                           preamble)
        except LmtpError as error:
            if not client.data_sent:
                error.message_sent = False
            client.writer.close()
            raise
        except BaseException:
            client.writer.close()
            raise
        if len(self._idle) < IDLE_KEEP:
            self._idle.append((client, xforward_ok))
        else:
            await client.quit()
            client.writer.close()
        return results

    async def _open(self) -> tuple[LmtpClient, bool]:
        try:
            reader, writer = await self.address.connect(self.connect_timeout)
        except (OSError, TimeoutError) as error:
            raise LmtpError(f"cannot connect to {self.address}: "
                            f"{getattr(error, 'strerror', None) or error or 'timeout'}",
                            message_sent=False) from None
        client = LmtpClient(reader, writer, self.timeout)
        try:
            greeting = await client.greeting()
            if not greeting.ok:
                raise LmtpError(f"{self.address} greeted {greeting}",
                                message_sent=False)
            lhlo = await self._lhlo(client)
        except BaseException:
            writer.close()
            raise
        return client, "XFORWARD" in lhlo.upper()

    async def _lhlo(self, client: LmtpClient) -> str:
        """LHLO, returning the whole multi-line reply (read_reply joins the lines)."""
        reply = await client.lhlo(self.helo)
        if not reply.ok:
            raise LmtpError(f"{self.address} refused LHLO: {reply}",
                            message_sent=False)
        return reply.text

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for client, _ in idle:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.quit(), 1.0)
            client.writer.close()
