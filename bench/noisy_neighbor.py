"""Benchmark: the reason mailfc exists — one domain's flood must not slow another.

    python -m bench.noisy_neighbor [--mode outbound] [--seconds 15] [--rounds 3] [--senders 50]
    python -m bench.noisy_neighbor --mode inbound [--seconds 15] [--rounds 3] [--senders 50]
                                   [--mailbox 200]

OUTBOUND MODE (the default).  Domain A floods: --senders concurrent submission loops
(10x its limit of 5 concurrent sends) plus an IMAP SEARCH storm (5 sessions searching
back to back, 2.5x its limit of 2 heavy commands at once; a refused client waits
50 ms, as a refused sender does).  The flood's clients run as SCHED_IDLE (they get a
CPU only when nothing else wants one): on a real host they are elsewhere on the internet,
and here they would otherwise take the CPU of the two cores that the platform under
test needs.  Domain B sends one message every 0.5 s and reads its mailbox every
0.25 s over an IMAP session opened before the clock starts.  Both domains are
warmed first (their containers running: cold starts are bench/cold_start.py's).
Reported, all in one run:

  1. B alone on mailfc,
  2. B during A's flood on mailfc (A in its own containers, with limits), in
     --rounds rounds that alternate with 1 (so drift of the machine falls on both
     alike); the flood's first ONSET_S seconds are reported apart, and the ratio
     is given with and without them,
  3. B during the same flood (past its first ONSET_S seconds) on a plain shared
     Postfix + Dovecot serving both domains (the same binaries in one shared
     container pair, no limits: the status quo of one server per box),

as p50/p99 of B's delivery latency (submission start to arrival at the remote
MX) and of B's IMAP command latency (with its three slowest commands), plus the
most concurrent sends A ever had open on mailfc (from the milter's records)
against its limit.  With 90 messages and 180 commands per figure (3 rounds of
15 s) a p99 is the second slowest: the per-round lines show how much it moves.

Everything runs on loopback and this host's own container bridge; the remote
MX is an aiosmtpd server of this benchmark, in a process of its own (A's accepted
mail arrives there too).  mailfc runs as an admin runs it,
`mailfc up` (supervised processes).  Loads stop by themselves.

INBOUND MODE (--mode inbound; bench/noisy_inbound.py, whose docstring says how).  No
limits are set for A or B: mailfc as a new install runs it.  Domain A receives a
port-25 flood: --senders concurrent SMTP clients (plain SMTP on both setups: the
shared baseline's Postfix has no TLS) each sending a 20 KB message to one of ten of
A's users, back to back, one message per connection; meanwhile ten other users of A
fetch their whole mailbox (--mailbox preloaded 20 KB messages, FETCH 1:* BODY.PEEK[])
again and again over IMAPS (the IMAP Router's TLS listener, mailfc's port 993).  The
flood's clients run SCHED_IDLE in a process of their own, as above: on a real host
they are elsewhere on the internet, and here they would take the CPU the platform
needs, so A's rate is what the platform takes in, not what its clients could push.
Domain B receives a small message on port 25 every 0.1 s, timed from the SMTP connect
until its file is in B's maildir, and one of B's users runs an IMAP round (NOOP, then
the newest message's flags and two header fields) every 0.2 s over an IMAPS session
opened before the clock starts, each round timed.  B's clients run at normal priority
in the measuring process.  Reported:

  1. B alone on mailfc,
  2. B during A's flood on mailfc, in --rounds rounds alternating with 1, the flood's
     first ONSET_S seconds apart,
  3. B during the same flood (past its first ONSET_S seconds) on one shared Postfix +
     Dovecot serving both domains: a host Postfix of the benchmark (the same binaries)
     taking port-25 mail and delivering it by LMTP into the shared Dovecot container,

each as p50/p99 of B's delivery and of B's IMAP round (with its three slowest rounds),
and

  4. the ratios of B's p99s during the flood to alone, with and without the onset
     (targets on mailfc: at most 1.5x without, 2x with) and on the shared server,
  5. A's accepted messages/s (250s its clients got) during the flood and in its onset
     on mailfc, and during the flood on the shared server, and the ratio mailfc /
     shared server (mailfc may admit A's recipients more slowly while the host is short
     of CPU: this says by how much), A's readers' MB/s fetched, and per round how long
     A's accepted mail took to be all in A's maildirs after the flood (the next phase
     of B alone waits for that, then SETTLE_S).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import multiprocessing
import signal
import ssl
import statistics
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiosmtplib
import asyncpg
from aiosmtpd.smtp import SMTP, Envelope, Session

from bench.platform import (
    LOOPBACK_UNCAPPED,
    handed_over,
    in_own_process,
    scratch_state,
    start_up,
)
from mailfc.config import Config, parse_config
from mailfc.db import accounts, connect, domains, limits
from mailfc.passwords import hash_password
from mailfc.protocols.lmtp import read_reply
from mailfc.runtime.lifecycle import Runtime
from mailfc.runtime.settings import from_config as runtime_settings

PASSWORD = "bench-password"
SUBMISSION = 22587
IMAPS = 22993
MX_PORT = 22525
A_LIMIT = 5
A_HEAVY_LIMIT = 2
A_ACCOUNTS = 10
# A flood's onset: its 50 clients and 5 IMAP sessions connect at once (TLS, logins,
# the first wave of A's mail) before the router's session slots and admission have
# taken hold (about 1.5 s here).  B's figures then are reported apart, and the
# ratio is given with them included too.
ONSET_S = 5.0
# After the warm-up (the new containers' own start-up work) and after a flood
# (A's accepted mail still leaving), before B is measured alone.
SETTLE_S = 5.0


class MxHandler:
    """The remote MX (aiosmtpd), in a process of its own: A's accepted flood arrives
    here too, and a sink in the measuring process would take the GIL from the loop
    that times B.  Only B's arrivals and the warm-up messages are reported (marker,
    monotonic time: the clock is the machine's, the same in every process)."""

    def __init__(self, arrivals: multiprocessing.Queue[tuple[str, float]]) -> None:
        self.arrivals = arrivals

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or b""
        marker = content.split(b"X-Bench: ", 1)[1].split(b"\r\n", 1)[0] if \
            b"X-Bench: " in content else b""
        if marker.startswith((b"b-", b"warm-up-")):
            self.arrivals.put((marker.decode(), time.monotonic()))
        return "250 2.0.0 accepted"


def serve_mx(arrivals: multiprocessing.Queue[tuple[str, float]]) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        await loop.create_server(lambda: SMTP(MxHandler(arrivals)), "127.0.0.1", MX_PORT)
        arrivals.put(("", 0.0))         # listening
        await asyncio.Event().wait()

    asyncio.run(main())


class Sink:
    """B's arrivals at the remote MX, as the MX process reports them."""

    def __init__(self) -> None:
        self.arrived: dict[str, float] = {}
        self.changed = asyncio.Event()
        context = multiprocessing.get_context("spawn")
        self._arrivals: multiprocessing.Queue[tuple[str, float]] = context.Queue()
        self._process = context.Process(target=serve_mx, args=(self._arrivals,), daemon=True)

    async def start(self) -> None:
        self._process.start()
        ready = await asyncio.to_thread(self._arrivals.get, True, 60)
        assert ready == ("", 0.0), ready
        loop = asyncio.get_running_loop()
        threading.Thread(target=self._collect, args=(loop,), daemon=True).start()

    def _collect(self, loop: asyncio.AbstractEventLoop) -> None:
        while True:
            marker, at = self._arrivals.get()
            loop.call_soon_threadsafe(self._arrive, marker, at)

    def _arrive(self, marker: str, at: float) -> None:
        self.arrived[marker] = at
        self.changed.set()

    def stop(self) -> None:
        self._process.terminate()
        self._process.join(10)

    async def wait_for(self, markers: set[str], within: float) -> None:
        """Until every marker has arrived, or `within` seconds passed."""
        await self.wait_until(lambda: markers <= set(self.arrived), within)

    async def wait_until(self, done: Callable[[], bool], within: float) -> None:
        deadline = time.monotonic() + within
        while not done() and time.monotonic() < deadline:
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), deadline - time.monotonic())
            except TimeoutError:
                return


def config(state_dir: Path) -> Config:
    return parse_config({
        "paths": {"state_dir": str(state_dir)},
        "host": {"name": "bench-nn"},
        "network": {"bridge": "mfcn0", "subnet": "10.96.0.0/24"},
        "runtime": {"name_prefix": "mfcn"},
        # The internal hops (LMTP Router, SMTP-Out) on their default unix
        # sockets in <state_dir>/private/hops (mailfc.hops).
        "listen": {"imap_router": "127.0.0.1:22143",
                   "imap_router_tls": f"127.0.0.1:{IMAPS}",
                   "submission": f"127.0.0.1:{SUBMISSION}", "submissions": "127.0.0.1:22465",
                   "milter": "127.0.0.1:22030", "hook_server": "127.0.0.1:22031",
                   "smtp_in": "127.0.0.1:22025"},
        "dispatcher": {"lmtp_port": 22124, "imap_port": 22243, "smtp_port": 22687},
        "submission": {"auth_failure_delay_s": 0.1},
        "smtp_out": {"routes": [f"*=127.0.0.1:{MX_PORT}"]},
        "spool": {"retry_base_s": 1.0, "retry_max_s": 2.0, "scan_interval_s": 0.2},
        **LOOPBACK_UNCAPPED,
    }, "noisy neighbor bench")


@functools.cache
def unverified() -> ssl.SSLContext:
    """One client context per process, as a mail client keeps one: making a context
    loads the system's CA bundle (about 30 ms of CPU here), which would otherwise be
    counted in every submission's latency and spent again by each flood sender."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def message(sender: str, marker: str) -> bytes:
    """A small message; this bench's sink knows it by X-Bench, bench/platform.py's
    Sink by X-Mark."""
    return (f"From: {sender}\r\nTo: x@remote.example\r\nSubject: bench\r\n"
            f"Message-ID: <{marker}@bench>\r\nX-Bench: {marker}\r\nX-Mark: {marker}\r\n\r\n"
            + "hello\r\n" * 20).encode()


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@dataclass
class Samples:
    delivery: list[float] = field(default_factory=list)
    imap: list[float] = field(default_factory=list)
    sent: int = 0
    refused: int = 0

    def add(self, other: Samples) -> None:
        self.delivery += other.delivery
        self.imap += other.imap
        self.sent += other.sent
        self.refused += other.refused

    def p99_ms(self, kind: str) -> float:
        return percentile(self.delivery if kind == "delivery" else self.imap, .99) * 1000

    def line(self, label: str, unit: str = "commands") -> str:
        """`unit`: what one IMAP figure times (a command; the inbound mode's round)."""

        def pct(values: list[float], q: float) -> float:
            return percentile(values, q) * 1000

        return (f"  {label:<34} delivery p50 {pct(self.delivery, .5):7.0f} ms  p99 "
                f"{pct(self.delivery, .99):7.0f} ms  ({len(self.delivery)}/{self.sent} msgs, "
                f"{self.refused} refused)   IMAP p50 "
                f"{pct(self.imap, .5):6.1f} ms  p99 {pct(self.imap, .99):7.1f} ms"
                f"  (slowest: {', '.join(f'{v * 1000:.1f}' for v in sorted(self.imap)[-3:])};"
                f" {len(self.imap)} {unit})")


# -- clients -----------------------------------------------------------------------------

FAILURES: dict[str, int] = {}


async def submit_via_router(user: str, marker: str) -> bool:
    """One authenticated submission through the SMTP Router; False if refused (4xx)."""
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=SUBMISSION, start_tls=True,
                             tls_context=unverified(), timeout=60)
    try:
        await client.connect()
        await client.login(user, PASSWORD)
        await client.sendmail(user, ["x@remote.example"], message(user, marker))
        return True
    except aiosmtplib.SMTPException as error:
        if user.startswith("b"):
            key = f"{type(error).__name__}: {str(error)[:60]}"
            FAILURES[key] = FAILURES.get(key, 0) + 1
        return False
    finally:
        client.close()


async def submit_direct(path: str, user: str, marker: str) -> bool:
    """The status quo: straight to the shared Postfix (its dispatcher socket `path`),
    user vouched for by XCLIENT."""
    reader, writer = await asyncio.open_unix_connection(path)
    try:
        await read_reply(reader)
        for line in ("EHLO bench", f"XCLIENT LOGIN={user} ADDR=127.0.0.1", "EHLO bench",
                     f"MAIL FROM:<{user}>", "RCPT TO:<x@remote.example>", "DATA"):
            writer.write(line.encode() + b"\r\n")
            reply = await read_reply(reader)
            if reply.code >= 400:
                return False
        writer.write(message(user, marker) + b".\r\n")
        return (await read_reply(reader)).code == 250
    finally:
        writer.close()


async def imap_session(host: str, port: int, user: str, *, tls: bool
                       ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(host, port,
                                                   ssl=unverified() if tls else None)
    await reader.readuntil(b"\n")
    await imap_command(reader, writer, b"l", f'LOGIN "{user}" "{PASSWORD}"'.encode())
    await imap_command(reader, writer, b"s", b"SELECT INBOX")
    return reader, writer


async def imap_handed_over(dovecot_pid: int, user: str
                           ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A session of the shared Dovecot, handed over as the dispatcher does it (Dovecot
    takes no password login)."""
    reader, writer = await asyncio.open_unix_connection(sock=await handed_over(dovecot_pid,
                                                                               user))
    await reader.readuntil(b"\n")
    await imap_command(reader, writer, b"s", b"SELECT INBOX")
    return reader, writer


async def imap_command(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                       tag: bytes, command: bytes) -> bytes:
    writer.write(tag + b" " + command + b"\r\n")
    while True:
        line = await reader.readuntil(b"\n")
        if line.startswith(tag + b" "):
            return line


# -- loads ---------------------------------------------------------------------------------

async def quiet_domain(seconds: float, submit: object, open_imap: object, sink: Sink
                       ) -> Samples:
    samples = Samples()
    started: dict[str, float] = {}
    in_flight: list[asyncio.Task[bool]] = []
    # The session is opened before the clock starts: its login (a password hash, a
    # new imap process) is not one of the commands measured, and would otherwise
    # compete with the first message measured.
    reader, writer = await open_imap()  # type: ignore[operator]
    deadline = time.monotonic() + seconds

    async def sending() -> None:
        while time.monotonic() < deadline:
            marker = f"b-{uuid.uuid4().hex}"
            started[marker] = time.monotonic()
            # A steady rate: the next message does not wait for this one's reply.
            task = asyncio.create_task(submit(marker))  # type: ignore[operator]
            in_flight.append(task)
            samples.sent += 1
            await asyncio.sleep(0.5)

    async def reading() -> None:
        n = 0
        while time.monotonic() < deadline:
            began = time.monotonic()
            await imap_command(reader, writer, b"r%d" % n, b"SEARCH ALL")
            samples.imap.append(time.monotonic() - began)
            n += 1
            await asyncio.sleep(0.25)
        writer.close()

    await asyncio.gather(sending(), reading())
    outcomes = await asyncio.gather(*in_flight, return_exceptions=True)
    samples.refused = sum(1 for outcome in outcomes if outcome is not True)
    await sink.wait_for(set(started), within=30)
    samples.delivery = [sink.arrived[m] - t for m, t in started.items() if m in sink.arrived]
    return samples


async def flood(seconds: float, senders: int, submit: object, open_imap: object) -> Samples:
    samples = Samples()
    deadline = time.monotonic() + seconds

    async def sender(index: int) -> None:
        while time.monotonic() < deadline:
            ok = await submit(index, f"a-{uuid.uuid4().hex}")  # type: ignore[operator]
            samples.sent += 1
            if not ok:
                samples.refused += 1
                await asyncio.sleep(0.05)

    async def searcher(index: int) -> None:
        reader, writer = await open_imap(index)  # type: ignore[operator]
        n = 0
        while time.monotonic() < deadline:
            reply = await imap_command(reader, writer, b"q%d" % n, b'SEARCH TEXT "hello"')
            n += 1
            if b" NO " in reply:
                await asyncio.sleep(0.05)
        writer.close()

    await asyncio.gather(*(sender(i) for i in range(senders)),
                         *(searcher(i) for i in range(5)), return_exceptions=True)
    return samples


async def flood_load(seconds: float, senders: int, shared: tuple[str, int] | None
                     ) -> tuple[int, int]:
    """A's load, (sent, refused); run in a process of its own (flood_elsewhere)."""

    async def main() -> Samples:
        if shared is None:
            async def a_submit(index: int, marker: str) -> bool:
                return await submit_via_router(f"a{index % A_ACCOUNTS}@a.example", marker)

            async def a_imap(index: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
                return await imap_session("127.0.0.1", IMAPS, f"a{index}@a.example", tls=True)

            return await flood(seconds, senders, a_submit, a_imap)
        smtp_socket, dovecot_pid = shared

        async def s_submit(index: int, marker: str) -> bool:
            return await submit_direct(smtp_socket, f"a{index % A_ACCOUNTS}@shared.example",
                                       marker)

        async def s_imap(index: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            return await imap_handed_over(dovecot_pid, f"a{index}@shared.example")

        return await flood(seconds, senders, s_submit, s_imap)

    outcome = await main()
    return outcome.sent, outcome.refused


async def flood_elsewhere(seconds: float, senders: int, shared: tuple[str, int] | None,
                          started: asyncio.Event) -> tuple[int, int]:
    """A's flood from a process of its own, at the lowest CPU priority (module
    docstring): driving 50 TLS clients must not slow the event loop that measures
    B.  `started` is set when its clients begin, once its imports are done."""
    return await in_own_process(flood_load, seconds, senders, shared,
                                within_s=seconds + 120, idle=True, started=started)


async def max_open_sends(pool: asyncpg.Pool, domain: str, since: float) -> int:
    rows = await pool.fetch(
        "SELECT started_at, ended_at FROM smtp_messages WHERE domain = $1 AND ended_at IS NOT"
        " NULL AND verdict = 'accept' AND started_at >= to_timestamp($2)", domain, since)
    points = sorted([(r["started_at"], 1) for r in rows] + [(r["ended_at"], -1) for r in rows],
                    key=lambda p: (p[0], p[1]))
    most = now = 0
    for _, step in points:
        now += step
        most = max(most, now)
    return most


async def start_platform(settings: Config, state_dir: Path) -> asyncio.subprocess.Process:
    return await start_up(settings, state_dir, SUBMISSION)


async def run(args: argparse.Namespace, state_dir: Path) -> None:
    sink = Sink()
    await sink.start()
    settings = config(state_dir)
    process = await start_platform(settings, state_dir)
    pool = await connect(settings)
    runtime = Runtime(runtime_settings(settings, name_prefix=settings.runtime.name_prefix),
                      pool)
    await runtime.open(fill_pool=False)
    try:
        hashed = hash_password(PASSWORD)
        async with pool.acquire() as db:
            for name in ("a.example", "b.example", "shared.example"):
                await domains.add(db, name)
            for i in range(A_ACCOUNTS):
                await accounts.add(db, f"a{i}@a.example", hashed)
                await accounts.add(db, f"a{i}@shared.example", hashed)
            await accounts.add(db, "b0@b.example", hashed)
            await accounts.add(db, "b0@shared.example", hashed)
            await limits.set_limit(db, "a.example", "concurrent_sends", A_LIMIT)
            await limits.set_limit(db, "a.example", "concurrent_sends", 2, per_account=True)
            await limits.set_limit(db, "a.example", "imap_heavy_concurrent", A_HEAVY_LIMIT)
        # Mailboxes to search, on both setups.
        for i in range(A_ACCOUNTS):
            for domain in ("a.example", "shared.example"):
                await preload(settings, f"a{i}@{domain}", 20)
        for domain in ("b.example", "shared.example"):
            await preload(settings, f"b0@{domain}", 50)

        async def b_submit(marker: str) -> bool:
            return await submit_via_router("b0@b.example", marker)

        async def b_imap() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            return await imap_session("127.0.0.1", IMAPS, "b0@b.example", tls=True)

        # Warm: a domain's Postfix and Dovecot start with its first sessions, and a
        # cold start is not what this benchmark measures (bench/cold_start.py does).
        # A is warmed too: a flooding domain is one whose containers are running.
        for user in ("b0@b.example", "a0@a.example"):
            assert await submit_via_router(user, f"warm-up-{user}"), \
                f"{user}'s warm-up submission was refused"
            _, writer = await imap_session("127.0.0.1", IMAPS, user, tls=True)
            writer.close()
        await sink.wait_for({"warm-up-b0@b.example", "warm-up-a0@a.example"}, within=60)
        await asyncio.sleep(SETTLE_S)   # the new containers' own start-up work
        print(f"B alone and B during A's flood ({args.senders} senders, limit {A_LIMIT};"
              f" 5 SEARCH sessions), {args.rounds} rounds of {args.seconds:g} s each")
        solo, onset, during = Samples(), Samples(), Samples()
        flood_started = time.time()
        a_sent = a_refused = 0
        for round_number in range(1, args.rounds + 1):
            solo_round = await quiet_domain(args.seconds, b_submit, b_imap, sink)
            started = asyncio.Event()
            flooding = asyncio.create_task(flood_elsewhere(
                ONSET_S + args.seconds + 2, args.senders, None, started))
            await started.wait()
            onset.add(await quiet_domain(ONSET_S, b_submit, b_imap, sink))
            during_round = await quiet_domain(args.seconds, b_submit, b_imap, sink)
            sent, refused = await flooding
            a_sent, a_refused = a_sent + sent, a_refused + refused
            print(f"  round {round_number}: B's p99 alone / during the flood: delivery"
                  f" {solo_round.p99_ms('delivery'):.0f} / {during_round.p99_ms('delivery'):.0f}"
                  f" ms, IMAP {solo_round.p99_ms('imap'):.1f} /"
                  f" {during_round.p99_ms('imap'):.1f} ms")
            solo.add(solo_round)
            during.add(during_round)
            # A's accepted mail is still on its way out: the next solo phase starts
            # once the flood's aftermath is gone.
            await asyncio.sleep(SETTLE_S)
        print(solo.line("B alone, mailfc"))
        print(onset.line(f"B in the flood's first {ONSET_S:g} s"))
        print(during.line("B during the flood, mailfc"))
        for reason, count in FAILURES.items():
            print(f"    B refused {count}x: {reason}")
        most = await max_open_sends(pool, "a.example", flood_started)
        print(f"  A: {a_sent} submissions tried, {a_refused} refused with 4xx;"
              f" most concurrent sends open: {most} (limit {A_LIMIT})")

        # The status quo: one shared Postfix and one shared Dovecot for both domains.
        postfix = await runtime.ensure("shared.example", "smtp")
        dovecot = await runtime.ensure("shared.example", "imap")
        # The shared servers get the CPU a whole box gives one server.
        await pool.execute("UPDATE container_specs SET cpu_quota_max_us = 200000"
                           " WHERE domain_id IS NULL")
        await runtime.update(postfix, cpu_quota_us=200000)
        await runtime.update(dovecot, cpu_quota_us=200000)
        assert dovecot.pid is not None
        smtp_socket, dovecot_pid = postfix.socket(), dovecot.pid

        async def s_b_submit(marker: str) -> bool:
            return await submit_direct(smtp_socket, "b0@shared.example", marker)

        async def s_b_imap() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            return await imap_handed_over(dovecot_pid, "b0@shared.example")

        started = asyncio.Event()
        flooding = asyncio.create_task(flood_elsewhere(
            ONSET_S + args.seconds + 2, args.senders, (smtp_socket, dovecot_pid), started))
        await started.wait()
        await asyncio.sleep(ONSET_S)
        shared = await quiet_domain(args.seconds, s_b_submit, s_b_imap, sink)
        s_sent, s_refused = await flooding
        print(shared.line("B during the flood, shared server"))
        print(f"  A on the shared server: {s_sent} submissions, {s_refused} refused")
        for label, values in (
                ("delivery", (solo.delivery, during.delivery, shared.delivery,
                              onset.delivery + during.delivery)),
                ("IMAP", (solo.imap, during.imap, shared.imap, onset.imap + during.imap))):
            p99 = [percentile(v, .99) for v in values]
            print(f"  B's {label} p99 during the flood / alone: mailfc "
                  f"{p99[1] / p99[0]:.2f}x (onset included {p99[3] / p99[0]:.2f}x),"
                  f" shared server {p99[2] / p99[0]:.2f}x (target on mailfc <= 1.5x)")
        print(f"  medians: delivery {statistics.median(solo.delivery) * 1000:.0f} ->"
              f" {statistics.median(during.delivery) * 1000:.0f} ms on mailfc")
    finally:
        for instance in await runtime.instances("shared.example"):
            await runtime.stop(instance)
        await runtime.close()
        await pool.close()
        process.send_signal(signal.SIGTERM)
        await process.wait()
        sink.stop()


async def preload(settings: Config, address: str, count: int,
                  content: Callable[[str], bytes] | None = None) -> None:
    """`count` messages into `address`'s INBOX through the LMTP Router; each is
    content(marker) (dot-stuffed), by default a small message()."""
    make = content or functools.partial(message, "seed@remote.example")
    reader, writer = await asyncio.open_unix_connection(
        str(settings.hops_dir / "lmtp-router.sock"))
    await read_reply(reader)
    for line in ("LHLO bench",):
        writer.write(line.encode() + b"\r\n")
        await read_reply(reader)
    for n in range(count):
        for line in ("MAIL FROM:<seed@remote.example>", f"RCPT TO:<{address}>", "DATA"):
            writer.write(line.encode() + b"\r\n")
            await read_reply(reader)
        writer.write(make(f"seed-{n}") + b".\r\n")
        await read_reply(reader)
    writer.write(b"QUIT\r\n")
    writer.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.noisy_neighbor",
                                     description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--mode", choices=("outbound", "inbound"), default="outbound",
                        help="A's flood: submission and SEARCH (outbound), or port 25 and"
                             " whole-mailbox FETCHes (inbound); see the module docstring")
    parser.add_argument("--seconds", type=float, default=15.0,
                        help="length of each measured phase")
    parser.add_argument("--rounds", type=int, default=3,
                        help="B alone, then B during A's flood, this many times")
    parser.add_argument("--senders", type=int, default=50)
    parser.add_argument("--mailbox", type=int, default=200,
                        help="inbound: messages (20 KB) in each of A's readers' mailboxes")
    args = parser.parse_args(argv)
    if args.mode == "inbound":
        # Imported here: bench.noisy_inbound builds on this module.
        from bench.noisy_inbound import run as run_inbound

        with scratch_state(config, bridge="mfcn0") as state_dir:
            asyncio.run(run_inbound(args, state_dir))
        return
    with scratch_state(config, bridge="mfcn0") as state_dir:
        asyncio.run(run(args, state_dir))


if __name__ == "__main__":
    main()
