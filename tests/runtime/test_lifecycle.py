"""The runtime with real runc, Postfix and Dovecot: start, deliver, read, limit, stop."""

from __future__ import annotations

import asyncio
import os
import smtplib
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg
import pytest

from mailfc.errors import InvalidInput
from mailfc.runtime import Runtime, RuntimeSettings, UnknownDomain
from mailfc.runtime.network import NETNS_DIR
from mailfc.runtime.readiness import read_banner
from tests.conftest import UnixSMTP, handed_over_imap
from tests.runtime.conftest import cgroup_file, interfaces, remove_test_network

pytestmark = pytest.mark.integration

NewDomain = Callable[..., Awaitable[str]]
MESSAGE = (b"From: alice@remote.example\r\nTo: bob@{domain}\r\n"
           b"Subject: runtime test {n}\r\nMessage-ID: <{n}@remote.example>\r\n\r\n"
           b"Hello from the runtime tests.\r\n")


def _message(domain: str, n: int) -> bytes:
    return MESSAGE.replace(b"{domain}", domain.encode()).replace(b"{n}", str(n).encode())


async def test_postfix_and_dovecot_start_and_greet(runtime: Runtime,
                                                   new_domain: NewDomain) -> None:
    domain = await new_domain()
    smtp = await runtime.ensure(domain, "smtp")
    imap = await runtime.ensure(domain, "imap")
    lmtp = await runtime.ensure(domain, "lmtp")
    assert (smtp.image, imap.image) == ("postfix", "dovecot")
    assert lmtp.name == imap.name, "lmtp and imap share one Dovecot"
    assert smtp.address != imap.address
    assert (await read_banner(smtp.socket())).startswith(f"220 mail.{domain} ESMTP".encode())
    assert (await read_banner(lmtp.socket("lmtp"))).startswith(b"220 ")
    assert imap.pid is not None
    client = await handed_over_imap(imap.pid, f"bob@{domain}")
    try:
        assert (await asyncio.to_thread(client.noop))[0] == "OK"
    finally:
        await asyncio.to_thread(client.logout)
    rows = await runtime.db.fetch(
        "SELECT name, state, host(address) AS address FROM container_instances"
        " WHERE name = ANY($1::text[])", [smtp.name, imap.name])
    assert {r["state"] for r in rows} == {"running"}
    assert {r["address"] for r in rows} == {str(smtp.address), str(imap.address)}


async def test_lmtp_delivery_then_imap_fetch(runtime: Runtime, settings: RuntimeSettings,
                                             new_domain: NewDomain) -> None:
    domain = await new_domain()
    instance = await runtime.ensure(domain, "lmtp")
    assert instance.pid is not None

    def deliver() -> None:
        with smtplib.LMTP(instance.socket("lmtp"), timeout=10) as lmtp:
            refused = lmtp.sendmail("alice@remote.example", [f"bob@{domain}"],
                                    _message(domain, 1))
            assert refused == {}

    await asyncio.to_thread(deliver)
    # The session is handed over as the dispatcher does it: no password.
    imap = await handed_over_imap(instance.pid, f"bob@{domain}")

    def read() -> bytes:
        try:
            status, data = imap.select("INBOX")
            assert status == "OK" and data[0] == b"1"
            status, fetched = imap.fetch("1", "(RFC822)")
            assert status == "OK"
            first = fetched[0]
            assert isinstance(first, tuple)
            return first[1]
        finally:
            imap.logout()

    body = await asyncio.to_thread(read)
    assert b"Subject: runtime test 1" in body
    new = settings.mail_dir / domain / "bob" / "Maildir" / "new"
    files = list(new.iterdir()) or list((new.parent / "cur").iterdir())
    assert len(files) == 1
    assert (files[0].stat().st_uid, files[0].stat().st_gid) == (
        settings.outside_id(settings.vmail_uid), settings.outside_id(settings.vmail_gid))


async def test_cgroup_limits_follow_the_spec_and_update_live(
        runtime: Runtime, settings: RuntimeSettings, new_domain: NewDomain) -> None:
    domain = await new_domain(cpu_quota_us=30000, cpu_period_us=100000,
                              memory_bytes=96 << 20, pids_limit=77)
    instance = await runtime.ensure(domain, "smtp")
    name = instance.name
    assert cgroup_file("cpu", settings, name, "cpu.cfs_quota_us") == "30000"
    assert cgroup_file("cpu", settings, name, "cpu.cfs_period_us") == "100000"
    assert cgroup_file("memory", settings, name, "memory.limit_in_bytes") == str(96 << 20)
    assert cgroup_file("pids", settings, name, "pids.max") == "77"

    limits = await runtime.update(instance, cpu_quota_us=150000, memory_bytes=192 << 20)
    assert (limits.cpu_quota_us, limits.memory_bytes) == (150000, 192 << 20)
    assert cgroup_file("cpu", settings, name, "cpu.cfs_quota_us") == "150000"
    assert cgroup_file("memory", settings, name, "memory.limit_in_bytes") == str(192 << 20)
    # Same process: the update was live, not a restart.
    assert (await runtime.backend.state(name)).pid == instance.pid  # type: ignore[union-attr]

    stats = runtime.stats(instance)
    assert stats.cpu_usage_us > 0 and stats.memory_bytes > 0 and stats.pids >= 2
    assert stats.nr_throttled >= 0 and stats.throttled_us >= 0

    with pytest.raises(InvalidInput, match="out of range"):
        await runtime.update(instance, memory_bytes=1 << 40)


async def test_a_container_sees_only_its_own_domain(runtime: Runtime, settings: RuntimeSettings,
                                                    new_domain: NewDomain) -> None:
    domain_a, domain_b = await new_domain(), await new_domain()
    a = await runtime.ensure(domain_a, "imap")
    b = await runtime.ensure(domain_b, "imap")
    b_maildir = settings.mail_dir / domain_b / "carol" / "Maildir"
    b_maildir.mkdir(parents=True)
    (b_maildir / "secret").write_text("domain B only")

    async def inside(*argv: str) -> tuple[int, str]:
        return await runtime.backend.exec(a.name, list(argv))

    code, out = await inside("/usr/bin/cat", "/etc/shadow")
    assert code != 0 and "No such file" in out
    code, out = await inside("/usr/bin/ls", "-A", "/srv/mail")
    assert code == 0 and "carol" not in out
    for path in (str(b_maildir / "secret"), str(settings.mail_dir), f"/srv/{domain_b}"):
        code, out = await inside("/usr/bin/cat", path)
        assert code != 0, f"{path} is visible inside domain A's container: {out}"
    code, out = await inside("/usr/bin/cat", "/etc/passwd")
    # The rendered skeleton, not the host's /etc/passwd (which has Debian's daemon user).
    assert code == 0 and "vmail" in out and "\ndaemon:" not in out
    code, out = await inside("/usr/bin/touch", "/usr/bin/written-by-a-container")
    assert code != 0, "/usr must be read-only"
    assert b.name != a.name


async def test_stop_removes_cgroup_and_bundle(
        runtime: Runtime, settings: RuntimeSettings, new_domain: NewDomain) -> None:
    domain = await new_domain()
    instance = await runtime.ensure(domain, "imap")
    name = instance.name
    veth = f"v{settings.name_prefix[:6]}{name.rpartition('-')[2]}"
    # In its user namespace the container's network namespace is runc's own: the
    # runtime made none and no veth for it (test_isolation checks what it has).
    assert settings.id_base and not settings.netns_by_path
    assert not (NETNS_DIR / name).exists()
    assert veth not in await runtime.network.list_veths()
    assert (settings.bundles_dir / name / "config.json").exists()
    assert cgroup_file("memory", settings, name, "memory.limit_in_bytes")

    await runtime.stop(instance, drain_timeout=3.0)

    assert not (NETNS_DIR / name).exists()
    assert veth not in await runtime.network.list_veths()
    assert not (settings.bundles_dir / name).exists()
    from mailfc.runtime import cgroups
    assert not cgroups.exists(runtime.cgroup_path(name))
    assert await runtime.backend.state(name) is None
    row = await runtime.db.fetchrow(
        "SELECT state, stop_reason FROM container_instances WHERE name = $1", name)
    assert row is not None and row["state"] == "stopped" and row["stop_reason"] == "stopped"
    assert await runtime.instances(domain) == []


async def test_without_a_user_namespace_a_container_joins_a_pooled_netns(
        settings: RuntimeSettings, cmdb: asyncpg.Pool, new_domain: NewDomain) -> None:
    """id_base 0: containers join an endpoint of the pool (netns with lo and eth0,
    a veth on the bridge), each its own, removed when the container stops."""
    legacy = Runtime(settings.replace(id_base=0), cmdb)
    await legacy.open()
    await legacy.recover()
    try:
        assert legacy.settings.netns_by_path and len(legacy.network.pooled()) == 2
        pooled = set(legacy.network.pooled())
        a = await legacy.ensure(await new_domain(), "smtp")
        b = await legacy.ensure(await new_domain(), "imap")
        assert {a.name, b.name} <= pooled, "the starts did not take the pool's endpoints"
        inodes = set()
        for instance in (a, b):
            assert instance.pid is not None
            netns = os.stat(f"/proc/{instance.pid}/ns/net").st_ino
            assert netns == (NETNS_DIR / instance.name).stat().st_ino
            assert netns != os.stat("/proc/self/ns/net").st_ino
            inodes.add(netns)
            assert interfaces(instance.pid) == {"lo", "eth0"}
            service = "lmtp" if instance.image == "dovecot" else "smtp"
            assert (await read_banner(instance.socket(service))).startswith(b"220 ")
        assert len(inodes) == 2, "two containers share a network namespace"
        for instance in (a, b):
            veth = f"v{settings.name_prefix[:6]}{instance.name.rpartition('-')[2]}"
            await legacy.stop(instance, drain_timeout=3.0)
            assert not (NETNS_DIR / instance.name).exists()
            assert veth not in await legacy.network.list_veths()
    finally:
        for instance in await legacy.instances():
            await legacy.stop(instance, drain_timeout=1.0, reason="test over")
        await legacy.recover()
        await legacy.close()
        await remove_test_network(settings)


async def test_twenty_concurrent_ensures_start_one_container(
        runtime: Runtime, new_domain: NewDomain) -> None:
    domain = await new_domain()
    before = runtime.starts
    instances = await asyncio.gather(*(runtime.ensure(domain, "imap") for _ in range(20)))
    assert runtime.starts - before == 1
    assert len({i.name for i in instances}) == 1
    live = await runtime.db.fetchval(
        "SELECT count(*) FROM container_instances i JOIN domains d ON d.id = i.domain_id"
        " WHERE d.name = $1 AND i.state <> 'stopped'", domain)
    assert live == 1
    # lmtp callers arriving at the same moment share the same Dovecot too.
    again = await asyncio.gather(*(runtime.ensure(domain, s) for s in ("lmtp", "imap") * 5))
    assert {i.name for i in again} == {instances[0].name}
    assert runtime.starts - before == 1


async def test_concurrent_starts_of_many_domains_get_distinct_addresses(
        runtime: Runtime, new_domain: NewDomain) -> None:
    domains = [await new_domain() for _ in range(6)]
    instances = await asyncio.gather(*(runtime.ensure(d, "smtp") for d in domains))
    assert len({i.address for i in instances}) == len(domains)
    banners = await asyncio.gather(*(read_banner(i.socket()) for i in instances))
    assert all(b.startswith(b"220 ") for b in banners)


async def test_unknown_and_suspended_domains_are_refused(
        runtime: Runtime, cmdb: asyncpg.Pool, new_domain: NewDomain) -> None:
    with pytest.raises(UnknownDomain, match="no domain"):
        await runtime.ensure("nowhere.runtime.test", "imap")
    with pytest.raises(UnknownDomain, match="not a valid domain"):
        await runtime.ensure("../../etc", "imap")
    domain = await new_domain()
    await cmdb.execute("UPDATE domains SET state = 'suspended' WHERE name = $1", domain)
    with pytest.raises(UnknownDomain, match="suspended"):
        await runtime.ensure(domain, "smtp")
    with pytest.raises(ValueError, match="unknown service"):
        await runtime.ensure(domain, "pop3")


async def test_mail_root_and_queue_are_persistent(runtime: Runtime, settings: RuntimeSettings,
                                                  new_domain: NewDomain) -> None:
    domain = await new_domain()
    first = await runtime.ensure(domain, "smtp")
    queue = settings.domains_dir / domain / "postfix-0" / "spool"
    assert _queue_intact(queue)
    await runtime.stop(first)
    second = await runtime.ensure(domain, "smtp")
    assert second.name != first.name and second.slot == first.slot == 0
    assert _queue_intact(queue)


def _queue_intact(queue: Path) -> bool:
    return (queue / "pid" / "master.pid").exists() and (queue / "deferred").is_dir()


async def test_only_the_dispatchers_socket_is_trusted(
        runtime: Runtime, new_domain: NewDomain) -> None:
    """XCLIENT on the socket only root reaches; no password opens Dovecot."""
    domain = await new_domain()
    smtp = await runtime.ensure(domain, "smtp")
    imap = await runtime.ensure(domain, "imap")

    def xclient_offered() -> bool:
        with UnixSMTP(smtp.socket(), timeout=10) as client:
            client.ehlo("dispatcher.test")
            return client.has_extn("xclient")

    assert await asyncio.to_thread(xclient_offered)
    # Dovecot's one passdb refuses every user, whatever the password.
    code, out = await runtime.backend.exec(
        imap.name, ["/usr/bin/doveadm", "auth", "test", f"bob@{domain}", "any password"])
    assert code != 0 and "auth failed" in out.lower(), out


async def test_idle_and_lifetime_bookkeeping(runtime: Runtime, cmdb: asyncpg.Pool,
                                             new_domain: NewDomain) -> None:
    idle_domain = await new_domain(idle_timeout_s=60, lifetime_s=3600)
    old_domain = await new_domain(idle_timeout_s=60, lifetime_s=3600)
    idle, old = (await runtime.ensure(idle_domain, "smtp"),
                 await runtime.ensure(old_domain, "smtp"))
    assert await runtime.due_for_stop() == []
    await cmdb.execute("UPDATE container_instances SET last_activity_at = now() - '2 min'::interval"
                       " WHERE id = $1", idle.id)
    await cmdb.execute("UPDATE container_instances SET created_at = now() - '2 h'::interval"
                       " WHERE id = $1", old.id)
    due = {instance.name: reason for instance, reason in await runtime.due_for_stop()}
    assert due == {idle.name: "idle", old.name: "lifetime"}
    await runtime.touch(idle)
    due = {instance.name: reason for instance, reason in await runtime.due_for_stop()}
    assert due == {old.name: "lifetime"}


async def test_a_start_abandoned_by_a_dead_process_is_taken_over(
        runtime: Runtime, cmdb: asyncpg.Pool, settings: RuntimeSettings,
        new_domain: NewDomain) -> None:
    domain = await new_domain()
    domain_id = await cmdb.fetchval("SELECT id FROM domains WHERE name = $1", domain)
    await cmdb.execute(
        "INSERT INTO container_instances (domain_id, service, host_id, name, address, state,"
        " created_at) VALUES ($1, 'imap', $2, $3, '10.78.0.251', 'starting',"
        " now() - '1 hour'::interval)",
        domain_id, runtime.host_id, f"{settings.name_prefix}-deadbeef")
    instance = await runtime.ensure(domain, "imap")
    assert instance.name != f"{settings.name_prefix}-deadbeef"
    state = await cmdb.fetchval("SELECT state FROM container_instances WHERE name = $1",
                                f"{settings.name_prefix}-deadbeef")
    assert state == "stopped"
