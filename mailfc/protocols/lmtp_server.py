"""A lean LMTP server (RFC 2033) for mailfc's internal hops.

Filter-In/Filter-Out, SMTP-Out's intake and the LMTP Router receive every message
of every domain over LMTP from mailfc's own gateways; Internet-facing SMTP stays with
aiosmtpd (SMTP-In).  aiosmtpd costs about 0.9 ms of CPU per one-message session
here (a task, stream objects and a command table built with `inspect` per
connection, addresses through the email header parser); this server, an
asyncio.Protocol, about 0.15 ms on the same load, and a gateway hop runs once per
message on every hop.

SESSION
    220 greeting; LHLO; then transactions: MAIL FROM:<addr> [params],
    RCPT TO:<addr> [params]..., DATA, the message up to <CRLF>.<CRLF>, and one reply
    per accepted recipient.  RSET, NOOP, VRFY (252), HELP, QUIT.  A handler adds
    verbs of its own (XFORWARD) with `extra_verbs` and `handle_<VERB>`.

PIPELINING
    Replies to commands the client pipelined are collected and go out in one write
    once no further complete command is waiting; 354, 221 and 421 go out at once.

HANDLER (hooks named after the verbs; all but DATA optional)
    lhlo_extensions: list[str]           extra LHLO keywords
    handle_RCPT(session, envelope, address, options) -> str   (append to rcpt_tos)
    handle_DATA(session, envelope) -> list[str]               one reply per recipient
    handle_<VERB>(session, envelope, argument) -> str         for VERB in extra_verbs
    A hook that raises gets `451 4.3.0` (the sender keeps the message and retries).

LIMITS
    A command line of more than 4096 octets: `500 5.5.2`; a message over
    data_size_limit: `552 5.3.4` for each recipient (the rest of it is read and
    dropped); 20 errors in a session, or no input for idle_timeout_s: 421 and close.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

log = logging.getLogger("mailfc.protocols.lmtp_server")

MAX_COMMAND_LINE = 4096
MAX_ERRORS = 20
# Commands a client may have pipelined before the server stops reading until it
# has answered them: bounds what one connection holds in memory.
MAX_PENDING_INPUT = 256 * 1024

R_OK = "250 2.0.0 OK"
R_OK_SENDER = "250 2.1.0 OK"
R_OK_RCPT = "250 2.1.5 OK"
R_START_DATA = "354 End data with <CR><LF>.<CR><LF>"
R_BYE = "221 2.0.0 Bye"
R_VRFY = "252 2.0.0 Cannot VRFY user, but will accept message and attempt delivery"
R_HELP = "214 2.0.0 Commands: LHLO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP"
R_UNKNOWN = "500 5.5.1 command {verb!r} not recognized"
R_LINE_TOO_LONG = "500 5.5.2 line too long"
R_USE_LHLO = "500 5.5.1 this is an LMTP server: use LHLO"
R_SYNTAX = "501 5.5.4 syntax: {usage}"
R_BAD_ADDRESS = "501 5.1.3 bad address syntax"
R_NEED_LHLO = "503 5.5.1 send LHLO first"
R_NESTED_MAIL = "503 5.5.1 sender already given"
R_NEED_MAIL = "503 5.5.1 need MAIL command first"
R_NEED_RCPT = "503 5.5.1 need RCPT command first"
R_BAD_PARAMETER = "555 5.5.4 parameter {name} not recognized"
R_TOO_BIG = "552 5.3.4 message size exceeds the limit of {limit} bytes"
R_INTERNAL = "451 4.3.0 temporary failure, try again later"
R_TOO_MANY_ERRORS = "421 4.7.0 too many errors, closing"
R_TIMEOUT = "421 4.4.2 timeout, closing"
R_SHUTDOWN = "421 4.3.2 service shutting down, try again later"

MAIL_PARAMETERS = frozenset({"SIZE", "BODY", "SMTPUTF8", "RET", "ENVID", "AUTH"})
RCPT_PARAMETERS = frozenset({"NOTIFY", "ORCPT"})
DATA_END = b"\r\n.\r\n"


class MessageTooBig(Exception):
    """The message went past data_size_limit (and was read to its end)."""


class Envelope:
    """One transaction.  mail_from is None before MAIL, "" for the null sender."""

    __slots__ = ("content", "extra", "mail_from", "mail_options", "rcpt_tos")

    def __init__(self) -> None:
        self.mail_from: str | None = None
        self.mail_options: list[str] = []
        self.rcpt_tos: list[str] = []
        self.content = b""
        # What hooks keep for the transaction (alias expansions, XFORWARD attributes).
        self.extra: dict[str, Any] = {}

    @property
    def sender(self) -> str:
        """The reverse path once MAIL was taken: "" for the null sender (bounces)."""
        return self.mail_from or ""


class Session:
    __slots__ = ("host_name", "peer")

    def __init__(self, peer: Any) -> None:
        self.peer = peer
        self.host_name: str | None = None


class Tracker(Protocol):
    """What drains a listener's sessions (gateways.listener.CyclingListener)."""

    def attach(self, connection: Any) -> None: ...

    def detach(self, connection: Any) -> bool: ...


Hook = Callable[..., Awaitable[Any]]


class LmtpServer:
    """The protocol factory: one per listener, holding what every connection shares."""

    def __init__(self, handler: Any, *, hostname: str, ident: str = "mailfc LMTP",
                 data_size_limit: int = 50 * 1024 * 1024, idle_timeout_s: float = 300.0) -> None:
        self.data_size_limit = data_size_limit
        self.idle_timeout_s = idle_timeout_s
        self.greeting = f"220 {hostname} {ident} ready\r\n".encode()
        keywords = [hostname, "PIPELINING", "ENHANCEDSTATUSCODES", "8BITMIME", "SMTPUTF8",
                    f"SIZE {data_size_limit}", *getattr(handler, "lhlo_extensions", [])]
        self.lhlo_reply = ("\r\n".join(f"250-{k}" for k in keywords[:-1])
                           + f"\r\n250 {keywords[-1]}")
        self.verbs: dict[str, Hook] = {
            verb: getattr(handler, f"handle_{verb}")
            for verb in getattr(handler, "extra_verbs", ())}
        self.rcpt_hook: Hook | None = getattr(handler, "handle_RCPT", None)
        self.data_hook: Hook = handler.handle_DATA

    def __call__(self) -> LmtpConnection:
        return LmtpConnection(self)

    def tracked_by(self, tracker: Tracker) -> LmtpConnection:
        """A connection drained by `tracker` (a cycled listener passes itself)."""
        return LmtpConnection(self, tracker)


class LmtpConnection(asyncio.Protocol):
    """One LMTP session: data_received fills a buffer, one task answers commands."""

    def __init__(self, server: LmtpServer, tracker: Tracker | None = None) -> None:
        self.server = server
        self.tracker = tracker
        self.transport: asyncio.Transport | None = None
        self.session = Session(None)
        self.envelope = Envelope()
        self._buffer = bytearray()
        self._eof = False
        self._data_wanted: asyncio.Future[None] | None = None
        self._writable: asyncio.Future[None] | None = None
        self._reading_paused = False
        self._data_mode = False
        self._out: list[bytes] = []
        self._errors = 0
        # The loop keeps only a weak reference to a task.
        self._task: asyncio.Task[None] | None = None

    # -- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.session.peer = transport.get_extra_info("peername")
        if self.tracker is not None:
            self.tracker.attach(self)
        transport.write(self.server.greeting)  # type: ignore[attr-defined]
        self._task = asyncio.get_running_loop().create_task(self._serve())

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if len(self._buffer) > MAX_PENDING_INPUT and not self._data_mode \
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
        if self.tracker is not None:
            self.tracker.detach(self)

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

    # -- input ---------------------------------------------------------------------------

    def _wake(self) -> None:
        if self._data_wanted is not None and not self._data_wanted.done():
            self._data_wanted.set_result(None)

    async def _more(self) -> bool:
        """Wait for input; False at end of input or after the idle timeout."""
        if self._eof:
            return False
        if self._reading_paused and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()
        self._data_wanted = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(self.server.idle_timeout_s):
                await self._data_wanted
        except TimeoutError:
            self._reply(R_TIMEOUT)
            return False
        finally:
            self._data_wanted = None
        return True

    async def _line(self) -> bytes | None:
        """The next command line without its line end; None when the session ends."""
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                line = bytes(self._buffer[:end])
                del self._buffer[:end + 1]
                if end > MAX_COMMAND_LINE:
                    self._error(R_LINE_TOO_LONG)
                    continue
                return line[:-1] if line.endswith(b"\r") else line
            if len(self._buffer) > MAX_COMMAND_LINE:
                # Drop what came so far; the line's end gets its reply.
                self._buffer.clear()
                self._buffer += b"x" * (MAX_COMMAND_LINE + 1)
            self._flush()
            await self._drain()
            if not await self._more():
                return None

    async def _message(self) -> bytes | None:
        """The message after 354, dot-unstuffed; None when the session ends first.
        Over the size limit: MessageTooBig once all of it has been read."""
        self._data_mode = True
        limit = self.server.data_size_limit
        # The virtual CRLF before the first line lets one search find "." alone on
        # the first line too.
        self._buffer[:0] = b"\r\n"
        searched = 0
        too_big = False
        try:
            while True:
                end = self._buffer.find(DATA_END, searched)
                if end >= 0:
                    raw = bytes(self._buffer[:end + 2])
                    del self._buffer[:end + len(DATA_END)]
                    if too_big or len(raw) - 2 > limit:
                        raise MessageTooBig
                    return raw.replace(b"\r\n.", b"\r\n")[2:]
                searched = max(0, len(self._buffer) - len(DATA_END) + 1)
                if searched > limit + 2:
                    # Keep only the tail a terminator split across reads needs.
                    too_big = True
                    del self._buffer[:searched]
                    searched = 0
                if not await self._more():
                    return None
        finally:
            self._data_mode = False

    # -- output --------------------------------------------------------------------------

    def _reply(self, line: str) -> None:
        self._out.append(line.encode("utf-8", "replace") + b"\r\n")

    def _error(self, line: str) -> None:
        self._reply(line)
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
        try:
            while self._errors < MAX_ERRORS:
                line = await self._line()
                if line is None or not await self._command(line):
                    break
            else:
                self._reply(R_TOO_MANY_ERRORS)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("LMTP session from %s failed", self.session.peer)
            self._reply(R_INTERNAL)
        finally:
            self._flush()
            if self.transport is not None:
                self.transport.close()

    async def _command(self, line: bytes) -> bool:
        """Answer one command; False when the session is to end."""
        text = line.decode("utf-8", "replace")
        verb, _, argument = text.partition(" ")
        verb = verb.upper()
        argument = argument.strip()
        if verb == "MAIL":
            self._mail(argument)
        elif verb == "RCPT":
            await self._rcpt(argument)
        elif verb == "DATA":
            return await self._data(argument)
        elif verb == "LHLO":
            if not argument:
                self._error(R_SYNTAX.format(usage="LHLO hostname"))
            else:
                self.session.host_name = argument
                self.envelope = Envelope()
                self._reply(self.server.lhlo_reply)
        elif verb == "RSET":
            self.envelope = Envelope()
            self._reply(R_OK)
        elif verb == "NOOP":
            self._reply(R_OK)
        elif verb == "QUIT":
            self._reply(R_BYE)
            return False
        elif verb == "VRFY":
            self._reply(R_VRFY)
        elif verb == "HELP":
            self._reply(R_HELP)
        elif verb in ("HELO", "EHLO"):
            self._error(R_USE_LHLO)
        elif verb in self.server.verbs:
            if self.session.host_name is None:
                self._error(R_NEED_LHLO)
            else:
                reply = await self._hook(self.server.verbs[verb], self.envelope, argument)
                self._reply(reply or R_INTERNAL)
        else:
            self._error(R_UNKNOWN.format(verb=verb[:32]))
        return True

    async def _hook(self, hook: Hook, *args: Any) -> Any:
        try:
            return await hook(self.session, *args)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("LMTP hook %s failed", getattr(hook, "__name__", hook))
            return None

    def _mail(self, argument: str) -> None:
        if self.session.host_name is None:
            return self._error(R_NEED_LHLO)
        if self.envelope.mail_from is not None:
            return self._error(R_NESTED_MAIL)
        parsed = _path(argument, "FROM:")
        if parsed is None:
            return self._error(R_SYNTAX.format(usage="MAIL FROM:<address> [parameters]"))
        address, options = parsed
        problem = _check_parameters(options, MAIL_PARAMETERS)
        if problem:
            return self._error(problem)
        for option in options:
            if option.upper().startswith("SIZE="):
                size = option[5:]
                if not size.isdigit():
                    return self._error(R_SYNTAX.format(usage="SIZE=<number>"))
                if int(size) > self.server.data_size_limit:
                    return self._error(R_TOO_BIG.format(limit=self.server.data_size_limit))
        self.envelope.mail_from = address
        self.envelope.mail_options = options
        self._reply(R_OK_SENDER)

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
        self._reply(reply or R_INTERNAL)

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
        self._reply(R_START_DATA)
        self._flush()
        envelope, self.envelope = self.envelope, Envelope()
        count = len(envelope.rcpt_tos)
        try:
            content = await self._message()
        except MessageTooBig:
            for _ in range(count):
                self._reply(R_TOO_BIG.format(limit=self.server.data_size_limit))
            return True
        if content is None:
            return False
        envelope.content = content
        replies = await self._hook(self.server.data_hook, envelope)
        if not replies or len(replies) != count:
            if replies:
                log.error("LMTP DATA hook gave %d replies for %d recipients",
                          len(replies), count)
            replies = [R_INTERNAL] * count
        for reply in replies:
            self._reply(reply)
        return True


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
