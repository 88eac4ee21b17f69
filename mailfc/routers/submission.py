"""SMTP Router (submission): authenticates users, then hands them to their domain's Postfix.

LISTENERS
    listen.submission (587, STARTTLS required before AUTH) and
    listen.submissions (465, implicit TLS).

DIALOGUE (before AUTH, answered by the router)
    220 <host> ESMTP mailfc submission
    EHLO/HELO, STARTTLS, AUTH PLAIN [initial-response], AUTH LOGIN, NOOP, RSET,
    QUIT.  MAIL before AUTH: 530 5.7.0.  AUTH before TLS: 538 5.7.11.
    Wrong user or password: 535 5.7.8 after submission.auth_failure_delay_s;
    failure throttling and bans as for IMAP (mailfc.routers.throttle); three
    failures end the session.

AFTER AUTH
    While the password is checked, the session to the domain's Postfix is
    already being opened through the dispatcher of the domain's host (a cold
    start overlaps with AUTH).  The router then sends
        EHLO <router>; XCLIENT LOGIN=<user> ADDR=<client> NAME=... HELO=...; EHLO ...
    so Postfix and its milter see the authenticated user and the real client
    (Postfix accepts XCLIENT only on the dispatcher's own path into the
    container).  From then on only the transaction's commands are passed to
    Postfix (MAIL, RCPT, DATA, RSET, NOOP, QUIT) and its reply back:
        MAIL FROM with a sender that is not the user's address or one of its
            aliases           -> 553 5.7.1, not passed on
        EHLO/HELO             -> answered here (the session stays authenticated)
        AUTH, STARTTLS again  -> 503 5.5.1
        XCLIENT, XFORWARD     -> 550 5.7.0: a client never speaks for the router
        anything else (BDAT, VRFY, ETRN, ...) -> 502 5.5.2, not passed on
    Domain's container not available: 451 4.3.0 for the AUTH (try again later).

DATA
    The message goes on to Postfix as it arrives, in chunks of at most 64 KiB: the
    router never holds a line or the message, so a 300 KB line or a 50 MB message
    costs it no more memory than a short one.  The message ends where Postfix will
    see its end, a "." line ended by CRLF or a bare LF (mailfc/routers/data_relay.py);
    the router sends the dot line there (with CRLF) and passes Postfix's reply on.
    SIZE: EHLO announces messages.size_limit, and the router enforces it on the
    client's bytes; the domain's Postfix is rendered with a message_size_limit
    that leaves room for its queue file's own overhead (main.cf), so it takes
    whatever the router passed.  MAIL with SIZE= over it: 552 5.3.4, not passed on.
    A message that grows past it: the transaction with Postfix is broken off (no
    final dot: Postfix keeps nothing), the rest is read and dropped, and the client
    hears 552 5.3.4 at its final dot; the session goes on (the next command gets a
    new session with Postfix).
    Postfix lost (its container died, the dispatcher went away) during the message:
    the rest is read and dropped and the client hears 421 4.4.2 at its final dot
    (the message was not sent; a client tries again); between commands: 421 4.4.2
    at once.  Either way the session ends.  The client silent for idle_timeout_s:
    421 4.4.2, and Postfix's half of the message is dropped.

SESSIONS PER DOMAIN
    A domain with an enforced concurrent_sends limit (domain scope) gets at most
    that many authenticated sessions through this router at once; the AUTH of one
    more waits for a session to end.  Beyond its limit a session could only be
    refused at MAIL by the milter, after costing the domain's Postfix a process,
    the milter and the database a decision, and its client a new TLS session for
    each retry: a flood of 50 senders against a limit of 5 would spend the shared
    parts' CPU on 45 sessions that can never send.  No slot within
    pressure_max_wait_s: 451 4.7.1 for the AUTH.  The milter stays the authority
    (per account, across hosts); limits are read every few seconds.

ADMISSION
    While the host is short of CPU, a domain opening more sessions than its fair
    share waits for its turn before its Postfix is contacted (mailfc/fairness.py);
    no turn within pressure_max_wait_s: 451 4.7.1 for the AUTH.

CONFIGURATION
    submission.auth_failure_delay_s (1), max_failures_per_ip (20),
    max_failures_per_pair (5), failure_window_s (300), account_delay_after (5),
    account_delay_s (0.5), account_delay_max_s (8), spray_accounts (10),
    spray_ban_s (3600), ban_refresh_s (5), login_timeout_s (60),
    idle_timeout_s (300), pressure_target (0.15), pressure_min_rate (1),
    pressure_max_wait_s (30); messages.size_limit (52428800).
    [submission_connections]: connections per client on both ports (mailfc.anvil;
    past them `421 4.7.0 <host> Error: too many connections from <client>`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import ssl
import time
from dataclasses import dataclass

import asyncpg

from mailfc import logsetup, netio
from mailfc.addresses import normalize_address, split_address
from mailfc.config import Config
from mailfc.db.directory import Account, Directory
from mailfc.errors import InvalidInput, MailfcError
from mailfc.fairness import Admission, PerKeyLimit
from mailfc.metrics import names as metrics
from mailfc.policy.snapshot import Snapshot
from mailfc.protocols import proxy
from mailfc.protocols.lmtp import LmtpError, Reply, read_reply, xtext
from mailfc.routers.data_relay import EndOfData
from mailfc.routers.listeners import LoginRouter, connect_dispatcher, peer_and_local
from mailfc.routers.throttle import delay_failure

log = logging.getLogger("mailfc.routers.submission")

MAX_LINE = 4096
# What a client may say to its domain's Postfix after AUTH; everything else is
# answered here, so no client command can speak for the router (XCLIENT).
PASSED_ON = frozenset({"MAIL", "RCPT", "DATA", "RSET", "NOOP", "QUIT"})
# The router's own words towards Postfix: a client using them gets a clear no.
ROUTER_ONLY = frozenset({"XCLIENT", "XFORWARD"})
SEND_LIMITS_REFRESH_S = 2.0
MAX_FAILURES_PER_SESSION = 3
BACKEND_TIMEOUT_S = 60.0

R_GREETING = "220 {host} ESMTP mailfc submission"
R_AUTH_REQUIRED = "530 5.7.0 Authentication required"
R_ENCRYPTION_REQUIRED = "538 5.7.11 Encryption required: use STARTTLS first"
R_AUTH_FAILED = "535 5.7.8 Authentication credentials invalid"
R_AUTH_OK = "235 2.7.0 Authentication successful"
R_UNAVAILABLE = "451 4.3.0 The mail server for {domain} is not available, try again later"
R_BUSY = ("451 4.7.1 Too many new sessions for {domain} while this server is busy,"
          " try again later")
R_SESSIONS = ("451 4.7.1 Too many sessions of {domain} at once (its limit is {limit}"
              " concurrent sends), try again later")
R_BAD_SENDER = "553 5.7.1 Sender address <{sender}> is not owned by user {user}"
R_ALREADY = "503 5.5.1 Already authenticated"
R_SYNTAX = "501 5.5.4 Syntax error in parameters"
R_UNKNOWN = "502 5.5.2 Command not recognized"
R_NOT_PERMITTED = "550 5.7.0 {verb} is not permitted"
R_BYE = "221 2.0.0 Bye"
R_LINE_TOO_LONG = "500 5.5.6 Line too long"
R_TIMEOUT = "421 4.4.2 {host} Timeout, closing connection"
R_LOST = ("421 4.4.2 {host} Connection to the mail server of {domain} lost; what was not"
          " answered with 250 was not sent, try again")
R_TOO_BIG = "552 5.3.4 Message size exceeds the limit of {limit} bytes"
R_REOPEN_FAILED = "421 4.3.0 The mail server for {domain} is not available, try again later"
# A read of the message from the client, and what may wait unsent towards Postfix
# before the router waits for it (memory per session stays about twice this).
DATA_CHUNK = 65536
BACKEND_HIGH_WATER = 4 * DATA_CHUNK


class BackendUnavailable(Exception):
    """The domain's Postfix did not greet or refused XCLIENT."""


class DomainBusy(BackendUnavailable):
    """Admission (mailfc.fairness) gave the domain no turn in time."""


@dataclass
class Backend:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter


class ConcurrentSendLimits(Snapshot[dict[str, int]]):
    """Each domain's enforced concurrent_sends limit (SESSIONS PER DOMAIN)."""

    what = "concurrent_sends limits"

    def __init__(self, pool: asyncpg.Pool) -> None:
        super().__init__(pool, {}, SEND_LIMITS_REFRESH_S)

    async def read(self) -> dict[str, int]:
        rows = await self.pool.fetch(
            "SELECT d.name, l.value FROM limits l JOIN domains d ON d.id = l.domain_id"
            " WHERE l.scope = 'domain' AND l.kind = 'concurrent_sends' AND l.mode = 'enforce'")
        return {row["name"]: int(row["value"]) for row in rows}


class SubmissionRouter(LoginRouter):
    name = "submission-router"
    protocol = "submission"

    def __init__(self, config: Config, directory: Directory,
                 tls_context: ssl.SSLContext) -> None:
        super().__init__(
            config, directory, tls_context, settings=config.submission,
            plain=config.listen.submission, implicit_tls=config.listen.submissions,
            session_factory=SubmissionSession, log=log)
        settings = config.submission
        self.admission = Admission(target=settings.pressure_target,
                                   min_rate=settings.pressure_min_rate,
                                   max_wait_s=settings.pressure_max_wait_s)
        self.send_limits = ConcurrentSendLimits(directory.pool)
        self.domain_sessions = PerKeyLimit(1)   # each domain's cap: its limit
        self.slot_wait_s = settings.pressure_max_wait_s

    async def start(self) -> None:
        await self.admission.start()
        await super().start()

    async def stop(self, drain_timeout: float) -> None:
        await super().stop(drain_timeout)
        await self.admission.stop()


class SubmissionSession:
    def __init__(self, router: SubmissionRouter, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, implicit_tls: bool) -> None:
        self.router = router
        self.settings = router.config.submission
        self.host = router.config.host_name
        self.reader = reader
        self.writer = writer
        self.tls = implicit_tls
        (self.client_ip, self.client_port), self.local = peer_and_local(writer)
        self.helo: str | None = None
        self.failures = 0
        # The domain's session slot (SESSIONS PER DOMAIN), held until the session ends.
        self.slot = contextlib.AsyncExitStack()
        self.size_limit = router.config.messages.size_limit
        # What the client sent after a message's final dot (pipelined commands),
        # read before anything more from the connection.
        self.pending = bytearray()
        self.backend: Backend | None = None

    async def send(self, line: str) -> None:
        self.writer.write(line.encode() + b"\r\n")
        await self.writer.drain()

    async def read_line(self, wait_s: float) -> bytes:
        head = b""
        if self.pending:
            end = self.pending.find(b"\n")
            if end >= 0:
                line = bytes(self.pending[:end + 1])
                del self.pending[:end + 1]
                if len(line) > MAX_LINE:
                    raise InvalidInput("line too long")
                return line
            head = bytes(self.pending)
            self.pending.clear()
        try:
            line = head + await asyncio.wait_for(self.reader.readuntil(b"\n"), wait_s)
        except asyncio.LimitOverrunError:
            raise InvalidInput("line too long") from None
        if len(line) > MAX_LINE:
            raise InvalidInput("line too long")
        return line

    async def read_some(self, wait_s: float) -> bytes:
        """What the client sent next, at most DATA_CHUNK bytes; b"" when it is gone."""
        if self.pending:
            data = bytes(self.pending)
            self.pending.clear()
            return data
        return await asyncio.wait_for(self.reader.read(DATA_CHUNK), wait_s)

    async def read_command(self, wait_s: float) -> tuple[bytes, str, str] | None:
        """The next command as (line, VERB, argument); None when the session ends
        (a timeout or an overlong line, answered here, or the client gone)."""
        try:
            raw = await self.read_line(wait_s)
        except TimeoutError:
            await self.send(R_TIMEOUT.format(host=self.host))
            return None
        except InvalidInput:
            await self.send(R_LINE_TOO_LONG)
            return None
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        verb, _, argument = raw.decode("utf-8", "replace").rstrip("\r\n").partition(" ")
        return raw, verb.upper(), argument

    def capabilities(self) -> list[str]:
        words = [self.host, "PIPELINING", f"SIZE {self.size_limit}", "8BITMIME",
                 "ENHANCEDSTATUSCODES"]
        if not self.tls:
            words.append("STARTTLS")
        else:
            words.append("AUTH PLAIN LOGIN")
        return words

    async def ehlo(self, argument: str) -> None:
        if not argument:
            await self.send(R_SYNTAX)
            return
        self.helo = argument.split()[0][:255]
        words = self.capabilities()
        for index, word in enumerate(words):
            await self.send(("250 " if index == len(words) - 1 else "250-") + word)

    # -- before AUTH ---------------------------------------------------------------------

    async def run(self) -> None:
        try:
            await self.dialogue()
        except ConnectionError as error:
            # The client left while it was being answered (a reset during a 535's
            # delay): its end, not the router's failure.
            log.info("submission client %s left: %s", self.client_ip, error)
        finally:
            await self.slot.aclose()

    async def dialogue(self) -> None:
        await self.send(R_GREETING.format(host=self.host))
        deadline = time.monotonic() + self.settings.login_timeout_s
        while True:
            command = await self.read_command(max(0.1, deadline - time.monotonic()))
            if command is None:
                return
            _, verb, argument = command
            if verb in ("EHLO", "HELO"):
                await self.ehlo(argument.strip())
            elif verb == "STARTTLS":
                if not await self.starttls():
                    return
            elif verb == "AUTH":
                outcome = await self.auth(argument.strip())
                if outcome is False:
                    return
                if isinstance(outcome, tuple):
                    await self.relay(*outcome)
                    return
            elif verb in ("NOOP", "RSET"):
                await self.send("250 2.0.0 OK")
            elif verb == "QUIT":
                await self.send(R_BYE)
                return
            elif verb in ("MAIL", "RCPT", "DATA", "BDAT", "VRFY", "EXPN"):
                await self.send(R_AUTH_REQUIRED)
            elif verb in ROUTER_ONLY:
                await self.send(R_NOT_PERMITTED.format(verb=verb))
            else:
                await self.send(R_UNKNOWN)

    async def starttls(self) -> bool:
        if self.tls:
            await self.send("503 5.5.1 TLS already active")
            return True
        # Commands pipelined after STARTTLS would count as sent over TLS.
        if self.reader._buffer:  # type: ignore[attr-defined]
            await self.send("503 5.5.1 Data pipelined after STARTTLS")
            return False
        await self.send("220 2.0.0 Ready to start TLS")
        try:
            await self.writer.start_tls(self.router.tls_context, ssl_handshake_timeout=30)
        except (ssl.SSLError, OSError, TimeoutError) as error:
            log.info("STARTTLS from %s failed: %s", self.client_ip, error)
            return False
        self.tls = True
        self.helo = None  # RFC 3207: the client must say EHLO again
        return True

    async def auth(self, argument: str) -> tuple[Account, Backend] | bool:
        if not self.tls:
            await self.send(R_ENCRYPTION_REQUIRED)
            return True
        mechanism, _, initial = argument.partition(" ")
        mechanism = mechanism.upper()
        try:
            if mechanism == "PLAIN":
                response = initial.strip() or await self.challenge("")
                if response == "*":
                    await self.send("501 5.7.0 Authentication cancelled")
                    return True
                authzid, authcid, password = base64.b64decode(response, validate=True).split(
                    b"\0")
                if authzid and authzid != authcid:
                    await self.send("535 5.7.8 Acting as another user is not allowed")
                    return True
            elif mechanism == "LOGIN":
                user = initial.strip() or await self.challenge("VXNlcm5hbWU6")
                if user == "*":
                    await self.send("501 5.7.0 Authentication cancelled")
                    return True
                authcid = base64.b64decode(user, validate=True)
                secret = await self.challenge("UGFzc3dvcmQ6")
                if secret == "*":
                    await self.send("501 5.7.0 Authentication cancelled")
                    return True
                password = base64.b64decode(secret, validate=True)
            else:
                await self.send("504 5.5.4 Unrecognized authentication type")
                return True
        except (binascii.Error, ValueError):
            await self.send("501 5.5.2 Cannot decode the response")
            return True
        except _SessionOver:
            return False
        return await self.login(authcid.decode("utf-8", "replace"),
                                password.decode("utf-8", "replace"))

    async def challenge(self, prompt: str) -> str:
        """The client's answer to a 334; _SessionOver (answered here where the client
        is still there) when it sends an overlong line, stays silent or leaves."""
        await self.send(f"334 {prompt}")
        try:
            line = await self.read_line(self.settings.login_timeout_s)
        except TimeoutError:
            await self.send(R_TIMEOUT.format(host=self.host))
            raise _SessionOver from None
        except InvalidInput:
            await self.send(R_LINE_TOO_LONG)
            raise _SessionOver from None
        except (asyncio.IncompleteReadError, ConnectionError):
            raise _SessionOver from None
        return line.decode("ascii", "replace").strip()

    async def login(self, username: str, password: str) -> tuple[Account, Backend] | bool:
        try:
            domain = split_address(username)[1]
        except InvalidInput:
            domain = ""     # no account: authenticate() refuses it
        limit = (await self.router.send_limits.get()).get(domain)
        if limit is not None and not await self.take_slot(domain, limit):
            await self.send(R_SESSIONS.format(domain=domain, limit=limit))
            return True
        login = await self.router.authenticate(
            username, password, self.client_ip, self.open_backend,
            (BackendUnavailable, MailfcError, OSError, TimeoutError, LmtpError,
             asyncio.IncompleteReadError))
        if login.failure is not None or login.backend is None:
            await self.slot.aclose()    # only a session that goes on keeps its slot
        if login.failure is not None:
            return await self.fail()
        assert login.account is not None
        if login.backend is None:
            reply = R_BUSY if isinstance(login.unavailable, DomainBusy) else R_UNAVAILABLE
            await self.send(reply.format(domain=login.account.domain))
            return True
        await self.send(R_AUTH_OK)
        return login.account, login.backend

    async def take_slot(self, domain: str, limit: int) -> bool:
        """One of the domain's session slots, waiting up to pressure_max_wait_s."""
        try:
            async with asyncio.timeout(self.router.slot_wait_s):
                await self.slot.enter_async_context(
                    self.router.domain_sessions.slot(domain, limit))
        except TimeoutError:
            return False
        return True

    async def fail(self) -> bool:
        self.failures += 1
        await delay_failure(self.settings.auth_failure_delay_s)
        await self.send(R_AUTH_FAILED)
        if self.failures >= MAX_FAILURES_PER_SESSION:
            await self.send("421 4.7.0 Too many failed authentications, closing")
            return False
        return True

    async def open_backend(self, account: Account) -> Backend:
        """The domain's Postfix, greeted and told who the client is (XCLIENT)."""
        config = self.router.config
        if not await self.router.admission.admit(account.domain):
            raise DomainBusy(f"{account.domain}: no turn within "
                                     f"{self.settings.pressure_max_wait_s:g}s")
        placement = await self.router.directory.place(account.domain)
        # This host's dispatcher through its unix socket, another's with mutual TLS.
        reader, writer, _ = await connect_dispatcher(config, placement, "smtp")
        try:
            writer.write(proxy.encode(self.client_ip, self.client_port, *self.local,
                                      authority=account.domain))
            greeting = await asyncio.wait_for(
                read_reply(reader), config.runtime.start_timeout_s + BACKEND_TIMEOUT_S)
            if greeting.code != 220:
                raise BackendUnavailable(f"greeting {greeting}")
            await self._expect(reader, writer, f"EHLO {self.host}", 250)
            attributes = (f"LOGIN={xtext(account.address)} ADDR={self.client_ip}"
                          f" NAME=[UNAVAILABLE] HELO={xtext(self.helo or 'unknown')}")
            await self._expect(reader, writer, f"XCLIENT {attributes}", 220)
            await self._expect(reader, writer, f"EHLO {self.helo or 'unknown'}", 250)
        except BaseException:
            await netio.close(writer)
            raise
        return Backend(reader, writer)

    @staticmethod
    async def _expect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      command: str, code: int) -> Reply:
        writer.write(command.encode() + b"\r\n")
        reply = await asyncio.wait_for(read_reply(reader), BACKEND_TIMEOUT_S)
        if reply.code != code:
            raise BackendUnavailable(f"{command.split()[0]} answered {reply}")
        return reply

    # -- after AUTH ----------------------------------------------------------------------

    async def relay(self, account: Account, backend: Backend) -> None:
        senders = await self.router.directory.sender_addresses(account.address)
        self.backend = backend
        mail_from = ""  # for the hop log line (mailfc.logsetup)
        try:
            while True:
                command = await self.read_command(self.settings.idle_timeout_s)
                if command is None:
                    return
                raw, verb, argument = command
                if verb in ("EHLO", "HELO"):
                    await self.ehlo(argument.strip())
                    continue
                if verb in ("AUTH", "STARTTLS"):
                    await self.send(R_ALREADY)
                    continue
                if verb not in PASSED_ON:
                    await self.send(R_NOT_PERMITTED.format(verb=verb) if verb in ROUTER_ONLY
                                    else R_UNKNOWN)
                    continue
                if verb == "MAIL":
                    sender = _mail_from(argument)
                    if sender is None or sender not in senders:
                        await self.send(R_BAD_SENDER.format(sender=sender or "",
                                                            user=account.address))
                        continue
                    declared = _declared_size(argument)
                    if declared is not None and declared > self.size_limit:
                        await self.send(R_TOO_BIG.format(limit=self.size_limit))
                        continue
                    mail_from = sender
                if self.backend is None:
                    # The last message went over the size limit and its Postfix
                    # session was broken off: the next transaction gets a new one.
                    if verb == "QUIT":
                        await self.send(R_BYE)
                        return
                    if verb in ("RSET", "NOOP"):
                        await self.send("250 2.0.0 OK")
                        continue
                    if not await self.reopen(account):
                        return
                assert self.backend is not None
                reply = await self.forward(self.backend, raw)
                if verb == "DATA" and reply.code == 354:
                    data_reply = await self.stream_data(self.backend, account)
                    metrics.submitted(data_reply.code if data_reply else None, account.domain)
                    if data_reply is None:
                        return
                    reply = data_reply
                    if reply.ok:
                        # Postfix's reply names its queue id: "250 2.0.0 Ok: queued as X".
                        _, found, after = str(reply).partition("queued as ")
                        queued = after.split() if found else []
                        logsetup.hop("submission", queued[0] if queued else None,
                                     f"from=<{mail_from}>, sasl_username={account.address},"
                                     f" client={self.client_ip}, status=sent ({reply})")
                if verb == "QUIT" or reply.code == 421:
                    return
        except (LmtpError, ConnectionError, TimeoutError, asyncio.IncompleteReadError,
                asyncio.LimitOverrunError, RuntimeError) as error:
            # RuntimeError: a write to a transport that is already closed (uvloop).
            log.info("submission session of %s: backend lost: %s", account.address,
                     error or type(error).__name__)
            with contextlib.suppress(Exception):
                await self.send(R_LOST.format(host=self.host, domain=account.domain))
        finally:
            if self.backend is not None:
                await netio.close(self.backend.writer)
                self.backend = None

    async def reopen(self, account: Account) -> bool:
        try:
            self.backend = await self.open_backend(account)
        except (BackendUnavailable, MailfcError, OSError, TimeoutError, LmtpError,
                asyncio.IncompleteReadError) as error:
            log.info("submission session of %s: no new session with its Postfix: %s",
                     account.address, error)
            await self.send(R_REOPEN_FAILED.format(domain=account.domain))
            return False
        return True

    async def forward(self, backend: Backend, raw: bytes) -> Reply:
        backend.writer.write(raw if raw.endswith(b"\r\n") else raw.rstrip(b"\n") + b"\r\n")
        return await self.pass_reply(backend)

    async def pass_reply(self, backend: Backend) -> Reply:
        # Read one whole (possibly multi-line) reply and give it to the client as is.
        lines: list[bytes] = []
        while True:
            line = await asyncio.wait_for(backend.reader.readuntil(b"\n"), BACKEND_TIMEOUT_S)
            lines.append(line)
            if line[3:4] != b"-":
                break
        self.writer.write(b"".join(lines))
        await self.writer.drain()
        last = lines[-1].decode("utf-8", "replace")
        if not last[:3].isdigit():
            raise LmtpError(f"malformed reply {last[:80]!r}")
        return Reply(int(last[:3]), last[4:].strip())

    async def stream_data(self, backend: Backend, account: Account) -> Reply | None:
        """The message from the client to Postfix, chunk by chunk, up to its final dot
        (DATA in the header); Postfix's reply, or the router's own.  None: the session
        is over (the client went away or was silent too long)."""
        end = EndOfData()
        size = 0
        lost: str | None = None     # why Postfix is gone, if it is
        over = False
        while True:
            try:
                chunk = await self.read_some(self.settings.idle_timeout_s)
            except TimeoutError:
                await self.abandon(backend)
                with contextlib.suppress(Exception):
                    await self.send(R_TIMEOUT.format(host=self.host))
                return None
            if not chunk:
                await self.abandon(backend)   # no final dot: Postfix keeps nothing
                return None
            content, rest = end.feed(chunk)
            size += len(content)
            if size > self.size_limit and not over:
                over = True
                await self.abandon(backend)
            if content and not over and lost is None:
                lost = await self._pass_on(backend, content)
            if rest is not None:
                self.pending[:0] = rest
                break
        if over:
            log.info("submission session of %s: message over %d bytes refused",
                     account.address, self.size_limit)
            await self.send(R_TOO_BIG.format(limit=self.size_limit))
            return Reply(552, "")
        if lost is None:
            lost = await self._pass_on(backend, b".\r\n", flush=True)
        if lost is None:
            try:
                return await self.pass_reply(backend)
            except (LmtpError, ConnectionError, TimeoutError, asyncio.IncompleteReadError,
                    asyncio.LimitOverrunError, RuntimeError) as error:
                lost = str(error) or type(error).__name__
        log.info("submission session of %s: its Postfix was lost during a message: %s",
                 account.address, lost)
        await self.send(R_LOST.format(host=self.host, domain=account.domain))
        return Reply(421, "")

    @staticmethod
    async def _pass_on(backend: Backend, data: bytes, *, flush: bool = False) -> str | None:
        """Write to Postfix, waiting while it has more than BACKEND_HIGH_WATER unread;
        None, or why Postfix is gone."""
        transport = backend.writer.transport
        if transport.is_closing():
            return "connection closed"
        try:
            backend.writer.write(data)
            if flush or transport.get_write_buffer_size() > BACKEND_HIGH_WATER:
                await asyncio.wait_for(backend.writer.drain(), BACKEND_TIMEOUT_S)
        except (ConnectionError, RuntimeError, OSError, TimeoutError) as error:
            return str(error) or type(error).__name__
        return None

    async def abandon(self, backend: Backend) -> None:
        """Break the session with Postfix off in the middle of a message (it keeps
        nothing without the final dot)."""
        if self.backend is backend:
            self.backend = None
        backend.writer.transport.abort()
        await netio.close(backend.writer)


class _SessionOver(Exception):
    """The client broke off an AUTH exchange (see challenge()): end the session."""


def _declared_size(argument: str) -> int | None:
    """MAIL's SIZE=n parameter; None when absent or not a number."""
    for word in argument.split()[1:]:
        name, _, value = word.partition("=")
        if name.upper() == "SIZE" and value.isdigit():
            return int(value)
    return None


def _mail_from(argument: str) -> str | None:
    """The address of `FROM:<a@b> SIZE=...`, normalized; None if malformed."""
    text = argument.strip()
    if not text.upper().startswith("FROM:"):
        return None
    rest = text[5:].strip()
    if not rest.startswith("<") or ">" not in rest:
        return None
    address = rest[1:rest.index(">")]
    if not address:
        return None
    try:
        return normalize_address(address)
    except InvalidInput:
        return None
