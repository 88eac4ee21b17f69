"""SMTP-In's protocol object: aiosmtpd's SMTP with the strictness an MX needs.

What this adds to aiosmtpd (everything else, including STARTTLS, SIZE and 8BITMIME, is
aiosmtpd's own):
- every reply carries an enhanced status code (replies.with_enhanced), except the
  greeting, the EHLO lines and 354 (RFC 2034);
- DATA with more input already waiting (the client did not wait for 354) is improper
  pipelining: 554 5.5.0 and the connection is closed, nothing is queued;
- a command line over aiosmtpd's limit gets 500 5.5.2 (aiosmtpd's own reply, coded);
- the connection and its end are reported to the handler (session records), and a
  shutdown says 421 before closing.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiosmtpd.smtp import SMTP

from mailfc.gateways import replies
from mailfc.gateways.listener import Connection, CyclingListener
from mailfc.protocols.smtp import CoalescedReplies

log = logging.getLogger("mailfc.gateways.smtp_in")


class SmtpInProtocol(CoalescedReplies, SMTP, Connection):
    def __init__(self, listener: CyclingListener, handler: Any, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.listener = listener
        self._in_ehlo = False
        self._announced = False

    # -- connection life --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = not self._announced
        super().connection_made(transport)
        if first:
            # Called again after STARTTLS with the TLS transport: one session only.
            self._announced = True
            self.listener.attach(self)
            self.event_handler.connected(self, self.session)

    def connection_lost(self, error: Exception | None) -> None:
        if self.listener.detach(self):
            self.event_handler.disconnected(self, self.session)
        super().connection_lost(error)

    def close_for_shutdown(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self._writer.write(self.take_held() + replies.SHUTDOWN.encode() + b"\r\n")
            self.transport.close()

    # -- replies ----------------------------------------------------------------------

    async def push(self, status: Any) -> None:
        if isinstance(status, str) and not self._in_ehlo:
            status = replies.with_enhanced(status)
        await super().push(status)

    async def smtp_EHLO(self, hostname: str) -> None:
        self._in_ehlo = True
        try:
            await super().smtp_EHLO(hostname)
        finally:
            self._in_ehlo = False

    async def smtp_DATA(self, arg: str) -> None:
        # RFC 2920: DATA ends a pipelined group; the message may follow only after 354.
        waiting = len(self._reader._buffer)  # type: ignore[attr-defined]
        if waiting and self.envelope is not None and self.envelope.rcpt_tos and not arg:
            log.info("%s: improper pipelining after DATA (%d bytes early)",
                     self.session.peer if self.session else "?", waiting)
            await self.push(replies.PIPELINING.format(command="DATA"))
            self.event_handler.refused(self.session, "pipelining", "improper pipelining")
            assert self.transport is not None
            self.transport.close()
            return
        await super().smtp_DATA(arg)
