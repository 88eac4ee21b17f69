"""Fixtures of the runtime tests: a real Runtime (runc, Postfix, Dovecot, netns).

The tests use their own bridge (mfctest0), subnet (10.78.0.0/24), host row
(runtime-test) and name prefix (mfctest), so they never touch a platform that
runs on the same machine: every cleanup is by that prefix.  The CMDB and the
state directory come from the shared fixtures in tests/conftest.py.

Missing root, runc, Postfix or Dovecot fails the tests (never skips them).
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import asyncpg
import pytest

from mailfc.config import Config
from mailfc.runtime import Runtime, RuntimeSettings, cgroups
from tests.conftest import delete_link, require, require_binary, require_root

TEST_BRIDGE = "mfctest0"
TEST_SUBNET = "10.78.0.0/24"
TEST_HOST = "runtime-test"
TEST_PREFIX = "mfctest"
_domain_numbers = itertools.count(1)


def require_container_tools() -> None:
    require_root()
    require_binary("runc", "runc")
    require(os.access("/usr/lib/postfix/sbin/master", os.X_OK), "Postfix (apt-get install postfix)")
    require(os.access("/usr/sbin/dovecot", os.X_OK), "Dovecot (apt-get install dovecot-core)")
    require(os.access("/usr/lib/dovecot/imap", os.X_OK), "dovecot-imapd")
    require(os.access("/usr/lib/dovecot/lmtp", os.X_OK), "dovecot-lmtpd")


@pytest.fixture
async def host_id(cmdb: asyncpg.Pool) -> int:
    # Upserted per test: other suites may clean the hosts table between tests.
    value = await cmdb.fetchval(
        """INSERT INTO hosts (name, dispatcher_address, container_subnet)
           VALUES ($1, '127.0.0.1', $2)
           ON CONFLICT (name) DO UPDATE SET container_subnet = EXCLUDED.container_subnet
           RETURNING id""", TEST_HOST, TEST_SUBNET)
    assert isinstance(value, int)
    return value


@pytest.fixture
def settings(mailfc_config: Config, host_id: int) -> RuntimeSettings:
    require_container_tools()
    return RuntimeSettings(
        state_dir=mailfc_config.state_dir, mail_root=mailfc_config.mail_root,
        bridge=TEST_BRIDGE, subnet=TEST_SUBNET, host_id=host_id, name_prefix=TEST_PREFIX,
        start_timeout=5.0, stop_timeout=3.0, netns_pool_size=2)


@pytest.fixture
async def runtime(settings: RuntimeSettings, cmdb: asyncpg.Pool) -> AsyncIterator[Runtime]:
    runtime = Runtime(settings, cmdb)
    await runtime.open()
    await runtime.recover()
    yield runtime
    for instance in await runtime.instances():
        with contextlib.suppress(Exception):
            await runtime.stop(instance, drain_timeout=1.0, reason="test over")
    await runtime.recover()   # containers whose rows another suite truncated
    await runtime.close()
    await remove_test_network(settings)


async def remove_test_network(settings: RuntimeSettings) -> None:
    delete_link(settings.bridge)
    cgroups.remove_if_empty(settings.cgroup_parent)


@pytest.fixture
def new_domain(cmdb: asyncpg.Pool) -> Callable[..., Awaitable[str]]:
    """Create a domain (optionally with its own container spec) and return its name."""

    async def make(**spec: int) -> str:
        name = f"d{next(_domain_numbers)}-{os.getpid()}.runtime.test"
        domain_id = await cmdb.fetchval(
            "INSERT INTO domains (name) VALUES ($1) RETURNING id", name)
        for service in ("smtp", "imap") if spec else ():
            columns = ", ".join(["domain_id", "service", *spec])
            values = ", ".join(f"${n}" for n in range(1, len(spec) + 3))
            await cmdb.execute(
                f"INSERT INTO container_specs ({columns}) VALUES ({values})",
                domain_id, service, *spec.values())
        return name

    return make


def cgroup_file(controller: str, settings: RuntimeSettings, name: str, filename: str) -> str:
    h = cgroups.hierarchies()
    root = h.v1[controller] if h.is_v1 else h.unified
    assert root is not None
    return (Path(root) / settings.cgroup_parent.lstrip("/") / name / filename).read_text().strip()


def interfaces(pid: int) -> set[str]:
    """The network interfaces in `pid`'s network namespace (its /proc/<pid>/net/dev)."""
    lines = Path(f"/proc/{pid}/net/dev").read_text().splitlines()[2:]
    return {line.split(":")[0].strip() for line in lines}


@pytest.fixture
def cli_env(settings: RuntimeSettings, tmp_path: Path, runtime: Runtime) -> dict[str, str]:
    config = tmp_path / "mailfc.toml"
    config.write_text(
        f'[paths]\nstate_dir = "{settings.state_dir}"\nmail_root = "{settings.mail_dir}"\n'
        f'[host]\nname = "{TEST_HOST}"\n'
        f'[network]\nbridge = "{settings.bridge}"\nsubnet = "{settings.subnet}"\n'
        f'[runtime]\nname_prefix = "{settings.name_prefix}"\n')
    return {"MAILFC_CONFIG": str(config)}
