"""The spool's delivery side: per-domain queues drained round-robin, retries, bounces.

FAIRNESS
    Every message waits in the queue of each recipient domain it has (a message to
    a.example and b.example is two jobs).  Each domain has at most
    spool.per_domain_concurrency deliveries in flight, all domains together at most
    spool.max_deliveries; domains wait for a free slot in FIFO order, one job per domain
    worker at a time, so a flood to a.example holds per_domain_concurrency slots and
    b.example's next message takes the next free one.  A flooded domain's queue grows,
    nobody else's does.

RETRIES
    A 4xx reply (or no reply: next hop down, timeout) keeps those recipients queued:
    retry after retry_base_s, doubling up to retry_max_s (+-10 % so a backlog does not
    retry in lockstep).  A 5xx reply, or a 4xx after max_lifetime_s in the queue, is
    final: the sender gets one DSN (RFC 3464) listing every failed recipient.  2xx
    replies are final successes.  Only the recipients still owed stay queued.

OWNERSHIP
    Several processes may accept into one spool directory (a resident service being
    cycled); exactly one, the holder of the lock file, delivers.  The others only commit
    files; the owner finds them at its next scan (scan_interval_s), and takes over the
    whole queue when the previous owner stops and lets go of the lock.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import logging
import os
import random
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from mailfc.config import SpoolSection
from mailfc.gateways.spool import dsn
from mailfc.gateways.spool.store import (
    Envelope,
    Progress,
    SpoolFiles,
    SpoolFull,
    domain_of,
    new_queue_id,
)
from mailfc.protocols.lmtp import Reply

T = TypeVar("T")
DISK_THREADS = 32

log = logging.getLogger("mailfc.gateways.spool")

# deliver(envelope, recipients of one domain, message) -> a Reply per recipient.
Deliver = Callable[[Envelope, list[str], bytes], Awaitable[dict[str, Reply]]]

MAX_CACHED_BYTES = 64 << 20


@dataclass
class Entry:
    envelope: Envelope
    pending: dict[str, list[str]]
    final: dict[str, tuple[int, str]] = field(default_factory=dict)
    attempts: dict[str, int] = field(default_factory=dict)
    last_error: dict[str, str] = field(default_factory=dict)
    message: bytes | None = None
    timers: dict[str, asyncio.TimerHandle] = field(default_factory=dict)
    deleted: bool = False
    finishing: bool = False


@dataclass
class DomainQueue:
    ready: collections.deque[str] = field(default_factory=collections.deque)
    active: int = 0
    # Messages with recipients of this domain still owed (ready, waiting or in flight).
    queued: int = 0


class Spool:
    def __init__(self, directory: Path, deliver: Deliver, settings: SpoolSection, *,
                 hostname: str) -> None:
        self.files = SpoolFiles(directory)
        self.deliver_fn = deliver
        self.settings = settings
        self.hostname = hostname
        self.entries: dict[str, Entry] = {}
        self.queues: dict[str, DomainQueue] = collections.defaultdict(DomainQueue)
        self.owner = False
        self._lock_fd: int | None = None
        self._slots = asyncio.Semaphore(settings.max_deliveries)
        self._committing: set[str] = set()
        self._running_sync: asyncio.Future[None] | None = None
        self._next_sync: asyncio.Future[None] | None = None
        self._cached = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._background: list[asyncio.Task[None]] = []
        self._stopping = False
        self._hop_failing = False
        self.delivered = 0
        # The spool's file work (fsync above all) in threads of its own: commits of
        # concurrent sessions wait for the disk together, and ext4 commits their
        # fsyncs in one journal transaction; the loop's default pool (cores + 4
        # threads) would queue them one batch at a time.
        self._disk: ThreadPoolExecutor | None = None

    # -- life cycle -------------------------------------------------------------------

    async def start(self) -> None:
        await self._io(self.files.prepare)
        if await self._io(self._try_lock):
            await self._take_over()
        self._background = [asyncio.create_task(self._scan_loop())]

    async def stop(self, drain_timeout: float) -> None:
        """Stop starting deliveries, let those in flight finish, then let go of the spool."""
        self._stopping = True
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        if self._tasks:
            _, late = await asyncio.wait(set(self._tasks), timeout=drain_timeout)
            for task in late:
                # Cut off mid-delivery: those recipients stay queued for the next owner.
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        for entry in self.entries.values():
            for timer in entry.timers.values():
                timer.cancel()
        self.entries.clear()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
            self.owner = False
        if self._disk is not None:
            self._disk.shutdown(wait=True)
            self._disk = None

    async def _io(self, function: Callable[..., T], *args: object) -> T:
        """Run a blocking file operation of the spool in its disk threads."""
        if self._disk is None:
            self._disk = ThreadPoolExecutor(max_workers=DISK_THREADS,
                                            thread_name_prefix="mailfc-spool")
        return await asyncio.get_running_loop().run_in_executor(self._disk, function, *args)

    def _try_lock(self) -> bool:
        fd = os.open(self.files.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._lock_fd = fd
        return True

    async def _take_over(self) -> None:
        self.owner = True
        removed = await self._io(self.files.clean_tmp)
        if removed:
            log.info("spool: removed %d uncommitted file(s) of an earlier run", removed)
        loaded = await self._scan()
        if loaded:
            log.info("spool %s: resuming %d queued message(s)", self.files.directory, loaded)

    # -- accepting --------------------------------------------------------------------

    def has_room(self, size: int = 0) -> bool:
        try:
            stat = os.statvfs(self.files.directory)
        except OSError:
            return False
        return stat.f_bavail * stat.f_frsize >= self.settings.min_free_bytes + size

    def queued(self, domain: str) -> int:
        queue = self.queues.get(domain)
        return queue.queued if queue is not None else 0

    async def put(self, sender: str, recipients: list[str], message: bytes, *,
                  mail_options: tuple[str, ...] = (), client_ip: str | None = None,
                  client_name: str | None = None, helo: str | None = None,
                  is_bounce: bool = False, queue_id: str | None = None) -> str:
        """Make the message durable and queue it; raises SpoolFull.  Returns its queue id."""
        if not self.has_room(len(message)):
            raise SpoolFull("free space below spool.min_free_bytes")
        envelope = Envelope(queue_id or new_queue_id(), sender, tuple(recipients), time.time(),
                            mail_options, client_ip, client_name, helo, len(message),
                            is_bounce)
        self._committing.add(envelope.queue_id)
        try:
            await self._io(self.files.commit, envelope, message)
            await self._queue_synced()
            if self.owner and not self._stopping:
                self._add(envelope, Progress(), message)
        finally:
            self._committing.discard(envelope.queue_id)
        return envelope.queue_id

    async def _queue_synced(self) -> None:
        """Until queue/ is fsync'd after our rename.  A sync already running may have
        begun before the rename, so it is the next one that counts; every commit
        renamed meanwhile waits for that same next one."""
        if self._next_sync is None:
            self._next_sync = asyncio.ensure_future(self._sync_after(self._running_sync))
        await asyncio.shield(self._next_sync)

    async def _sync_after(self, previous: asyncio.Future[None] | None) -> None:
        if previous is not None:
            with contextlib.suppress(Exception):
                await previous
        # Renames from now on need the sync after this one.
        self._running_sync, self._next_sync = self._next_sync, None
        try:
            await self._io(self.files.sync_queue)
        finally:
            if self._running_sync is asyncio.current_task():
                self._running_sync = None

    # -- scheduling -------------------------------------------------------------------

    def _add(self, envelope: Envelope, progress: Progress, message: bytes | None) -> None:
        pending: dict[str, list[str]] = {}
        for recipient in envelope.recipients:
            if recipient not in progress.final:
                pending.setdefault(domain_of(recipient), []).append(recipient)
        if message is not None and self._cached + len(message) > MAX_CACHED_BYTES:
            message = None
        if message is not None:
            self._cached += len(message)
        entry = Entry(envelope, pending, dict(progress.final), dict(progress.attempts),
                      dict(progress.last_error), message)
        self.entries[envelope.queue_id] = entry
        if not pending:
            self._spawn(self._finish(entry))
            return
        for domain in pending:
            self.queues[domain].queued += 1
            self._make_ready(envelope.queue_id, domain)

    def _make_ready(self, queue_id: str, domain: str) -> None:
        queue = self.queues[domain]
        queue.ready.append(queue_id)
        while queue.active < min(self.settings.per_domain_concurrency, len(queue.ready)):
            queue.active += 1
            self._spawn(self._worker(domain))

    def _spawn(self, job: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(job)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _worker(self, domain: str) -> None:
        queue = self.queues[domain]
        try:
            while queue.ready and not self._stopping:
                queue_id = queue.ready.popleft()
                entry = self.entries.get(queue_id)
                if entry is None or entry.deleted or domain not in entry.pending:
                    continue
                async with self._slots:
                    if self._stopping:
                        queue.ready.appendleft(queue_id)
                        return
                    await self._deliver(entry, domain)
        finally:
            queue.active -= 1

    async def _deliver(self, entry: Entry, domain: str) -> None:
        recipients = list(entry.pending[domain])
        envelope = entry.envelope
        try:
            message = entry.message
            if message is None:
                message = await self._io(self.files.read_message, envelope.queue_id)
            replies = await asyncio.wait_for(
                self.deliver_fn(envelope, recipients, message),
                self.settings.delivery_timeout_s)
            if self._hop_failing:
                log.warning("spool: next hop works again")
                self._hop_failing = False
        except asyncio.CancelledError:
            raise
        except Exception as error:
            text = f"4.4.1 next hop unavailable: {error or type(error).__name__}"
            if not self._hop_failing:
                # Logged once per outage, not once per message.
                log.warning("spool: %s (keeping mail queued)", text)
                self._hop_failing = True
            replies = dict.fromkeys(recipients, Reply(451, text))
        await self._record(entry, domain, recipients, replies)

    async def _record(self, entry: Entry, domain: str, recipients: list[str],
                      replies: dict[str, Reply]) -> None:
        now = time.time()
        final: dict[str, tuple[int, str]] = {}
        deferred: list[str] = []
        error = ""
        for recipient in recipients:
            reply = replies.get(recipient) or Reply(451, "4.3.0 no reply for this recipient")
            if reply.temporary:
                deferred.append(recipient)
                error = str(reply)
            else:
                final[recipient] = (reply.code, reply.text)
        age = now - entry.envelope.received_at
        if deferred and age >= self.settings.max_lifetime_s:
            days = self.settings.max_lifetime_s / 86400
            for recipient in deferred:
                final[recipient] = (554, f"5.4.7 delivery time expired after {days:g} days;"
                                         f" last error: {error}")
            deferred = []
        records: list[dict[str, object]] = [
            {"rcpt": r, "code": code, "text": text} for r, (code, text) in final.items()]
        attempts = entry.attempts.get(domain, 0) + 1
        delay = min(self.settings.retry_max_s,
                    self.settings.retry_base_s * 2 ** (attempts - 1)) * random.uniform(0.9, 1.1)
        if deferred:
            records.append({"domain": domain, "attempts": attempts, "next": now + delay,
                            "error": error})
        if entry.deleted:
            return
        finished = not deferred and set(entry.pending) == {domain}
        if not (finished and all(code < 300 for code, _ in (*entry.final.values(),
                                                           *final.values()))):
            # Needed on disk only while the message stays (see store.py EXACTLY ONCE):
            # a message delivered to everyone is unlinked right away instead.
            await self._io(self.files.append_log, entry.envelope.queue_id, records)
        entry.final.update(final)
        self.delivered += sum(1 for code, _ in final.values() if code < 300)
        if deferred:
            entry.pending[domain] = deferred
            entry.attempts[domain] = attempts
            entry.last_error[domain] = error
            if not self._stopping:
                loop = asyncio.get_running_loop()
                entry.timers[domain] = loop.call_later(
                    delay, self._retry_due, entry.envelope.queue_id, domain)
            return
        del entry.pending[domain]
        self.queues[domain].queued -= 1
        if not entry.pending:
            await self._finish(entry)

    def _retry_due(self, queue_id: str, domain: str) -> None:
        entry = self.entries.get(queue_id)
        if entry is None or self._stopping:
            return
        entry.timers.pop(domain, None)
        if domain in entry.pending:
            self._make_ready(queue_id, domain)

    async def _finish(self, entry: Entry) -> None:
        if entry.finishing or entry.deleted:
            return
        entry.finishing = True
        envelope = entry.envelope
        failed = {r: reply for r, reply in entry.final.items() if reply[0] >= 300}
        if failed and envelope.sender and not envelope.is_bounce:
            message = entry.message
            try:
                if message is None:
                    message = await self._io(self.files.read_message, envelope.queue_id)
                report = dsn.bounce(self.hostname, envelope, failed, message)
                await self.put("", [envelope.sender], report, is_bounce=True)
            except (SpoolFull, OSError) as error:
                log.error("spool: cannot queue the bounce for %s, keeping it: %s",
                          envelope.queue_id, error)
                entry.finishing = False
                asyncio.get_running_loop().call_later(
                    self.settings.retry_base_s, lambda: self._spawn(self._finish(entry)))
                return
        elif failed:
            log.warning("spool: %s failed for %s; no bounce (null sender or a bounce itself)",
                        envelope.queue_id, ", ".join(failed))
        await self._io(self.files.remove, envelope.queue_id)
        self._forget(entry)

    def _forget(self, entry: Entry) -> None:
        for timer in entry.timers.values():
            timer.cancel()
        if entry.message is not None:
            self._cached -= len(entry.message)
            entry.message = None
        self.entries.pop(entry.envelope.queue_id, None)

    # -- scanning and control -----------------------------------------------------------

    async def _scan_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.scan_interval_s)
            try:
                if not self.owner:
                    if await self._io(self._try_lock):
                        log.info("spool %s: taking over delivery", self.files.directory)
                        await self._take_over()
                    continue
                for queue_id, action in await self._io(self.files.take_requests):
                    await self.apply(queue_id, action)
                await self._scan()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("spool: scan failed")

    async def _scan(self) -> int:
        """Load committed messages this process does not know yet (start-up, other writers)."""
        known = set(self.entries) | set(self._committing)

        def read() -> list[tuple[Envelope, Progress]]:
            found = []
            for queue_id in self.files.queue_ids():
                if queue_id in known:
                    continue
                try:
                    found.append((self.files.read_envelope(queue_id),
                                  self.files.read_progress(queue_id)))
                except FileNotFoundError:
                    continue      # finished between listing and reading
                except ValueError as error:
                    log.error("spool: %s is unreadable, leaving it alone: %s", queue_id, error)
            return found

        loaded = 0
        for envelope, progress in await self._io(read):
            if envelope.queue_id in self.entries or self._stopping:
                continue
            self._add(envelope, progress, None)
            loaded += 1
        return loaded

    async def apply(self, queue_id: str, action: str) -> bool:
        """`retry` (now) or `delete` one message (`all` for every message); False: unknown."""
        targets = list(self.entries.values()) if queue_id == "all" else [
            e for e in (self.entries.get(queue_id),) if e is not None]
        for entry in targets:
            if action == "delete":
                entry.deleted = True
                for domain in entry.pending:
                    self.queues[domain].queued -= 1
                entry.pending = {}
                await self._io(self.files.remove, entry.envelope.queue_id)
                self._forget(entry)
                log.info("spool: %s deleted by the administrator", entry.envelope.queue_id)
            elif action == "retry":
                for domain, timer in list(entry.timers.items()):
                    timer.cancel()
                    del entry.timers[domain]
                    self._make_ready(entry.envelope.queue_id, domain)
        return bool(targets)

    async def wait_idle(self, within: float) -> bool:
        """Until nothing is queued (tests, benchmarks); False when `within` s passed."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if not self.entries and not self._committing:
                return True
            await asyncio.sleep(0.05)
        return False


def spool_directory(state_dir: Path, configured: str, name: str) -> Path:
    return Path(configured) if configured else state_dir / "spool" / name

