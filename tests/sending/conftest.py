"""The sending path on a host of its own, with a remote MX in its own network namespace.

    swaks/smtplib --587--> SMTP Router --> dispatcher --> [Postfix s.example]
        --LMTP--> Filter-Out (OpenDKIM signs) --> SMTP-Out --> MX 10.94.0.2:25
                                                          \\-> LMTP Router (hosted)
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from mailfc.config import Config, parse_config
from mailfc.controller.platform import Platform
from mailfc.db import accounts, domains
from mailfc.db.pool import embedded_cluster
from mailfc.passwords import hash_password
from tests.conftest import PlatformHost, require_binary
from tests.dkim import opendkim_signing

PASSWORD = "sending-test-password"
SUBMISSION_PORT, SUBMISSIONS_PORT = 21587, 21465
DKIM_PORT = 21891
NETNS, VETH_HOST, VETH_MX = "mfco-mx", "mfcoH", "mfcoM"
HOST_ADDRESS, MX_ADDRESS = "10.94.0.1", "10.94.0.2"


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def remove_network() -> None:
    subprocess.run(["ip", "link", "del", VETH_HOST], capture_output=True)
    subprocess.run(["ip", "netns", "del", NETNS], capture_output=True)


@dataclass
class RemoteMx:
    directory: Path

    def messages(self) -> list[tuple[dict[str, object], bytes]]:
        found = []
        for envelope in sorted(self.directory.glob("*.json"), key=lambda p: int(p.stem)):
            found.append((json.loads(envelope.read_text()),
                          envelope.with_suffix(".eml").read_bytes()))
        return found


@pytest.fixture(scope="session")
def remote_mx(state_dir: Path) -> Iterator[RemoteMx]:
    remove_network()
    ip("netns", "add", NETNS)
    directory = state_dir / "remote-mx"
    process = None
    try:
        ip("link", "add", VETH_HOST, "type", "veth", "peer", "name", VETH_MX)
        ip("link", "set", VETH_MX, "netns", NETNS)
        ip("addr", "add", f"{HOST_ADDRESS}/30", "dev", VETH_HOST)
        ip("link", "set", VETH_HOST, "up")
        ip("-n", NETNS, "addr", "add", f"{MX_ADDRESS}/30", "dev", VETH_MX)
        ip("-n", NETNS, "link", "set", VETH_MX, "up")
        ip("-n", NETNS, "link", "set", "lo", "up")
        with (state_dir / "remote-mx.log").open("wb") as log:
            process = subprocess.Popen(
                ["nsenter", f"--net=/var/run/netns/{NETNS}", sys.executable, "-m",
                 "tests.sending.mx_sink", MX_ADDRESS, "25", str(directory)],
                stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).parents[2])
        deadline = time.monotonic() + 20
        while not (directory / "ready").exists():
            assert process.poll() is None, "the remote MX exited; see remote-mx.log"
            assert time.monotonic() < deadline, "the remote MX did not start"
            time.sleep(0.05)
        yield RemoteMx(directory)
    finally:
        if process is not None:
            process.terminate()
            process.wait(timeout=10)
        remove_network()


@dataclass
class SendingHost(PlatformHost):
    mx: RemoteMx

    def logs(self, domain: str) -> str:
        """The domain's container logs, to explain a failed assertion."""
        directory = self.config.state_dir / "runtime" / "domains" / domain
        return "\n".join(f"== {path.name}\n{path.read_text(errors='replace')[-3000:]}"
                         for path in sorted(directory.glob("*.log")))


@pytest.fixture(scope="session")
async def sending_host(state_dir: Path, cmdb: asyncpg.Pool, mailfc_config: Config,
                       remote_mx: RemoteMx) -> AsyncIterator[SendingHost]:
    require_binary("runc", "runc")
    require_binary("postfix", "postfix")
    own = state_dir / "sending"
    own.mkdir(exist_ok=True)
    own.chmod(0o711)
    async with cmdb.acquire() as db:
        for domain in ("s.example", "t.example"):
            if not await db.fetchval("SELECT 1 FROM domains WHERE name = $1", domain):
                await domains.add(db, domain)
        hashed = hash_password(PASSWORD)
        for address in ("sam@s.example", "sue@s.example", "tom@t.example"):
            if not await db.fetchval(
                    "SELECT 1 FROM accounts a JOIN domains d ON d.id = a.domain_id"
                    " WHERE a.localpart || '@' || d.name = $1", address):
                await accounts.add(db, address, hashed)
    with opendkim_signing(own / "dkim", "s.example", DKIM_PORT):
        config = parse_config({
            "paths": {"state_dir": str(own)},
            "database": {"dsn": embedded_cluster(mailfc_config).dsn},
            "host": {"name": "sending-host"},
            "network": {"bridge": "mfcs0", "subnet": "10.95.0.0/24"},
            "runtime": {"name_prefix": "mfcs"},
            # The internal hops (LMTP Router, SMTP-Out) on their default unix sockets.
            "listen": {"imap_router": "127.0.0.1:21143",
                       "imap_router_tls": "127.0.0.1:21993",
                       "submission": f"127.0.0.1:{SUBMISSION_PORT}",
                       "submissions": f"127.0.0.1:{SUBMISSIONS_PORT}",
                       "milter": "127.0.0.1:21030", "hook_server": "127.0.0.1:21031"},
            "dispatcher": {"lmtp_port": 21124, "imap_port": 21243, "smtp_port": 21587 + 100},
            "submission": {"auth_failure_delay_s": 0.1},
            "filter_out": {"milters": [f"inet:127.0.0.1:{DKIM_PORT}"]},
            "smtp_out": {"routes": [f"remote.example={MX_ADDRESS}:25"], "timeout_s": 20.0},
            "spool": {"retry_base_s": 1.0, "retry_max_s": 2.0, "scan_interval_s": 0.5},
        }, "sending tests")
        platform = Platform(config, ("milter", "dispatcher", "lmtp-router",
                                     "submission-router", "smtp-out", "filter-out"))
        await platform.start()
        await cmdb.execute(
            "UPDATE domains SET host_id = (SELECT id FROM hosts WHERE name = 'sending-host')"
            " WHERE name IN ('s.example', 't.example')")
        try:
            yield SendingHost(platform, remote_mx)
        finally:
            await platform.stop()
            await asyncio.to_thread(subprocess.run, ["ip", "link", "del", "mfcs0"],
                                    capture_output=True, check=False)
