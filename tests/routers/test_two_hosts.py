"""Two container hosts on one machine: the routers send each domain to its own host.

Host A is the test's own platform (tests/routers/conftest.py).  Host B is a
real `mailfc up --services dispatcher` process in a network namespace the test
creates (entered with nsenter), reachable over a veth pair, sharing the CMDB and the mail root
as a second machine would.  Domain c.example is placed on host B.

Host B is added the way an operator would: `mailfc host add host-b` on host A
writes its cluster credentials, and host B's configuration points at them, so
host A's routers reach it over mutual TLS.  A third party on host A's address
without such a credential (plain TCP; TLS with a certificate of another CA)
gets nothing from host B's dispatcher.
"""

from __future__ import annotations

import asyncio
import contextlib
import imaplib
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest

from mailfc import cluster
from mailfc.db import accounts, domains
from mailfc.db.pool import embedded_cluster
from mailfc.passwords import hash_password
from mailfc.protocols import proxy
from tests.routers.conftest import (
    DISPATCHER_IMAP_PORT,
    IMAP_PORT,
    PASSWORD,
    RouterHost,
    client_tls,
)
from tests.routers.test_lmtp_router import delivered, lmtp_transaction, message

NETNS = "mfch-b"
VETH_A, VETH_B = "mfchA", "mfchB"
ADDRESS_A, ADDRESS_B = "10.84.0.1", "10.84.0.2"
DISPATCHER_LMTP_PORT = 12024


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


def add_host_b(router_host: RouterHost, credentials: Path) -> None:
    """`mailfc host add host-b` on host A, as an operator would run it."""
    config = credentials.parent / "host-a.toml"
    ports = router_host.config.dispatcher
    config.write_text(f"""
[paths]
state_dir = "{router_host.config.state_dir}"
[host]
name = "{router_host.config.host_name}"
[dispatcher]
lmtp_port = {ports.lmtp_port}
imap_port = {ports.imap_port}
smtp_port = {ports.smtp_port}
""")
    done = subprocess.run(
        [sys.executable, "-m", "mailfc", "--config", str(config), "host", "add", "host-b",
         "--dispatcher", ADDRESS_B, "--subnet", "10.85.0.0/24",
         "--credentials", str(credentials)],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "cert_file" in done.stdout, done.stdout


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
    credentials = state / "credentials"
    await asyncio.to_thread(add_host_b, router_host, credentials)
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
[cluster]
ca_file = "{credentials / 'ca.pem'}"
cert_file = "{credentials / 'cert.pem'}"
key_file = "{credentials / 'key.pem'}"
[network]
bridge = "mfcb1"
subnet = "10.85.0.0/24"
[dispatcher]
address = "{ADDRESS_B}"
lmtp_port = {DISPATCHER_LMTP_PORT}
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
        lmtp_transaction, router_host, ["frank@c.example", "bob@a.example"],
        message(subject))
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


def attempt(port: int, context: ssl.SSLContext | None) -> bytes:
    """What host B's dispatcher answers a PROXY header and a LOGIN sent from host
    A's address (which dispatcher.allowed_clients lets through) by a client
    without a certificate of the cluster; ssl.SSLError when TLS refuses it."""
    header = proxy.encode("192.0.2.9", 40000, ADDRESS_B, 143, authority="c.example")
    raw = socket.create_connection((ADDRESS_B, port), timeout=10,
                                   source_address=(ADDRESS_A, 0))
    data = b""
    # A reset is a refusal too: what counts is that nothing usable came back.
    with contextlib.suppress(ConnectionResetError, BrokenPipeError), \
            (context.wrap_socket(raw, server_hostname=ADDRESS_B) if context else raw) as conn:
        conn.settimeout(10)
        conn.sendall(header + b'a LOGIN "frank@c.example" "-"\r\n')
        while chunk := conn.recv(4096):
            data += chunk
    return data


def foreign_context(directory: Path, trusted_ca: Path) -> ssl.SSLContext:
    """A client that trusts host B's CA but holds a certificate of another CA."""
    directory.mkdir(exist_ok=True)
    cluster.new_ca(directory / "ca.pem", directory / "ca.key")
    cluster.issue(directory / "ca.pem", directory / "ca.key", "intruder", ADDRESS_A,
                  directory / "cert.pem", directory / "key.pem")
    context = ssl.create_default_context(cafile=str(trusted_ca))
    context.load_cert_chain(directory / "cert.pem", directory / "key.pem")
    return context


async def test_a_host_without_credentials_gets_nothing(router_host: RouterHost,
                                                       host_b: str) -> None:
    state = Path(router_host.config.state_dir, "host-b")
    foreign = foreign_context(state / "foreign", state / "credentials" / "ca.pem")
    anonymous = ssl.create_default_context(cafile=str(state / "credentials" / "ca.pem"))
    for port in (DISPATCHER_LMTP_PORT, DISPATCHER_IMAP_PORT):
        # Plain TCP: the dispatcher expects a TLS handshake and closes without a word
        # in clear (at most a TLS alert, record type 0x15).
        plain = await asyncio.to_thread(attempt, port, None)
        assert plain[:1] in (b"", b"\x15"), plain[:80]
        for context in (foreign, anonymous):
            try:
                answer = await asyncio.to_thread(attempt, port, context)
            except ssl.SSLError:
                continue    # refused in the handshake (certificate required, unknown CA)
            assert answer == b"", answer[:80]
