"""Runtime: the lifecycle API the dispatcher, the controller and the CLI use.

    runtime = Runtime(settings, pool)        # pool: asyncpg pool on the CMDB
    await runtime.open()                     # checks, bridge, netns pool
    await runtime.recover()                  # once at start-up, see recovery.py
    inst = await runtime.ensure("example.org", "imap", Trigger("session", "imap"))
    # connect to the unix socket inst.socket("lmtp") (host root only)
    await runtime.touch(inst)                # session activity, for idle timeouts
    await runtime.update(inst, cpu_quota_us=150_000, memory_bytes=512 << 20)
    runtime.stats(inst)                      # CgroupStats
    await runtime.stop(inst, drain_timeout=2.0)
    await runtime.close()                    # containers keep running

ensure(domain, service) returns a running instance of this host, starting one
when there is none.  Concurrent callers for one (domain, image) share a
single start; a caller that is cancelled does not cancel the start for the
others.  start(domain, service) always starts another instance (scale out,
bounded by the spec's max_instances).  Every start, made or failed, is an
event of kind "start" with its trigger and cold-start time (starts.py).

sweep() removes this runtime's containers (by its name prefix, one by one by
name) that no live CMDB row owns: those of a removed domain, or of a row
someone closed by hand.  recover() does the same once at start-up; the
controller calls sweep() every round.  remove_domain() stops a domain's
containers at once, for `mailfc domain remove`.

A start: claim address and slot in the CMDB (row 'starting') -> render /etc
and config.json -> runc run -> the service's unix socket listening (polled in
the kernel's socket table of the container, see readiness.py) -> row
'running'.  In a user namespace (the default) runc gives the container a
network namespace of its own with only lo; without one (id_base 0) it joins a
netns taken from the pool, addressed before runc runs (settings.netns_by_path).
The whole start is bounded by settings.start_timeout; on any failure everything
made so far is removed again, the row is marked stopped with the reason, and
the caller gets StartFailed (or AddressExhausted / CapacityExhausted /
UnknownDomain).

stop(): row 'draining' -> SIGTERM to the container's init -> wait for it to exit
(drain_timeout, default settings.stop_timeout) -> SIGKILL to every process ->
runc delete, netns and veth (if any), cgroups, bundle removed -> row 'stopped'.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
from typing import Any

import asyncpg

from mailfc.errors import InvalidInput, MailfcError
from mailfc.runtime import cgroups, cmdb, storage
from mailfc.runtime.backend import Backend
from mailfc.runtime.bundle import Limits, build_spec, ensure_rootfs, write_spec
from mailfc.runtime.errors import NotRunning, RuntimeUnavailable, StartFailed
from mailfc.runtime.images import (
    ALSO_READY,
    IMAGES,
    SOCKETS,
    Image,
    check_installed,
    host_users,
    image_for,
    render_etc,
    template_context,
)
from mailfc.runtime.instance import Instance
from mailfc.runtime.network import Endpoint, Network
from mailfc.runtime.readiness import process_alive, wait_exit, wait_listen_socket
from mailfc.runtime.runc import RuncBackend
from mailfc.runtime.settings import RuntimeSettings
from mailfc.runtime.starts import UNKNOWN, Trigger
from mailfc.runtime.starts import record as record_start

log = logging.getLogger(__name__)
CLEANUP_TIMEOUT = 10.0


class Runtime:
    def __init__(self, settings: RuntimeSettings, db: asyncpg.Pool,
                 backend: Backend | None = None) -> None:
        self.settings = settings
        self.db = db
        self.backend = backend or RuncBackend(settings.runc_root, settings.runc)
        self.network = Network(settings)
        self._host: asyncpg.Record | None = None
        self._inflight: dict[tuple[str, str], asyncio.Task[Instance]] = {}
        self._reserved: set[ipaddress.IPv4Address] = set()
        self._own_starts: set[str] = set()   # container names this runtime is starting
        self._background: set[asyncio.Task[None]] = set()   # start events being written
        self.starts = 0   # containers this runtime started (tests and benchmarks read it)

    # -- set-up ----------------------------------------------------------------------

    async def open(self, *, fill_pool: bool = True) -> None:
        """Check the host, find its CMDB row, make the bridge and the netns pool (if used)."""
        self.backend.check()
        for image in IMAGES.values():
            check_installed(image)
        host_users(self.settings.vmail_uid, self.settings.vmail_gid)
        self._host = await cmdb.host(self.db, self.settings.host_id,
                                     self.settings.resolved_host_name)
        subnet = ipaddress.ip_network(str(self._host["container_subnet"]))
        if subnet != self.settings.network:
            raise RuntimeUnavailable(
                f"host {self._host['name']} has container subnet {subnet} in the CMDB but"
                f" the runtime is configured for {self.settings.network}: make them agree")
        ensure_rootfs(self.settings.rootfs)
        storage.prepare_mail_root(self.settings)
        self.settings.bundles_dir.mkdir(parents=True, exist_ok=True)
        await self.network.open()
        if fill_pool:
            await self.network.fill()

    async def close(self) -> None:
        """Stop managing; running containers stay up (recover() adopts them later)."""
        for task in list(self._inflight.values()):
            task.cancel()
        for task in list(self._inflight.values()):
            with contextlib.suppress(BaseException):
                await task
        if self._background:
            # Start events still being written (the CLI closes right after a start).
            await asyncio.wait(list(self._background), timeout=CLEANUP_TIMEOUT)
        await self.network.close()

    async def __aenter__(self) -> Runtime:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def host_id(self) -> int:
        assert self._host is not None, "Runtime.open() first"
        return int(self._host["id"])

    def cgroup_path(self, name: str) -> str:
        return f"{self.settings.cgroup_parent}/{name}"

    # -- ensure / start ------------------------------------------------------------------

    async def ensure(self, domain: str, service: str, trigger: Trigger | None = None
                     ) -> Instance:
        """A running instance of (domain, service) on this host; starts one if needed.

        `trigger` says who asked, for the start event (the first caller's, when
        several wait for one start)."""
        image = image_for(service)
        domain = cmdb.check_domain_name(domain)
        key = (domain, image.name)
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(
                self._ensure(domain, image, service, trigger or UNKNOWN),
                name=f"ensure {domain} {image.name}")
            self._inflight[key] = task
            task.add_done_callback(lambda done: self._forget(key, done))
        # shield: one caller giving up must not cancel the start the others wait for.
        return await asyncio.shield(task)

    def _forget(self, key: tuple[str, str], task: asyncio.Task[Instance]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled():
            task.exception()  # retrieved: every waiter may have been cancelled

    async def _ensure(self, domain: str, image: Image, service: str, trigger: Trigger
                      ) -> Instance:
        spec = await cmdb.domain_spec(self.db, domain, image.record_service)
        deadline = time.monotonic() + self.settings.start_timeout
        while True:
            live = [r for r in await cmdb.live_instances(
                self.db, spec["domain_id"], image.record_service)
                if r["host_id"] == self.host_id]
            for row in live:
                if row["state"] == "running":
                    if row["pid"] and process_alive(row["pid"]):
                        return Instance.from_record(row)
                    # Died behind our back: clean it up and start afresh.
                    await self._discard(row["name"], None, row["id"], "exited unexpectedly",
                                        image.name)
            starting = [r for r in live if r["state"] == "starting"]
            stale = [r for r in starting if r["name"] not in self._own_starts
                     and await self._start_is_stale(r)]
            for row in stale:
                # Its starter died mid-start (a start never outlives start_timeout).
                await self._discard(row["name"], None, row["id"], "start abandoned",
                                    image.name)
                starting.remove(row)
            if not starting:
                return await self._start(spec, image, service, trigger)
            # Another process is starting it: wait for its outcome, bounded.
            if time.monotonic() >= deadline:
                raise StartFailed(f"{domain} {image.name}: another process's start did not"
                                  f" finish within {self.settings.start_timeout:g} s")
            await asyncio.sleep(0.01)

    async def _start_is_stale(self, row: asyncpg.Record) -> bool:
        age = await self.db.fetchval("SELECT extract(epoch FROM now() - $1::timestamptz)",
                                     row["created_at"])
        return float(age) > 2 * self.settings.start_timeout + CLEANUP_TIMEOUT

    async def start(self, domain: str, service: str, trigger: Trigger | None = None
                    ) -> Instance:
        """Start another instance of (domain, service) (scale out)."""
        image = image_for(service)
        domain = cmdb.check_domain_name(domain)
        spec = await cmdb.domain_spec(self.db, domain, image.record_service)
        return await self._start(spec, image, service, trigger or UNKNOWN)

    async def _start(self, spec: asyncpg.Record, image: Image, service: str,
                     trigger: Trigger) -> Instance:
        assert self._host is not None
        domain = spec["domain"]
        began = time.monotonic()
        endpoint: Endpoint | None = None
        name: str | None = None
        row: asyncpg.Record | None = None
        log_file = None
        log_offset = 0
        try:
            async with asyncio.timeout(self.settings.start_timeout):
                if self.settings.netns_by_path:
                    endpoint = await self.network.acquire()
                    name = endpoint.name
                else:
                    name = self.network.new_name()
                self._own_starts.add(name)
                row = await cmdb.insert_instance(
                    self.db, spec=spec, service=image.record_service, host_row=self._host,
                    network=self.settings.network, name=name, reserved=self._reserved)
                address = _ipv4(row["address"])
                slot = int(row["slot"])
                log_file = storage.log_path(self.settings, image, domain, slot)
                bundle = self._make_bundle(name, image, domain, slot, spec, row["id"])
                if endpoint is not None:
                    await self.network.configure(endpoint, address)
                storage.rotate_log(log_file, self.settings.log_max_bytes,
                                   self.settings.log_keep)
                log_offset = storage.log_size(log_file)
                pid = await self.backend.run(name, bundle, log_file)
                self.starts += 1
                ready_by = time.monotonic() + self.settings.start_timeout
                for path in (SOCKETS[service], *ALSO_READY.get(service, ())):
                    await wait_listen_socket(pid, path, ready_by,
                                             interval=self.settings.ready_poll_interval)
                ready = await cmdb.mark_running(self.db, row["id"], pid)
        except BaseException as error:
            reason = _describe(error, self.settings.start_timeout)
            if log_file is not None:
                # Postfix's master logs through postlogd, so a master that dies
                # before spawning it leaves nothing: name the file either way.
                tail = storage.log_tail(log_file, log_offset)
                reason += f"; its log {log_file}" + (f" says: {tail[-400:]}" if tail else
                                                    " is empty")
            if endpoint is not None and row is None and not endpoint.address:
                # Nothing was made with it: the endpoint can serve the next start.
                self.network.give_back(endpoint)
            elif name is not None and (row is not None or endpoint is not None):
                await asyncio.shield(self._discard(
                    name, endpoint, row["id"] if row else None,
                    f"start failed: {reason}", image.name))
            if not isinstance(error, Exception):
                raise  # cancelled
            self._record_start(domain, image.record_service, trigger, began,
                               row["id"] if row else None, name, None,
                               int(row["slot"]) if row else None, failure=reason)
            if isinstance(error, MailfcError) and not isinstance(error, StartFailed):
                raise  # UnknownDomain, AddressExhausted, CapacityExhausted: already clear
            raise StartFailed(f"{domain} {image.name} did not start: {reason}") from None
        finally:
            if name is not None:
                self._own_starts.discard(name)
            with contextlib.suppress(RuntimeError):
                self.network.refill_soon()
        self._record_start(domain, image.record_service, trigger, began, row["id"], name,
                           pid, slot)
        return Instance(
            id=row["id"], name=name, domain=domain, domain_id=spec["domain_id"],
            service=image.record_service, image=image.name, host_id=self.host_id,
            address=address, state="running", slot=slot, pid=pid,
            created_at=row["created_at"], ready_at=ready["ready_at"],
            last_activity_at=ready["last_activity_at"])

    def _record_start(self, domain: str, service: str, trigger: Trigger, began: float,
                      instance_id: int | None, name: str | None, pid: int | None,
                      slot: int | None, failure: str | None = None) -> None:
        """Write the start event in the background (see starts.py)."""
        assert self._host is not None
        task = asyncio.get_running_loop().create_task(record_start(
            self.db, host=str(self._host["name"]), domain=domain, service=service,
            trigger=trigger, cold_start_s=time.monotonic() - began,
            instance_id=instance_id, container=name, pid=pid, slot=slot, failure=failure))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _make_bundle(self, name: str, image: Image, domain: str, slot: int,
                     spec: asyncpg.Record, instance_id: int) -> Any:
        settings = self.settings
        mounts = storage.prepare_domain(settings, image, domain, slot)
        bundle = storage.make_bundle(settings, name)
        context = template_context(image, domain, settings)
        render_etc(image, bundle / "etc", context, settings.images_dir)
        write_spec(bundle, build_spec(
            name=name, image=image, rootfs=settings.rootfs, etc_dir=bundle / "etc",
            mail_dir=settings.mail_dir / domain, socket_dir=settings.sockets,
            state_dirs=mounts, netns_path=f"/run/netns/{name}",
            cgroups_path=self.cgroup_path(name),
            limits=Limits(spec["cpu_quota_us"], spec["cpu_period_us"], spec["memory_bytes"],
                          spec["pids_limit"]),
            hostname=context["hostname"],
            annotations={"mailfc.domain": domain, "mailfc.image": image.name,
                         "mailfc.slot": str(slot), "mailfc.instance": str(instance_id)},
            id_base=settings.id_base))
        return bundle

    async def _discard(self, name: str, endpoint: Endpoint | None, instance_id: int | None,
                       reason: str, image: str) -> None:
        """Remove everything of a container by name; bounded, never raises."""
        try:
            async with asyncio.timeout(CLEANUP_TIMEOUT):
                with contextlib.suppress(MailfcError):
                    await self.backend.delete(name, force=True)
                if endpoint is not None:
                    await self.network.release(endpoint)
                elif self.settings.netns_by_path or self.network.netns_exists(name):
                    # (the second: a container started without a user namespace
                    # before the settings changed)
                    await self.network.remove_by_name(name)
                cgroups.remove(self.cgroup_path(name))
                storage.remove_bundle(self.settings, name)
                if instance_id is not None:
                    await cmdb.mark_stopped(self.db, instance_id, reason)
        except Exception:
            log.exception("cleaning up container %s (%s) failed; recover() will retry",
                          name, image)

    # -- stop / update / stats ----------------------------------------------------------

    async def stop(self, instance: Instance, drain_timeout: float | None = None,
                   reason: str = "stopped") -> None:
        """Drain and stop: SIGTERM, SIGKILL after drain_timeout, then remove everything."""
        self._check_local(instance)
        timeout = self.settings.stop_timeout if drain_timeout is None else drain_timeout
        await cmdb.mark_draining(self.db, instance.id)
        state = await self.backend.state(instance.name)
        if state is not None and state.status in ("running", "paused", "created"):
            await self.backend.kill(instance.name, "TERM")
            if not await wait_exit(state.pid, timeout):
                await self.backend.kill(instance.name, "KILL", all_processes=True)
                await wait_exit(state.pid, 2.0)
                reason += f" (killed after {timeout:g} s drain)"
        await self._discard(instance.name, None, instance.id, reason, instance.image)

    async def update(self, instance: Instance, *, cpu_quota_us: int | None = None,
                     memory_bytes: int | None = None, cpu_period_us: int | None = None
                     ) -> Limits:
        """Change CPU quota/period and memory limit of a running container, live."""
        self._check_local(instance)
        spec = await cmdb.domain_spec(self.db, instance.domain, instance.service)
        for label, value, most in (("cpu quota", cpu_quota_us, spec["cpu_quota_max_us"]),
                                   ("memory", memory_bytes, spec["memory_max_bytes"]),
                                   ("cpu period", cpu_period_us, 1_000_000)):
            if value is not None and not 0 < value <= most:
                raise InvalidInput(f"{label} {value} out of range: 1..{most} (the spec's"
                                   " maximum; raise it in the container spec first)")
        await self.backend.update(instance.name, cpu_quota_us=cpu_quota_us,
                                  cpu_period_us=cpu_period_us, memory_bytes=memory_bytes)
        return cgroups.limits(self.cgroup_path(instance.name))

    def stats(self, instance: Instance) -> cgroups.CgroupStats:
        self._check_local(instance)
        return cgroups.stats(self.cgroup_path(instance.name))

    def limits(self, instance: Instance) -> Limits:
        self._check_local(instance)
        return cgroups.limits(self.cgroup_path(instance.name))

    async def touch(self, instance: Instance) -> None:
        """Record session activity (the idle timeout counts from the last one)."""
        await cmdb.touch(self.db, instance.id)

    async def pin(self, instance: Instance, *, cpu: bool, memory: bool,
                  for_s: int | None = None) -> None:
        """Keep the controller off this instance's CPU quota and/or memory limit, for
        for_s seconds (None: until unpin())."""
        await cmdb.pin(self.db, instance.id, cpu=cpu, memory=memory, for_s=for_s)

    async def unpin(self, instance: Instance) -> None:
        await cmdb.unpin(self.db, instance.id)

    # -- removed domains and orphans ------------------------------------------------------

    async def remove_domain(self, domain: str, drain_timeout: float | None = None
                            ) -> list[str]:
        """Stop every container of `domain` on this host now; their names."""
        stopped = []
        for instance in await self.instances(domain):
            await self.stop(instance, drain_timeout, reason="domain removed")
            stopped.append(instance.name)
        return stopped

    async def sweep(self) -> list[str]:
        """Remove this runtime's containers that no live CMDB row of this host owns
        (a removed domain's, a row closed by hand); the names removed.

        Only names with this runtime's prefix, in its own runc root, one by one.  A
        start inserts its row before runc runs, so the containers are listed first
        and the rows read after: a start in progress always has its row."""
        prefix = self.settings.name_prefix + "-"
        containers = [c for c in await self.backend.containers() if c.name.startswith(prefix)]
        if not containers:
            return []
        owned = {row["name"] for row in await self.db.fetch(
            "SELECT name FROM container_instances WHERE host_id = $1 AND state <> 'stopped'"
            " AND name = ANY($2::text[])", self.host_id, [c.name for c in containers])}
        removed = []
        for container in containers:
            if container.name in owned or container.name in self._own_starts:
                continue
            log.warning("removing container %s (%s of %s): no CMDB row owns it",
                        container.name, container.annotations.get("mailfc.image", "?"),
                        container.annotations.get("mailfc.domain", "?"))
            await self._discard(container.name, None, None, "orphan",
                                container.annotations.get("mailfc.image", "?"))
            removed.append(container.name)
        return removed

    # -- queries -------------------------------------------------------------------------

    async def instances(self, domain: str | None = None, service: str | None = None,
                        *, include_stopped: bool = False) -> list[Instance]:
        rows = await cmdb.instances_on_host(
            self.db, self.host_id, include_stopped=include_stopped,
            domain=cmdb.check_domain_name(domain) if domain else None)
        found = [Instance.from_record(r) for r in rows]
        if service is not None:
            found = [i for i in found if i.serves(service)]
        return found

    async def get(self, name: str) -> Instance:
        row = await cmdb.instance_by_name(self.db, name)
        if row is None:
            raise NotRunning(f"no container named {name}")
        return Instance.from_record(row)

    async def due_for_stop(self) -> list[tuple[Instance, str]]:
        """Running instances past their lifetime or idle timeout (for the controller)."""
        return [(Instance.from_record(r), r["due_reason"])
                for r in await cmdb.due_for_stop(self.db, self.host_id)]

    async def recover(self) -> Any:
        from mailfc.runtime.recovery import recover
        return await recover(self)

    def _check_local(self, instance: Instance) -> None:
        if instance.host_id != self.host_id:
            raise NotRunning(f"{instance.name} runs on host id {instance.host_id},"
                             f" not on this one ({self.host_id})")


def _ipv4(value: object) -> ipaddress.IPv4Address:
    if isinstance(value, ipaddress.IPv4Interface):
        return value.ip
    return ipaddress.IPv4Address(str(value).split("/")[0])


def _describe(error: BaseException, timeout: float) -> str:
    if isinstance(error, TimeoutError):
        return f"not listening within {timeout:g} s"
    if isinstance(error, ProcessLookupError):
        return "the server exited during start-up"
    if isinstance(error, asyncio.CancelledError):
        return "cancelled"
    return str(error) or type(error).__name__
