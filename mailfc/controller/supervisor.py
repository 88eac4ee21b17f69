"""Supervisor: `mailfc up` runs the resident services as a few processes, not one.

Each group below is one `mailfc up --services ...` child process with its own
event loop, so a flood that keeps one role busy (TLS handshakes and logins at
the SMTP Router, say) does not delay the sessions of another (IMAP of a quiet
domain) behind it in a shared loop, and the machine's cores are all used:

    milter      milter                      (every domain Postfix's policy)
    hooks       hook-server                 (every domain Dovecot's policy)
    host        dispatcher, controller      (the controller reads the dispatcher's counts)
    outbound    smtp-out, filter-out
    routers     lmtp-router, imap-router
    submission  submission-router
    inbound     smtp-in                     (with the [filter_in] chain: a process of its
                                             own, it fills a core when the MX is busy)

A flood of one domain's submissions then loads the submission, milter and
outbound processes, while another domain's IMAP commands pass the routers,
host and hooks processes, each with its own share of the CPU.

They start in this order, each once the previous one reports that it is up
(the next hop listens before its clients start); they stop in reverse order on
SIGTERM or Ctrl-C.  A child that dies is started again after RESTART_DELAY_S;
one that fails while starting stops the whole platform with its error.

THE DATABASE.  With the embedded PostgreSQL (no database.dsn) the supervisor
also watches its postmaster, every DB_CHECK_S (the pid in postmaster.pid,
looked up in /proc).  When it is gone (killed, crashed, the OOM killer) the
cluster is started again at once, then after DB_BACKOFF_S between failed
attempts (a start fails while the old server's processes still hold its
shared memory, for a moment after a kill -9); each restart is an event
("db_restart", `mailfc events`) and a log line.  Meanwhile the services answer
what needs the database with a temporary failure (451, NO [UNAVAILABLE]);
their pools connect again by themselves.  An external database (database.dsn)
is its administrator's to supervise.

CYCLING.  Every controller.resident_lifetime_s each group but "host" is
replaced: a new process starts and takes over the listening sockets
(SO_REUSEPORT, or the unix socket path) before the old one gets SIGTERM and
drains its sessions, so a leak or an update never needs a restart window and
no connection is refused.  The host process (dispatcher and controller) owns
the containers and is not cycled.  The
children's log lines go to the supervisor's standard error, prefixed with the
group name.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field

import asyncpg

from mailfc.db import events
from mailfc.db.embedded import EmbeddedCluster
from mailfc.errors import ConfigError, DatabaseError

log = logging.getLogger("mailfc.supervisor")

GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("milter", ("milter",)),
    ("hooks", ("hook-server",)),
    ("host", ("dispatcher", "controller")),
    ("outbound", ("smtp-out", "filter-out")),
    ("routers", ("lmtp-router", "imap-router")),
    ("submission", ("submission-router",)),
    ("inbound", ("smtp-in",)),
)
READY_MARK = "mailfc is up"
START_TIMEOUT_S = 120.0
RESTART_DELAY_S = 1.0
DB_CHECK_S = 1.0
DB_BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 15.0, 30.0)


@dataclass
class Child:
    name: str
    services: tuple[str, ...]
    process: asyncio.subprocess.Process | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    pump: asyncio.Task[None] | None = None
    last_lines: list[str] = field(default_factory=list)


NOT_CYCLED = ("host",)


class DatabaseWatch:
    """The embedded PostgreSQL, started again when its postmaster is gone (THE
    DATABASE in the module's header)."""

    def __init__(self, cluster: EmbeddedCluster, host: str,
                 check_s: float = DB_CHECK_S) -> None:
        self.cluster = cluster
        self.host = host
        self.check_s = check_s
        self.restarts = 0

    async def run(self, stop: asyncio.Event) -> None:
        failures = 0
        down_since: float | None = None
        lost_pid: int | None = None
        while not stop.is_set():
            wait = DB_BACKOFF_S[min(failures, len(DB_BACKOFF_S)) - 1] if failures \
                else self.check_s
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), wait)
            if stop.is_set():
                return
            if await asyncio.to_thread(self.cluster.postmaster_alive):
                failures, down_since = 0, None
                continue
            if down_since is None:
                down_since = time.monotonic()
                lost_pid = self.cluster.postmaster_pid()
                log.error("the embedded PostgreSQL is down (postmaster pid %s gone);"
                          " starting it again", lost_pid or "?")
            try:
                started = await asyncio.to_thread(self.cluster.ensure_running)
            except (DatabaseError, OSError) as error:
                failures += 1
                log.error("the embedded PostgreSQL did not start (attempt %d): %s; trying"
                          " again in %g s", failures, error,
                          DB_BACKOFF_S[min(failures, len(DB_BACKOFF_S)) - 1])
                continue
            if not started:
                continue    # someone else (a command, a child) started it meanwhile
            down_s = time.monotonic() - down_since
            attempts, failures, down_since = failures + 1, 0, None
            self.restarts += 1
            reason = (f"its postmaster (pid {lost_pid or '?'}) was gone: started again after"
                      f" {down_s:.1f} s ({attempts} attempt(s))")
            log.warning("the embedded PostgreSQL is up again: %s", reason)
            await self._record(reason, {"lost_pid": lost_pid, "attempts": attempts,
                                        "down_s": round(down_s, 1),
                                        "pid": self.cluster.postmaster_pid()})

    async def _record(self, reason: str, detail: dict[str, object]) -> None:
        try:
            connection = await asyncpg.connect(self.cluster.dsn, timeout=10)
            try:
                await events.record(connection, "db_restart", reason, host=self.host,
                                    detail=detail)
            finally:
                await connection.close()
        except (OSError, TimeoutError, asyncpg.PostgresError) as error:
            log.warning("the db_restart event was not recorded: %s", error)


class Supervisor:
    def __init__(self, config_path: str | None, verbose: bool,
                 resident_lifetime_s: float = 0.0, *,
                 database: DatabaseWatch | None = None,
                 groups: tuple[tuple[str, tuple[str, ...]], ...] = GROUPS) -> None:
        self.config_path = config_path
        self.verbose = verbose
        self.resident_lifetime_s = resident_lifetime_s
        self.database = database
        self.children = [Child(name, services) for name, services in groups]
        self.stopping = False
        self.cycles = 0
        # Processes being replaced by a cycle: stop() ends them too, should it come
        # while a cycle waits for the new process to be ready.
        self.retiring: set[asyncio.subprocess.Process] = set()

    def _argv(self, child: Child) -> list[str]:
        argv = [sys.executable, "-m", "mailfc"]
        if self.config_path:
            argv += ["--config", self.config_path]
        argv += ["up", "--services", ",".join(child.services)]
        if self.verbose:
            argv.append("--verbose")
        return argv

    async def _spawn(self, child: Child) -> None:
        child.ready.clear()
        child.last_lines.clear()
        child.process = await asyncio.create_subprocess_exec(
            *self._argv(child), stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "MAILFC_PROCESS": child.name})
        child.pump = asyncio.create_task(self._pump(child))

    async def _pump(self, child: Child) -> None:
        assert child.process is not None and child.process.stderr is not None
        while line := await child.process.stderr.readline():
            text = line.decode("utf-8", "replace").rstrip()
            child.last_lines = [*child.last_lines[-19:], text]
            sys.stderr.write(f"[{child.name}] {text}\n")
            if READY_MARK in text:
                child.ready.set()

    async def start(self) -> None:
        for child in self.children:
            await self._spawn(child)
            assert child.process is not None
            waiting = asyncio.create_task(child.ready.wait())
            exited = asyncio.create_task(child.process.wait())
            await asyncio.wait({waiting, exited}, timeout=START_TIMEOUT_S,
                               return_when=asyncio.FIRST_COMPLETED)
            waiting.cancel()
            exited.cancel()
            if not child.ready.is_set():
                if child.pump is not None:
                    with contextlib.suppress(asyncio.CancelledError):
                        await asyncio.wait_for(child.pump, 2.0)
                error = next((line for line in reversed(child.last_lines)
                              if line.startswith(("Error:", "error:"))),
                             "\n".join(child.last_lines[-5:]) or "no output")
                await self.stop()
                raise ConfigError(f"the {child.name} process did not start: {error}")
            log.info("%s process up (%s)", child.name, ", ".join(child.services))

    async def cycle(self, child: Child) -> None:
        """Replace `child`'s process: the new one first, then the old one drains."""
        old, old_pump = child.process, child.pump
        if old is not None:
            self.retiring.add(old)
        try:
            await self._spawn(child)
            assert child.process is not None
            try:
                await asyncio.wait_for(child.ready.wait(), START_TIMEOUT_S)
            except TimeoutError:
                log.error("the new %s process did not start; keeping the old one",
                          child.name)
                with contextlib.suppress(ProcessLookupError):
                    child.process.kill()
                child.process, child.pump = old, old_pump
                return
            if old is not None and old.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    old.send_signal(signal.SIGTERM)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(old.wait(), 120)
        finally:
            if old is not None and (old.returncode is not None or child.process is old):
                self.retiring.discard(old)
        self.cycles += 1
        log.info("%s process replaced (pid %s -> %s)", child.name,
                 old.pid if old else "-", child.process.pid)

    async def _cycle_forever(self) -> None:
        while True:
            await asyncio.sleep(self.resident_lifetime_s)
            for child in self.children:
                if child.name not in NOT_CYCLED and not self.stopping:
                    await self.cycle(child)

    async def watch(self, stop: asyncio.Event) -> None:
        """Restart children that die, until `stop` is set; cycle them on schedule."""
        helpers = []
        if self.resident_lifetime_s > 0:
            helpers.append(asyncio.create_task(self._cycle_forever()))
        if self.database is not None:
            helpers.append(asyncio.create_task(self.database.run(stop)))
        try:
            await self._watch(stop)
        finally:
            for helper in helpers:
                helper.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)

    async def _watch(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            waits = {asyncio.create_task(c.process.wait()): (c, c.process)
                     for c in self.children if c.process is not None}
            stopper = asyncio.create_task(stop.wait())
            done, _ = await asyncio.wait({*waits, stopper}, return_when=asyncio.FIRST_COMPLETED)
            for task in (*waits, stopper):
                task.cancel()
            if stop.is_set():
                return
            for task in done:
                if task not in waits:
                    continue
                child, process = waits[task]
                if child.process is not process:
                    continue  # replaced by a cycle: its exit is expected
                log.error("%s process exited (status %s); starting it again", child.name,
                          child.process.returncode if child.process else "?")
                await asyncio.sleep(RESTART_DELAY_S)
                await self._spawn(child)

    async def stop(self) -> None:
        self.stopping = True
        for child in reversed(self.children):
            for process in (child.process, *self.retiring):
                if process is None or process.returncode is not None:
                    continue
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(process.wait(), 60)
                except TimeoutError:
                    log.error("%s process did not stop within 60 s; killing it",
                              child.name)
                    with contextlib.suppress(ProcessLookupError):
                        process.kill()
                    await process.wait()
            if child.pump is not None:
                with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                    await asyncio.wait_for(child.pump, 2.0)
