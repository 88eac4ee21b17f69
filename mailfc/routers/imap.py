"""IMAP Router: the pre-login dialogue for every hosted domain, then a transparent proxy.

LISTENERS
    listen.imap_router (143, STARTTLS) and listen.imap_router_tls (993, implicit TLS).

DIALOGUE (before login; everything else gets `BAD`, commands that need a
login get `NO Log in first`)
    * OK [CAPABILITY ...] mailfc IMAP router ready
    CAPABILITY, NOOP, ID, STARTTLS, LOGIN user pass, AUTHENTICATE PLAIN [ir], LOGOUT

LOGIN
    1. The account is looked up in the CMDB.  If it exists and is active, the
       session towards its domain's container starts at once (placement,
       dispatcher, cold start) while the password is checked, so a cold start
       overlaps with the login dialogue.
    2. Wrong user or password: `NO [AUTHENTICATIONFAILED]` after
       imap_router.auth_failure_delay_s (plus the account's growing delay); an
       address past its failure limits, or banned, gets the same reply without
       its password being checked (mailfc.routers.throttle, docs/security.md
       "Login abuse").  Three failures in one session end it.  Every attempt is
       recorded in auth_attempts.
    3. Right password: the router sends `tag LOGIN user -` with the client's
       own tag to the dispatcher, which hands the connection to an imap
       process of the domain's Dovecot as that user, with the client address
       from the router's PROXY header (mailfc.dispatcher.server).  The tagged
       reply, with Dovecot's post-login CAPABILITY, goes to the client
       verbatim, and from then on bytes flow both ways untouched, between the
       client and that imap process, through this router only.
    Container not available in time: `NO [UNAVAILABLE]`.  Backend gone in the
    middle of a session: `* BYE [UNAVAILABLE]` and the connection closes.
    Dovecot ending the session at login (`* BYE [LIMIT] ...`: over the
    account's imap_sessions limit): that BYE is the one answer the client
    gets, and the connection closes.

SECURITY
    Plaintext LOGIN/AUTHENTICATE before TLS is refused (`LOGINDISABLED`) unless
    imap_router.allow_plaintext_auth.  Bytes pipelined after STARTTLS are a
    command-injection attempt: the connection is closed.  Pre-login literals
    are capped at 8 KiB each and a command (lines and literals) at
    MAX_COMMAND (64 KiB: an RFC 2971 ID of 30 fields of 1024 bytes fits, as
    Dovecot takes it).  A longer command gets `* BAD` and `* BYE`, then the
    connection closes after its input is read and thrown away (bounded), so
    the client reads the answer instead of a reset.
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
from typing import cast

from mailfc import netio
from mailfc.config import Config
from mailfc.db.directory import Account, Directory
from mailfc.errors import MailfcError
from mailfc.protocols import imap, proxy
from mailfc.routers.listeners import LoginRouter, connect_dispatcher, peer_and_local
from mailfc.routers.throttle import delay_failure

log = logging.getLogger("mailfc.routers.imap")

MAX_FAILURES_PER_SESSION = 3
MAX_COMMAND = 65536
# After refusing too much input: read and throw away at most this much, this long,
# before closing (closing with unread input resets the connection, and the
# client may never see the BAD).
LINGER_BYTES = 1 << 20
LINGER_S = 2.0
BACKEND_LOGIN_TIMEOUT_S = 15.0
NEEDS_LOGIN = {
    b"SELECT", b"EXAMINE", b"CREATE", b"DELETE", b"RENAME", b"SUBSCRIBE", b"UNSUBSCRIBE",
    b"LIST", b"LSUB", b"STATUS", b"APPEND", b"CHECK", b"CLOSE", b"EXPUNGE", b"SEARCH",
    b"FETCH", b"STORE", b"COPY", b"MOVE", b"UID", b"IDLE", b"NAMESPACE", b"GETQUOTAROOT",
    b"GETQUOTA", b"ENABLE", b"UNSELECT", b"SORT", b"THREAD", b"GETACLRIGHTS", b"MYRIGHTS",
}


class BackendUnavailable(Exception):
    """The domain's container did not answer with a greeting in time."""


@dataclass
class Backend:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    opened_s: float
    # The dispatcher is on this host (a unix socket): it can take the client's
    # own socket.
    local: bool = False


class ImapRouter(LoginRouter):
    name = "imap-router"
    protocol = "imap"

    def __init__(self, config: Config, directory: Directory,
                 tls_context: ssl.SSLContext) -> None:
        super().__init__(
            config, directory, tls_context, settings=config.imap_router,
            plain=config.listen.imap_router, implicit_tls=config.listen.imap_router_tls,
            session_factory=ImapSession, log=log)


class ImapSession:
    def __init__(self, router: ImapRouter, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, implicit_tls: bool) -> None:
        self.router = router
        self.config = router.config.imap_router
        self.reader = reader
        self.writer = writer
        self.tls = implicit_tls
        (self.client_ip, self.client_port), (self.local_ip, self.local_port) = \
            peer_and_local(writer)
        self.failures = 0

    # -- wire ------------------------------------------------------------------

    async def send(self, line: str) -> None:
        self.writer.write(line.encode() + b"\r\n")
        await self.writer.drain()

    async def read_line(self) -> bytes:
        return await imap.read_line(self.reader)

    async def read_command(self) -> tuple[bytes, bytes, list[bytes]]:
        return await imap.read_command(self.reader, lambda: self.send("+ OK"),
                                       max_line=MAX_COMMAND, max_total=MAX_COMMAND)

    def capabilities(self) -> str:
        words = ["IMAP4rev1", "SASL-IR", "LITERAL+", "ID", "ENABLE", "IDLE"]
        if not self.tls:
            words.append("STARTTLS")
        if self.tls or self.config.allow_plaintext_auth:
            words.append("AUTH=PLAIN")
        else:
            words.append("LOGINDISABLED")
        return " ".join(words)

    # -- dialogue ----------------------------------------------------------------

    async def run(self) -> None:
        try:
            await self.dialogue()
        except ConnectionError as error:
            # The client left while it was being answered (a reset during a NO's
            # delay): its end, not the router's failure, and no traceback.
            log.info("imap client %s left: %s", self.client_ip, error)

    async def dialogue(self) -> None:
        await self.send(f"* OK [CAPABILITY {self.capabilities()}] mailfc IMAP router ready.")
        deadline = time.monotonic() + self.config.login_timeout_s
        while True:
            remaining = deadline - time.monotonic()
            try:
                tag, command, arguments = await asyncio.wait_for(self.read_command(), remaining)
            except TimeoutError:
                await self.send("* BYE Disconnected for inactivity.")
                return
            except imap.ImapSyntaxError as error:
                await self.send(f"* BAD {error}")
                if "literal" in str(error) or "too long" in str(error):
                    await self.send("* BYE Too much data before login.")
                    await self.linger()
                    return
                continue
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            backend = await self.dispatch(tag.decode("ascii", "replace"), command, arguments)
            if backend is False:
                return
            if isinstance(backend, Backend):
                await self.proxy(backend)
                return

    async def linger(self) -> None:
        """Half-close, then read and drop what the client still sends (bounded)."""
        with contextlib.suppress(OSError, RuntimeError, NotImplementedError):
            if self.writer.can_write_eof():
                self.writer.write_eof()
        dropped = 0
        deadline = time.monotonic() + LINGER_S
        with contextlib.suppress(OSError, TimeoutError, ConnectionError):
            while dropped < LINGER_BYTES:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                chunk = await asyncio.wait_for(self.reader.read(65536), remaining)
                if not chunk:
                    break
                dropped += len(chunk)

    async def dispatch(self, tag: str, command: bytes,
                       arguments: list[bytes]) -> Backend | bool:
        """Answer one command; a Backend once logged in, False to hang up."""
        if command == b"CAPABILITY":
            await self.send(f"* CAPABILITY {self.capabilities()}")
            await self.send(f"{tag} OK Capability completed.")
        elif command == b"NOOP":
            await self.send(f"{tag} OK NOOP completed.")
        elif command == b"ID":
            await self.send('* ID ("name" "mailfc")')
            await self.send(f"{tag} OK ID completed.")
        elif command == b"LOGOUT":
            await self.send("* BYE Logging out.")
            await self.send(f"{tag} OK Logout completed.")
            return False
        elif command == b"STARTTLS":
            return await self.starttls(tag)
        elif command == b"LOGIN":
            if len(arguments) != 2:
                await self.send(f"{tag} BAD LOGIN expects a user name and a password.")
                return True
            return await self.login(tag, _text(arguments[0]), _text(arguments[1]))
        elif command == b"AUTHENTICATE":
            return await self.authenticate(tag, arguments)
        elif command in NEEDS_LOGIN:
            await self.send(f"{tag} NO Log in first.")
        else:
            await self.send(f"{tag} BAD Unknown command.")
        return True

    async def starttls(self, tag: str) -> bool:
        if self.tls:
            await self.send(f"{tag} BAD TLS is already active.")
            return True
        # Anything the client sent after STARTTLS would be read as if it had
        # come over TLS: a known injection attack, so such a client is dropped.
        # asyncio has no public peek; its buffer is where pipelined bytes wait.
        if self.reader._buffer:  # type: ignore[attr-defined]
            await self.send(f"{tag} BAD Data pipelined after STARTTLS.")
            return False
        await self.send(f"{tag} OK Begin TLS negotiation now.")
        try:
            await self.writer.start_tls(self.router.tls_context, ssl_handshake_timeout=30)
        except (ssl.SSLError, OSError, TimeoutError) as error:
            log.info("STARTTLS from %s failed: %s", self.client_ip, error)
            return False
        self.tls = True
        return True

    async def authenticate(self, tag: str, arguments: list[bytes]) -> Backend | bool:
        if not arguments or arguments[0].upper() != b"PLAIN":
            await self.send(f"{tag} NO [CANNOT] Only AUTHENTICATE PLAIN is supported.")
            return True
        if not self._may_authenticate():
            await self.refuse_plaintext(tag)
            return True
        if len(arguments) > 1:
            response = arguments[1]
        else:
            await self.send("+ ")
            try:
                response = await self.read_line()
            except imap.ImapSyntaxError as error:
                # The continuation line is bounded like a command line (fuzz suite).
                await self.send(f"{tag} BAD {error}")
                await self.send("* BYE Too much data before login.")
                return False
            except (asyncio.IncompleteReadError, ConnectionError):
                return False     # the client left in the middle of AUTHENTICATE
        if response == b"*":
            await self.send(f"{tag} BAD Authentication cancelled.")
            return True
        try:
            authzid, authcid, password = base64.b64decode(response, validate=True).split(b"\0")
        except (binascii.Error, ValueError):
            await self.send(f"{tag} BAD Invalid AUTHENTICATE PLAIN response.")
            return True
        if authzid and authzid != authcid:
            await self.send(f"{tag} NO [AUTHORIZATIONFAILED] Acting as another user is not "
                            "allowed.")
            return True
        return await self.login(tag, _text(authcid), _text(password), checked=True)

    def _may_authenticate(self) -> bool:
        return self.tls or self.config.allow_plaintext_auth

    async def refuse_plaintext(self, tag: str) -> None:
        await self.send(f"{tag} NO [PRIVACYREQUIRED] Plaintext authentication is disallowed "
                        "on non-TLS connections: use STARTTLS or port 993.")

    async def login(self, tag: str, username: str, password: str,
                    checked: bool = False) -> Backend | bool:
        if not checked and not self._may_authenticate():
            await self.refuse_plaintext(tag)
            return True
        login = await self.router.authenticate(
            username, password, self.client_ip, self.open_backend,
            (BackendUnavailable, MailfcError, OSError, TimeoutError))
        if login.failure is not None:
            return await self.fail(tag)
        assert login.account is not None
        if login.backend is None:
            await self.send(f"{tag} NO [UNAVAILABLE] The mail server for "
                            f"{login.account.domain} is not available right now; try again "
                            "later.")
            return True
        return await self.backend_login(tag, login.account, login.backend)

    async def fail(self, tag: str) -> bool:
        self.failures += 1
        await delay_failure(self.config.auth_failure_delay_s)
        await self.send(f"{tag} NO [AUTHENTICATIONFAILED] Authentication failed.")
        if self.failures >= MAX_FAILURES_PER_SESSION:
            await self.send("* BYE Too many invalid login attempts.")
            return False
        return True

    # -- towards the domain's Dovecot --------------------------------------------

    async def open_backend(self, account: Account) -> Backend:
        started = time.monotonic()
        placement = await self.router.directory.place(account.domain)
        timeout = self.router.config.runtime.start_timeout_s + \
            self.router.config.dispatcher.connect_timeout_s
        reader, writer, local = await connect_dispatcher(self.router.config, placement, "imap")
        try:
            writer.write(proxy.encode(self.client_ip, self.client_port, self.local_ip,
                                      self.local_port, authority=account.domain))
            greeting = await asyncio.wait_for(reader.readuntil(b"\n"), timeout)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError) as err:
            await netio.close(writer)
            raise BackendUnavailable(f"dispatcher closed the session: {err}") from None
        except BaseException:
            await netio.close(writer)
            raise
        if not greeting.startswith(b"* OK"):
            await netio.close(writer)
            raise BackendUnavailable(greeting.decode("ascii", "replace").strip())
        return Backend(reader, writer, time.monotonic() - started, local)

    async def backend_login(self, tag: str, account: Account, backend: Backend) -> Backend | bool:
        # The password was checked here; the dispatcher hands the session to Dovecot.
        login = f"{tag} LOGIN ".encode() + imap.quote(account.address)
        client = cast(asyncio.Transport, self.writer.transport)
        pending = self._take_for_hand_over(backend, client)
        if pending is not None:
            # The client's own socket goes along, and in the password's place what
            # the client sent after LOGIN: Dovecot answers the LOGIN on that socket
            # and this router is out of the session.
            netio.send_with_fd(backend.writer,
                               login + b" {%d+}\r\n" % len(pending) + pending + b"\r\n",
                               self.writer.get_extra_info("socket").fileno())
        else:
            backend.writer.write(login + b' "-"\r\n')
        prefix = tag.encode() + b" "
        try:
            while True:
                line = await asyncio.wait_for(backend.reader.readuntil(b"\n"),
                                              BACKEND_LOGIN_TIMEOUT_S)
                if line.startswith(prefix):
                    break
                if line.startswith(b"* BYE") and pending is None:
                    # Dovecot ends the session (over a limit): that is the answer.
                    log.info("backend ended the login of %s: %r", account.address,
                             line[:200])
                    self.writer.write(line)
                    with contextlib.suppress(ConnectionError):
                        await self.writer.drain()
                    await netio.close(backend.writer)
                    return False
                if not line.startswith(b"* "):
                    raise BackendUnavailable(f"unexpected reply {line[:80]!r}")
                self.writer.write(line)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError,
                TimeoutError, BackendUnavailable) as error:
            log.warning("backend login of %s failed: %s", account.address, error)
            line = b""
        ok = line[len(prefix):].startswith(b"OK")
        if pending is not None:
            await netio.close(backend.writer)
            if ok:
                return False    # run_session closes our copy; the connection stays open
            self.reader.feed_data(pending)  # for the dialogue here, after the NO
            client.resume_reading()
        if not ok:
            if line:
                log.warning("backend refused login of %s: %r", account.address, line[:200])
            await netio.close(backend.writer)
            await self.send(f"{tag} NO [UNAVAILABLE] The mail server for {account.domain} "
                            "did not accept the session; try again later.")
            return True
        self.writer.write(line)
        await self.writer.drain()
        return backend

    def _take_for_hand_over(self, backend: Backend, client: asyncio.Transport) -> bytes | None:
        """What the client sent after its LOGIN, when its socket can go to the
        dispatcher (on this host, no TLS state here, the bytes fit the LOGIN's
        literal); None when it cannot."""
        if not backend.local or self.tls:
            return None
        client.pause_reading()
        if len(self.reader._buffer) > imap.MAX_LITERAL:  # type: ignore[attr-defined]
            client.resume_reading()
            return None
        return netio.take_buffer(self.reader)

    async def proxy(self, backend: Backend) -> None:
        result = await netio.splice(self.reader, self.writer, backend.reader, backend.writer)
        if result.server_closed_first and b"* BYE" not in result.server_tail:
            with contextlib.suppress(Exception):
                await self.send("* BYE [UNAVAILABLE] Connection to the mail server lost.")


def _text(value: bytes) -> str:
    return value.decode("utf-8", "replace")
