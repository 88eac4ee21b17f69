"""A lean SMTP and LMTP server (RFC 5321, RFC 2033) for mailfc's gateways.

Every message of every domain passes SMTP-In (ESMTP, the MX, with the inbound checks
before its 250), then the LMTP Router, or Filter-Out and SMTP-Out's intake on its way
out (LMTP, internal hops).  aiosmtpd
did this at about 0.9 ms of CPU per one-message session here (a task, stream
objects and a command table built with `inspect` per connection, addresses through
the email header parser); this server, an asyncio.Protocol, at about 0.15 ms, and
the hops run once per message each on a CPU-bound host.

DIALECTS
    LmtpServer: LHLO; one reply per accepted recipient after the message.
    SmtpServer: HELO/EHLO, STARTTLS (RFC 3207), one reply per message; DATA with
    input already waiting (the client did not wait for 354) is improper pipelining
    (RFC 2920): 554 5.5.0 and the connection is closed.

SESSION
    220 greeting; hello; then transactions: MAIL FROM:<addr> [params],
    RCPT TO:<addr> [params]..., DATA, the message up to <CRLF>.<CRLF>.  RSET, NOOP,
    VRFY (252), HELP, QUIT.  A handler adds verbs of its own (XFORWARD) with
    `extra_verbs` and `handle_<VERB>`.  Every reply carries an enhanced status code
    (RFC 2034) but the greeting, the hello lines and 354.  MAIL takes SIZE, BODY,
    SMTPUTF8 and AUTH; RCPT no parameter; any other (DSN's RET, ENVID, NOTIFY and
    ORCPT too: DSN is not advertised) gets `555 5.5.4`, never silently dropped.

PIPELINING
    Replies to commands the client pipelined are collected and go out in one write
    once no further complete command is waiting; 354, 220 (STARTTLS), 221 and 421 go
    out at once.

TLS
    STARTTLS (SmtpServer with a tls_context) answers 220, then hands the connection
    to loop.start_tls; what the client sent in the clear after STARTTLS is dropped
    (command injection), and the session starts again (EHLO, no envelope).  A failed
    handshake closes only that connection.

HANDLER (hooks named after the verbs; all but DATA optional)
    ehlo_extensions: list[str]                               extra EHLO/LHLO keywords
    connected(session) / disconnected(session)               session begins / ends
    refused(session, rule, reason)                           a protocol-level refusal
    handle_HELO(session, hostname) -> None                   HELO, EHLO or LHLO taken
    handle_MAIL(session, envelope, address, options) -> str  reply; a 2xx takes it
    handle_RCPT(session, envelope, address, options) -> str  (append to rcpt_tos)
    handle_DATA(session, envelope) -> str (SMTP) | list[str] (LMTP, per recipient)
    handle_RSET(session, envelope) -> None                   a transaction dropped
    handle_<VERB>(session, envelope, argument) -> str        for VERB in extra_verbs
    A hook that raises gets `451 4.3.0` (the sender keeps the message and retries).

MESSAGE DATA
    The message is written, dot-unstuffed, into a mailfc.messages.MessageData as it
    arrives (memory up to its memory part, an unlinked file in message_dir beyond), so a
    connection holds at most MAX_PENDING_INPUT of input whatever the message's size;
    handle_DATA finds it in envelope.message with envelope.bare_lf and
    envelope.eight_bit noted on the way, and it is closed after the hook.  Text lines
    of any length are taken (checks decide about them).

LIMITS
    A command line over max_command_line (LMTP 4096, SMTP 1000 octets as for text
    lines): `500 5.5.2`; a message over data_size_limit: `552 5.3.4` (the rest of it
    is read and dropped, never stored); no input for idle_timeout_s: 421 and close.

ERRORS (ErrorLimits, Postfix's smtpd error counter)
    Every 4xx/5xx reply to a command is an error: syntax, sequence, unknown
    commands and, for SmtpServer, the handler's refusals too (550 5.1.1 unknown
    user, 554 5.7.1 relaying denied, a refused message).  Once a session has made
    soft_limit errors, every further reply waits sleep_s first (Postfix 2.1 and
    later: smtpd_error_sleep_time, fixed, not growing); at hard_limit errors the
    session gets `421 4.7.0 <host> Error: too many errors` and is closed.  More than
    junk_limit of NOOP, RSET, VRFY, HELO/EHLO count as an error each
    (smtpd_junk_command_limit).  SmtpServer: Postfix's 10, 20, 1 s, 100, so one
    connection can no longer try a thousand recipients in a second.  LmtpServer (the
    internal hops, whose peers are mailfc's own): only protocol errors count, no
    delay, 421 at 20; a recipient refusal there is the answer a hop asked for.

CONNECTIONS
    With an `anvil` (mailfc.anvil), a connection from a client over its connection
    count or rate gets `421 4.7.0 <host> Error: too many connections from <client>`
    instead of the greeting and is closed; the handler never hears of it.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from mailfc.anvil import Anvil, Ticket
from mailfc.messages import MessageData
from mailfc.protocols.lmtp import XFORWARD_EXTENSION, xforward_attributes

log = logging.getLogger("mailfc.protocols.smtp_server")

LMTP_COMMAND_LINE = 4096
SMTP_COMMAND_LINE = 1000
MAX_ERRORS = 20
TLS_HANDSHAKE_TIMEOUT_S = 30.0
# Commands a client may have pipelined before the server stops reading until it
# has answered them: bounds what one connection holds in memory.
MAX_PENDING_INPUT = 256 * 1024

R_OK = "250 2.0.0 OK"
R_OK_SENDER = "250 2.1.0 OK"
R_OK_RCPT = "250 2.1.5 OK"
R_START_DATA = "354 End data with <CR><LF>.<CR><LF>"
R_START_TLS = "220 2.0.0 Ready to start TLS"
R_BYE = "221 2.0.0 Bye"
R_VRFY = "252 2.0.0 Cannot VRFY user, but will accept message and attempt delivery"
R_HELP = "214 2.0.0 Commands: {verbs}"
R_UNKNOWN = "500 5.5.1 command {verb!r} not recognized"
R_LINE_TOO_LONG = "500 5.5.2 line too long"
R_USE_LHLO = "500 5.5.1 this is an LMTP server: use LHLO"
R_SYNTAX = "501 5.5.4 syntax: {usage}"
R_BAD_ADDRESS = "501 5.1.3 bad address syntax"
R_NEED_HELLO = "503 5.5.1 send {hello} first"
R_NESTED_MAIL = "503 5.5.1 sender already given"
R_NEED_MAIL = "503 5.5.1 need MAIL command first"
R_NEED_RCPT = "503 5.5.1 need RCPT command first"
R_TLS_ACTIVE = "503 5.5.1 TLS already active"
R_BAD_PARAMETER = "555 5.5.4 parameter {name} not recognized"
R_PIPELINING = "554 5.5.0 improper command pipelining after {command}"
R_TOO_BIG = "552 5.3.4 message size exceeds the limit of {limit} bytes"
R_INTERNAL = "451 4.3.0 temporary failure, try again later"
R_TOO_MANY_ERRORS = "421 4.7.0 {host} Error: too many errors"
R_TIMEOUT = "421 4.4.2 timeout, closing"
R_SHUTDOWN = "421 4.3.2 service shutting down, try again later"
R_XFORWARD_PLACE = "503 5.5.1 XFORWARD only between transactions"
R_XFORWARD_SYNTAX = "501 5.5.4 bad XFORWARD attribute: expected NAME, ADDR, PROTO, HELO, IDENT"

# DSN (RFC 3461: RET, ENVID, NOTIFY, ORCPT) is not advertised, so its parameters get
# 555 5.5.4 like any unknown one: taking them without honouring them would tell the
# sender its NOTIFY=NEVER or NOTIFY=SUCCESS will be respected.
MAIL_PARAMETERS = frozenset({"SIZE", "BODY", "SMTPUTF8", "AUTH"})
RCPT_PARAMETERS: frozenset[str] = frozenset()
BODY_TYPES = frozenset({"7BIT", "8BITMIME"})
DATA_END = b"\r\n.\r\n"


# Commands a client may repeat without delivering mail; past junk_limit each counts as
# an error (Postfix's SMTPD_CMD_FLAG_LIMIT commands).
JUNK_COMMANDS = frozenset({"NOOP", "RSET", "VRFY", "HELO", "EHLO", "LHLO"})


@dataclass(frozen=True)
class ErrorLimits:
    """How a session's errors are answered: see ERRORS in the module's manual."""

    soft_limit: int = 10        # smtpd_soft_error_limit
    hard_limit: int = 20        # smtpd_hard_error_limit
    sleep_s: float = 1.0        # smtpd_error_sleep_time
    junk_limit: int = 100       # smtpd_junk_command_limit (0: no limit)
    # The handler's 4xx/5xx replies count too (not only the protocol's own).
    count_refusals: bool = True


POSTFIX_ERRORS = ErrorLimits()
INTERNAL_HOP_ERRORS = ErrorLimits(soft_limit=MAX_ERRORS, hard_limit=MAX_ERRORS, sleep_s=0.0,
                                  junk_limit=0, count_refusals=False)


class MessageTooBig(Exception):
    """The message went past data_size_limit (and was read to its end)."""


class Envelope:
    """One transaction.  mail_from is None before MAIL, "" for the null sender."""

    __slots__ = ("bare_lf", "declared_size", "eight_bit", "extra", "mail_from", "mail_options",
                 "message", "rcpt_tos")

    def __init__(self) -> None:
        self.mail_from: str | None = None
        self.mail_options: list[str] = []
        # What MAIL's SIZE= announced (0: nothing), checked against the limit.
        self.declared_size = 0
        self.rcpt_tos: list[str] = []
        # The message once DATA ended (protocols do not hold it whole in memory), with
        # what the server noticed while reading it: a bare LF, 8-bit bytes.
        self.message: MessageData | None = None
        self.bare_lf = False
        self.eight_bit = False
        # What hooks keep for the transaction (alias expansions, XFORWARD attributes).
        self.extra: dict[str, Any] = {}

    @property
    def sender(self) -> str:
        """The reverse path once MAIL was taken: "" for the null sender (bounces)."""
        return self.mail_from or ""


class Session:
    """One connection.  `state` is the handler's own (SMTP-In's session record)."""

    __slots__ = ("extended", "host_name", "peer", "state", "tls")

    def __init__(self, peer: Any) -> None:
        self.peer = peer
        self.host_name: str | None = None
        self.extended = False       # EHLO or LHLO rather than HELO
        self.tls = False
        self.state: Any = None


class Tracker(Protocol):
    """What drains a listener's sessions (gateways.listener.CyclingListener)."""

    def attach(self, connection: Any) -> None: ...

    def detach(self, connection: Any) -> bool: ...


Hook = Callable[..., Awaitable[Any]]


class _Server:
    """The protocol factory: one per listener, holding what every connection shares."""

    lmtp = False
    hello = "EHLO"
    base_keywords: tuple[str, ...] = ()

    def __init__(self, handler: Any, *, hostname: str, ident: str,
                 data_size_limit: int, idle_timeout_s: float, max_command_line: int,
                 message_dir: str | Path | None = None,
                 errors: ErrorLimits = INTERNAL_HOP_ERRORS, anvil: Anvil | None = None
                 ) -> None:
        self.hostname = hostname
        self.errors = errors
        self.anvil = anvil
        self.too_many_errors = R_TOO_MANY_ERRORS.format(host=hostname)
        # Where a message past MessageData's memory part goes (an unlinked file).
        self.message_dir = message_dir
        self.data_size_limit = data_size_limit
        self.idle_timeout_s = idle_timeout_s
        self.max_command_line = max_command_line
        self.greeting = f"220 {hostname} {ident} ready\r\n".encode()
        self.keywords = [*self.base_keywords, "PIPELINING", "ENHANCEDSTATUSCODES", "8BITMIME",
                         "SMTPUTF8", f"SIZE {data_size_limit}",
                         *getattr(handler, "ehlo_extensions", [])]
        self.verbs: dict[str, Hook] = {
            verb: getattr(handler, f"handle_{verb}")
            for verb in getattr(handler, "extra_verbs", ())}
        self.helo_hook: Hook | None = getattr(handler, "handle_HELO", None)
        self.mail_hook: Hook | None = getattr(handler, "handle_MAIL", None)
        self.rcpt_hook: Hook | None = getattr(handler, "handle_RCPT", None)
        self.rset_hook: Hook | None = getattr(handler, "handle_RSET", None)
        self.data_hook: Hook = handler.handle_DATA
        self.on_connected: Callable[..., None] | None = getattr(handler, "connected", None)
        self.on_disconnected: Callable[..., None] | None = getattr(handler, "disconnected",
                                                                   None)
        self.on_refused: Callable[..., None] | None = getattr(handler, "refused", None)
        self.help = R_HELP.format(verbs=" ".join(self.help_verbs()))

    def help_verbs(self) -> list[str]:
        return [self.hello, "MAIL", "RCPT", "DATA", "RSET", "NOOP", "QUIT", "VRFY", "HELP"]

    def hello_keywords(self, session: Session) -> list[str]:
        return self.keywords

    def hello_reply(self, session: Session) -> str:
        keywords = [self.hostname, *self.hello_keywords(session)]
        return "\r\n".join(f"250-{k}" for k in keywords[:-1]) + f"\r\n250 {keywords[-1]}"

    def __call__(self) -> ServerConnection:
        return ServerConnection(self)

    def tracked_by(self, tracker: Tracker) -> ServerConnection:
        """A connection drained by `tracker` (a cycled listener passes itself)."""
        return ServerConnection(self, tracker)


class LmtpServer(_Server):
    lmtp = True
    hello = "LHLO"

    def __init__(self, handler: Any, *, hostname: str, ident: str = "mailfc LMTP",
                 data_size_limit: int = 50 * 1024 * 1024, idle_timeout_s: float = 300.0,
                 max_command_line: int = LMTP_COMMAND_LINE,
                 message_dir: str | Path | None = None) -> None:
        super().__init__(handler, hostname=hostname, ident=ident,
                         data_size_limit=data_size_limit, idle_timeout_s=idle_timeout_s,
                         max_command_line=max_command_line, message_dir=message_dir)


class SmtpServer(_Server):
    def __init__(self, handler: Any, *, hostname: str, ident: str = "ESMTP mailfc",
                 data_size_limit: int = 50 * 1024 * 1024, idle_timeout_s: float = 300.0,
                 max_command_line: int = SMTP_COMMAND_LINE,
                 tls_context: ssl.SSLContext | None = None,
                 message_dir: str | Path | None = None,
                 errors: ErrorLimits = POSTFIX_ERRORS, anvil: Anvil | None = None) -> None:
        self.tls_context = tls_context
        super().__init__(handler, hostname=hostname, ident=ident,
                         data_size_limit=data_size_limit, idle_timeout_s=idle_timeout_s,
                         max_command_line=max_command_line, message_dir=message_dir,
                         errors=errors, anvil=anvil)

    def help_verbs(self) -> list[str]:
        return ["HELO", *super().help_verbs(), *(["STARTTLS"] if self.tls_context else [])]

    def hello_keywords(self, session: Session) -> list[str]:
        if self.tls_context is None or session.tls:
            return self.keywords
        return [*self.keywords, "STARTTLS"]


class ServerConnection(asyncio.Protocol):
    """One session: data_received fills a buffer, one task answers commands."""

    def __init__(self, server: _Server, tracker: Tracker | None = None) -> None:
        self.server = server
        self.tracker = tracker
        self.transport: asyncio.Transport | None = None
        self.session = Session(None)
        self.envelope = Envelope()
        self._buffer = bytearray()
        self._eof = False
        self._ended = False
        self._data_wanted: asyncio.Future[None] | None = None
        # The idle timeout: one timer per session, re-armed only when it fires early
        # (a timeout per command line would create and cancel a timer per line).
        self._waiting_since = 0.0
        self._idle_timer: asyncio.TimerHandle | None = None
        self._idle_expired = False
        self._writable: asyncio.Future[None] | None = None
        self._reading_paused = False
        self._out: list[bytes] = []
        self._errors = 0
        self._junk = 0
        self._ticket: Ticket | None = None
        # The loop keeps only a weak reference to a task.
        self._task: asyncio.Task[None] | None = None

    # -- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.session.peer = transport.get_extra_info("peername")
        anvil = self.server.anvil
        if anvil is not None:
            peer = self.session.peer
            self._ticket = anvil.connect(str(peer[0]) if isinstance(peer, tuple) else None)
            if self._ticket.refusal is not None:
                # No session: neither the tracker nor the handler hears of it.
                self._ended = True
                transport.write(anvil.refusal_line(self._ticket.client))  # type: ignore[attr-defined]
                transport.close()
                return
        if self.tracker is not None:
            self.tracker.attach(self)
        if self.server.on_connected is not None:
            self.server.on_connected(self.session)
        transport.write(self.server.greeting)  # type: ignore[attr-defined]
        self._task = asyncio.get_running_loop().create_task(self._serve())

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        # Commands pipelined past this, or message data the session has not written
        # out yet: stop reading until it has (bounded memory per connection).
        if len(self._buffer) > MAX_PENDING_INPUT \
                and self.transport is not None and not self._reading_paused:
            self.transport.pause_reading()
            self._reading_paused = True
        self._wake()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = True
        self._wake()
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        self._end()

    def pause_writing(self) -> None:
        self._writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        self._writable = None

    def close_for_shutdown(self) -> None:
        """The listener is going away: say so and close (see gateways.listener)."""
        if self.transport is not None and not self.transport.is_closing():
            self._reply(R_SHUTDOWN)
            self._flush()
            self.transport.close()

    def _end(self) -> None:
        """Once per session, from connection_lost or the end of _serve (a failed TLS
        handshake loses the connection without telling this protocol)."""
        if self._ended:
            return
        self._ended = True
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        if self._ticket is not None:
            self._ticket.release()
        if self.tracker is not None:
            self.tracker.detach(self)
        if self.server.on_disconnected is not None:
            try:
                self.server.on_disconnected(self.session)
            except Exception:
                log.exception("disconnect hook failed for %s", self.session.peer)

    # -- input ---------------------------------------------------------------------------

    def _wake(self) -> None:
        if self._data_wanted is not None and not self._data_wanted.done():
            self._data_wanted.set_result(None)

    async def _more(self) -> bool:
        """Wait for input; False at end of input or after the idle timeout."""
        if self._eof:
            return False
        self._resume_reading()
        loop = asyncio.get_running_loop()
        self._data_wanted = loop.create_future()
        self._waiting_since = loop.time()
        if self._idle_timer is None:
            self._idle_timer = loop.call_at(self._waiting_since + self.server.idle_timeout_s,
                                            self._idle_check)
        try:
            await self._data_wanted
        finally:
            self._data_wanted = None
        if self._idle_expired:
            self._reply(R_TIMEOUT)
            return False
        return True

    def _idle_check(self) -> None:
        """The idle timer fired: the session times out if it has waited for input all
        along since; else the timer is set for the end of the current wait (or for
        the next wait, which sets it itself)."""
        self._idle_timer = None
        if self._data_wanted is None or self._data_wanted.done():
            return
        loop = asyncio.get_running_loop()
        deadline = self._waiting_since + self.server.idle_timeout_s
        if loop.time() < deadline:
            self._idle_timer = loop.call_at(deadline, self._idle_check)
            return
        self._idle_expired = True
        self._data_wanted.set_result(None)

    def _resume_reading(self) -> None:
        if self._reading_paused and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()

    async def _line(self) -> bytes | None:
        """The next command line without its line end; None when the session ends."""
        limit = self.server.max_command_line
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                line = bytes(self._buffer[:end])
                del self._buffer[:end + 1]
                if end > limit:
                    self._error(R_LINE_TOO_LONG)
                    continue
                return line[:-1] if line.endswith(b"\r") else line
            if len(self._buffer) > limit:
                # Drop what came so far; the line's end gets its reply.
                self._buffer.clear()
                self._buffer += b"x" * (limit + 1)
            self._flush()
            await self._drain()
            if not await self._more():
                return None

    async def _message(self, envelope: Envelope) -> MessageData | None:
        """The message after 354, dot-unstuffed, into a MessageData as it arrives
        (memory stays bounded whatever its size); None when the session ends first.
        Over the size limit: the rest is read and dropped, then MessageTooBig."""
        limit = self.server.data_size_limit
        data = MessageData(self.server.message_dir)
        writer = _Unstuffer(data, limit)
        # The virtual CRLF before the first line lets one search find "." alone on
        # the first line too.
        self._buffer[:0] = b"\r\n"
        searched = 0
        try:
            while True:
                end = self._buffer.find(DATA_END, searched)
                if end >= 0:
                    writer.feed(bytes(self._buffer[:end + 2]))
                    del self._buffer[:end + len(DATA_END)]
                    if writer.too_big:
                        data.close()
                        raise MessageTooBig
                    envelope.bare_lf = writer.bare_lf
                    envelope.eight_bit = writer.eight_bit
                    return data
                # Keep the bytes a terminator split across reads needs (4), and never
                # end a written piece inside a CRLF.
                keep = 4 if self._buffer[-5:-4] != b"\r" else 5
                if len(self._buffer) > keep:
                    cut = len(self._buffer) - keep
                    writer.feed(bytes(self._buffer[:cut]))
                    del self._buffer[:cut]
                searched = 0
                if not await self._more():
                    data.close()
                    return None
        except BaseException:
            data.close()
            raise

    # -- output --------------------------------------------------------------------------

    def _reply(self, line: str) -> None:
        self._out.append(line.encode("utf-8", "replace") + b"\r\n")

    def _error(self, line: str) -> None:
        self._reply(line)
        self._errors += 1

    def _answer(self, line: str) -> None:
        """A reply the handler chose: its refusals count as errors where the server's
        ErrorLimits say so."""
        self._reply(line)
        if line[:1] in ("4", "5") and self.server.errors.count_refusals:
            self._errors += 1

    def _flush(self) -> None:
        if self._out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(self._out))
        self._out.clear()

    async def _drain(self) -> None:
        if self._writable is not None:
            await self._writable

    # -- the session -------------------------------------------------------------------

    async def _serve(self) -> None:
        limits = self.server.errors
        try:
            while self._errors < limits.hard_limit:
                line = await self._line()
                if line is None:
                    break
                if self._errors >= limits.soft_limit and limits.sleep_s > 0:
                    # Postfix sleeps before each reply past the soft limit.
                    await asyncio.sleep(limits.sleep_s)
                if not await self._command(line):
                    break
            else:
                log.info("%s: too many errors (%d), closing", self.session.peer,
                         self._errors)
                self._reply(self.server.too_many_errors)
                if self.server.on_refused is not None:
                    self.server.on_refused(self.session, "errors", "too many errors")
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("session from %s failed", self.session.peer)
            self._reply(R_INTERNAL)
        finally:
            self._flush()
            if self.transport is not None:
                self.transport.close()
            self._end()

    async def _command(self, line: bytes) -> bool:
        """Answer one command; False when the session is to end."""
        text = line.decode("utf-8", "replace")
        verb, _, argument = text.partition(" ")
        verb = verb.upper()
        argument = argument.strip()
        if verb in JUNK_COMMANDS and self.server.errors.junk_limit:
            self._junk += 1
            if self._junk > self.server.errors.junk_limit:
                self._errors += 1
        if verb == "MAIL":
            await self._mail(argument)
        elif verb == "RCPT":
            await self._rcpt(argument)
        elif verb == "DATA":
            return await self._data(argument)
        elif verb == self.server.hello or (verb == "HELO" and not self.server.lmtp):
            await self._hello(verb, argument)
        elif verb == "RSET":
            await self._reset()
            self._reply(R_OK)
        elif verb == "NOOP":
            self._reply(R_OK)
        elif verb == "QUIT":
            self._reply(R_BYE)
            return False
        elif verb == "VRFY":
            self._reply(R_VRFY)
        elif verb == "HELP":
            self._reply(self.server.help)
        elif verb == "STARTTLS" and isinstance(self.server, SmtpServer) \
                and self.server.tls_context is not None:
            return await self._starttls(argument, self.server.tls_context)
        elif verb in ("HELO", "EHLO") and self.server.lmtp:
            self._error(R_USE_LHLO)
        elif verb in self.server.verbs:
            if self.session.host_name is None:
                self._error(R_NEED_HELLO.format(hello=self.server.hello))
            else:
                reply = await self._hook(self.server.verbs[verb], self.envelope, argument)
                self._answer(reply or R_INTERNAL)
        else:
            self._error(R_UNKNOWN.format(verb=verb[:32]))
        return True

    async def _hook(self, hook: Hook, *args: Any) -> Any:
        try:
            return await hook(self.session, *args)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("hook %s failed", getattr(hook, "__name__", hook))
            return None

    async def _reset(self) -> None:
        """Drop the transaction, telling the handler when there was one."""
        envelope, self.envelope = self.envelope, Envelope()
        if envelope.mail_from is not None and self.server.rset_hook is not None:
            await self._hook(self.server.rset_hook, envelope)

    async def _hello(self, verb: str, argument: str) -> None:
        if not argument:
            return self._error(R_SYNTAX.format(usage=f"{verb} hostname"))
        await self._reset()
        self.session.host_name = argument
        self.session.extended = verb != "HELO"
        if self.server.helo_hook is not None:
            await self._hook(self.server.helo_hook, argument)
        self._reply(self.server.hello_reply(self.session) if self.session.extended
                    else f"250 {self.server.hostname}")

    async def _starttls(self, argument: str, context: ssl.SSLContext) -> bool:
        if self.session.tls:
            self._error(R_TLS_ACTIVE)
            return True
        if argument:
            self._error(R_SYNTAX.format(usage="STARTTLS"))
            return True
        # RFC 3207 section 5: nothing the client pipelined in the clear may count as
        # said inside TLS.
        self._buffer.clear()
        self._reply(R_START_TLS)
        self._flush()
        assert self.transport is not None
        self._resume_reading()
        try:
            transport = await asyncio.get_running_loop().start_tls(
                self.transport, self, context, server_side=True,
                ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT_S)
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as error:
            log.info("TLS handshake with %s failed: %s", self.session.peer, error)
            self.transport = None
            return False
        if transport is None:
            return False
        self.transport = transport
        self.session.tls = True
        self.session.host_name = None
        self.session.extended = False
        await self._reset()
        return True

    async def _mail(self, argument: str) -> None:
        if self.session.host_name is None:
            return self._error(R_NEED_HELLO.format(hello=self.server.hello))
        if self.envelope.mail_from is not None:
            return self._error(R_NESTED_MAIL)
        parsed = _path(argument, "FROM:")
        if parsed is None:
            return self._error(R_SYNTAX.format(usage="MAIL FROM:<address> [parameters]"))
        address, options = parsed
        problem = _check_parameters(options, MAIL_PARAMETERS)
        if problem:
            return self._error(problem)
        declared = 0
        for option in options:
            name, _, value = option.partition("=")
            name = name.upper()
            if name == "SIZE":
                if not value.isdigit():
                    return self._error(R_SYNTAX.format(usage="SIZE=<number>"))
                declared = int(value)
                if declared > self.server.data_size_limit:
                    return self._error(R_TOO_BIG.format(limit=self.server.data_size_limit))
            elif name == "BODY" and value.upper() not in BODY_TYPES:
                return self._error(R_SYNTAX.format(usage="BODY=7BIT or BODY=8BITMIME"))
        self.envelope.declared_size = declared
        if self.server.mail_hook is not None:
            reply = await self._hook(self.server.mail_hook, self.envelope, address, options)
            reply = reply or R_INTERNAL
            if not reply.startswith("2"):
                return self._answer(reply)
        else:
            reply = R_OK_SENDER
        self.envelope.mail_from = address
        self.envelope.mail_options = options
        self._reply(reply)

    async def _rcpt(self, argument: str) -> None:
        if self.envelope.mail_from is None:
            return self._error(R_NEED_MAIL)
        parsed = _path(argument, "TO:")
        if parsed is None:
            return self._error(R_SYNTAX.format(usage="RCPT TO:<address> [parameters]"))
        address, options = parsed
        if not address:
            return self._error(R_BAD_ADDRESS)
        problem = _check_parameters(options, RCPT_PARAMETERS)
        if problem:
            return self._error(problem)
        if self.server.rcpt_hook is None:
            self.envelope.rcpt_tos.append(address)
            return self._reply(R_OK_RCPT)
        reply = await self._hook(self.server.rcpt_hook, self.envelope, address, options)
        self._answer(reply or R_INTERNAL)

    async def _data(self, argument: str) -> bool:
        if argument:
            self._error(R_SYNTAX.format(usage="DATA"))
            return True
        if self.envelope.mail_from is None:
            self._error(R_NEED_MAIL)
            return True
        if not self.envelope.rcpt_tos:
            self._error(R_NEED_RCPT)
            return True
        if self._buffer and not self.server.lmtp:
            # RFC 2920: DATA ends a pipelined group; the message may follow only
            # after 354.  A client that sends it early is not an MTA.
            log.info("%s: improper pipelining after DATA (%d bytes early)",
                     self.session.peer, len(self._buffer))
            self._reply(R_PIPELINING.format(command="DATA"))
            if self.server.on_refused is not None:
                self.server.on_refused(self.session, "pipelining", "improper pipelining")
            await self._reset()
            return False
        self._reply(R_START_DATA)
        self._flush()
        envelope, self.envelope = self.envelope, Envelope()
        count = len(envelope.rcpt_tos) if self.server.lmtp else 1
        try:
            content = await self._message(envelope)
        except MessageTooBig:
            for _ in range(count):
                self._answer(R_TOO_BIG.format(limit=self.server.data_size_limit))
            if self.server.on_refused is not None:
                self.server.on_refused(self.session, "size", "message over the size limit")
            return True
        if content is None:
            return False     # the handler hears of it in disconnected()
        envelope.message = content
        try:
            replies = await self._hook(self.server.data_hook, envelope)
        finally:
            content.close()
        if isinstance(replies, str):
            replies = [replies]
        if not replies or len(replies) != count:
            if replies:
                log.error("DATA hook gave %d replies for %d", len(replies), count)
            replies = [R_INTERNAL] * count
        for reply in replies:
            self._answer(reply)
        return True


class _Unstuffer:
    """Writes the pieces of DATA into a MessageData without the transparency dots
    (RFC 5321 4.5.2) and without the virtual CRLF _message puts first; notes a bare
    LF and 8-bit bytes on the way.  A piece never ends between CR and LF (the caller
    sees to it), so a line start is known across pieces."""

    def __init__(self, data: MessageData, limit: int) -> None:
        self.data = data
        self.limit = limit
        self.written = 0
        self.too_big = False
        self.bare_lf = False
        self.eight_bit = False
        self._line_start = False
        self._skip = 2

    def feed(self, piece: bytes) -> None:
        if not piece:
            return
        # Counting is memchr-fast; a look-behind regex costs ~10 ms per MB.
        if not self.bare_lf and piece.count(b"\n") != piece.count(b"\r\n"):
            self.bare_lf = True
        if not self.eight_bit and not piece.isascii():
            self.eight_bit = True
        ends_line = piece.endswith(b"\r\n")
        out = piece.replace(b"\r\n.", b"\r\n")
        if self._line_start and out.startswith(b"."):
            out = out[1:]
        self._line_start = ends_line
        if self._skip:
            skipped = min(self._skip, len(out))
            out = out[skipped:]
            self._skip -= skipped
        if self.too_big or not out:
            return
        if self.written + len(out) > self.limit:
            self.too_big = True
            return
        self.data.write(out)
        self.written += len(out)


class TakesXforward:
    """Handler mixin for an internal hop: XFORWARD (Postfix's XFORWARD_README: NAME,
    ADDR, PROTO, HELO, IDENT, xtext) between transactions, kept for the next one in
    envelope.extra["xforward"].  Only for listeners whose peers were authenticated
    (mailfc.hops): the attributes are believed."""

    extra_verbs: tuple[str, ...] = ("XFORWARD",)
    ehlo_extensions: list[str] = [XFORWARD_EXTENSION]

    async def handle_XFORWARD(self, session: Session, envelope: Envelope,
                              argument: str) -> str:
        if envelope.mail_from is not None:
            return R_XFORWARD_PLACE
        attributes = xforward_attributes(argument)
        if attributes is None:
            return R_XFORWARD_SYNTAX
        envelope.extra.setdefault("xforward", {}).update(attributes)
        return R_OK


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _path(argument: str, keyword: str) -> tuple[str, list[str]] | None:
    """`FROM:<addr> PARAM=x` -> ("addr", ["PARAM=x"]); a source route is dropped."""
    if argument[:len(keyword)].upper() != keyword:
        return None
    rest = argument[len(keyword):].lstrip()
    if not rest.startswith("<"):
        return None
    end = _closing_bracket(rest)
    if end < 0:
        return None
    address = rest[1:end]
    if address.startswith("@"):
        address = address.partition(":")[2]
    if any(c in address for c in " \t<>") and not address.startswith('"'):
        return None
    # RFC 5321 4.1.2: no control character anywhere in a path, quoted or not.  One
    # taken here would reach the spool, DNS and PostgreSQL as an "address".
    if _CONTROL.search(address):
        return None
    return address, rest[end + 1:].split()


def _closing_bracket(text: str) -> int:
    quoted = False
    index = 1
    while index < len(text):
        char = text[index]
        if char == "\\" and quoted:
            index += 2
            continue
        if char == '"':
            quoted = not quoted
        elif char == ">" and not quoted:
            return index
        index += 1
    return -1


def _check_parameters(options: list[str], known: frozenset[str]) -> str | None:
    for option in options:
        name = option.partition("=")[0].upper()
        if name not in known:
            return R_BAD_PARAMETER.format(name=name[:32])
    return None
