"""Controller: keeps this host's containers in balance (one per host, resident).

Every controller.interval_s it looks at this host's containers and acts:

SCALE TO ZERO
    An instance idle past its spec's idle_timeout_s is drained and stopped.
    One past its lifetime_s with no open session is stopped; with sessions
    open it is marked draining (the dispatcher gives new sessions to another
    instance, starting one if needed) and stopped once they have ended.

SCALE UP / DOWN
    CPU quota and memory limit follow throttling and memory pressure
    (decisions.py), live with `runc update`, between the spec's base and
    maximum values.  A setting an admin pinned (`mailfc container update`,
    until `--unpin` or its `--pin-for` runs out) is left alone.

SCALE OUT / IN
    Open sessions per running instance (from the dispatcher) above
    controller.scale_out_sessions start another instance, up to the spec's
    max_instances; when quiet for scale_in_after_s the newest extra instance
    drains.

ADAPTIVE LIMITS
    Limits with a range (min_value/max_value) move within it from the host's
    headroom (smoothed) and the domain's recent reject ratio, every
    adaptive_interval_s, damped: a bounded step, a dead band and hysteresis
    (decisions.damped_step); the event carries the figures.

ORPHANS
    Every round the runtime sweeps runc's list for containers of its name
    prefix that no live CMDB row owns (a removed domain's) and removes them
    by name (event "orphan").

HOSTS
    Another host whose heartbeat is older than host_down_after_s is marked
    down; its domains are placed elsewhere at their next session.

VANISHED CONTAINERS
    A container the CMDB calls running whose init is gone (killed, crashed, the
    OOM killer) is cleaned up at the start of the next round (event "gone"): its
    row is closed, the dispatcher looks again, the domain's next session starts
    it afresh, and a dead Postfix's queue is looked at in the same round (see
    below).  A container that dies during a round (`runc update` answering
    "container not running", its cgroup gone) is treated the same way where it
    fails; the rest of the round goes on.

DEFERRED MAIL
    Every controller.deferred_retry_s (and at once after a Postfix vanished)
    each domain's persistent Postfix queue is looked at; a domain with mail
    there and no Postfix running here gets one started (event "retry_queue"),
    whose queue manager retries it.  Counted as mail: the finished queue files
    in deferred/, active/, hold/ and incoming/.  Not mail: what a Postfix killed
    while receiving leaves in incoming/, an empty file or one never marked
    finished (mode 0600, no owner-execute bit); such a file, older than
    LEFTOVER_AGE_S and held open by no process, is removed (event
    "queue_cleanup"), so it neither counts as queued mail forever nor starts
    the domain's Postfix every round.

Every decision is an event row (mailfc.db.events) with its reason
and measurements.  A failing step is logged and retried next round, and never
keeps the other steps of the round from running; the controller never stops
a container that has open sessions, except when the container's lifetime has
passed and it has been draining for drain_grace_s.
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from mailfc.config import Config
from mailfc.controller import decisions
from mailfc.db import events
from mailfc.dispatcher.server import Dispatcher
from mailfc.runtime.errors import CapacityExhausted
from mailfc.runtime.instance import Instance
from mailfc.runtime.lifecycle import Runtime
from mailfc.runtime.readiness import process_alive
from mailfc.runtime.starts import Trigger

log = logging.getLogger("mailfc.controller")

RECENT_WINDOW = "15 minutes"


class Controller:
    name = "controller"

    def __init__(self, config: Config, pool: asyncpg.Pool, runtime: Runtime,
                 dispatcher: Dispatcher) -> None:
        self.config = config
        self.settings = config.controller
        self.pool = pool
        self.runtime = runtime
        self.dispatcher = dispatcher
        self.host = config.host_name
        self._cpu: dict[str, decisions.CpuSample] = {}
        self._last_throttled: dict[str, float] = {}
        self._quiet_since: dict[tuple[str, str], float] = {}
        self._next_adaptive = 0.0
        self._headroom: float | None = None                  # smoothed
        self._trends: dict[int, decisions.Trend] = {}        # limit id -> its trend
        self._next_retry = 0.0
        # What "headroom" means is the host's business; replaceable for tests.
        self.headroom: Callable[[], float] = host_headroom
        self._task: asyncio.Task[None] | None = None
        self.rounds = 0

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def stop(self, drain_timeout: float) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _loop(self) -> None:
        while True:
            started = time.monotonic()
            try:
                await self.round()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("controller round failed; retrying next round")
            await asyncio.sleep(max(0.0, self.settings.interval_s -
                                    (time.monotonic() - started)))

    async def round(self) -> None:
        """One look at everything; public so tests can drive it step by step.

        Each step is guarded: one that fails is logged and tried again next round,
        and the steps after it still run."""
        self.rounds += 1
        await self._step("looking for vanished containers", self.reap_vanished())
        await self._step("removing orphaned containers", self.sweep_orphans())
        await self._step("stopping idle containers", self.lifecycle())
        instances = [i for i in await self.runtime.instances() if i.state == "running"]
        specs = await self._specs(instances)
        for instance in instances:
            spec = specs.get((instance.domain_id, instance.service))
            if spec is not None:
                await self._step("scaling up/down", self.scale_vertically(instance, spec),
                                 instance)
        await self._step("scaling out/in", self.scale_horizontally(instances, specs))
        await self._step("watching hosts", self.watch_hosts())
        if time.monotonic() >= self._next_adaptive:
            self._next_adaptive = time.monotonic() + self.settings.adaptive_interval_s
            await self._step("adapting limits", self.adapt_limits())
        if time.monotonic() >= self._next_retry:
            self._next_retry = time.monotonic() + self.settings.deferred_retry_s
            await self._step("retrying deferred mail", self.retry_deferred())

    async def _step(self, what: str, step: Awaitable[None],
                    instance: Instance | None = None) -> None:
        """Run one step of a round; a failure stays in it.  A failure that comes from
        `instance` having died under the step (runc: "container not running")
        marks it gone."""
        try:
            await step
        except asyncio.CancelledError:
            raise
        except Exception as error:
            if instance is not None and await self._vanished(instance, ask_runc=True):
                await self._gone(instance, f"it died while {what} ({error})")
                return
            log.warning("controller: %s%s failed: %s; trying again next round", what,
                        f" {instance.name}" if instance else "", error)

    # -- vanished containers ------------------------------------------------------------

    async def reap_vanished(self) -> None:
        """Clean up live rows of containers whose init is gone (VANISHED CONTAINERS)."""
        for instance in await self.runtime.instances():
            if instance.state in ("running", "draining") and \
                    await self._vanished(instance, ask_runc=False):
                await self._gone(instance, "its container's processes are gone")

    async def _vanished(self, instance: Instance, *, ask_runc: bool) -> bool:
        if not instance.pid or not process_alive(instance.pid):
            return True
        if not ask_runc:
            return False
        try:
            state = await self.runtime.backend.state(instance.name)
        except Exception:
            return False    # no better answer now; the next round looks again
        return state is None or state.status != "running"

    async def _gone(self, instance: Instance, why: str) -> None:
        self.dispatcher.forget(instance.domain)
        try:
            # Nothing to drain: stop() finds the container stopped and removes it.
            await self.runtime.stop(instance, drain_timeout=0.0, reason=f"vanished: {why}")
        except Exception as error:
            log.warning("cleaning up vanished container %s failed: %s; trying again next"
                        " round", instance.name, error)
            return
        self._cpu.pop(instance.name, None)
        self._last_throttled.pop(instance.name, None)
        await self._event("gone", f"{why}: cleaned up, the domain's next session starts"
                          " it again", instance, pid=instance.pid)
        if instance.service == "smtp":
            self._next_retry = 0.0  # its queue may hold mail: look this round

    async def sweep_orphans(self) -> None:
        """Remove containers no CMDB row owns (ORPHANS)."""
        for name in await self.runtime.sweep():
            self._cpu.pop(name, None)
            self._last_throttled.pop(name, None)
            await events.record(self.pool, "orphan", "no CMDB row owns it (its domain was"
                                " removed, or its row closed): container removed",
                                host=self.host, instance=name)

    async def _event(self, kind: str, reason: str, instance: Instance | None = None,
                     domain: str | None = None, **detail: Any) -> None:
        log.info("%s %s: %s", kind, instance.name if instance else domain, reason)
        await events.record(
            self.pool, kind, reason, host=self.host,
            domain=instance.domain if instance else domain,
            service=instance.service if instance else None,
            instance=instance.name if instance else None, detail=detail)

    # -- scale to zero ---------------------------------------------------------------

    async def lifecycle(self) -> None:
        for instance, why in await self.runtime.due_for_stop():
            sessions = self.dispatcher.open_sessions.get(instance.name, 0)
            if why == "idle" and sessions:
                continue  # activity not yet written: it is not idle
            if sessions:
                await self.pool.execute(
                    "UPDATE container_instances SET state = 'draining', draining_at = now()"
                    " WHERE id = $1 AND state = 'running'", instance.id)
                self.dispatcher.forget(instance.domain)
                await self._event("drain", f"lifetime over with {sessions} session(s) open:"
                                  " no new sessions, stops when they end", instance,
                                  open_sessions=sessions)
                continue
            await self._step("stopping", self._stop(
                instance, f"{why} timeout reached" if why == "idle"
                else "lifetime over, no session open", reason_kind=why), instance)
        for instance in await self.runtime.instances():
            if instance.state == "draining" and \
                    not self.dispatcher.open_sessions.get(instance.name):
                await self._step("stopping", self._stop(
                    instance, "drained: its last session ended", reason_kind="drained"),
                    instance)

    async def _stop(self, instance: Instance, reason: str, reason_kind: str) -> None:
        self.dispatcher.forget(instance.domain)
        await self.runtime.stop(instance, reason=reason)
        self._cpu.pop(instance.name, None)
        self._last_throttled.pop(instance.name, None)
        await self._event("stop", reason, instance, cause=reason_kind)

    # -- scale up / down ----------------------------------------------------------------

    async def scale_vertically(self, instance: Instance, spec: asyncpg.Record) -> None:
        try:
            stats = self.runtime.stats(instance)
            limits = self.runtime.limits(instance)
        except Exception as error:  # the container went away between looks
            log.debug("no stats for %s: %s", instance.name, error)
            return
        sample = decisions.CpuSample(stats.nr_periods, stats.nr_throttled)
        before = self._cpu.get(instance.name)
        self._cpu[instance.name] = sample
        if before is None:
            return
        share = decisions.throttled_share(before, sample)
        quota = limits.cpu_quota_us if limits.cpu_quota_us > 0 else spec["cpu_quota_us"]
        now = time.monotonic()
        if instance.pinned("cpu"):
            pass    # the admin's setting stands
        elif share >= self.settings.scale_up_share:
            self._last_throttled[instance.name] = now
            target = decisions.scaled_up(quota, spec["cpu_quota_max_us"],
                                         self.settings.scale_step)
            if target is not None:
                await self.runtime.update(instance, cpu_quota_us=target)
                await self._event("scale_up", f"throttled in {share:.0%} of CPU periods:"
                                  f" quota {quota} -> {target} us", instance,
                                  throttled_share=round(share, 3), cpu_quota_us=target)
        elif now - self._last_throttled.get(instance.name, now - 1e9) >= \
                self.settings.scale_down_after_s or instance.name not in self._last_throttled:
            target = decisions.scaled_down(quota, spec["cpu_quota_us"], self.settings.scale_step)
            if target is not None:
                await self.runtime.update(instance, cpu_quota_us=target)
                await self._event("scale_down", f"no throttling for "
                                  f"{self.settings.scale_down_after_s:g} s: quota {quota} ->"
                                  f" {target} us", instance, cpu_quota_us=target)
        memory_limit = limits.memory_bytes if limits.memory_bytes > 0 else spec["memory_bytes"]
        if memory_limit and not instance.pinned("memory") and \
                stats.memory_bytes / memory_limit >= self.settings.memory_high:
            target = decisions.scaled_up(memory_limit, spec["memory_max_bytes"],
                                         self.settings.scale_step)
            if target is not None:
                await self.runtime.update(instance, memory_bytes=target)
                await self._event("scale_up", f"memory at {stats.memory_bytes / memory_limit:.0%}"
                                  f" of its limit: {memory_limit} -> {target} bytes", instance,
                                  memory_bytes=target)

    async def _specs(self, instances: list[Instance]
                     ) -> dict[tuple[int, str], asyncpg.Record]:
        """The effective spec of each (domain, service), in one query per round:
        the domain's own row, else the default row (domain_id NULL)."""
        keys = sorted({(i.domain_id, i.service) for i in instances})
        rows = await self.pool.fetch(
            """
            SELECT DISTINCT ON (k.domain_id, k.service) k.domain_id AS key_domain,
                   k.service AS key_service, s.cpu_quota_us, s.cpu_quota_max_us,
                   s.memory_bytes, s.memory_max_bytes, s.max_instances
            FROM unnest($1::bigint[], $2::text[]) AS k(domain_id, service)
            JOIN container_specs s ON s.service = k.service
                 AND (s.domain_id = k.domain_id OR s.domain_id IS NULL)
            ORDER BY k.domain_id, k.service, s.domain_id IS NULL
            """, [k[0] for k in keys], [k[1] for k in keys])
        return {(row["key_domain"], row["key_service"]): row for row in rows}

    # -- scale out / in -----------------------------------------------------------------

    async def scale_horizontally(self, instances: list[Instance],
                                 specs: dict[tuple[int, str], asyncpg.Record]) -> None:
        groups: dict[tuple[str, str], list[Instance]] = defaultdict(list)
        for instance in instances:
            groups[(instance.domain, instance.service)].append(instance)
        threshold = self.settings.scale_out_sessions
        now = time.monotonic()
        for (domain, service), members in groups.items():
            sessions = [self.dispatcher.open_sessions.get(i.name, 0) for i in members]
            spec = specs[(members[0].domain_id, members[0].service)]
            if decisions.wants_scale_out(sessions, threshold, spec["max_instances"]):
                try:
                    started = await self.runtime.start(
                        domain, service, Trigger("controller", protocol=service,
                                                 why="scale out"))
                except CapacityExhausted as error:
                    log.info("cannot scale out %s: %s", domain, error)
                    continue
                except Exception as error:  # StartFailed, the database: next round
                    log.warning("scaling out %s failed: %s; trying again next round",
                                domain, error)
                    continue
                self.dispatcher.forget(domain)
                self._quiet_since.pop((domain, service), None)
                await self._event("scale_out", f"{sum(sessions)} sessions on {len(members)}"
                                  f" instance(s) (>= {threshold} each): started another",
                                  started, open_sessions=sessions)
                continue
            if decisions.quiet_enough_to_scale_in(sessions, threshold):
                since = self._quiet_since.setdefault((domain, service), now)
                if now - since >= self.settings.scale_in_after_s:
                    newest = max(members, key=lambda i: i.id)
                    await self.pool.execute(
                        "UPDATE container_instances SET state = 'draining',"
                        " draining_at = now() WHERE id = $1 AND state = 'running'", newest.id)
                    self.dispatcher.forget(domain)
                    self._quiet_since.pop((domain, service), None)
                    await self._event("scale_in", f"{sum(sessions)} sessions on {len(members)}"
                                      f" instances for {self.settings.scale_in_after_s:g} s:"
                                      " draining the newest", newest, open_sessions=sessions)
            else:
                self._quiet_since.pop((domain, service), None)

    # -- deferred mail of stopped domains -----------------------------------------------

    async def retry_deferred(self) -> None:
        """Start the Postfix of every domain whose persistent queue holds mail but
        which has no live instance here, so the mail is retried, not forgotten."""
        live = {i.domain for i in await self.runtime.instances(service="smtp")}
        census = await asyncio.to_thread(queue_census, self.runtime.settings.domains_dir)
        for domain, removed in census.removed.items():
            await self._event("queue_cleanup", f"removed {len(removed)} unfinished queue"
                              " file(s) a killed Postfix left in incoming/", domain=domain,
                              files=removed[:20])
        for domain, queued in census.queued.items():
            if domain in live:
                continue
            try:
                instance = await self.runtime.ensure(
                    domain, "smtp", Trigger("controller", protocol="smtp",
                                            why=f"retry {queued} queued message(s)"))
            except Exception as error:
                log.warning("cannot start %s to retry its %d queued message(s): %s",
                            domain, queued, error)
                continue
            await self._event("retry_queue", f"{queued} message(s) waiting in its queue:"
                              " started Postfix to retry them", instance, queued=queued)

    # -- hosts ------------------------------------------------------------------------

    async def watch_hosts(self) -> None:
        rows = await self.pool.fetch(
            "UPDATE hosts SET state = 'down' WHERE state <> 'down' AND name <> $1"
            " AND heartbeat_at < now() - make_interval(secs => $2)"
            " RETURNING name, heartbeat_at", self.host, self.settings.host_down_after_s)
        for row in rows:
            await events.record(self.pool, "host_down",
                                f"no heartbeat since {row['heartbeat_at']:%H:%M:%S}: its"
                                " domains move at their next session",
                                host=row["name"], detail={"seen_by": self.host})

    # -- adaptive limits ------------------------------------------------------------------

    async def adapt_limits(self) -> None:
        rows = await self.pool.fetch(
            "SELECT l.id, l.kind, l.value, l.min_value, l.max_value, d.name AS domain"
            " FROM limits l JOIN domains d ON d.id = l.domain_id"
            " WHERE l.min_value IS NOT NULL AND (d.host_id IS NULL OR d.host_id ="
            " (SELECT id FROM hosts WHERE name = $1))", self.host)
        if not rows:
            return
        sample = self.headroom()
        self._headroom = headroom = decisions.smoothed(self._headroom, sample)
        for row in rows:
            reject_ratio = await self._reject_ratio(row["domain"])
            target = decisions.adaptive_target(row["min_value"], row["max_value"], headroom,
                                               reject_ratio)
            move = decisions.damped_step(row["value"], target, row["min_value"],
                                         row["max_value"], self._trends.get(row["id"],
                                                                            decisions.Trend()))
            self._trends[row["id"]] = move.trend
            value = move.value
            if value == row["value"]:
                continue
            await self.pool.execute("UPDATE limits SET value = $2, updated_at = now()"
                                    " WHERE id = $1", row["id"], value)
            await self._event("limit_change", f"{row['kind']} {row['value']} -> {value}"
                              f" towards {target} (step at most {move.step_bound}, dead band"
                              f" {move.dead_band}; headroom {headroom:.0%}, rejects"
                              f" {reject_ratio:.0%}, range {row['min_value']}..{row['max_value']})",
                              domain=row["domain"], limit_kind=row["kind"], value=value,
                              previous=row["value"], headroom=round(headroom, 3),
                              headroom_sample=round(sample, 3),
                              reject_ratio=round(reject_ratio, 3), **move.figures())

    async def _reject_ratio(self, domain: str) -> float:
        row = await self.pool.fetchrow(
            f"SELECT count(*) AS total, count(*) FILTER (WHERE verdict IN"
            f" ('reject', 'tempfail')) AS refused FROM smtp_messages"
            f" WHERE domain = $1 AND started_at >= now() - interval '{RECENT_WINDOW}'", domain)
        if row is None or not row["total"]:
            return 0.0
        return float(row["refused"]) / float(row["total"])


QUEUE_DIRECTORIES = ("deferred", "active", "incoming", "hold")
# An unfinished file in incoming/ this much older than its last write is a
# leftover of a killed Postfix (a live cleanup(8) holds its file open anyway).
LEFTOVER_AGE_S = 60.0


@dataclass
class QueueCensus:
    queued: dict[str, int] = field(default_factory=dict)          # domain -> messages
    removed: dict[str, list[str]] = field(default_factory=dict)   # domain -> leftovers


def queue_census(domains_dir: Path, now: float | None = None) -> QueueCensus:
    """The messages in each domain's Postfix queues, leftovers of a killed Postfix
    not counted (and removed when old and held open by no process)."""
    now = time.time() if now is None else now
    census = QueueCensus()
    candidates: list[tuple[str, Path, os.stat_result]] = []
    for domain_dir in sorted(domains_dir.glob("*")):
        count = 0
        for spool in domain_dir.glob("postfix-*/spool"):
            for name in QUEUE_DIRECTORIES:
                queue = spool / name
                if not queue.is_dir():
                    continue
                for path in queue.rglob("*"):
                    try:
                        info = path.lstat()
                    except OSError:
                        continue    # gone meanwhile: Postfix moved it on
                    if not stat.S_ISREG(info.st_mode):
                        continue
                    if _finished(name, info):
                        count += 1
                    elif name == "incoming" and now - info.st_mtime > LEFTOVER_AGE_S:
                        candidates.append((domain_dir.name, path, info))
        if count:
            census.queued[domain_dir.name] = count
    if candidates:
        held = open_files()
        for domain, path, info in candidates:
            if (info.st_dev, info.st_ino) in held:
                continue    # a live cleanup(8) is still writing it
            try:
                path.unlink()
            except OSError as error:
                log.warning("cannot remove the queue leftover %s: %s", path, error)
                continue
            census.removed.setdefault(domain, []).append(path.name)
    return census


def _finished(queue: str, info: os.stat_result) -> bool:
    """A queue file Postfix will deliver: not empty, and in incoming/ marked done
    (cleanup(8) sets the owner-execute bit when the file is complete)."""
    if info.st_size == 0:
        return False
    return queue != "incoming" or bool(info.st_mode & stat.S_IXUSR)


def open_files() -> set[tuple[int, int]]:
    """(device, inode) of every file some process on this machine holds open."""
    held: set[tuple[int, int]] = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        directory = f"/proc/{pid}/fd"
        try:
            descriptors = os.listdir(directory)
        except OSError:
            continue
        for fd in descriptors:
            try:
                info = os.stat(f"{directory}/{fd}")
            except OSError:
                continue
            held.add((info.st_dev, info.st_ino))
    return held


def host_headroom() -> float:
    """1 - the busiest of CPU load per core and memory in use, from /proc."""
    cpu = os.getloadavg()[0] / (os.cpu_count() or 1)
    memory = 0.0
    try:
        info: dict[str, int] = {}
        with open("/proc/meminfo") as handle:
            for line in handle:
                key, _, rest = line.partition(":")
                info[key] = int(rest.split()[0])
        memory = 1.0 - info["MemAvailable"] / info["MemTotal"]
    except (OSError, KeyError, ValueError, ZeroDivisionError):
        pass
    return max(0.0, 1.0 - max(cpu, memory))
