"""Shared fixtures: one embedded PostgreSQL cluster per test session.

The cluster lives in a temporary state directory under /tmp (searchable by the
`postgres` user, which pytest's own 0700 tmp directories are not) and is
stopped and removed at the end.  Tests that need root or a binary fail loudly
through `require()`: a skipped integration suite would hide every defect.
"""

from __future__ import annotations

import asyncio
import imaplib
import os
import shutil
import smtplib
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest
import uvloop

from mailfc.config import Config, parse_config
from mailfc.controller.platform import Platform
from mailfc.db import connect
from mailfc.db.pool import embedded_cluster
from mailfc.protocols import dovecot
from mailfc.runtime.images import dovecot_socket

TEST_HOST = "test-host"


@dataclass
class PlatformHost:
    """A platform a test suite runs in this process, with its config and pool at hand."""

    platform: Platform

    @property
    def config(self) -> Config:
        return self.platform.config

    @property
    def pool(self) -> asyncpg.Pool:
        assert self.platform.pool is not None
        return self.platform.pool


def require(condition: bool, what: str) -> None:
    """Fail (never skip) when the machine lacks what an integration test needs."""
    if not condition:
        pytest.fail(f"this test needs {what}; run the README's set-up (./setup.sh) as root")


async def eventually(condition: Callable[[], object], within_s: float = 5.0) -> None:
    """Poll until `condition()` holds, then assert it (with its last value)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if condition():
            return
        await asyncio.sleep(0.05)
    assert condition()


def delete_link(name: str) -> None:
    """Delete a network link (our test bridges) if it exists."""
    subprocess.run(["ip", "link", "del", name], capture_output=True, check=False)


class UnixSMTP(smtplib.LMTP):
    """smtplib's SMTP client on a unix socket (a container's Postfix: smtplib.LMTP
    connects to a path, and this one greets with EHLO)."""

    ehlo_msg = "ehlo"


class _HandedIMAP4(imaplib.IMAP4):
    """imaplib on a socket given to it, already logged in (a PREAUTH greeting)."""

    def __init__(self, sock: socket.socket) -> None:
        self._given = sock
        super().__init__()

    def open(self, host: str = "", port: int = 0, timeout: float | None = None) -> None:
        self.host, self.port, self.sock = host, port, self._given
        self.file = self.sock.makefile("rb")


async def handed_over_imap(pid: int, user: str, socket_timeout_s: float = 30.0
                           ) -> imaplib.IMAP4:
    """An IMAP session of `user` in the Dovecot container whose init is `pid`,
    handed over as the dispatcher does it (auth-userdb, imap-master): Dovecot
    takes no password from anyone.  A blocking client: use it in a thread."""
    ours = await dovecot.handed_over_pair(
        dovecot_socket(pid, "auth-userdb"), dovecot_socket(pid, "imap-master"), user,
        greeting=b"* PREAUTH [mailfc test] Handed over.\r\n")
    ours.settimeout(socket_timeout_s)
    return _HandedIMAP4(ours)


def require_root() -> None:
    require(os.geteuid() == 0, "root (namespaces, runc, cgroups)")


def require_binary(name: str, package: str) -> str:
    path = shutil.which(name) or next(
        (str(p) for p in (Path("/usr/sbin") / name, Path("/usr/lib/postgresql/15/bin") / name)
         if p.exists()), None)
    require(path is not None, f"{name} (apt-get install {package})")
    assert path is not None
    return path


@pytest.fixture(scope="session")
def state_dir() -> Iterator[Path]:
    require_root()
    path = Path(tempfile.mkdtemp(prefix="mailfc-test-", dir="/tmp"))
    path.chmod(0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def mailfc_config(state_dir: Path) -> Iterator[Config]:
    config = parse_config({"paths": {"state_dir": str(state_dir)}}, "test")
    config_file = state_dir / "mailfc.toml"
    config_file.write_text(f'[paths]\nstate_dir = "{state_dir}"\n')
    os.environ["MAILFC_CONFIG"] = str(config_file)
    yield config
    embedded_cluster(config).stop()


@pytest.fixture(scope="session")
def config_file(mailfc_config: Config) -> Path:
    return Path(os.environ["MAILFC_CONFIG"])


@pytest.fixture(scope="session")
async def cmdb(mailfc_config: Config) -> AsyncIterator[asyncpg.Pool]:
    """A pool on the embedded cluster, schema current, with this machine's host row."""
    pool = await connect(mailfc_config)
    await pool.execute(
        "INSERT INTO hosts (name, dispatcher_address, container_subnet)"
        " VALUES ($1, '127.0.0.1', $2) ON CONFLICT (name) DO NOTHING",
        TEST_HOST, mailfc_config.network.subnet,
    )
    yield pool
    await pool.close()


@pytest.fixture
async def clean_cmdb(cmdb: asyncpg.Pool) -> asyncpg.Pool:
    """The CMDB with no domains, accounts, aliases, limits or blocks."""
    # DELETE, not TRUNCATE ... CASCADE: that would empty container_specs too,
    # default rows (domain_id NULL) included.
    await cmdb.execute("DELETE FROM domains")
    await cmdb.execute("DELETE FROM blocks")
    await cmdb.execute("DELETE FROM hosts WHERE name <> $1", TEST_HOST)
    return cmdb


@pytest.fixture(scope="session")
def event_loop_policy() -> asyncio.AbstractEventLoopPolicy:
    """Tests run on the event loop the processes run on (mailfc.eventloop: uvloop).

    A policy and not pytest-asyncio's loop-factory hook: the hook parametrizes async
    tests only, so a sync test using an async fixture would tear the session's loop
    (and the cluster fixtures on it) down and build another."""
    policy: asyncio.AbstractEventLoopPolicy = uvloop.EventLoopPolicy()
    return policy
