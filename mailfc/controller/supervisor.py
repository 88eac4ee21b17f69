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
SIGTERM or Ctrl-C.  A child reports that it is up by writing "ready" on a pipe
it inherits (mailfc.metrics.readiness), not by a log line.  One that fails
while starting stops the whole platform with its error.

CRASH LOOPS.  A child that dies is started again after RESTART_DELAY_S, doubled
for each further death that comes within STABLE_S of its start, up to
RESTART_MAX_S: a child that cannot run costs a start a minute, not one a
second.  Each restart is an event ("restart", `mailfc events`) and counts in
mailfc_process_restarts_total.

HEALTH AND METRICS.  The supervisor listens on [metrics] listen (default
127.0.0.1:9810, mailfc.metrics.http): /metrics sums what every child counted
(PROMETHEUS_MULTIPROC_DIR = <state_dir>/metrics, emptied at each start), /healthz
says the supervisor answers, /readyz is 503 while a child is not ready or the
database does not answer.  Under systemd (Type=notify, contrib/systemd) it sends
READY=1 once every child is ready.

RELOAD.  SIGHUP re-reads the configuration file: the supervisor takes the new
log settings at once, then cycles every child but "host" one at a time (see
CYCLING), so the new processes run with the new file (limits, timeouts, filter
chains, listeners) without a refused connection.  Settings the supervisor or
the host process hold (RESTART_SECTIONS) are logged as needing a restart.

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
import shutil
import signal
import sys
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
from prometheus_client import multiprocess

from mailfc.db import events
from mailfc.db.embedded import EmbeddedCluster
from mailfc.errors import ConfigError, DatabaseError
from mailfc.metrics.readiness import READY_FD_ENV, READY_LINE

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
START_TIMEOUT_S = 120.0
RESTART_DELAY_S = 1.0
RESTART_MAX_S = 60.0
STABLE_S = 60.0
DB_PING_S = 2.0
# Sections the supervisor or the never-cycled host process hold: a change needs a
# restart of `mailfc up` (RELOAD in the header).
RESTART_SECTIONS = ("paths", "database", "host", "cluster", "network", "runtime",
                    "dispatcher", "controller", "metrics")
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
    restarts: int = 0
    quick_deaths: int = 0       # deaths within STABLE_S of their start, in a row
    started_at: float = 0.0
    restarting: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None


NOT_CYCLED = ("host",)


def restart_delay(quick_deaths: int) -> float:
    """The wait before a restart after `quick_deaths` deaths in a row, each within
    STABLE_S of its start (CRASH LOOPS in the header): 1, 2, 4, ... up to 60 s."""
    return min(RESTART_DELAY_S * 2.0 ** min(quick_deaths, 16), RESTART_MAX_S)


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
                 groups: tuple[tuple[str, tuple[str, ...]], ...] = GROUPS,
                 metrics_dir: Path | None = None, dsn: str | None = None,
                 host: str | None = None) -> None:
        self.config_path = config_path
        self.verbose = verbose
        self.resident_lifetime_s = resident_lifetime_s
        self.database = database
        self.children = [Child(name, services) for name, services in groups]
        self.stopping = False
        self.cycles = 0
        self.metrics_dir = metrics_dir
        self.dsn = dsn
        self.host = host
        self.database_up = dsn is None
        self._database_checked = 0.0
        # Set whenever a child gets a new process: the watch loop waits on it too.
        self.changed = asyncio.Event()
        self._background: set[asyncio.Task[None]] = set()
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

    def prepare_metrics_dir(self) -> None:
        """An empty PROMETHEUS_MULTIPROC_DIR: the files of a previous run's
        processes would otherwise count again."""
        if self.metrics_dir is None:
            return
        shutil.rmtree(self.metrics_dir, ignore_errors=True)
        self.metrics_dir.mkdir(parents=True, exist_ok=True)

    def _environment(self, child: Child, ready_fd: int) -> dict[str, str]:
        env = {**os.environ, "MAILFC_PROCESS": child.name, READY_FD_ENV: str(ready_fd)}
        env.pop("NOTIFY_SOCKET", None)     # systemd hears from the supervisor only
        if self.metrics_dir is not None:
            env["PROMETHEUS_MULTIPROC_DIR"] = str(self.metrics_dir)
        return env

    async def _spawn(self, child: Child) -> None:
        child.ready.clear()
        child.last_lines.clear()
        ready_read, ready_write = os.pipe()
        try:
            child.process = await asyncio.create_subprocess_exec(
                *self._argv(child), stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
                env=self._environment(child, ready_write), pass_fds=(ready_write,))
        except BaseException:
            os.close(ready_read)
            raise
        finally:
            os.close(ready_write)
        child.started_at = time.monotonic()
        child.pump = asyncio.create_task(self._pump(child))
        self._in_background(self._await_ready(child, child.process, ready_read))
        self.changed.set()

    async def _await_ready(self, child: Child, process: asyncio.subprocess.Process,
                           ready_read: int) -> None:
        """The child's READY line on its pipe (end of file: it died first)."""
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(ready_read, "rb", 0))
        try:
            line = await reader.readline()
        finally:
            transport.close()
        if line == READY_LINE and child.process is process and process.returncode is None:
            child.ready.set()

    def _in_background(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _pump(self, child: Child) -> None:
        assert child.process is not None and child.process.stderr is not None
        while line := await child.process.stderr.readline():
            text = line.decode("utf-8", "replace").rstrip()
            child.last_lines = [*child.last_lines[-19:], text]
            sys.stderr.write(f"[{child.name}] {text}\n")

    def _gone(self, process: asyncio.subprocess.Process) -> None:
        """A child process ended: its live gauges stop counting."""
        if self.metrics_dir is not None:
            with contextlib.suppress(OSError):
                multiprocess.mark_process_dead(  # type: ignore[no-untyped-call]
                    process.pid, str(self.metrics_dir))

    # -- health ------------------------------------------------------------------------

    def process_states(self) -> dict[str, tuple[bool, int]]:
        return {child.name: (child.running and child.ready.is_set(), child.restarts)
                for child in self.children}

    async def readiness(self) -> tuple[bool, str]:
        """Whether every child is ready and the database answers; what is not."""
        missing = [child.name for child in self.children
                   if not (child.running and child.ready.is_set())]
        if not await self.check_database():
            missing.append("database")
        return (not missing), ", ".join(missing)

    async def check_database(self) -> bool:
        if self.dsn is None or time.monotonic() - self._database_checked < DB_PING_S:
            return self.database_up
        try:
            connection = await asyncpg.connect(self.dsn, timeout=DB_PING_S)
            try:
                await connection.fetchval("SELECT 1", timeout=DB_PING_S)
            finally:
                await connection.close()
            self.database_up = True
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
            self.database_up = False
        self._database_checked = time.monotonic()
        return self.database_up

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
                if old.returncode is not None:
                    self._gone(old)
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
            self.changed.clear()
            waits = {asyncio.create_task(c.process.wait()): (c, c.process)
                     for c in self.children if c.process is not None and c.running}
            stopper = asyncio.create_task(stop.wait())
            changed = asyncio.create_task(self.changed.wait())
            done, _ = await asyncio.wait({*waits, stopper, changed},
                                         return_when=asyncio.FIRST_COMPLETED)
            for task in (*waits, stopper, changed):
                task.cancel()
            if stop.is_set():
                return
            for task in done:
                if task not in waits:
                    continue
                child, process = waits[task]
                if child.process is not process or self.stopping:
                    continue  # replaced by a cycle: its exit is expected
                self._died(child, process)

    def _died(self, child: Child, process: asyncio.subprocess.Process) -> None:
        """Start `child` again after its backoff (CRASH LOOPS in the header)."""
        child.ready.clear()
        self._gone(process)
        lived_s = time.monotonic() - child.started_at
        child.quick_deaths = child.quick_deaths + 1 if lived_s < STABLE_S else 0
        delay = restart_delay(child.quick_deaths)
        child.restarts += 1
        reason = (f"the {child.name} process (pid {process.pid}) exited with status"
                  f" {process.returncode} after {lived_s:.1f} s; starting it again in"
                  f" {delay:g} s")
        log.error("%s", reason)
        self._in_background(self._record_restart(child, process, reason, delay, lived_s))
        if child.restarting is None or child.restarting.done():
            child.restarting = asyncio.create_task(self._restart_later(child, delay))

    async def _restart_later(self, child: Child, delay: float) -> None:
        await asyncio.sleep(delay)
        if self.stopping or child.running:
            return
        try:
            await self._spawn(child)
        except OSError as error:
            # As if it had died at once: the backoff grows and the next try comes.
            log.error("the %s process could not be started: %s", child.name, error)
            child.started_at = time.monotonic()
            child.quick_deaths += 1
            child.restarting = None
            self._in_background(self._restart_later(child, restart_delay(child.quick_deaths)))

    async def _record_restart(self, child: Child, process: asyncio.subprocess.Process,
                              reason: str, delay: float, lived_s: float) -> None:
        if self.dsn is None:
            return
        try:
            connection = await asyncpg.connect(self.dsn, timeout=10)
            try:
                await events.record(connection, "restart", reason, host=self.host,
                                    service=child.name,
                                    detail={"pid": process.pid, "status": process.returncode,
                                            "lived_s": round(lived_s, 1), "delay_s": delay,
                                            "restarts": child.restarts})
            finally:
                await connection.close()
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
            log.warning("the restart event was not recorded: %s", error)

    async def reload(self, changed_sections: list[str]) -> None:
        """Cycle every child but the host one, one at a time (RELOAD in the header)."""
        needs_restart = [name for name in changed_sections if name in RESTART_SECTIONS]
        if needs_restart:
            log.warning("reload: %s changed; these take effect only after a restart of"
                        " mailfc up", ", ".join(f"[{name}]" for name in needs_restart))
        for child in self.children:
            if child.name not in NOT_CYCLED and not self.stopping and child.running:
                await self.cycle(child)
        log.info("reload: %d processes replaced with the new configuration",
                 sum(1 for child in self.children if child.name not in NOT_CYCLED))

    async def stop(self) -> None:
        self.stopping = True
        for child in self.children:
            if child.restarting is not None:
                child.restarting.cancel()
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
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
