"""Socket-level fuzzing of a running `mailfc up`: mutated real dialogues at every
endpoint that reads bytes from a client or a container.

TARGETS (a Target: how to connect, a corpus of real sessions, a clean check)
    smtp-in          listen.smtp_in            SMTP, a message for a hosted user
    submission       listen.submission         SMTP before AUTH (STARTTLS, AUTH)
    submissions      listen.submissions        the same inside implicit TLS
    imap             listen.imap_router        IMAP before login (ID, LOGIN, literals)
    imaps            listen.imap_router_tls    the same inside implicit TLS
    lmtp-router      hops_dir/lmtp-router.sock LMTP, as SMTP-Out's spool speaks it
    dispatcher-*     dispatcher sockets        a PROXY v2 header, then the service
    smtp-out-intake  hops_dir/smtp-out.sock    LMTP from Filter-Out
    filter-out       the containers' sockets   what each domain's Postfix sends out
    milter, hooks    the containers' sockets   milter packets, hook lines

MUTATIONS (mutate()): a bit flipped, cut short, a slice repeated, two sessions
spliced, a huge line inserted, random bytes; sent whole, in random pieces, or one
byte at a time.  Each connection ends after its bytes (and what the server still
answers within a second) or at a per-connection deadline.

CHECKS (Platform checks in test_sockets.py and bench/fuzz.py): each target still
answers its clean check, no supervised process died or was restarted, no traceback
reached up.log, and each process's peak RSS stayed within its bound.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import random
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from mailfc.config import Config
from mailfc.policy.hooks import protocol as hooks
from mailfc.policy.milter import codec as milter
from mailfc.protocols import proxy

CONNECT_TIMEOUT_S = 3.0
CONNECTION_DEADLINE_S = 4.0
HUGE_LINE = 200_000

Opener = Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


@dataclass
class Target:
    name: str
    open: Opener
    corpus: list[bytes]
    # A clean session and what its last reply line must start with.
    clean: bytes
    clean_reply: bytes
    tried: int = 0
    hangs: int = 0
    refused: int = 0
    problems: list[str] = field(default_factory=list)


def _tcp(host: str, port: int, tls: ssl.SSLContext | None = None) -> Opener:
    async def open_() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=tls, limit=1 << 20), CONNECT_TIMEOUT_S)
    return open_


def _unix(path: Path) -> Opener:
    async def open_() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.wait_for(asyncio.open_unix_connection(str(path), limit=1 << 20),
                                      CONNECT_TIMEOUT_S)
    return open_


def _hostport(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host, int(port)


def client_tls() -> ssl.SSLContext:
    """The platform's certificate is self-signed: accepted here on purpose."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _message(sender: str, recipient: str) -> bytes:
    return (f"From: <{sender}>\r\nTo: <{recipient}>\r\nSubject: fuzz\r\n"
            f"Date: Mon, 7 Dec 2026 02:00:00 +0000\r\nMessage-ID: <fuzz@test.example>\r\n"
            f"\r\nhello\r\n..a dot\r\n").encode()


def targets(settings: Config, domain: str, user: str, password: str) -> list[Target]:
    """Every fuzzable endpoint of the platform `settings` describe."""
    recipient = f"{user}@{domain}"
    message = _message("someone@remote.example", recipient)
    smtp = [
        b"EHLO fuzz.example\r\nMAIL FROM:<someone@remote.example>\r\nRCPT TO:<" +
        recipient.encode() + b">\r\nDATA\r\n" + message + b".\r\nQUIT\r\n",
        b"EHLO fuzz.example\r\nMAIL FROM:<> SIZE=100 BODY=8BITMIME\r\nRCPT TO:<nobody@"
        + domain.encode() + b">\r\nRCPT TO:<postmaster>\r\nRSET\r\nNOOP\r\nVRFY x\r\nQUIT\r\n",
        b"HELO fuzz\r\nMAIL FROM:<a@b.example> RET=FULL\r\nRCPT TO:<x@elsewhere.example> "
        b"NOTIFY=NEVER\r\nSTARTTLS\r\nQUIT\r\n",
    ]
    plain_login = f"\0{recipient}\0{password}".encode()
    auth = base64.b64encode(plain_login)
    submission = [
        b"EHLO fuzz.example\r\nAUTH PLAIN " + auth + b"\r\nMAIL FROM:<" + recipient.encode()
        + b">\r\nQUIT\r\n",
        b"EHLO fuzz.example\r\nAUTH LOGIN\r\n" + base64.b64encode(b"x@y.example") + b"\r\n"
        + base64.b64encode(b"wrong") + b"\r\nSTARTTLS\r\nQUIT\r\n",
        b"HELO x\r\nMAIL FROM:<a@b>\r\nXCLIENT ADDR=1.2.3.4\r\nNOOP\r\nRSET\r\nQUIT\r\n",
    ]
    imap = [
        b"a1 CAPABILITY\r\na2 ID (\"name\" \"fuzz\" \"version\" \"1\")\r\na3 LOGIN {"
        + str(len(recipient)).encode() + b"+}\r\n" + recipient.encode() + b" wrong\r\n"
        b"a4 LOGOUT\r\n",
        b"a1 AUTHENTICATE PLAIN\r\n" + auth + b"\r\na2 NOOP\r\na3 SELECT INBOX\r\n"
        b"a4 LOGOUT\r\n",
        b"a1 ID (" + b" ".join(b'"f%02d" "%s"' % (i, b"v" * 1000) for i in range(30))
        + b")\r\na2 STARTTLS\r\na3 LOGOUT\r\n",
    ]
    lmtp = [
        b"LHLO fuzz\r\nMAIL FROM:<someone@remote.example>\r\nRCPT TO:<" + recipient.encode()
        + b">\r\nDATA\r\n" + message + b".\r\nQUIT\r\n",
        b"LHLO fuzz\r\nXFORWARD NAME=x ADDR=192.0.2.1 PROTO=ESMTP\r\nMAIL FROM:<>\r\n"
        b"RCPT TO:<nobody@nowhere.example>\r\nDATA\r\nQUIT\r\n",
    ]
    header = proxy.encode("192.0.2.9", 40000, "127.0.0.1", 25, authority=domain)
    unknown = proxy.encode("192.0.2.9", 40000, "127.0.0.1", 25, authority="nowhere.example")
    milter_session = (milter.encode(milter.SMFIC_OPTNEG, milter.encode_optneg(0x1FF, 0)[5:])
                      + milter.encode(milter.SMFIC_MACRO, b"Cj\0mx.test\0")
                      + milter.encode(milter.SMFIC_CONNECT, b"client\x004\x9c\x40192.0.2.9\0")
                      + milter.encode(milter.SMFIC_HELO, b"fuzz\0")
                      + milter.encode(milter.SMFIC_MAIL, b"<a@b.example>\0SIZE=10\0")
                      + milter.encode(milter.SMFIC_RCPT, f"<{recipient}>\0".encode())
                      + milter.encode(milter.SMFIC_QUIT))
    hook_session = (hooks.encode(hooks.SESSION, 1, 1000, recipient, "192.0.2.9", 0)
                    + hooks.encode(hooks.CMD, 1, 1, "SEARCH", "a1")
                    + hooks.encode(hooks.DONE, 1, 1, 1000, 50, "SEARCH", "a1", "OK", "ALL")
                    + hooks.encode(hooks.END, 1, 10, 20, "logout"))
    listen = settings.listen
    sockets_dir = settings.container_sockets_dir
    tls = client_tls()
    found = [
        Target("smtp-in", _tcp(*_hostport(listen.smtp_in)), smtp,
               b"EHLO clean.example\r\nQUIT\r\n", b"221"),
        Target("submission", _tcp(*_hostport(listen.submission)), submission,
               b"EHLO clean.example\r\nQUIT\r\n", b"221"),
        Target("submissions", _tcp(*_hostport(listen.submissions), tls), submission,
               b"EHLO clean.example\r\nQUIT\r\n", b"221"),
        Target("imap", _tcp(*_hostport(listen.imap_router)), imap,
               b"a1 CAPABILITY\r\na2 LOGOUT\r\n", b"a2 OK"),
        Target("imaps", _tcp(*_hostport(listen.imap_router_tls), tls), imap,
               b"a1 CAPABILITY\r\na2 LOGOUT\r\n", b"a2 OK"),
        Target("lmtp-router", _unix(settings.hops_dir / "lmtp-router.sock"), lmtp,
               b"LHLO clean\r\nQUIT\r\n", b"221"),
        Target("dispatcher-lmtp", _unix(settings.dispatcher_socket("lmtp")),
               [unknown + lmtp[1], header[:20], header + b"garbage\r\n"], b"", b""),
        Target("dispatcher-imap", _unix(settings.dispatcher_socket("imap")),
               [unknown + imap[0], header[:30] + b"\0" * 40], b"", b""),
        Target("dispatcher-smtp", _unix(settings.dispatcher_socket("smtp")),
               [unknown + submission[2], proxy.SIGNATURE + b"\x21\x11\xff\xff"], b"", b""),
        Target("smtp-out-intake", _unix(settings.hops_dir / "smtp-out.sock"), lmtp,
               b"", b""),
        Target("filter-out", _unix(sockets_dir / "filter-out.sock"), lmtp, b"", b""),
        Target("milter", _unix(Path(settings.milter.socket or sockets_dir / "milter.sock")),
               [milter_session], b"", b""),
        Target("hooks", _unix(Path(settings.hooks.socket or sockets_dir / "hooks.sock")),
               [hook_session], b"", b""),
    ]
    return found


# -- mutations -------------------------------------------------------------------------

def mutate(rng: random.Random, corpus: list[bytes]) -> bytes:
    data = bytearray(rng.choice(corpus))
    for _ in range(rng.randint(1, 3)):
        how = rng.choice(("flip", "flip", "cut", "repeat", "splice", "huge", "random",
                          "insert"))
        at = rng.randrange(len(data) + 1)
        if how == "flip" and data:
            at = min(at, len(data) - 1)
            data[at] ^= 1 << rng.randrange(8)
        elif how == "cut":
            del data[at:]
        elif how == "repeat":
            data[at:at] = bytes(data[at:at + rng.randint(1, 200)]) * rng.randint(2, 50)
        elif how == "splice":
            other = rng.choice(corpus)
            data[at:] = other[rng.randrange(len(other) + 1):]
        elif how == "huge":
            data[at:at] = bytes([rng.randrange(32, 127)]) * rng.randint(HUGE_LINE // 4,
                                                                         HUGE_LINE)
        elif how == "random":
            data[at:at] = rng.randbytes(rng.randint(1, 300))
        elif how == "insert":
            data[at:at] = rng.choice((b"\r\n", b"\n", b"\0", b".\r\n", b"{99999}\r\n",
                                      b"STARTTLS\r\n", b"DATA\r\n", b"\r\n.\r\n"))
    return bytes(data)


def pieces(rng: random.Random, data: bytes) -> list[bytes]:
    """Whole, cut at random points, or one byte at a time (short streams only)."""
    mode = rng.choice(("whole", "cuts", "cuts", "bytewise"))
    if mode == "whole" or not data:
        return [data]
    if mode == "bytewise" and len(data) <= 400:
        return [data[i:i + 1] for i in range(len(data))]
    cuts = sorted(rng.randrange(len(data)) for _ in range(rng.randint(1, 12)))
    out, start = [], 0
    for cut in cuts:
        out.append(data[start:cut])
        start = cut
    out.append(data[start:])
    return [p for p in out if p]


async def _drain_replies(reader: asyncio.StreamReader, until: float) -> None:
    while time.monotonic() < until:
        chunk = await asyncio.wait_for(reader.read(65536), max(0.01, until - time.monotonic()))
        if not chunk:
            return


async def one_connection(target: Target, data: list[bytes]) -> None:
    """Send one mutated stream; note a hang (the deadline passed with the server
    neither answering nor closing) but never fail on what the server does."""
    target.tried += 1
    try:
        reader, writer = await target.open()
    except (OSError, TimeoutError, ssl.SSLError):
        target.refused += 1
        return
    deadline = time.monotonic() + CONNECTION_DEADLINE_S
    try:
        # RuntimeError: uvloop's answer to a write after the server closed.
        with contextlib.suppress(OSError, TimeoutError, ssl.SSLError, ConnectionError,
                                 asyncio.IncompleteReadError, RuntimeError):
            for piece in data:
                if writer.is_closing():
                    break
                writer.write(piece)
                await asyncio.wait_for(writer.drain(), max(0.01, deadline - time.monotonic()))
                if len(data) > 1:
                    await asyncio.sleep(0)
            with contextlib.suppress(OSError, RuntimeError, NotImplementedError):
                if writer.can_write_eof():
                    writer.write_eof()
            await _drain_replies(reader, min(deadline, time.monotonic() + 1.0))
    finally:
        writer.transport.abort()


async def clean_check(target: Target) -> str | None:
    """None when the target answers a clean client as it should, else what it did."""
    try:
        reader, writer = await target.open()
    except (OSError, TimeoutError, ssl.SSLError) as error:
        return f"{target.name}: no connection ({error})"
    try:
        if not target.clean:
            return None     # accepted a connection: all a clean client can ask of it
        writer.write(target.clean)
        await writer.drain()
        received = b""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            chunk = await asyncio.wait_for(reader.read(65536), deadline - time.monotonic())
            if not chunk:
                break
            received += chunk
            if received.rstrip(b"\r\n").rsplit(b"\n", 1)[-1].startswith(target.clean_reply):
                return None
        return f"{target.name}: clean session got {received[-300:]!r}"
    except (OSError, TimeoutError, ssl.SSLError, ConnectionError) as error:
        return f"{target.name}: clean session failed ({error!r})"
    finally:
        writer.transport.abort()


async def fuzz(all_targets: list[Target], seconds: float, rng: random.Random,
               concurrency: int = 6) -> None:
    """Mutated connections to every target, `concurrency` at a time per target, until
    `seconds` passed."""
    stop = time.monotonic() + seconds

    async def worker(target: Target) -> None:
        while time.monotonic() < stop:
            data = pieces(rng, mutate(rng, target.corpus))
            try:
                await asyncio.wait_for(one_connection(target, data),
                                       CONNECTION_DEADLINE_S + 2.0)
            except TimeoutError:
                target.hangs += 1

    await asyncio.gather(*(worker(t) for t in all_targets for _ in range(concurrency)))


# -- the platform's health around a run ---------------------------------------------------

# A process's peak RSS may grow this much over its RSS before the run (its sessions'
# buffers and TLS state while dozens of hostile connections are open), no more.
RSS_GROWTH_KB = 96 * 1024


@dataclass
class Health:
    """What a run must leave as it found: the processes (same pids), the log without a
    traceback, each process's memory within RSS_GROWTH_KB of where it began."""

    processes: dict[str, int]
    rss_kb: dict[str, int]
    log: Path
    log_offset: int
    peak_kb: dict[str, int] = field(default_factory=dict)

    @classmethod
    def before(cls, processes: dict[str, int], log: Path) -> Health:
        rss = {}
        for name, pid in processes.items():
            reset_peak(pid)
            rss[name] = memory_kb(pid).get("VmRSS", 0)
        offset = log.stat().st_size if log.exists() else 0
        return cls(dict(processes), rss, log, offset)

    def problems(self, processes_now: dict[str, int]) -> list[str]:
        found = []
        if processes_now != self.processes:
            found.append(f"processes changed: {self.processes} -> {processes_now}")
        for name, pid in self.processes.items():
            peak = memory_kb(pid).get("VmHWM", 0)
            self.peak_kb[name] = peak
            if peak > self.rss_kb[name] + RSS_GROWTH_KB:
                found.append(f"{name}: peak RSS {peak} kB, {self.rss_kb[name]} kB before")
        with contextlib.suppress(OSError), self.log.open("rb") as handle:
            handle.seek(self.log_offset)
            text = handle.read().decode("utf-8", "replace")
            if "Traceback" in text:
                at = text.index("Traceback")
                found.append("a traceback in the log:\n" + text[max(0, at - 400):at + 3000])
        return found


def memory_kb(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of `pid` in kB; empty if it is gone."""
    values = {}
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0])
    return values


def reset_peak(pid: int) -> None:
    """Start VmHWM again from the current RSS (proc(5): clear_refs, "5")."""
    with contextlib.suppress(OSError):
        Path(f"/proc/{pid}/clear_refs").write_text("5")


def report(all_targets: list[Target]) -> str:
    return "\n".join(f"  {t.name:16} tried {t.tried:6}  refused {t.refused:4}  hangs {t.hangs}"
                     for t in all_targets)
