"""Two container hosts on one machine: the routers send each domain to its own host.

Host A is the test's own platform (tests/routers/conftest.py).  Host B is a
real `mailfc up --services dispatcher` process in a network namespace the test
creates (entered with nsenter), reachable over a veth pair, sharing the CMDB and the mail root
as a second machine would.  Domain c.example is placed on host B.
"""

from __future__ import annotations

import asyncio
import imaplib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest

from mailfc.db import accounts, domains
from mailfc.db.pool import embedded_cluster
from mailfc.passwords import hash_password
from tests.routers.conftest import DISPATCHER_IMAP_PORT, IMAP_PORT, PASSWORD, RouterHost, client_tls
from tests.routers.test_lmtp_router import delivered, lmtp_transaction, message

NETNS = "mfch-b"
VETH_A, VETH_B = "mfchA", "mfchB"
ADDRESS_A, ADDRESS_B = "10.84.0.1", "10.84.0.2"


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def remove_network() -> None:
    subprocess.run(["ip", "link", "del", VETH_A], capture_output=True)
    subprocess.run(["ip", "netns", "del", NETNS], capture_output=True)


@pytest.fixture(scope="module")
def host_b_network() -> Iterator[None]:
    remove_network()
    ip("netns", "add", NETNS)
    try:
        ip("link", "add", VETH_A, "type", "veth", "peer", "name", VETH_B)
        ip("link", "set", VETH_B, "netns", NETNS)
        ip("addr", "add", f"{ADDRESS_A}/30", "dev", VETH_A)
        ip("link", "set", VETH_A, "up")
        ip("-n", NETNS, "addr", "add", f"{ADDRESS_B}/30", "dev", VETH_B)
        ip("-n", NETNS, "link", "set", VETH_B, "up")
        ip("-n", NETNS, "link", "set", "lo", "up")
        yield
    finally:
        remove_network()


def wait_listening(address: str, port: int, process: subprocess.Popen[bytes],
                   timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError("host B exited; see host-b.log in the test state directory")
        try:
            socket.create_connection((address, port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"host B's dispatcher did not listen on {address}:{port}")


def start_host_b(config: Path) -> subprocess.Popen[bytes]:
    with (config.parent / "host-b.log").open("wb") as log:
        return subprocess.Popen(
            # nsenter, not `ip netns exec`: the latter remounts /sys, which hides
            # the cgroup mounts runc needs.
            ["nsenter", f"--net=/var/run/netns/{NETNS}", sys.executable, "-m", "mailfc",
             "--config",
             str(config), "up", "--services", "dispatcher"],
            stdout=subprocess.DEVNULL, stderr=log, env={**os.environ})


def stop_host_b(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
async def host_b(router_host: RouterHost, host_b_network: None) -> AsyncIterator[str]:
    state = Path(router_host.config.state_dir) / "host-b"
    state.mkdir(exist_ok=True)
    state.chmod(0o711)
    dsn = embedded_cluster(router_host.config).dsn
    config = state / "mailfc.toml"
    config.write_text(f"""
[paths]
state_dir = "{state}"
mail_root = "{router_host.mail_root}"
[database]
dsn = "{dsn}"
[host]
name = "host-b"
[network]
bridge = "mfcb1"
subnet = "10.85.0.0/24"
[dispatcher]
address = "{ADDRESS_B}"
lmtp_port = 12024
imap_port = {DISPATCHER_IMAP_PORT}
smtp_port = 12587
allowed_clients = ["{ADDRESS_A}/32"]
[runtime]
name_prefix = "mfchb"
""")
    process = start_host_b(config)
    try:
        await asyncio.to_thread(wait_listening, ADDRESS_B, DISPATCHER_IMAP_PORT, process, 60)
        async with router_host.pool.acquire() as db:
            await provision_c(db)
        yield "host-b"
    finally:
        await asyncio.to_thread(stop_host_b, process)
        await router_host.pool.execute(
            "UPDATE domains SET host_id = NULL WHERE name = 'c.example'")
        await router_host.pool.execute("UPDATE hosts SET state = 'down' WHERE name = 'host-b'")


async def provision_c(db: asyncpg.Connection) -> None:
    if not await db.fetchval("SELECT 1 FROM domains WHERE name = 'c.example'"):
        await domains.add(db, "c.example")
        await accounts.add(db, "frank@c.example", hash_password(PASSWORD))
    await db.execute("UPDATE domains SET host_id = (SELECT id FROM hosts WHERE name = 'host-b')"
                     " WHERE name = 'c.example'")


async def test_each_domain_is_served_by_its_own_host(router_host: RouterHost,
                                                     host_b: str) -> None:
    subject = f"two hosts {uuid.uuid4()}"
    _, data = await asyncio.to_thread(
        lmtp_transaction, ["frank@c.example", "bob@a.example"], message(subject))
    log = await asyncio.to_thread(
        Path(router_host.config.state_dir, "host-b", "host-b.log").read_text)
    assert [code for code, _ in data] == [250, 250], log[-3000:]
    assert len(delivered(router_host.mail_root, "frank@c.example", subject)) == 1
    assert len(delivered(router_host.mail_root, "bob@a.example", subject)) == 1

    rows = await router_host.pool.fetch(
        "SELECT d.name AS domain, h.name AS host FROM container_instances c"
        " JOIN domains d ON d.id = c.domain_id JOIN hosts h ON h.id = c.host_id"
        " WHERE c.state = 'running'")
    hosts_of = {(row["domain"], row["host"]) for row in rows}
    assert ("c.example", host_b) in hosts_of
    assert ("a.example", "router-host") in hosts_of
    assert ("c.example", "router-host") not in hosts_of

    def read() -> bytes:
        client = imaplib.IMAP4("127.0.0.1", IMAP_PORT, timeout=30)
        client.starttls(ssl_context=client_tls())
        client.login("frank@c.example", PASSWORD)
        client.select("INBOX")
        _, found = client.search(None, "SUBJECT", f'"{subject}"')
        client.logout()
        return found[0]

    assert (await asyncio.to_thread(read)).strip()
