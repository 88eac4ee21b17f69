"""The controller against real containers: scale to zero, up/down, out, adaptive limits.

The platform runs with the controller's own loop slowed to an hour; each test
drives `controller.round()` itself, so what it asserts follows from what it did.
"""

from __future__ import annotations

import asyncio
import imaplib
import os
import shutil
import signal
import smtplib
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import asyncpg
import pytest

from mailfc.config import Config, parse_config
from mailfc.controller.controller import LEFTOVER_AGE_S, Controller, queue_census
from mailfc.controller.platform import Platform
from mailfc.db import accounts, domains, limits
from mailfc.db.pool import embedded_cluster
from mailfc.passwords import hash_password
from mailfc.runtime import cgroups
from mailfc.runtime.instance import Instance
from mailfc.runtime.lifecycle import Runtime
from mailfc.runtime.readiness import process_alive
from tests.conftest import UnixSMTP, require_binary
from tests.routers.conftest import PASSWORD, client_tls

IMAP_PORT, IMAPS_PORT = 20143, 20993


@pytest.fixture(scope="module")
async def platform(state_dir: Path, cmdb: asyncpg.Pool,
                   mailfc_config: Config) -> AsyncIterator[Platform]:
    require_binary("runc", "runc")
    own = state_dir / "controller"
    own.mkdir(exist_ok=True)
    own.chmod(0o711)
    config = parse_config({
        "paths": {"state_dir": str(own)},
        "database": {"dsn": embedded_cluster(mailfc_config).dsn},
        "host": {"name": "controller-host"},
        "network": {"bridge": "mfcc0", "subnet": "10.93.0.0/24"},
        "listen": {"imap_router": f"127.0.0.1:{IMAP_PORT}",
                   "imap_router_tls": f"127.0.0.1:{IMAPS_PORT}"},
        "dispatcher": {"lmtp_port": 20124, "imap_port": 20243, "smtp_port": 20587},
        # Deferred mail is retried every 2 s (the default is 10 s).
        "runtime": {"name_prefix": "mfcc", "postfix_retry_s": 2},
        "controller": {"interval_s": 3600.0, "scale_out_sessions": 2,
                       "scale_down_after_s": 1.0, "scale_in_after_s": 1.0},
    }, "controller tests")
    hashed = hash_password(PASSWORD)
    async with cmdb.acquire() as db:
        for name in ("idle.example", "life.example", "burn.example", "flood.example",
                     "adapt.example", "vanish.example", "leftover.example",
                     "retry.example"):
            if not await db.fetchval("SELECT 1 FROM domains WHERE name = $1", name):
                await domains.add(db, name)
                await accounts.add(db, f"user@{name}", hashed)
    platform = Platform(config, ("dispatcher", "controller", "lmtp-router", "imap-router"))
    await platform.start()
    await cmdb.execute(
        "UPDATE domains SET host_id = (SELECT id FROM hosts WHERE name = 'controller-host')"
        " WHERE name LIKE '%.example' AND name IN ('idle.example', 'life.example',"
        " 'burn.example', 'flood.example', 'adapt.example', 'vanish.example',"
        " 'leftover.example', 'retry.example')")
    try:
        yield platform
    finally:
        await platform.stop()
        await asyncio.to_thread(subprocess.run, ["ip", "link", "del", "mfcc0"],
                                capture_output=True, check=False)


def controller_of(platform: Platform) -> Controller:
    assert platform.controller is not None
    return platform.controller


def runtime_of(platform: Platform) -> Runtime:
    assert platform.runtime is not None
    return platform.runtime


async def set_spec(pool: asyncpg.Pool, domain: str, service: str = "imap",
                   **values: int) -> None:
    columns = ", ".join(values)
    placeholders = ", ".join(f"${i + 3}" for i in range(len(values)))
    updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in values)
    await pool.execute(
        f"INSERT INTO container_specs (domain_id, service, {columns})"
        f" SELECT id, $2, {placeholders} FROM domains WHERE name = $1"
        f" ON CONFLICT (coalesce(domain_id, 0), service) DO UPDATE SET {updates}",
        domain, service, *values.values())


async def events_of(pool: asyncpg.Pool, domain: str, kind: str) -> list[asyncpg.Record]:
    return list(await pool.fetch("SELECT * FROM events WHERE domain = $1 AND kind = $2"
                                 " ORDER BY id", domain, kind))


async def until(condition: Callable[[], object], controller: Controller,
                seconds: float = 20.0) -> None:
    """Run controller rounds until `condition()` (awaited if needed) holds."""
    deadline = asyncio.get_running_loop().time() + seconds
    while asyncio.get_running_loop().time() < deadline:
        await controller.round()
        result = condition()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        await asyncio.sleep(0.25)
    raise AssertionError("condition not reached within the time allowed")


def deliver(platform: Platform, address: str) -> dict[str, tuple[int, bytes]]:
    # The LMTP Router's default socket (listen.lmtp_router, mailfc.hops).
    socket = platform.config.hops_dir / "lmtp-router.sock"
    with smtplib.LMTP(str(socket), timeout=30) as client:
        return client.sendmail("x@remote.example", [address], b"Subject: c\r\n\r\nhi\r\n")


def open_imap(address: str) -> imaplib.IMAP4_SSL:
    client = imaplib.IMAP4_SSL("127.0.0.1", IMAPS_PORT, ssl_context=client_tls(), timeout=30)
    client.login(address, PASSWORD)
    client.select("INBOX")
    return client


async def test_idle_container_stops_and_restarts_on_next_session(platform: Platform) -> None:
    pool, runtime, controller = platform.pool, runtime_of(platform), controller_of(platform)
    assert pool is not None
    await set_spec(pool, "idle.example", idle_timeout_s=1)
    assert await asyncio.to_thread(deliver, platform, "user@idle.example") == {}
    assert len(await runtime.instances("idle.example")) == 1

    async def stopped() -> bool:
        return not await runtime.instances("idle.example")

    await until(stopped, controller)
    stops = await events_of(pool, "idle.example", "stop")
    assert stops and "idle" in stops[-1]["reason"]
    # The next session starts it again.
    assert await asyncio.to_thread(deliver, platform, "user@idle.example") == {}
    assert len(await runtime.instances("idle.example")) == 1


async def test_lifetime_drains_instead_of_cutting_a_session(platform: Platform) -> None:
    pool, runtime, controller = platform.pool, runtime_of(platform), controller_of(platform)
    assert pool is not None
    await set_spec(pool, "life.example", lifetime_s=2)
    first = await asyncio.to_thread(open_imap, "user@life.example")
    [old] = await runtime.instances("life.example")

    async def draining() -> bool:
        return any(i.state == "draining" for i in await runtime.instances("life.example"))

    await until(draining, controller)
    assert (await events_of(pool, "life.example", "drain"))
    # The open session goes on; a new one goes to a new instance.
    assert (await asyncio.to_thread(first.noop))[0] == "OK"
    await set_spec(pool, "life.example", lifetime_s=3600)
    second = await asyncio.to_thread(open_imap, "user@life.example")
    names = {i.name for i in await runtime.instances("life.example")}
    assert len(names) == 2 and old.name in names
    await asyncio.to_thread(first.logout)

    async def old_gone() -> bool:
        return old.name not in {i.name for i in await runtime.instances("life.example")}

    await until(old_gone, controller)
    assert (await asyncio.to_thread(second.noop))[0] == "OK"
    await asyncio.to_thread(second.logout)
    assert any("drained" in e["reason"] for e in await events_of(pool, "life.example", "stop"))


async def test_cpu_burner_is_scaled_up_then_down(platform: Platform) -> None:
    pool, runtime, controller = platform.pool, runtime_of(platform), controller_of(platform)
    assert pool is not None
    await set_spec(pool, "burn.example", cpu_quota_us=20000, cpu_quota_max_us=60000)
    instance = await runtime.ensure("burn.example", "imap")
    path = runtime.cgroup_path(instance.name)
    assert cgroups.limits(path).cpu_quota_us == 20000
    # A real busy loop inside the domain's container, ending by itself.
    await asyncio.to_thread(subprocess.run, [
        "runc", "--root", str(runtime.settings.runc_root), "exec", "-d", instance.name,
        "/usr/bin/timeout", "6", "/bin/sh", "-c", "while :; do :; done"], check=True,
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    await until(lambda: cgroups.limits(path).cpu_quota_us > 20000, controller, 10)
    ups = await events_of(pool, "burn.example", "scale_up")
    assert ups and "throttled" in ups[-1]["reason"]
    # Never above the spec's maximum.
    await until(lambda: cgroups.limits(path).cpu_quota_us == 20000, controller, 30)
    assert max(cgroups.limits(path).cpu_quota_us, 0) <= 60000
    assert await events_of(pool, "burn.example", "scale_down")


async def test_session_flood_scales_out_and_both_instances_serve(platform: Platform) -> None:
    pool, runtime, controller = platform.pool, runtime_of(platform), controller_of(platform)
    assert pool is not None
    dispatcher = next(s for s in platform.services if s.name == "dispatcher")
    clients = [await asyncio.to_thread(open_imap, "user@flood.example") for _ in range(3)]
    try:
        await until(lambda: True, controller, 1)
        running = [i for i in await runtime.instances("flood.example") if i.state == "running"]
        assert len(running) == 2
        assert await events_of(pool, "flood.example", "scale_out")
        clients += [await asyncio.to_thread(open_imap, "user@flood.example") for _ in range(3)]
        open_sessions = dispatcher.open_sessions  # type: ignore[attr-defined]
        assert all(open_sessions.get(i.name, 0) > 0 for i in running), open_sessions
    finally:
        for client in clients:
            await asyncio.to_thread(client.logout)

    async def back_to_one() -> bool:
        return len(await runtime.instances("flood.example")) == 1

    await until(back_to_one, controller, 30)
    assert await events_of(pool, "flood.example", "scale_in")


async def test_adaptive_limit_moves_within_its_range(platform: Platform) -> None:
    pool, controller = platform.pool, controller_of(platform)
    assert pool is not None
    async with pool.acquire() as db:
        await limits.set_limit(db, "adapt.example", "messages", 10, window_s=3600,
                               value_range=(10, 100))
        await limits.set_limit(db, "adapt.example", "recipients", 500, window_s=3600)
    # A host with most of its capacity free (this machine's own load is whatever
    # the other tests make it).
    controller.headroom = lambda: 0.9
    seen = []
    for _ in range(8):
        await controller.adapt_limits()
        seen.append(await pool.fetchval(
            "SELECT value FROM limits l JOIN domains d ON d.id = l.domain_id"
            " WHERE d.name = 'adapt.example' AND l.kind = 'messages'"))
    assert all(10 <= value <= 100 for value in seen)
    assert seen[0] > 10 and seen[0] - 10 <= (100 - 10) // 5  # one bounded step
    fixed = await pool.fetchval(
        "SELECT value FROM limits l JOIN domains d ON d.id = l.domain_id"
        " WHERE d.name = 'adapt.example' AND l.kind = 'recipients'")
    assert fixed == 500
    changes = await events_of(pool, "adapt.example", "limit_change")
    assert changes and "headroom" in changes[0]["reason"]


async def test_queued_mail_of_a_stopped_domain_is_retried(platform: Platform) -> None:
    pool, runtime, controller = platform.pool, runtime_of(platform), controller_of(platform)
    assert pool is not None
    assert not await runtime.instances("idle.example", "smtp")
    # A message left deferred in the domain's persistent queue by an earlier
    # instance (written the way Postfix lays it out: deferred/<hash>/<queue id>).
    deferred = runtime.settings.domains_dir / "idle.example" / "postfix-0" / "spool" / \
        "deferred" / "A"
    await asyncio.to_thread(deferred.mkdir, parents=True, exist_ok=True)
    await asyncio.to_thread((deferred / "A1B2C3D4E5").write_bytes, b"C  1 2 3\n")
    try:
        await controller.retry_deferred()
        assert len(await runtime.instances("idle.example", "smtp")) == 1
        retries = await events_of(pool, "idle.example", "retry_queue")
        assert retries and "1 message(s)" in retries[-1]["reason"]
    finally:
        for instance in await runtime.instances("idle.example", "smtp"):
            await runtime.stop(instance)


def kill_container(instance: Instance) -> None:
    """kill -9 of the container's init (the kernel ends the rest of its pid namespace),
    as the OOM killer or a crash would; returns once it is dead."""
    assert instance.pid
    os.kill(instance.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while process_alive(instance.pid):
        assert time.monotonic() < deadline, f"{instance.name} did not die"
        time.sleep(0.01)


def queue_files(runtime: Runtime, domain: str, queue: str) -> list[Path]:
    spool = runtime.settings.domains_dir / domain
    return [path for path in spool.glob(f"postfix-*/spool/{queue}/**/*") if path.is_file()]


def submit_to_container(instance: Instance, recipient: str) -> dict[str, tuple[int, bytes]]:
    """A message straight into the container's Postfix (its dispatcher socket)."""
    with UnixSMTP(instance.socket("smtp"), timeout=30) as client:
        return client.sendmail("someone@remote.example", [recipient],
                               b"Subject: queued\r\n\r\nwaits for Filter-Out\r\n")


async def test_a_postfix_that_dies_during_a_round_is_marked_gone_and_its_queue_retried(
        platform: Platform, monkeypatch: pytest.MonkeyPatch) -> None:
    """The controller acts on a container that dies under it (`runc update`:
    "container not running"): the round goes on, the row is closed with an event,
    and the mail in the dead Postfix's queue gets a new Postfix in the same round."""
    pool, runtime, controller = platform.pool, runtime_of(platform), controller_of(platform)
    assert pool is not None
    await set_spec(pool, "vanish.example", "smtp", cpu_quota_us=50000,
                   cpu_quota_max_us=200000)
    instance = await runtime.ensure("vanish.example", "smtp")
    try:
        # Real mail in its queue: Filter-Out does not run here, so it stays deferred.
        assert await asyncio.to_thread(submit_to_container, instance,
                                       "user@vanish.example") == {}
        # Above its base quota, so the next round scales it down (a runc update).
        await runtime.update(instance, cpu_quota_us=100000)
        await controller.round()                      # its first CPU sample
        real_stats = runtime.stats

        def dying_stats(target: Instance) -> cgroups.CgroupStats:
            if target.name == instance.name:
                kill_container(instance)              # dies between two looks
            return real_stats(target)

        monkeypatch.setattr(runtime, "stats", dying_stats)
        await controller.round()                      # must not raise
        monkeypatch.undo()
        row = await pool.fetchrow("SELECT state, stop_reason FROM container_instances"
                                  " WHERE name = $1", instance.name)
        assert row["state"] == "stopped" and "vanished" in row["stop_reason"], dict(row)
        gone = await events_of(pool, "vanish.example", "gone")
        assert gone and "container not running" in gone[-1]["reason"], gone
        # Recovered in the same round: a new Postfix for the queued message.
        [again] = await runtime.instances("vanish.example", "smtp")
        assert again.name != instance.name and again.pid and process_alive(again.pid)
        assert await events_of(pool, "vanish.example", "retry_queue")
        # And a container killed between rounds is found by the next one.
        await asyncio.to_thread(kill_container, again)
        await controller.round()
        assert not await runtime.instances("vanish.example", "smtp") or \
            (await runtime.instances("vanish.example", "smtp"))[0].name != again.name
        assert len(await events_of(pool, "vanish.example", "gone")) == len(gone) + 1
    finally:
        for left in await runtime.instances("vanish.example"):
            await runtime.stop(left)
        await asyncio.to_thread(shutil.rmtree, runtime.settings.domains_dir /
                                "vanish.example", True)


async def test_a_killed_postfixs_leftovers_in_incoming_are_not_mail_and_are_removed(
        platform: Platform) -> None:
    """What a Postfix killed while receiving leaves in incoming/ (a file cleanup(8)
    never finished) is not counted as queued mail; once old and held open by no
    process it is removed (event queue_cleanup).  A file a live cleanup is still
    writing is never touched, however old it looks."""
    pool, runtime, controller = platform.pool, runtime_of(platform), controller_of(platform)
    assert pool is not None
    domains_dir = runtime.settings.domains_dir
    instance = await runtime.ensure("leftover.example", "smtp")
    # In a thread: the container's smtpd asks the dispatcher's SASL server, which
    # runs on this event loop, before it greets.
    client = await asyncio.to_thread(UnixSMTP, instance.socket("smtp"), timeout=30)
    try:
        await asyncio.to_thread(client.ehlo)
        assert (await asyncio.to_thread(client.mail, "someone@remote.example"))[0] == 250
        # cleanup(8) opens the queue file at the first valid RCPT.
        assert (await asyncio.to_thread(client.rcpt, "user@leftover.example"))[0] == 250
        [receiving] = queue_files(runtime, "leftover.example", "incoming")
        old = time.time() - 10 * LEFTOVER_AGE_S
        os.utime(receiving, (old, old))
        census = await asyncio.to_thread(queue_census, domains_dir)
        assert "leftover.example" not in census.queued      # not mail yet
        assert receiving.exists() and not census.removed    # a live cleanup holds it
        await asyncio.to_thread(kill_container, instance)
        client.close()
        [leftover] = queue_files(runtime, "leftover.example", "incoming")
        assert leftover == receiving
        info = leftover.stat()
        assert info.st_size == 0 or not info.st_mode & 0o100, oct(info.st_mode)
        # Young: neither counted nor removed yet.
        os.utime(leftover, None)
        census = await asyncio.to_thread(queue_census, domains_dir)
        assert "leftover.example" not in census.queued and leftover.exists()
        # Old: removed, with an event, and no Postfix is started for it.
        os.utime(leftover, (old, old))
        for gone in await runtime.instances("leftover.example"):
            await runtime.stop(gone)
        await controller.retry_deferred()
        assert not leftover.exists()
        cleanups = await events_of(pool, "leftover.example", "queue_cleanup")
        assert cleanups and "1 unfinished" in cleanups[-1]["reason"]
        assert not await runtime.instances("leftover.example", "smtp")
        assert not await events_of(pool, "leftover.example", "retry_queue")
    finally:
        client.close()
        for left in await runtime.instances("leftover.example"):
            await runtime.stop(left)
        await asyncio.to_thread(shutil.rmtree, domains_dir / "leftover.example", True)


class FakeFilterOut:
    """An LMTP server where Filter-Out listens, taking everything: what the domain's
    Postfix sends it (XFORWARD lines and messages) is kept."""

    def __init__(self) -> None:
        self.xforward: list[str] = []
        self.messages: list[bytes] = []
        self.received = asyncio.Event()

    async def session(self, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 fake filter-out\r\n")
        recipients = 0
        while line := await reader.readline():
            command = line.decode("utf-8", "replace").strip()
            verb = command.split(" ", 1)[0].upper()
            if verb == "LHLO":
                writer.write(b"250-fake\r\n250-XFORWARD NAME ADDR PROTO HELO IDENT\r\n"
                             b"250 ENHANCEDSTATUSCODES\r\n")
            elif verb == "XFORWARD":
                self.xforward.append(command)
                writer.write(b"250 2.0.0 Ok\r\n")
            elif verb in ("MAIL", "RCPT", "RSET", "NOOP"):
                recipients += verb == "RCPT"
                writer.write(b"250 2.0.0 Ok\r\n")
            elif verb == "DATA":
                writer.write(b"354 go on\r\n")
                await writer.drain()
                data = bytearray()
                while (part := await reader.readline()) not in (b".\r\n", b""):
                    data += part
                self.messages.append(bytes(data))
                writer.write(b"250 2.0.0 Ok\r\n" * recipients)
                recipients = 0
                self.received.set()
            elif verb == "QUIT":
                writer.write(b"221 2.0.0 Bye\r\n")
                await writer.drain()
                break
            else:
                writer.write(b"502 5.5.2 no\r\n")
            await writer.drain()
        writer.close()


async def test_deferred_mail_is_retried_within_seconds_of_filter_out_coming_back(
        platform: Platform) -> None:
    """Every deferral in a domain's Postfix is a failure of mailfc's own next hop: it
    retries after runtime.postfix_retry_s (2 s here), not Postfix's 300 s, and tells
    Filter-Out the message's long queue id (XFORWARD IDENT)."""
    runtime = runtime_of(platform)
    socket = runtime.settings.sockets / runtime.settings.filter_out_socket
    assert not socket.exists(), "Filter-Out does not run in this test's platform"
    instance = await runtime.ensure("retry.example", "smtp")
    server: asyncio.AbstractServer | None = None
    try:
        subject = f"retried {time.time()}"
        with_subject = f"Subject: {subject}\r\n\r\nwaits for Filter-Out\r\n".encode()

        def submit() -> dict[str, tuple[int, bytes]]:
            with UnixSMTP(instance.socket("smtp"), timeout=30) as client:
                return client.sendmail("someone@remote.example", ["user@retry.example"],
                                       with_subject)

        assert await asyncio.to_thread(submit) == {}
        # Its first attempt fails (nothing listens): the message is deferred.
        deadline = time.monotonic() + 20
        while not queue_files(runtime, "retry.example", "deferred"):
            assert time.monotonic() < deadline, "the message was never deferred"
            await asyncio.sleep(0.1)
        fake = FakeFilterOut()
        server = await asyncio.start_unix_server(fake.session, path=str(socket))
        socket.chmod(0o666)     # Postfix's lmtp client runs as the container's postfix
        back = time.monotonic()
        await asyncio.wait_for(fake.received.wait(), 20)
        waited = time.monotonic() - back
        assert waited < 10, f"retried only after {waited:.1f} s"
        assert subject.encode() in fake.messages[0]
        [ident] = [word.partition("=")[2] for line in fake.xforward
                   for word in line.split() if word.startswith("IDENT=")]
        assert len(ident) >= 12 and ident.isalnum(), ident   # a long queue id
    finally:
        if server is not None:
            server.close()
            await server.wait_closed()
        socket.unlink(missing_ok=True)
        for left in await runtime.instances("retry.example"):
            await runtime.stop(left)
        await asyncio.to_thread(shutil.rmtree, runtime.settings.domains_dir /
                                "retry.example", True)
