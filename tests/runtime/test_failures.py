"""Faults: missing packages, a server that dies or never listens, no address left.

Each failure must reach the caller as a clear error within the start timeout
and leave nothing behind: no container, netns, veth, cgroup or bundle, and the
CMDB row closed with the reason.
"""

from __future__ import annotations

import ipaddress
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import asyncpg
import pytest

from mailfc.runtime import (
    AddressExhausted,
    Runtime,
    RuntimeSettings,
    RuntimeUnavailable,
    cgroups,
    images,
)
from mailfc.runtime.errors import StartFailed
from mailfc.runtime.images import Image

pytestmark = pytest.mark.integration

NewDomain = Callable[..., Awaitable[str]]


def test_missing_server_binary_names_the_debian_package() -> None:
    image = Image(name="postfix", services=("smtp",), record_service="smtp",
                  args=("/nonexistent/master",), needs=(("/nonexistent/master", "postfix"),),
                  state_mounts=())
    with pytest.raises(RuntimeUnavailable, match="apt-get install postfix"):
        images.check_installed(image)


async def test_missing_runc_names_the_debian_package(settings: RuntimeSettings,
                                                     cmdb: asyncpg.Pool) -> None:
    runtime = Runtime(settings.replace(runc="/nonexistent/runc"), cmdb)
    with pytest.raises(RuntimeUnavailable, match="apt-get install runc"):
        await runtime.open()


async def test_unknown_host_row_is_a_clear_error(settings: RuntimeSettings,
                                                 cmdb: asyncpg.Pool) -> None:
    runtime = Runtime(settings.replace(host_id=None, host_name="no-such-host"), cmdb)
    with pytest.raises(RuntimeUnavailable, match="mailfc host add"):
        await runtime.open()


@pytest.fixture
async def broken_runtime(settings: RuntimeSettings, cmdb: asyncpg.Pool, tmp_path: Path,
                         runtime: Runtime) -> AsyncIterator[Runtime]:
    """A second runtime (same host, prefix, CMDB) whose images are broken on purpose."""
    shutil.copytree(images.IMAGES_DIR, tmp_path / "containers")
    main_cf = tmp_path / "containers/postfix/etc/postfix/main.cf.j2"
    main_cf.write_text(main_cf.read_text().replace(
        "queue_directory = /var/spool/postfix", "queue_directory = /nonexistent/queue"))
    dovecot_conf = tmp_path / "containers/dovecot/etc/dovecot/dovecot.conf.j2"
    # Dovecot runs, but its sockets are not where the runtime waits for them.
    dovecot_conf.write_text(dovecot_conf.read_text().replace(
        "base_dir = {{ base_dir }}", "base_dir = /run/elsewhere"))
    broken = Runtime(settings.replace(images_dir=tmp_path / "containers", start_timeout=1.5,
                                      netns_pool_size=0), cmdb)
    await broken.open()
    yield broken
    await broken.close()


async def _assert_nothing_left(runtime: Runtime, domain: str) -> None:
    rows = await runtime.db.fetch(
        "SELECT i.name, i.state, i.stop_reason FROM container_instances i"
        " JOIN domains d ON d.id = i.domain_id WHERE d.name = $1", domain)
    assert rows, "the failed start left no trace in the CMDB"
    for row in rows:
        name = row["name"]
        assert row["state"] == "stopped" and row["stop_reason"].startswith("start failed")
        assert await runtime.backend.state(name) is None
        assert name not in runtime.network.list_netns()
        assert not cgroups.exists(runtime.cgroup_path(name))
        assert not (runtime.settings.bundles_dir / name).exists()
        veth = f"v{runtime.settings.name_prefix[:6]}{name.rpartition('-')[2]}"
        assert veth not in await runtime.network.list_veths()


async def test_server_that_exits_at_start_fails_fast_and_cleanly(
        broken_runtime: Runtime, new_domain: NewDomain) -> None:
    domain = await new_domain()
    started = time.monotonic()
    with pytest.raises(StartFailed, match="exited during start-up") as failure:
        await broken_runtime.ensure(domain, "smtp")
    assert time.monotonic() - started < broken_runtime.settings.start_timeout
    # Postfix's master dies before its log daemon runs: the error names the log file.
    assert "postfix-0.log" in str(failure.value)
    await _assert_nothing_left(broken_runtime, domain)


async def test_server_that_never_listens_fails_within_the_timeout(
        broken_runtime: Runtime, new_domain: NewDomain) -> None:
    domain = await new_domain()
    started = time.monotonic()
    with pytest.raises(StartFailed, match=r"not listening within 1\.5 s"):
        await broken_runtime.ensure(domain, "imap")
    assert time.monotonic() - started < broken_runtime.settings.start_timeout + 2.0
    await _assert_nothing_left(broken_runtime, domain)


async def test_no_free_address_is_a_clear_error(runtime: Runtime, cmdb: asyncpg.Pool,
                                                new_domain: NewDomain) -> None:
    filler, domain = await new_domain(), await new_domain()
    filler_id = await cmdb.fetchval("SELECT id FROM domains WHERE name = $1", filler)
    network = runtime.settings.network
    taken = [a for a in network.hosts() if a != runtime.settings.bridge_address]
    live = {ipaddress.IPv4Address(str(r["address"]).split("/")[0]) for r in await cmdb.fetch(
        "SELECT address FROM container_instances WHERE host_id = $1 AND state <> 'stopped'",
        runtime.host_id)}
    free = [a for a in taken if a not in live]
    await cmdb.executemany(
        "INSERT INTO container_instances (domain_id, service, host_id, name, address, slot,"
        " state) VALUES ($1, 'imap', $2, $3, $4, $5, 'running')",
        [(filler_id, runtime.host_id, f"filler-{n}", a, n) for n, a in enumerate(free)])
    try:
        pooled = set(runtime.network.pooled())
        with pytest.raises(AddressExhausted, match="no free address"):
            await runtime.ensure(domain, "smtp")
        assert set(runtime.network.pooled()) == pooled, "the unused netns went back to the pool"
        assert await runtime.instances(domain) == []
    finally:
        await cmdb.execute("DELETE FROM container_instances WHERE domain_id = $1", filler_id)
