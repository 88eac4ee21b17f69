"""Benchmark: big messages in and out; throughput against Postfix, memory of every process.

    python -m bench.big_messages [--seconds 30] [--clients 8] [--size-mb 40]

Runs a whole platform as an admin runs it (`mailfc up`, its own embedded PostgreSQL,
bridge mfcz0, subnet 10.102.0.0/24, container prefix mfcz, ports 28xxx) and a remote MX
of the benchmark (bench.platform.Sink on 127.0.0.1:28525, a process of its own that keeps
a digest of each message, never the message).  Then four loads, one after another, each
--clients clients sending --size-mb MB messages (a MIME mail with a base64 attachment),
one after another per client, for --seconds:

  in,  mailfc    port 25 (SMTP-In -> spool -> LMTP Router -> Dovecot) to a hosted mailbox
  in,  Postfix   a host Postfix of the benchmark (bench.smtp_in.postfix_reference) taking
                 the same load (plain SMTP, as on port 25) and relaying it by LMTP into the
                 same domain's Dovecot
  out, mailfc    port 587 (STARTTLS, AUTH) -> submission router -> the domain's Postfix
                 -> Filter-Out -> SMTP-Out -> the remote MX
  out, Postfix   the host Postfix relaying the same load to the same remote MX (STARTTLS
                 too; no AUTH: it has no SASL, its clients are its mynetworks)

A load counts from its start until the last message its clients got 250 for has arrived
(maildir or remote MX); it prints msgs/s and MB/s, the ratio of MB/s mailfc / Postfix
(target: at least 0.8), and for every mailfc process its RSS when idle (before the first
load), its peak RSS during the mailfc loads (VmHWM of /proc/<pid>/status, reset through
clear_refs before each load, and VmRSS sampled every 0.1 s), the growth (target: at
most 64 MB above idle, whatever the message size) and the CPU seconds it used during
each mailfc load (to tell which hop a slow figure waits on).

Everything stops by itself: a load ends after --seconds plus the messages in flight, a
drain waits at most --drain seconds.  The platform, the host Postfix and the sink are
stopped by their pids; the state directory and the bridge are removed.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from email.utils import formatdate
from pathlib import Path

from bench.platform import (
    ACCEPTED,
    Sink,
    Up,
    container_pid,
    cpu_seconds,
    dot_stuffed,
    in_own_process,
    maildir_marks,
    memory_kb,
    reset_peak,
    scratch_state,
    send_message,
    trusting_client_tls,
    whole_platform_config,
)
from bench.smtp_in import postfix_reference
from mailfc.config import Config
from mailfc.db import accounts, connect, domains
from mailfc.passwords import hash_password
from mailfc.runtime.images import container_socket
from mailfc.tls import certificate_paths

DOMAIN = "big.bench.example"
USER = f"bea@{DOMAIN}"
OUTSIDE = "friend@remote.example"
PASSWORD = "big-bench-password"
BASE = 28000
SMTP_IN, SUBMISSION, MX_PORT, POSTFIX = BASE + 25, BASE + 587, BASE + 525, BASE + 26
BRIDGE = "mfcz0"
TARGET_RATIO = 0.8
TARGET_GROWTH_MB = 64


def config(state_dir: Path) -> Config:
    # The same concurrency towards the domain's Dovecot as the reference Postfix
    # (lmtp_destination_concurrency_limit = 8).
    return whole_platform_config(state_dir, base=BASE, name="big", subnet="10.102.0.0/24",
                                 prefix="mfcz", spool={"per_domain_concurrency": 8})


# -- the load, in a process of its own (bench.platform.in_own_process) ---------------------

def attachment_body(size: int) -> bytes:
    raw = os.urandom(max(size * 3 // 4 - 1024, 1))
    return (b"This is a multi-part message in MIME format.\r\n--b1\r\n"
            b"Content-Type: text/plain; charset=us-ascii\r\n\r\nThe attachment.\r\n--b1\r\n"
            b"Content-Type: application/octet-stream; name=\"big.bin\"\r\n"
            b"Content-Transfer-Encoding: base64\r\n\r\n"
            + base64.encodebytes(raw).replace(b"\n", b"\r\n") + b"--b1--\r\n")


def header(mark: str, sender: str, recipient: str) -> bytes:
    return (f"From: <{sender}>\r\nTo: <{recipient}>\r\nSubject: big {mark}\r\n"
            f"Date: {formatdate()}\r\nMessage-ID: <{uuid.uuid4().hex}@bench>\r\n"
            f"X-Mark: {mark}\r\nMIME-Version: 1.0\r\n"
            "Content-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n").encode()


async def client_load(port: int, sender: str, recipient: str, size: int, clients: int,
                      seconds: float, tls: bool, password: str, prefix: str
                      ) -> list[tuple[str, str, str, int]]:
    """`clients` clients sending one message after another for `seconds` (each at least
    one): (mark, outcome, last reply, bytes) of each."""
    body = dot_stuffed(attachment_body(size))
    context = trusting_client_tls() if tls else None
    login = (sender, password) if password else None
    deadline = time.monotonic() + seconds
    results: list[tuple[str, str, str, int]] = []

    async def client(index: int) -> None:
        n = 0
        while n == 0 or time.monotonic() < deadline:
            mark = f"{prefix}-{index}-{n}"
            data = dot_stuffed(header(mark, sender, recipient)) + body
            outcome, reply = await send_message("127.0.0.1", port, sender, [recipient], data,
                                                tls=context, login=login, timeout_s=300)
            results.append((mark, outcome, reply, len(data)))
            n += 1
            if outcome != ACCEPTED:
                await asyncio.sleep(0.5)

    await asyncio.gather(*(client(i) for i in range(clients)))
    return results


# -- measuring ------------------------------------------------------------------------------

@dataclass
class Figure:
    label: str
    accepted: int = 0
    refused: dict[str, int] = field(default_factory=dict)
    delivered: int = 0
    megabytes: float = 0.0
    seconds: float = 0.0

    @property
    def rate(self) -> float:
        return self.delivered / self.seconds if self.seconds else 0.0

    @property
    def throughput(self) -> float:
        return self.megabytes / self.seconds if self.seconds else 0.0

    def line(self) -> str:
        refused = sum(self.refused.values())
        return (f"  {self.label:<30} {self.delivered:4d}/{self.accepted:<4d} delivered in "
                f"{self.seconds:6.1f} s: {self.rate:5.2f} msgs/s, {self.throughput:6.1f} MB/s"
                + (f"  ({refused} not accepted)" if refused else ""))


@dataclass
class Memory:
    """RSS of each mailfc process: idle, and the peak during the mailfc loads; and the
    CPU seconds each used during them (where the time of a slow hop goes)."""

    pids: dict[str, int]
    idle_kb: dict[str, int]
    peak_kb: dict[str, dict[str, int]] = field(default_factory=dict)
    cpu_s: dict[str, dict[str, float]] = field(default_factory=dict)

    @classmethod
    def at_idle(cls, up: Up) -> Memory:
        pids = up.processes()
        return cls(pids, {name: memory_kb(pid).get("VmRSS", 0) for name, pid in pids.items()})

    def reset(self, load: str) -> None:
        self.cpu_s[load] = {name: -cpu_seconds(pid) for name, pid in self.pids.items()}
        for pid in self.pids.values():
            reset_peak(pid)

    def ended(self, load: str) -> None:
        for name, pid in self.pids.items():
            self.cpu_s[load][name] += cpu_seconds(pid)

    def sample(self, load: str) -> None:
        peaks = self.peak_kb.setdefault(load, {})
        for name, pid in self.pids.items():
            status = memory_kb(pid)
            peaks[name] = max(peaks.get(name, 0), status.get("VmRSS", 0),
                              status.get("VmHWM", 0))

    def report(self, up: Up) -> list[str]:
        now = up.processes()
        loads = list(self.peak_kb)
        lines = [f"  {'process':<12} {'idle':>7} " + " ".join(f"{'peak ' + name:>9}"
                                                             for name in loads)
                 + f" {'growth':>7}  " + "".join(f"  cpu {name:>4}" for name in loads)
                 + f"  (MB; target growth <= {TARGET_GROWTH_MB})"]
        for name, idle in self.idle_kb.items():
            peaks = [self.peak_kb[load].get(name, 0) for load in loads]
            growth = (max(peaks) - idle) / 1024 if peaks else 0.0
            note = "" if now.get(name) == self.pids[name] else "  (restarted during the run!)"
            verdict = "ok" if growth <= TARGET_GROWTH_MB else "OVER"
            lines.append(f"  {name:<12} {idle / 1024:7.1f} "
                         + " ".join(f"{peak / 1024:9.1f}" for peak in peaks)
                         + f" {growth:7.1f}  {verdict:<4}"
                         + "".join(f" {self.cpu_s[load].get(name, 0.0):7.1f} s"
                                   for load in loads) + note)
        return lines


async def measure(label: str, port: int, sender: str, recipient: str, args: argparse.Namespace,
                  *, tls: bool, password: str, arrived: Callable[[], set[str]],
                  memory: Memory | None = None, memory_label: str = "") -> Figure:
    prefix = f"{label.replace(' ', '')}-{uuid.uuid4().hex[:6]}"
    figure = Figure(label)
    sampling = True

    async def sampler() -> None:
        while sampling and memory is not None:
            memory.sample(memory_label)
            await asyncio.sleep(0.1)

    if memory is not None:
        memory.reset(memory_label)
    watcher = asyncio.create_task(sampler())
    began = time.monotonic()
    try:
        results = await in_own_process(
            client_load, port, sender, recipient, args.size_mb << 20, args.clients,
            args.seconds, tls, password, prefix, within_s=args.seconds + 600)
        accepted = {mark: size for mark, outcome, _, size in results if outcome == ACCEPTED}
        for _, outcome, reply, _ in results:
            if outcome != ACCEPTED:
                key = f"{outcome}: {reply[:60]}"
                figure.refused[key] = figure.refused.get(key, 0) + 1
        figure.accepted = len(accepted)
        deadline = time.monotonic() + args.drain
        done: set[str] = set()
        while time.monotonic() < deadline:
            done = await asyncio.to_thread(arrived) & set(accepted)
            if len(done) == len(accepted):
                break
            await asyncio.sleep(0.25)
        figure.seconds = time.monotonic() - began
        figure.delivered = len(done)
        figure.megabytes = sum(accepted[mark] for mark in done) / 1e6
    finally:
        sampling = False
        await watcher
    if memory is not None:
        memory.sample(memory_label)
        memory.ended(memory_label)
    return figure


def reference_routing(dovecot_pid: int, cert: Path, key: Path) -> str:
    return (f"relay_domains = {DOMAIN}\n"
            f"relay_transport = lmtp:unix:{container_socket(dovecot_pid, 'lmtp')}\n"
            f"relayhost = [127.0.0.1]:{MX_PORT}\n"
            "message_size_limit = 209715200\n"
            f"smtpd_tls_cert_file = {cert}\nsmtpd_tls_key_file = {key}\n"
            "smtpd_tls_security_level = may\n")


async def run(args: argparse.Namespace, state_dir: Path) -> None:
    settings = config(state_dir)
    sink = Sink(MX_PORT, state_dir / "sink.jsonl")
    await asyncio.to_thread(sink.start)
    up = Up(settings, state_dir, SMTP_IN)
    postfix: list[str] | None = None
    pool = None
    try:
        await up.start()
        pool = await connect(settings)
        async with pool.acquire() as db:
            await domains.add(db, DOMAIN)
            await accounts.add(db, USER, hash_password(PASSWORD))
            # The domain's servers get the machine's two CPUs from their start: a scale-up
            # in the middle of a load would be measured instead of the hops.
            await db.execute(
                "INSERT INTO container_specs (domain_id, service, cpu_quota_us,"
                " cpu_quota_max_us) SELECT id, s, 200000, 200000 FROM domains,"
                " (VALUES ('imap'), ('smtp')) v(s) WHERE name = $1", DOMAIN)

        def in_maildir() -> set[str]:
            return set(maildir_marks(settings.mail_root, USER))

        def at_mx() -> set[str]:
            return set(sink.marks())

        # Warm: the domain's containers start with its first messages.
        warm = argparse.Namespace(**{**vars(args), "clients": 1, "seconds": 0.0,
                                     "size_mb": 1, "drain": 120})
        for figure in (await measure("warm in", SMTP_IN, "someone@remote.example", USER, warm,
                                     tls=False, password="", arrived=in_maildir),
                       await measure("warm out", SUBMISSION, USER, OUTSIDE, warm, tls=True,
                                     password=PASSWORD, arrived=at_mx)):
            if figure.delivered != figure.accepted or not figure.accepted:
                raise RuntimeError(f"warm-up failed: {figure.line()} {figure.refused}\n"
                                   + up.log_tail())
        dovecot = await container_pid(pool, DOMAIN, "imap")
        assert dovecot is not None
        cert, key = certificate_paths(settings)
        postfix, _ = await asyncio.to_thread(
            postfix_reference, state_dir / "postfix", port=POSTFIX,
            routing=reference_routing(dovecot, cert, key))
        for port, recipient in ((POSTFIX, USER), (POSTFIX, OUTSIDE)):
            figure = await measure("warm reference", port, "someone@remote.example",
                                   recipient, warm, tls=True, password="",
                                   arrived=in_maildir if recipient == USER else at_mx)
            if figure.delivered != figure.accepted or not figure.accepted:
                raise RuntimeError(f"the reference Postfix failed: {figure.refused}")
        await asyncio.sleep(5.0)         # the warm-up's aftermath
        memory = Memory.at_idle(up)

        print(f"{args.clients} clients, {args.size_mb} MB messages, {args.seconds:g} s per load")
        results = []
        for direction, port, sender, recipient, arrived in (
                ("in", SMTP_IN, "someone@remote.example", USER, in_maildir),
                ("out", SUBMISSION, USER, OUTSIDE, at_mx)):
            ours = await measure(f"{direction}, mailfc", port, sender, recipient, args,
                                 tls=direction == "out",
                                 password=PASSWORD if direction == "out" else "",
                                 arrived=arrived, memory=memory, memory_label=direction)
            print(ours.line())
            for reason, count in ours.refused.items():
                print(f"      {count}x {reason}")
            theirs = await measure(f"{direction}, Postfix (host)", POSTFIX,
                                   "someone@remote.example" if direction == "in" else sender,
                                   recipient, args, tls=direction == "out", password="",
                                   arrived=arrived)
            print(theirs.line())
            for reason, count in theirs.refused.items():
                print(f"      {count}x {reason}")
            ratio = ours.throughput / theirs.throughput if theirs.throughput else 0.0
            results.append((direction, ratio))
            print(f"  {direction}: MB/s mailfc / Postfix = {ratio:.2f} (target >= "
                  f"{TARGET_RATIO})")
        print("memory of every mailfc process (RSS):")
        for line in memory.report(up):
            print(line)
    finally:
        if postfix is not None:
            await asyncio.to_thread(subprocess.run, [*postfix, "stop"], capture_output=True,
                                    check=False)
        if pool is not None:
            await pool.close()
        await up.stop()
        await asyncio.to_thread(sink.stop)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.big_messages",
                                     description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="length of each load")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--size-mb", type=int, default=40, help="message size (MiB)")
    parser.add_argument("--drain", type=float, default=300.0,
                        help="longest wait for a load's accepted messages to arrive")
    args = parser.parse_args()
    with scratch_state(config, bridge=BRIDGE) as state_dir:
        asyncio.run(run(args, state_dir))


if __name__ == "__main__":
    main()
