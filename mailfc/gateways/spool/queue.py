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

UNDELIVERABLE BOUNCES
    A message that can get no DSN (a DSN of this spool, or any mail with the null
    sender: another MTA's bounce) and fails for good is never dropped.  With
    spool.undeliverable_bounces = "quarantine" (the default) it moves to
    <spool>/quarantine/<id> with a record of why; set to an address (the platform's
    postmaster) it is sent there as a new message, an X-Mailfc-Undeliverable: header in
    front saying why, and goes to the quarantine only if that fails too.  A warning is
    logged either way.  `mailfc queue quarantine` lists them, `... release ID` queues one
    again (after the cause is fixed), `... delete ID` removes it.

MEMORY
    A message is copied into the spool file in 64 KiB chunks and sent on from that
    file (FileSlice), so a 40 MB message costs a chunk of memory, not 40 MB.  Only
    small messages (at most 64 KiB each, 8 MiB in all) stay cached in memory from the
    commit to their delivery, which saves a read for most mail.  A DSN carries at most
    the first 64 KiB of the original (its header block).

EXACTLY ONCE IN THE SCHEDULE
    A message is in `entries` once, and each of its domains in a ready queue or in
    flight at most once.  The scan that finds messages of other processes skips what a
    put of this process is committing (checked when it adds, not only when it began:
    a put may rename its file while the scan reads) and what was finished or deleted
    while it read (the file it read may be gone).

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

from mailfc import logsetup
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
from mailfc.messages import BytesSource, FileSlice, Prefixed, Source, as_source, head_of
from mailfc.metrics import names as metrics
from mailfc.protocols.lmtp import Reply

T = TypeVar("T")
DISK_THREADS = 32
FREE_SPACE_CHECK_S = 1.0

log = logging.getLogger("mailfc.gateways.spool")

# deliver(envelope, recipients of one domain, message) -> a Reply per recipient.  The
# message is a Source: read it in chunks (a FileSlice of the spool file, or the cached
# bytes of a small message), as often as needed for one delivery.
Deliver = Callable[[Envelope, list[str], Source], Awaitable[dict[str, Reply]]]

# Messages up to MAX_CACHED_MESSAGE bytes stay in memory until delivered, as long as
# all of them together stay within MAX_CACHED_BYTES; the rest is read from the file.
MAX_CACHED_MESSAGE = 64 << 10
MAX_CACHED_BYTES = 8 << 20


@dataclass
class Entry:
    envelope: Envelope
    file: FileSlice                    # the message in queue/<id>
    pending: dict[str, list[str]]
    final: dict[str, tuple[int, str]] = field(default_factory=dict)
    attempts: dict[str, int] = field(default_factory=dict)
    last_error: dict[str, str] = field(default_factory=dict)
    message: bytes | None = None       # cached (small messages only)
    timers: dict[str, asyncio.TimerHandle] = field(default_factory=dict)
    # Domains in a ready queue or being delivered: never twice at once.
    scheduled: set[str] = field(default_factory=set)
    deleted: bool = False
    finishing: bool = False
    # Whether queue/<id>.log may exist (found by a scan, or written here).
    logged: bool = True

    def source(self) -> Source:
        return BytesSource(self.message) if self.message is not None else self.file


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
        # The next hop's name on the hop log lines (mailfc.logsetup); the recipient
        # domain when empty (SMTP-Out: the remote MX or the LMTP Router, per domain).
        self.relay = ""
        # Called with each message found on taking over the spool (see _scan).
        self.on_resume: Callable[[Envelope], None] | None = None
        self.entries: dict[str, Entry] = {}
        self.queues: dict[str, DomainQueue] = collections.defaultdict(DomainQueue)
        self.owner = False
        self._lock_fd: int | None = None
        self._slots = asyncio.Semaphore(settings.max_deliveries)
        self._committing: set[str] = set()
        # Ids finished or deleted while a scan reads queue/ (None: no scan running).
        self._gone_during_scan: set[str] | None = None
        self._running_sync: asyncio.Future[None] | None = None
        self._next_sync: asyncio.Future[None] | None = None
        self._cached = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._background: list[asyncio.Task[None]] = []
        self._stopping = False
        self._hop_failing = False
        self._free_bytes = 0
        self._free_checked_at = -FREE_SPACE_CHECK_S
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
        self._cached = 0
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
        loaded = await self._scan(resuming=True)
        if loaded:
            log.info("spool %s: resuming %d queued message(s)", self.files.directory, loaded)

    # -- accepting --------------------------------------------------------------------

    def has_room(self, size: int = 0) -> bool:
        """Whether `size` more bytes leave spool.min_free_bytes free.  The file system
        is asked at most every FREE_SPACE_CHECK_S (a statvfs per command costs more
        than the answer is worth at hundreds of messages a second); in between, what
        this process committed since is taken off its last answer."""
        now = time.monotonic()
        if now - self._free_checked_at >= FREE_SPACE_CHECK_S:
            try:
                stat = os.statvfs(self.files.directory)
            except OSError:
                return False
            self._free_bytes = stat.f_bavail * stat.f_frsize
            self._free_checked_at = now
        return self._free_bytes >= self.settings.min_free_bytes + size

    def queued(self, domain: str) -> int:
        queue = self.queues.get(domain)
        return queue.queued if queue is not None else 0

    async def put(self, sender: str, recipients: list[str], message: bytes | Source, *,
                  mail_options: tuple[str, ...] = (), client_ip: str | None = None,
                  client_name: str | None = None, helo: str | None = None,
                  is_bounce: bool = False, queue_id: str | None = None,
                  ident: str | None = None) -> str:
        """Make the message durable and queue it; raises SpoolFull.  Returns its queue id.

        The message is copied into the spool file in chunks (in the spool's threads:
        a MessageData may be read there, nobody else reads it meanwhile); the caller
        may close it when put returns."""
        source = as_source(message)
        envelope = Envelope(queue_id or new_queue_id(), sender, tuple(recipients), time.time(),
                            mail_options, client_ip, client_name, helo, source.size,
                            is_bounce, ident=ident)
        return await self._commit(envelope, source)

    async def _commit(self, envelope: Envelope, source: Source) -> str:
        if not self.has_room(envelope.size):
            raise SpoolFull("free space below spool.min_free_bytes")
        queue_id = envelope.queue_id
        keep = MAX_CACHED_MESSAGE if self.owner and self._cached < MAX_CACHED_BYTES else 0
        self._committing.add(queue_id)
        try:
            cached = await self._io(self.files.commit, envelope, source, keep)
            self._free_bytes -= envelope.size
            try:
                await self._queue_synced()
            except SpoolFull:
                # The sender is told 452 and sends again: this copy must not go out too.
                await self._io(self.files.remove, queue_id)
                raise
            if self.owner and not self._stopping:
                file = FileSlice(self.files.queue / queue_id, len(envelope.to_json()),
                                 envelope.size)
                self._add(envelope, file, Progress(), cached, logged=False)
        finally:
            self._committing.discard(queue_id)
        return queue_id

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

    def _add(self, envelope: Envelope, file: FileSlice, progress: Progress,
             message: bytes | None, *, logged: bool = True) -> bool:
        """Schedule a committed message; False (and nothing done) if it is known already."""
        if envelope.queue_id in self.entries:
            log.error("spool: %s is queued already; not scheduling it twice", envelope.queue_id)
            return False
        pending: dict[str, list[str]] = {}
        for recipient in envelope.recipients:
            if recipient not in progress.final:
                pending.setdefault(domain_of(recipient), []).append(recipient)
        if message is not None and self._cached + len(message) > MAX_CACHED_BYTES:
            message = None
        if message is not None:
            self._cached += len(message)
        entry = Entry(envelope, file, pending, dict(progress.final), dict(progress.attempts),
                      dict(progress.last_error), message, logged=logged)
        self.entries[envelope.queue_id] = entry
        if not pending:
            self._spawn(self._finish(entry))
            return True
        for domain in pending:
            self.queues[domain].queued += 1
            self._make_ready(entry, domain)
        return True

    def _make_ready(self, entry: Entry, domain: str) -> None:
        if domain in entry.scheduled:
            return          # already waiting or in flight for this domain
        entry.scheduled.add(domain)
        queue = self.queues[domain]
        queue.ready.append(entry.envelope.queue_id)
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
                if entry is None:
                    continue
                if entry.deleted or domain not in entry.pending:
                    entry.scheduled.discard(domain)
                    continue
                async with self._slots:
                    if self._stopping:
                        queue.ready.appendleft(queue_id)
                        return
                    try:
                        await self._deliver(entry, domain)
                    finally:
                        # Its retry timer (set by _record) may schedule it again.
                        entry.scheduled.discard(domain)
        finally:
            queue.active -= 1

    async def _deliver(self, entry: Entry, domain: str) -> None:
        recipients = list(entry.pending[domain])
        envelope = entry.envelope
        try:
            replies = await asyncio.wait_for(
                self.deliver_fn(envelope, recipients, entry.source()),
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
        metrics.delivered(self.files.directory.name, final, age)
        self._log_hop(entry, domain, recipients, replies, final, age, attempts)
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
            entry.logged = True
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

    def _log_hop(self, entry: Entry, domain: str, recipients: list[str],
                 replies: dict[str, Reply], final: dict[str, tuple[int, str]], age: float,
                 attempts: int) -> None:
        """One hop line per recipient (mailfc.logsetup HOP LINES)."""
        for recipient in recipients:
            if recipient in final:
                code, text = final[recipient]
                status = "sent" if code < 300 else "bounced"
                said = f"{code} {text}"
            else:
                status = "deferred"
                said = str(replies.get(recipient) or "451 4.3.0 no reply for this recipient")
            logsetup.hop(self.files.directory.name, entry.envelope.queue_id,
                         f"to=<{recipient}>, relay={self.relay or domain}, delay={age:.1f},"
                         f" attempts={attempts}, status={status} ({said})")

    def _retry_due(self, queue_id: str, domain: str) -> None:
        entry = self.entries.get(queue_id)
        if entry is None or self._stopping:
            return
        entry.timers.pop(domain, None)
        if domain in entry.pending:
            self._make_ready(entry, domain)

    async def _finish(self, entry: Entry) -> None:
        if entry.finishing or entry.deleted:
            return
        entry.finishing = True
        envelope = entry.envelope
        failed = {r: reply for r, reply in entry.final.items() if reply[0] >= 300}
        try:
            if failed and envelope.sender and not envelope.is_bounce:
                head = await self._io(head_of, entry.source(), dsn.HEAD_LIMIT)
                report = dsn.bounce(self.hostname, envelope, failed, head)
                await self.put("", [envelope.sender], report, is_bounce=True)
            elif failed and await self._undeliverable(entry, failed):
                self._forget(entry)       # its file is in the quarantine now
                return
        except (SpoolFull, OSError) as error:
            log.error("spool: cannot hand on the failure of %s (a bounce, the postmaster"
                      " or the quarantine), keeping it queued: %s", envelope.queue_id, error)
            entry.finishing = False
            asyncio.get_running_loop().call_later(
                self.settings.retry_base_s, lambda: self._spawn(self._finish(entry)))
            return
        # In the loop, not in a disk thread: the unlink is what keeps a restarted spool
        # from sending the message again, and a thread hop (queued behind the commits'
        # fsyncs) would widen the window in which a kill -9 duplicates it.
        try:
            self.files.remove(envelope.queue_id, logged=entry.logged)
        except OSError as error:
            log.error("spool: cannot remove the finished %s: %s", envelope.queue_id, error)
        self._forget(entry)

    async def _undeliverable(self, entry: Entry, failed: dict[str, tuple[int, str]]) -> bool:
        """A message that gets no DSN failed for good: to the postmaster or the quarantine,
        never nowhere.  True: it went to the quarantine (its queue file moved there)."""
        envelope = entry.envelope
        what = "bounce" if envelope.is_bounce else "message with the null sender"
        reason = "; ".join(f"<{rcpt}>: {code} {text}" for rcpt, (code, text) in failed.items())
        target = self.settings.undeliverable_bounces
        if target != "quarantine" and not envelope.for_postmaster:
            header = _one_line(f"queue id {envelope.queue_id} from <{envelope.sender}>"
                               f" failed: {reason}")
            source = Prefixed(f"X-Mailfc-Undeliverable: {header}\r\n".encode(),
                              entry.source())
            copy = Envelope(new_queue_id(), "", (target,), time.time(),
                            envelope.mail_options, size=source.size, is_bounce=True,
                            for_postmaster=True)
            try:
                queue_id = await self._commit(copy, source)
            except (SpoolFull, OSError) as error:
                log.warning("spool: cannot send the undeliverable %s %s to %s (%s);"
                            " quarantining it", what, envelope.queue_id, target, error)
            else:
                log.warning("spool: %s %s undeliverable (%s); sent to %s as %s",
                            what, envelope.queue_id, reason, target, queue_id)
                return False
        record = {"queue_id": envelope.queue_id, "quarantined_at": time.time(),
                  "reason": reason,
                  "failed": {rcpt: [code, text] for rcpt, (code, text) in failed.items()}}
        await self._io(self.files.quarantine, envelope.queue_id, record)
        log.warning("spool: %s %s undeliverable (%s); kept in %s: see `mailfc queue"
                    " quarantine`", what, envelope.queue_id, reason, self.files.quarantine_dir)
        return True

    def _forget(self, entry: Entry) -> None:
        for timer in entry.timers.values():
            timer.cancel()
        if entry.message is not None:
            self._cached -= len(entry.message)
            entry.message = None
        if self.entries.get(entry.envelope.queue_id) is entry:
            del self.entries[entry.envelope.queue_id]
            if self._gone_during_scan is not None:
                self._gone_during_scan.add(entry.envelope.queue_id)

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
                metrics.spool_state(self.files.directory.name,
                                    [e.envelope.received_at for e in self.entries.values()])
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("spool: scan failed")

    async def _scan(self, *, resuming: bool = False) -> int:
        """Load committed messages this process does not know yet (start-up, other writers).
        resuming: taking over from an earlier owner; each message found goes to
        on_resume (it may have died between a commit and its sender's reply)."""
        known = set(self.entries) | set(self._committing)

        def read() -> list[tuple[Envelope, FileSlice, Progress]]:
            found = []
            for queue_id in self.files.queue_ids():
                if queue_id in known:
                    continue
                try:
                    envelope, file = self.files.read_head(self.files.queue / queue_id)
                    found.append((envelope, file, self.files.read_progress(queue_id)))
                except FileNotFoundError:
                    continue      # finished between listing and reading
                except ValueError as error:
                    log.error("spool: %s is unreadable, leaving it alone: %s", queue_id, error)
            return found

        gone: set[str] = set()
        self._gone_during_scan = gone
        try:
            found = await self._io(read)
        finally:
            self._gone_during_scan = None
        loaded = 0
        for envelope, file, progress in found:
            queue_id = envelope.queue_id
            # Known by now: a put of ours renamed it while we read (it adds it itself
            # once queue/ is synced), or it was delivered and removed meanwhile.
            if queue_id in self.entries or queue_id in self._committing or queue_id in gone:
                continue
            if self._stopping:
                break
            if resuming and self.on_resume is not None:
                self.on_resume(envelope)
            if self._add(envelope, file, progress, None):
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
                    self._make_ready(entry, domain)
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
    """Service `name`'s spool: a directory of its own under spool.directory."""
    return (Path(configured) if configured else state_dir / "spool") / name


def _one_line(text: str, limit: int = 900) -> str:
    """Header-safe: no line breaks, bounded (RFC 5322 lines stay under 998)."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[:limit - 3] + "..."

