"""Benchmark: kill -9 every process of the platform in turn under load; lost and duplicated mail.

    python -m bench.chaos [--messages 5000] [--outbound 500] [--rate 100] [--targets LIST]

Runs a whole platform as an admin runs it (`mailfc up`, its own embedded PostgreSQL,
bridge mfcx0, subnet 10.101.0.0/24, container prefix mfcx, ports 27xxx) and a remote MX
of the benchmark (bench.platform.Sink on 127.0.0.1:27525, a process of its own).  The
targets, killed with SIGKILL one after another:

  every process `mailfc up` runs (by its supervisor group: milter, hooks, host,
  outbound, routers, submission, filter, inbound: whatever this version runs), the
  domain's Dovecot and its Postfix (the container's init: the whole container dies),
  and last the embedded PostgreSQL's postmaster (last: if nothing restarts it, the
  phases after it would measure only that).

One phase per target.  Inbound, --messages / targets messages go to port 25 for a hosted
mailbox at --rate messages/s; outbound, --outbound / targets go to port 587 (STARTTLS,
AUTH) for a remote address (-> the domain's Postfix -> Filter-Out -> SMTP-Out -> the
remote MX) at the same pace; the kill comes a third of the way into the phase.  Each
message carries a unique X-Chaos-Id header (an X-Mark, bench.platform); a message not
accepted, or whose reply was lost, is tried again as a new message with a new id, as a
client would.  The next phase starts once every accepted message of this one arrived
(or after --drain-wait seconds).

Per fault it prints: messages accepted (250 at end of data), delivered (accepted ones in
the maildir or at the remote MX), lost (accepted, never arrived by the end of the run),
duplicates (extra copies of any id), unacknowledged ones that arrived anyway (the reply
was lost with the process: neither lost nor duplicate), how long the target took to come
back, and the drain: seconds from the kill until the last accepted message of the phase
arrived.  Target: 0 lost; 0 duplicates for mailfc's own processes (a kill of Dovecot or
Postfix in the middle of their own write may duplicate, as with plain Postfix); every
drain within 60 s.

Loads run in a process of their own and stop by themselves; a message is retried for at
most --give-up seconds.  Everything the benchmark starts is stopped by its pid; the state
directory and the bridge are removed.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import signal
import time
import uuid
from dataclasses import dataclass, field
from email.utils import formatdate
from pathlib import Path

from bench.platform import (
    ACCEPTED,
    UNKNOWN,
    Sink,
    Up,
    container_pid,
    dot_stuffed,
    in_own_process,
    maildir_files,
    mark_of,
    postmaster_pid,
    scratch_state,
    send_message,
    trusting_client_tls,
    whole_platform_config,
)
from mailfc.config import Config
from mailfc.controller.supervisor import GROUPS
from mailfc.db import accounts, connect, domains
from mailfc.db.pool import embedded_cluster
from mailfc.passwords import hash_password

DOMAIN = "chaos.bench.example"
INBOX = f"ivy@{DOMAIN}"
SENDER = f"otto@{DOMAIN}"
OUTSIDE = "friend@remote.example"
PASSWORD = "chaos-bench-password"
BASE = 27000
SMTP_IN, SUBMISSION, MX_PORT = BASE + 25, BASE + 587, BASE + 525
BRIDGE = "mfcx0"
CONTAINERS = {"dovecot": "imap", "postfix": "smtp"}
POSTGRES = "postgresql"
DRAIN_TARGET_S = 60.0


def config(state_dir: Path) -> Config:
    # A spool retries a failed hop within seconds: the drain target (60 s after a
    # fault) needs retries shorter than the production minute.
    return whole_platform_config(
        state_dir, base=BASE, name="chaos", subnet="10.101.0.0/24", prefix="mfcx",
        submission={"auth_failure_delay_s": 0.1},
        spool={"retry_base_s": 1.0, "retry_max_s": 5.0, "scan_interval_s": 0.5},
        controller={"deferred_retry_s": 10.0})


# -- the load of one phase, in a process of its own -----------------------------------------

def chaos_message(mark: str, sender: str, recipient: str) -> bytes:
    return (f"From: <{sender}>\r\nTo: <{recipient}>\r\nSubject: chaos {mark}\r\n"
            f"Date: {formatdate()}\r\nMessage-ID: <{uuid.uuid4().hex}@chaos.bench>\r\n"
            f"X-Chaos-Id: {mark}\r\nX-Mark: {mark}\r\n\r\n").encode() + b"chaos\r\n" * 250


async def phase_load(prefix: str, inbound: int, outbound: int, seconds: float,
                     give_up_s: float) -> list[tuple[str, str, str, str]]:
    """Paced messages, each retried under a new id until accepted or `give_up_s` passed:
    (id, direction, outcome, reply) of every attempt."""
    loop = asyncio.get_running_loop()
    began = loop.time()
    tls = trusting_client_tls()
    slots = asyncio.Semaphore(64)
    results: list[tuple[str, str, str, str]] = []

    async def one(direction: str, n: int, start_at: float) -> None:
        await asyncio.sleep(max(0.0, start_at - loop.time()))
        for attempt in range(10_000):
            mark = f"{prefix}-{direction}{n}-{attempt}"
            async with slots:
                if direction == "in":
                    outcome, reply = await send_message(
                        "127.0.0.1", SMTP_IN, "someone@remote.example", [INBOX],
                        dot_stuffed(chaos_message(mark, "someone@remote.example", INBOX)),
                        timeout_s=60)
                else:
                    outcome, reply = await send_message(
                        "127.0.0.1", SUBMISSION, SENDER, [OUTSIDE],
                        dot_stuffed(chaos_message(mark, SENDER, OUTSIDE)), tls=tls,
                        login=(SENDER, PASSWORD), timeout_s=60)
            results.append((mark, direction, outcome, reply))
            if outcome == ACCEPTED or loop.time() - began > give_up_s:
                return
            await asyncio.sleep(0.5)

    await asyncio.gather(
        *(one("in", i, began + i * seconds / max(inbound, 1)) for i in range(inbound)),
        *(one("out", i, began + i * seconds / max(outbound, 1)) for i in range(outbound)))
    return results


# -- where messages arrived ------------------------------------------------------------------

class Arrivals:
    """Every X-Chaos-Id in the maildir and at the remote MX: how often, and when first
    (the maildir file's mtime, the MX's record time)."""

    def __init__(self, mail_root: Path, sink: Sink) -> None:
        self.mail_root = mail_root
        self.sink = sink
        self.files: dict[str, str] = {}      # maildir file (name before ":2,") -> id
        self.copies: dict[str, list[str]] = collections.defaultdict(list)  # id -> where
        self.first: dict[str, float] = {}
        self.counts: collections.Counter[str] = collections.Counter()
        self.sunk = 0

    def scan(self) -> None:
        for path in maildir_files(self.mail_root, INBOX):
            name = path.name.partition(":")[0]
            if name in self.files:
                continue
            try:
                with path.open("rb") as handle:
                    head = handle.read(65536).split(b"\n\n", 1)[0]
                at = path.stat().st_mtime
            except FileNotFoundError:
                continue
            mark = mark_of(head)
            self.files[name] = mark
            self._arrived(mark, at)
            unfolded = head.replace(b"\n\t", b" ").replace(b"\n ", b" ")
            self.copies[mark].append(f"maildir {path.name}: " + " | ".join(
                line.decode("utf-8", "replace") for line in unfolded.splitlines()
                if line.startswith(b"Received:")))
        with contextlib.suppress(FileNotFoundError):
            lines = self.sink.record.read_text().splitlines(keepends=True)
            for line in lines[self.sunk:]:
                if not line.endswith("\n"):
                    break
                entry = json.loads(line)
                self._arrived(entry["mark"], entry["at"])
                self.copies[entry["mark"]].append(f"remote MX at {entry['at']:.3f}")
                self.sunk += 1

    def _arrived(self, mark: str, at: float) -> None:
        self.counts[mark] += 1
        self.first[mark] = min(self.first.get(mark, at), at)


@dataclass
class Phase:
    target: str
    killed_at: float = 0.0
    back_after: float | None = None
    note: str = ""
    attempts: list[tuple[str, str, str, str]] = field(default_factory=list)

    def marks(self, outcome: str | None = None, direction: str | None = None) -> set[str]:
        return {mark for mark, way, result, _ in self.attempts
                if (outcome is None or result == outcome)
                and (direction is None or way == direction)}

    def drained(self, arrivals: Arrivals) -> bool:
        return self.marks(ACCEPTED) <= set(arrivals.counts)

    def row(self, arrivals: Arrivals) -> str:
        accepted = self.marks(ACCEPTED)
        arrived = set(arrivals.counts)
        mine = self.marks()
        duplicates = sum(arrivals.counts[m] - 1 for m in mine if arrivals.counts[m] > 1)
        lost = len(accepted - arrived)
        unacked = len(self.marks(UNKNOWN) & arrived)
        never = len({m.rpartition("-")[0] for m in mine}
                    - {m.rpartition("-")[0] for m in accepted})
        retried = len(self.attempts) - len({m.rpartition("-")[0] for m in mine})
        if accepted and not lost:
            drain = max(arrivals.first[m] for m in accepted) - self.killed_at
            drain_text = f"{drain:6.1f} s" + ("" if drain <= DRAIN_TARGET_S else " !")
        else:
            drain_text = "  never" if lost else "      -"
        back = f"{self.back_after:5.1f} s" if self.back_after is not None else "    ? "
        return (f"  {self.target:<11} {len(self.marks(ACCEPTED, 'in')):5d} "
                f"{len(self.marks(ACCEPTED, 'out')):4d} {len(accepted & arrived):6d} "
                f"{lost:5d} {duplicates:5d} {unacked:6d} {never:6d} {retried:6d}  {back}  "
                f"{drain_text}"
                + (f"  {self.note}" if self.note else ""))


HEADER = ("  target         in  out  deliv  lost  dups unack'd  never  tries   back    drain"
          "\n  (accepted in/out; delivered; lost; extra copies; delivered without a 250;"
          " messages never accepted; attempts that failed and were tried again; target"
          " back after; last arrival after the kill)")


# -- faults ----------------------------------------------------------------------------------

async def target_pid(target: str, up: Up, settings: Config, pool: object) -> int | None:
    """The pid of a fault target now: a container's init, the postmaster, or a
    process of `mailfc up`."""
    if target in CONTAINERS:
        return await container_pid(pool, DOMAIN, CONTAINERS[target])
    if target == POSTGRES:
        return postmaster_pid(settings)
    return up.processes().get(target)


async def kill(target: str, up: Up, settings: Config, pool: object) -> tuple[float, int]:
    """SIGKILL the target; (time of the kill, pid killed)."""
    pid = await target_pid(target, up, settings, pool)
    if pid is None:
        raise LookupError(f"no running {target} to kill")
    os.kill(pid, signal.SIGKILL)
    return time.time(), pid


async def back(target: str, old: int, up: Up, settings: Config, pool: object,
               within_s: float) -> bool:
    """Until the target runs again (a new pid; a mailfc process also said it is up)."""
    deadline = time.monotonic() + within_s
    ready_before = sum(1 for line in up.log_tail(10**7).splitlines()
                       if line.startswith(f"[{target}] ") and "mailfc is up" in line)
    while time.monotonic() < deadline:
        pid = await target_pid(target, up, settings, pool)
        if target not in CONTAINERS and target != POSTGRES:
            ready = sum(1 for line in up.log_tail(10**7).splitlines()
                        if line.startswith(f"[{target}] ") and "mailfc is up" in line)
            if ready <= ready_before:
                pid = None
        if pid is not None and pid != old:
            return True
        await asyncio.sleep(0.2)
    return False


def targets_of(up: Up, wanted: str) -> list[str]:
    running = up.processes()
    order = [name for name, _ in GROUPS if name in running]
    order += sorted(set(running) - set(order) - {"supervisor"})
    order += [*CONTAINERS, POSTGRES]
    if wanted:
        chosen = [name.strip() for name in wanted.split(",") if name.strip()]
        unknown = set(chosen) - set(order)
        if unknown:
            raise SystemExit(f"unknown target(s) {', '.join(sorted(unknown))}; this platform"
                             f" has: {', '.join(order)}")
        return chosen
    return order


async def run(args: argparse.Namespace, state_dir: Path) -> None:
    settings = config(state_dir)
    sink = Sink(MX_PORT, state_dir / "sink.jsonl")
    await asyncio.to_thread(sink.start)
    up = Up(settings, state_dir, SMTP_IN)
    pool = None
    try:
        await up.start()
        pool = await connect(settings)
        async with pool.acquire() as db:
            await domains.add(db, DOMAIN)
            for address in (INBOX, SENDER):
                await accounts.add(db, address, hash_password(PASSWORD))
        arrivals = Arrivals(settings.mail_root, sink)

        async def watch() -> None:
            while True:
                await asyncio.to_thread(arrivals.scan)
                await asyncio.sleep(0.5)

        watcher = asyncio.create_task(watch())
        # Warm: the domain's Dovecot and Postfix start with its first messages.
        warm = Phase("warm-up")
        warm.attempts = await in_own_process(phase_load, "warm", 2, 2, 1.0, 120.0,
                                             within_s=300)
        await wait_drained(warm, arrivals, 120)
        if not warm.drained(arrivals) or not warm.marks(ACCEPTED):
            raise RuntimeError("the warm-up messages did not arrive:\n" + up.log_tail())
        targets = targets_of(up, args.targets)
        per_in = max(1, args.messages // len(targets))
        per_out = max(1, args.outbound // len(targets))
        seconds = per_in / args.rate
        print(f"{len(targets)} faults; per fault {per_in} messages in and {per_out} out over "
              f"{seconds:.1f} s, the kill after {seconds / 3:.1f} s")
        print(HEADER)
        phases = []
        for number, target in enumerate(targets):
            phase = Phase(target)
            phases.append(phase)
            started = asyncio.Event()
            load = asyncio.create_task(in_own_process(
                phase_load, f"p{number}", per_in, per_out, seconds, args.give_up,
                within_s=seconds + args.give_up + 120, started=started))
            await started.wait()
            await asyncio.sleep(seconds / 3)
            if target == POSTGRES:
                pool.terminate()     # its reconnecting would only add noise to the log
            try:
                phase.killed_at, pid = await kill(target, up, settings, pool)
                began = time.monotonic()
                if await back(target, pid, up, settings, pool, 90.0):
                    phase.back_after = time.monotonic() - began
                else:
                    phase.note = "did not come back within 90 s"
            except LookupError as error:
                phase.killed_at, phase.note = time.time(), str(error)
            phase.attempts = await load
            await wait_drained(phase, arrivals, args.drain_wait)
            if target == POSTGRES and phase.back_after is None:
                # Nothing restarted it: the bench does, so the run can end cleanly.
                await asyncio.to_thread(ensure_database, settings)
            print(phase.row(arrivals), flush=True)
        last_fault = max(p.killed_at for p in phases)
        await wait_drained_all(phases, arrivals, 60)
        await asyncio.sleep(5.0)              # a duplicate comes late: after a retry
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        await asyncio.to_thread(arrivals.scan)
        print("final counts (after every retry had its chance):")
        print(HEADER)
        for phase in phases:
            print(phase.row(arrivals))
        summarize(phases, arrivals, last_fault)
    finally:
        if pool is not None:
            pool.terminate()        # its connections may have died with the postmaster
        await up.stop()
        await asyncio.to_thread(sink.stop)


def ensure_database(settings: Config) -> None:
    embedded_cluster(settings).ensure_running()


async def wait_drained(phase: Phase, arrivals: Arrivals, within_s: float) -> None:
    await wait_drained_all([phase], arrivals, within_s)


async def wait_drained_all(phases: list[Phase], arrivals: Arrivals, within_s: float) -> None:
    """Until every accepted message of `phases` arrived (the watcher rescans every 0.5 s),
    or `within_s` passed."""
    deadline = time.monotonic() + within_s
    while True:
        if all(p.drained(arrivals) for p in phases) or time.monotonic() > deadline:
            return
        await asyncio.sleep(0.5)


def summarize(phases: list[Phase], arrivals: Arrivals, last_fault: float) -> None:
    accepted = set().union(*(p.marks(ACCEPTED) for p in phases))
    lost = accepted - set(arrivals.counts)
    ours = [p for p in phases if p.target not in (*CONTAINERS, POSTGRES)]
    own_duplicates = sum(arrivals.counts[m] - 1 for p in ours for m in p.marks()
                         if arrivals.counts[m] > 1)
    all_duplicates = sum(arrivals.counts[m] - 1 for p in phases for m in p.marks()
                         if arrivals.counts[m] > 1)
    last = max((arrivals.first[m] for m in accepted if m in arrivals.first), default=0.0)
    drain = last - last_fault
    for phase in phases:
        for mark in sorted(m for m in phase.marks() if arrivals.counts[m] > 1)[:5]:
            print(f"  duplicate after the {phase.target} kill: {mark}")
            for copy in arrivals.copies[mark]:
                print(f"      {copy[:400]}")
    print(f"total: {len(accepted)} accepted, {len(lost)} lost (target 0), {all_duplicates}"
          f" duplicate copies of which {own_duplicates} after a kill of a mailfc process"
          f" (target 0); last arrival {drain:.1f} s after the last fault (target <= "
          f"{DRAIN_TARGET_S:g} s){'' if not lost else ', not all arrived'}")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.chaos",
                                     description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--messages", type=int, default=5000, help="inbound, in all")
    parser.add_argument("--outbound", type=int, default=500, help="outbound, in all")
    parser.add_argument("--rate", type=float, default=100.0,
                        help="inbound messages per second (outbound: the same phase length)")
    parser.add_argument("--targets", default="",
                        help="comma-separated targets (default: all, in the order above)")
    parser.add_argument("--drain-wait", type=float, default=120.0,
                        help="longest wait for a phase's accepted messages to arrive")
    parser.add_argument("--give-up", type=float, default=120.0,
                        help="a message not accepted is retried this long")
    args = parser.parse_args()
    with scratch_state(config, bridge=BRIDGE) as state_dir:
        asyncio.run(run(args, state_dir))


if __name__ == "__main__":
    main()
