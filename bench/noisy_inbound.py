"""The inbound mode of bench/noisy_neighbor: one domain's port-25 flood against another's mail.

    python -m bench.noisy_neighbor --mode inbound [--seconds 15] [--rounds 3] [--senders 50]
                                   [--mailbox 200]
    python -m bench.noisy_inbound [the same options]      # the same thing

What runs and what is reported is in bench/noisy_neighbor.py's manual (INBOUND MODE);
this module is how.

B's delivery is timed from the SMTP connect of its sending client until the message's
file is in B's maildir: a task of the measuring loop (MaildirWatch) polls B's new/
(a stat every POLL_S, a listing when its modification time moved) and notes when each
file name first shows, and cur/ alike (B's IMAP session moves a file from new/ to cur/
at its next NOOP, possibly before a poll saw it in new/).  Before Linux 6.13's
fine-grained timestamps a directory's modification time had the kernel's tick as its
resolution, so a directory changed within RECENT_S is listed at every poll until it is
older.  Which file is which message is read afterwards from its X-Mark header.
Resolution: POLL_S plus the loop's wake-up; the watch costs a few per cent of a CPU.

A's accepted rate is counted from the flood's own clients (the time of each 250 after
the end of data), in the windows of B's phases; the flood's accepted mail must all be
in A's maildirs before the next phase of B alone starts (the drain time is printed).

The shared baseline (its inbound path): mailfc's own Postfix containers take no
port-25 mail (inbound mail goes SMTP-In -> LMTP Router -> the domain's Dovecot; a
domain's Postfix only sends), so the shared Postfix here is a host Postfix of the
benchmark (bench.smtp_in.postfix_reference: the same binaries as the containers', whose
/usr is the host's), on SHARED_SMTP, relaying shared.example by LMTP into the one shared
Dovecot container (its lmtp socket, 8 deliveries at once), as bench/smtp_in.py's
reference does.  Its IMAP sessions are handed straight to that Dovecot, as in the
outbound mode (that container has no TLS listener of its own): the shared baseline
spends no CPU on TLS for A's fetches, which flatters it.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import functools
import os
import signal
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.noisy_neighbor import (
    IMAPS,
    ONSET_S,
    PASSWORD,
    SETTLE_S,
    Samples,
    config,
    imap_handed_over,
    imap_session,
    message,
    percentile,
    preload,
    start_platform,
)
from bench.platform import ACCEPTED, dot_stuffed, in_own_process, mark_of, send_message
from bench.smtp_in import postfix_reference
from mailfc.db import accounts, connect, domains
from mailfc.passwords import hash_password
from mailfc.runtime.images import container_socket
from mailfc.runtime.lifecycle import Runtime
from mailfc.runtime.settings import from_config as runtime_settings

A, B, SHARED = "a.example", "b.example", "shared.example"
# The shared baseline's Postfix (a host Postfix of this benchmark), beside the
# outbound mode's ports (bench.noisy_neighbor.config: SMTP-In is 22025).
SHARED_SMTP = 22026
OUTSIDE = "friend@remote.example"
# A's users: READERS (r0..r9) fetch their preloaded mailboxes; the flood goes to
# FLOOD_RECIPIENTS others (a0..a9), so what a reader fetches does not grow with it.
READERS = 10
FLOOD_RECIPIENTS = 10
B_SEND_EVERY_S = 0.1
B_ROUND_EVERY_S = 0.2
# B's IMAP round: what a mail client polling for new mail does.
B_ROUND = (b"NOOP", b"FETCH * (FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT X-MARK)])")
B_MAILBOX = 50
# A refused client (4xx, a NO) waits this long before it tries again, as in the
# outbound mode.
REFUSED_PAUSE_S = 0.05
# The flood runs past the end of B's phases by this much, so B's last messages of a
# phase still meet it.
FLOOD_SLACK_S = 2.0
DRAIN_WITHIN_S = 180.0
ARRIVAL_WITHIN_S = 60.0
POLL_S = 0.002
RECENT_S = 0.005
# About 20 KB: ordinary text lines.
LINE = b"Ordinary text to fill a message of twenty kilobytes, line after line.\r\n"
BODY_20KB = LINE * (20 * 1024 // len(LINE) + 1)


def big_message(recipient: str, marker: str) -> bytes:
    """A 20 KB message to `recipient`, dot-stuffed (no line of it starts with a dot),
    a Message-ID of its own."""
    return (f"From: <{OUTSIDE}>\r\nTo: <{recipient}>\r\nSubject: flood\r\n"
            f"Message-ID: <{uuid.uuid4().hex}@flood.bench>\r\nX-Mark: {marker}\r\n\r\n"
            ).encode() + BODY_20KB


def maildir_of(mail_root: Path, address: str) -> Path:
    """Where Dovecot keeps `address`'s INBOX (as bench.platform.maildir_files finds it)."""
    localpart, _, domain = address.partition("@")
    return mail_root / domain / localpart / "Maildir"


def delivered_to(mail_root: Path, domain: str) -> int:
    """How many messages A's flood recipients in `domain` have (nobody reads them)."""
    total = 0
    for index in range(FLOOD_RECIPIENTS):
        maildir = maildir_of(mail_root, f"a{index}@{domain}")
        for sub in ("new", "cur"):
            with contextlib.suppress(FileNotFoundError):
                total += len(os.listdir(maildir / sub))
    return total


async def drained(mail_root: Path, domain: str, expected: int) -> float | None:
    """Seconds until the flood recipients of `domain` hold `expected` messages; None
    if they did not within DRAIN_WITHIN_S."""
    began = time.monotonic()
    while await asyncio.to_thread(delivered_to, mail_root, domain) < expected:
        if time.monotonic() - began > DRAIN_WITHIN_S:
            return None
        await asyncio.sleep(0.25)
    return time.monotonic() - began


async def imap_exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                        tag: bytes, command: bytes) -> tuple[bytes, int]:
    """One command and its whole response: (the tagged reply, bytes received).  A
    literal ({n} at a line's end) is read whole, not line by line: a 4 MB FETCH is
    read at the cost of its literals, not of its 60,000 lines."""
    writer.write(tag + b" " + command + b"\r\n")
    received = 0
    while True:
        line = await reader.readuntil(b"\n")
        received += len(line)
        if line.startswith(tag + b" "):
            return line, received
        if line.endswith(b"}\r\n") and b"{" in line:
            size = int(line[line.rindex(b"{") + 1:-3])
            await reader.readexactly(size)
            received += size


def answered_ok(reply: bytes) -> bool:
    return reply.split(b" ", 2)[1:2] == [b"OK"]


OpenImap = Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


class MaildirWatch:
    """When each message file of one maildir first showed in new/ or cur/ (module
    docstring), and which X-Mark each carries."""

    def __init__(self, maildir: Path) -> None:
        self.maildir = maildir
        self.first_seen: dict[str, float] = {}      # file name before ":2,<flags>"
        self.marks: dict[str, str] = {}             # the same name -> its X-Mark
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._poll())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _poll(self) -> None:
        directories = [str(self.maildir / sub) for sub in ("new", "cur")]
        last_mtime: dict[str, int] = {}
        last_listed: dict[str, set[str]] = {directory: set() for directory in directories}
        recent_ns = int(RECENT_S * 1e9)
        while True:
            now = time.monotonic()
            now_ns = time.time_ns()
            for directory in directories:
                try:
                    mtime = os.stat(directory).st_mtime_ns
                except FileNotFoundError:
                    continue
                if mtime == last_mtime.get(directory) and now_ns - mtime > recent_ns:
                    continue
                last_mtime[directory] = mtime
                # Only the names not listed last time are looked at: cur/ grows to
                # a thousand files or so, and this loop times B.
                listed = set(os.listdir(directory))
                for name in listed - last_listed[directory]:
                    self.first_seen.setdefault(name.partition(":")[0], now)
                last_listed[directory] = listed
            await asyncio.sleep(POLL_S)

    def _read_marks(self) -> None:
        for sub in ("new", "cur"):
            with contextlib.suppress(FileNotFoundError), os.scandir(self.maildir / sub) as found:
                for entry in found:
                    name = entry.name.partition(":")[0]
                    if name in self.marks or name not in self.first_seen:
                        continue
                    try:
                        with open(entry.path, "rb") as handle:
                            head = handle.read(8192)
                    except FileNotFoundError:       # moved to cur/ meanwhile: next time
                        continue
                    self.marks[name] = mark_of(head.replace(b"\r\n", b"\n").split(b"\n\n")[0])

    async def arrivals(self, markers: set[str], within: float) -> dict[str, float]:
        """marker -> when its file first showed, for those of `markers` that are in the
        maildir within `within` seconds (all of them, or what came by then)."""
        deadline = time.monotonic() + within
        while True:
            await asyncio.to_thread(self._read_marks)
            found = {mark: self.first_seen[name] for name, mark in self.marks.items()
                     if mark in markers}
            if len(found) == len(markers) or time.monotonic() > deadline:
                return found
            await asyncio.sleep(0.1)


# -- B's load --------------------------------------------------------------------------

@dataclass
class Phase:
    """B during one phase: its samples, when its clock ran, and when each message it
    had accepted began (SMTP connect), until deliveries() turns them into latencies."""
    samples: Samples
    began: float
    ended: float
    connected_at: dict[str, float] = field(default_factory=dict)


async def quiet_inbound(seconds: float, smtp_port: int, recipient: str, open_imap: OpenImap,
                        refusals: collections.Counter[str]) -> Phase:
    """B for `seconds`: a message to `recipient` every B_SEND_EVERY_S on `smtp_port`
    (at a steady rate: the next does not wait for this one's reply), an IMAP round
    (B_ROUND) every B_ROUND_EVERY_S on a session opened before the clock starts."""
    samples = Samples()
    connected_at: dict[str, float] = {}
    in_flight: list[asyncio.Task[tuple[str, str, str]]] = []
    reader, writer = await open_imap()
    began = time.monotonic()
    deadline = began + seconds

    async def one(marker: str) -> tuple[str, str, str]:
        """(marker, outcome, last reply) of one message to B."""
        connected_at[marker] = time.monotonic()
        outcome, text = await send_message("127.0.0.1", smtp_port, OUTSIDE, [recipient],
                                           dot_stuffed(message(OUTSIDE, marker)),
                                           timeout_s=60)
        return marker, outcome, text

    async def sending() -> None:
        while time.monotonic() < deadline:
            in_flight.append(asyncio.create_task(one(f"b-{uuid.uuid4().hex}")))
            samples.sent += 1
            await asyncio.sleep(B_SEND_EVERY_S)

    async def reading() -> None:
        n = 0
        while time.monotonic() < deadline:
            round_began = time.monotonic()
            for command in B_ROUND:
                await imap_exchange(reader, writer, b"b%d" % n, command)
                n += 1
            samples.imap.append(time.monotonic() - round_began)
            await asyncio.sleep(B_ROUND_EVERY_S)
        writer.close()

    await asyncio.gather(sending(), reading())
    ended = time.monotonic()
    for marker, outcome, text in await asyncio.gather(*in_flight):
        if outcome != ACCEPTED:
            samples.refused += 1
            refusals[f"{outcome}: {text[:60]}"] += 1
            del connected_at[marker]
    return Phase(samples, began, ended, connected_at)


async def deliveries(phase: Phase, watch: MaildirWatch) -> Samples:
    """The phase's samples with its deliveries: connect to file, for each accepted
    message that is in the maildir within ARRIVAL_WITHIN_S."""
    arrived = await watch.arrivals(set(phase.connected_at), within=ARRIVAL_WITHIN_S)
    phase.samples.delivery = [arrived[m] - t for m, t in phase.connected_at.items()
                              if m in arrived]
    return phase.samples


# -- A's flood ----------------------------------------------------------------------------

@dataclass
class Flood:
    """What A's flood clients saw: when each accepted message got its 250, how many
    were refused, and when each whole-mailbox FETCH ended with how many bytes."""
    accepted_at: list[float] = field(default_factory=list)
    refused: int = 0
    fetched: list[tuple[float, int]] = field(default_factory=list)
    reader_errors: int = 0

    def accepted_between(self, begin: float, end: float) -> int:
        return sum(1 for at in self.accepted_at if begin <= at < end)

    def fetched_between(self, begin: float, end: float) -> int:
        """Bytes of the FETCHes that ended in the window."""
        return sum(size for at, size in self.fetched if begin <= at < end)


async def inbound_flood(seconds: float, senders: int, smtp_port: int, domain: str,
                        dovecot_pid: int | None) -> Flood:
    """A's flood, in a process of its own (flood_elsewhere): `senders` port-25 clients
    sending a 20 KB message each to one of A's flood recipients, back to back (one
    message per connection), and READERS sessions fetching their whole mailbox again
    and again, over IMAPS on mailfc (`dovecot_pid` None) or handed to the shared
    Dovecot whose init is `dovecot_pid`."""
    flood = Flood()
    deadline = time.monotonic() + seconds

    async def sender(index: int) -> None:
        recipient = f"a{index % FLOOD_RECIPIENTS}@{domain}"
        while time.monotonic() < deadline:
            outcome, _ = await send_message("127.0.0.1", smtp_port, OUTSIDE, [recipient],
                                            big_message(recipient, "flood"), timeout_s=60)
            if outcome == ACCEPTED:
                flood.accepted_at.append(time.monotonic())
            else:
                flood.refused += 1
                await asyncio.sleep(REFUSED_PAUSE_S)

    async def reader(index: int) -> None:
        user = f"r{index}@{domain}"
        while time.monotonic() < deadline:
            try:
                if dovecot_pid is None:
                    imap, writer = await imap_session("127.0.0.1", IMAPS, user, tls=True)
                else:
                    imap, writer = await imap_handed_over(dovecot_pid, user)
            except (OSError, asyncio.IncompleteReadError, ssl.SSLError):
                flood.reader_errors += 1
                await asyncio.sleep(REFUSED_PAUSE_S)
                continue
            try:
                n = 0
                while time.monotonic() < deadline:
                    reply, size = await imap_exchange(imap, writer, b"f%d" % n,
                                                      b"FETCH 1:* BODY.PEEK[]")
                    n += 1
                    if answered_ok(reply):
                        flood.fetched.append((time.monotonic(), size))
                        continue
                    await asyncio.sleep(REFUSED_PAUSE_S)
                    if reply.split(b" ", 2)[1:2] == [b"BAD"]:   # no mailbox: log in again
                        flood.reader_errors += 1
                        break
            except (OSError, asyncio.IncompleteReadError, ssl.SSLError):
                flood.reader_errors += 1
                await asyncio.sleep(REFUSED_PAUSE_S)
            finally:
                writer.close()

    await asyncio.gather(*(sender(i) for i in range(senders)),
                         *(reader(i) for i in range(READERS)))
    return flood


async def flood_elsewhere(seconds: float, senders: int, smtp_port: int, domain: str,
                          dovecot_pid: int | None, started: asyncio.Event) -> Flood:
    """A's flood at the lowest CPU priority, as in the outbound mode (bench.noisy_neighbor
    flood_elsewhere); `started` is set when its clients begin."""
    return await in_own_process(inbound_flood, seconds, senders, smtp_port, domain,
                                dovecot_pid, within_s=seconds + 120, idle=True,
                                started=started)


# -- the run -------------------------------------------------------------------------------

@dataclass
class Rate:
    """A count over the seconds it took, summed over rounds."""
    count: float = 0.0
    seconds: float = 0.0

    def add(self, count: float, seconds: float) -> None:
        self.count += count
        self.seconds += seconds

    def per_s(self) -> float:
        return self.count / self.seconds if self.seconds else float("nan")


def ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else float("nan")


def p99_ratio(during: list[float], alone: list[float]) -> float:
    return ratio(percentile(during, .99), percentile(alone, .99))


def more_or_fewer(share: float) -> str:
    """0.92 -> "8% fewer", 1.1 -> "10% more"."""
    return f"{abs(share - 1) * 100:.0f}% {'fewer' if share < 1 else 'more'}"


async def run(args: argparse.Namespace, state_dir: Path) -> None:
    settings = config(state_dir)
    smtp_in = int(settings.listen.smtp_in.rpartition(":")[2])
    mail_root = settings.mail_root
    process = await start_platform(settings, state_dir)
    pool = await connect(settings)
    runtime = Runtime(runtime_settings(settings, name_prefix=settings.runtime.name_prefix),
                      pool)
    await runtime.open(fill_pool=False)
    postfix: list[str] | None = None
    watches: list[MaildirWatch] = []
    try:
        # No limits: a new install's defaults.
        hashed = hash_password(PASSWORD)
        async with pool.acquire() as db:
            for name in (A, B, SHARED):
                await domains.add(db, name)
            for domain in (A, SHARED):
                for i in range(READERS):
                    await accounts.add(db, f"r{i}@{domain}", hashed)
                for i in range(FLOOD_RECIPIENTS):
                    await accounts.add(db, f"a{i}@{domain}", hashed)
            for domain in (B, SHARED):
                await accounts.add(db, f"b0@{domain}", hashed)
        await asyncio.gather(
            *(preload(settings, f"r{i}@{domain}", args.mailbox,
                      content=functools.partial(big_message, f"r{i}@{domain}"))
              for i in range(READERS) for domain in (A, SHARED)),
            *(preload(settings, f"b0@{domain}", B_MAILBOX) for domain in (B, SHARED)))
        b_watch = MaildirWatch(maildir_of(mail_root, f"b0@{B}"))
        b_watch.start()
        watches.append(b_watch)
        refusals: collections.Counter[str] = collections.Counter()

        async def b_imap() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            return await imap_session("127.0.0.1", IMAPS, f"b0@{B}", tls=True)

        # Warm: containers running, every hop has carried a message (cold starts are
        # bench/cold_start.py's).
        for recipient, reader in ((f"b0@{B}", f"b0@{B}"), (f"a0@{A}", f"r0@{A}")):
            outcome, text = await send_message(
                "127.0.0.1", smtp_in, OUTSIDE, [recipient],
                dot_stuffed(message(OUTSIDE, f"warm-up-{recipient}")))
            assert outcome == ACCEPTED, f"the warm-up message to {recipient}: {text}"
            _, writer = await imap_session("127.0.0.1", IMAPS, reader, tls=True)
            writer.close()
        assert await b_watch.arrivals({f"warm-up-b0@{B}"}, within=60), \
            "B's warm-up message did not arrive"
        await asyncio.sleep(SETTLE_S)   # the new containers' own start-up work

        print(f"Inbound: B alone and B during A's port-25 flood ({args.senders} senders of"
              f" 20 KB messages; {READERS} IMAPS readers fetching {args.mailbox}-message"
              f" mailboxes), no limits set, {args.rounds} rounds of {args.seconds:g} s each")
        solo, onset, during = Samples(), Samples(), Samples()
        onset_accepted, during_accepted, fetched = Rate(), Rate(), Rate()
        a_refused = a_reader_errors = 0
        for round_number in range(1, args.rounds + 1):
            solo_round = await deliveries(
                await quiet_inbound(args.seconds, smtp_in, f"b0@{B}", b_imap, refusals),
                b_watch)
            before = await asyncio.to_thread(delivered_to, mail_root, A)
            started = asyncio.Event()
            flooding = asyncio.create_task(flood_elsewhere(
                ONSET_S + args.seconds + FLOOD_SLACK_S, args.senders, smtp_in, A, None,
                started))
            await started.wait()
            flood_began = time.monotonic()
            onset_phase = await quiet_inbound(ONSET_S, smtp_in, f"b0@{B}", b_imap, refusals)
            during_phase = await quiet_inbound(args.seconds, smtp_in, f"b0@{B}", b_imap,
                                               refusals)
            flood = await flooding
            drain_s = await drained(mail_root, A, before + len(flood.accepted_at))
            onset.add(await deliveries(onset_phase, b_watch))
            during_round = await deliveries(during_phase, b_watch)
            window = (during_phase.began, during_phase.ended)
            onset_accepted.add(flood.accepted_between(flood_began, during_phase.began),
                               during_phase.began - flood_began)
            during_accepted.add(flood.accepted_between(*window), window[1] - window[0])
            fetched.add(flood.fetched_between(*window), window[1] - window[0])
            a_refused += flood.refused
            a_reader_errors += flood.reader_errors
            drained_text = (f"A's accepted mail all delivered {drain_s:.1f} s after the flood"
                            if drain_s is not None else
                            f"A's accepted mail NOT all delivered {DRAIN_WITHIN_S:g} s after"
                            " the flood")
            print(f"  round {round_number}: B's p99 alone / during the flood: delivery"
                  f" {solo_round.p99_ms('delivery'):.0f} / {during_round.p99_ms('delivery'):.0f}"
                  f" ms, IMAP {solo_round.p99_ms('imap'):.1f} /"
                  f" {during_round.p99_ms('imap'):.1f} ms; A accepted"
                  f" {flood.accepted_between(*window) / (window[1] - window[0]):.0f} msgs/s;"
                  f" {drained_text}")
            solo.add(solo_round)
            during.add(during_round)
            if round_number < args.rounds:
                # The flood's aftermath, before B alone again.  The shared baseline
                # needs no such pause: its B is measured past the flood's onset.
                await asyncio.sleep(SETTLE_S)

        # The status quo: one shared Postfix and one shared Dovecot for both domains.
        dovecot = await runtime.ensure(SHARED, "imap")
        # The shared server gets the CPU a whole box gives one server.
        await pool.execute("UPDATE container_specs SET cpu_quota_max_us = 200000"
                           " WHERE domain_id IS NULL")
        await runtime.update(dovecot, cpu_quota_us=200000)
        assert dovecot.pid is not None
        dovecot_pid = dovecot.pid
        postfix, _ = await asyncio.to_thread(
            postfix_reference, state_dir / "shared-postfix", port=SHARED_SMTP,
            routing=f"relay_domains = {SHARED}\n"
                    f"relay_transport = lmtp:unix:{container_socket(dovecot_pid, 'lmtp')}")
        s_watch = MaildirWatch(maildir_of(mail_root, f"b0@{SHARED}"))
        s_watch.start()
        watches.append(s_watch)

        async def s_b_imap() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            return await imap_handed_over(dovecot_pid, f"b0@{SHARED}")

        for recipient in (f"b0@{SHARED}", f"a0@{SHARED}"):
            outcome, text = await send_message(
                "127.0.0.1", SHARED_SMTP, OUTSIDE, [recipient],
                dot_stuffed(message(OUTSIDE, f"warm-up-{recipient}")))
            assert outcome == ACCEPTED, f"the shared Postfix refused {recipient}: {text}"
        assert await s_watch.arrivals({f"warm-up-b0@{SHARED}"}, within=60), \
            "B's warm-up message did not arrive through the shared Postfix"
        started = asyncio.Event()
        flooding = asyncio.create_task(flood_elsewhere(
            ONSET_S + args.seconds + FLOOD_SLACK_S, args.senders, SHARED_SMTP, SHARED,
            dovecot_pid, started))
        await started.wait()
        await asyncio.sleep(ONSET_S)
        shared_phase = await quiet_inbound(args.seconds, SHARED_SMTP, f"b0@{SHARED}",
                                           s_b_imap, refusals)
        s_flood = await flooding
        shared = await deliveries(shared_phase, s_watch)
        s_window = (shared_phase.began, shared_phase.ended)

        for label, samples in (("B alone, mailfc", solo),
                               (f"B in the flood's first {ONSET_S:g} s", onset),
                               ("B during the flood, mailfc", during),
                               ("B during the flood, shared server", shared)):
            print(samples.line(label, unit="rounds"))
        for reason, count in refusals.items():
            print(f"    B refused {count}x: {reason}")
        s_seconds = s_window[1] - s_window[0]
        a_rate = during_accepted.per_s()
        s_rate = ratio(s_flood.accepted_between(*s_window), s_seconds)
        print(f"  A accepted (port 25): mailfc {a_rate:.0f} msgs/s during the flood"
              f" ({onset_accepted.per_s():.0f} msgs/s in its first {ONSET_S:g} s),"
              f" {a_refused} not accepted (4xx, or lost); shared server {s_rate:.0f} msgs/s,"
              f" {s_flood.refused} not accepted")
        print(f"  A's accepted rate during the flood, mailfc / shared server:"
              f" {ratio(a_rate, s_rate):.2f} ({more_or_fewer(ratio(a_rate, s_rate))} on mailfc)")
        print(f"  A's readers fetched: mailfc {fetched.per_s() / 1e6:.1f} MB/s, shared server"
              f" {s_flood.fetched_between(*s_window) / s_seconds / 1e6:.1f} MB/s"
              f" (sessions lost: {a_reader_errors} / {s_flood.reader_errors})")
        for label, alone, mailfc, shared_values, with_onset in (
                ("delivery", solo.delivery, during.delivery, shared.delivery,
                 onset.delivery + during.delivery),
                ("IMAP", solo.imap, during.imap, shared.imap, onset.imap + during.imap)):
            print(f"  B's {label} p99 during the flood / alone: mailfc"
                  f" {p99_ratio(mailfc, alone):.2f}x (target <= 1.5x), onset included"
                  f" {p99_ratio(with_onset, alone):.2f}x (target <= 2x);"
                  f" shared server {p99_ratio(shared_values, alone):.2f}x")
    finally:
        for watch in watches:
            watch.stop()
        if postfix is not None:
            await asyncio.to_thread(subprocess.run, [*postfix, "stop"], capture_output=True,
                                    check=False)
        for instance in await runtime.instances(SHARED):
            await runtime.stop(instance)
        await runtime.close()
        await pool.close()
        process.send_signal(signal.SIGTERM)
        await process.wait()


if __name__ == "__main__":
    from bench.noisy_neighbor import main

    main(["--mode", "inbound", *sys.argv[1:]])
