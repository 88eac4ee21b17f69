"""Nobody but the routers gets through the dispatcher (mailfc.dispatcher.server, SECURITY).

A process running as `nobody` on the dispatcher's own host tries every
endpoint of a running dispatcher the way the routers use them: a PROXY v2
header naming a domain, then the LOGIN that the router would send after
checking the password (`a LOGIN "bob@a.example" "-"`).
- TCP (12024 LMTP, 12143 IMAP, 12587 SMTP), plain and TLS without a
  certificate: refused in the TLS handshake, never a greeting.
- The unix sockets: EACCES (a directory only root may enter); and with the
  directory and sockets opened up for the test, the SO_PEERCRED check closes
  the connection before the dispatcher reads a byte.
The client is /usr/bin/python3 with the standard library only (nobody need
not read the project's virtual environment), started with setpriv.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailfc.dispatcher.server import LOCAL_SERVICES, Dispatcher
from mailfc.protocols import proxy
from tests.conftest import require
from tests.routers.conftest import RouterHost

PYTHON = "/usr/bin/python3"

# Runs as nobody: for each endpoint, what came back (never raises).
CLIENT = r"""
import json, socket, ssl, sys

job = json.loads(sys.argv[1])
attempt = bytes.fromhex(job["attempt"])
results = {}

def talk(sock):
    sock.settimeout(5)
    sock.sendall(attempt)
    data = b""
    while len(data) < 4096:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return "answered " + data.hex() if data else "closed"

def attempt_on(name, connect):
    try:
        sock = connect()
    except OSError as error:
        results[name] = "connect " + type(error).__name__
        return
    try:
        results[name] = talk(sock)
    except ssl.SSLError as error:
        results[name] = "tls " + (error.reason or type(error).__name__)
    except OSError as error:
        results[name] = "closed " + type(error).__name__
    finally:
        sock.close()

def plain(port):
    return socket.create_connection(("127.0.0.1", port), timeout=5)

def tls(port):
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE     # whatever the server is: it wants our certificate
    return context.wrap_socket(plain(port))

def unix(path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        raise
    return sock

for service, port in job["ports"].items():
    attempt_on("tcp " + service, lambda: plain(port))
    attempt_on("tls " + service, lambda: tls(port))
for service, path in job["sockets"].items():
    attempt_on("unix " + service, lambda: unix(path))
print(json.dumps(results))
"""


def as_nobody(job: dict[str, object]) -> dict[str, str]:
    require(Path(PYTHON).exists(), f"{PYTHON} (apt-get install python3)")
    require(shutil.which("setpriv") is not None, "setpriv (apt-get install util-linux)")
    done = subprocess.run(
        ["setpriv", "--reuid", "nobody", "--regid", "nogroup", "--clear-groups",
         PYTHON, "-I", "-c", CLIENT, json.dumps(job)],
        capture_output=True, text=True, timeout=120, cwd="/")
    assert done.returncode == 0, done.stderr
    results: dict[str, str] = json.loads(done.stdout)
    return results


def the_dispatcher(router_host: RouterHost) -> Dispatcher:
    return next(s for s in router_host.platform.services if isinstance(s, Dispatcher))


def job_for(router_host: RouterHost) -> dict[str, object]:
    config = router_host.config
    header = proxy.encode("192.0.2.66", 40000, "127.0.0.1", 143, authority="a.example")
    return {
        "attempt": (header + b'a LOGIN "bob@a.example" "-"\r\n').hex(),
        "ports": {"lmtp": config.dispatcher.lmtp_port, "imap": config.dispatcher.imap_port,
                  "smtp": config.dispatcher.smtp_port},
        "sockets": {s: str(config.dispatcher_socket(s)) for s in LOCAL_SERVICES},
    }


@pytest.fixture
def opened_up(router_host: RouterHost) -> Iterator[None]:
    """The dispatcher's socket directory and sockets open to everyone, for the
    length of a test: what a mistaken chmod would do."""
    directory = router_host.config.dispatcher_socket("imap").parent
    sockets = [router_host.config.dispatcher_socket(s) for s in LOCAL_SERVICES]
    modes = {path: path.stat().st_mode & 0o7777 for path in [directory, *sockets]}
    try:
        directory.chmod(0o711)
        for path in sockets:
            path.chmod(0o666)
        yield
    finally:
        for path, mode in modes.items():
            path.chmod(mode)


def assert_no_greeting(result: str) -> None:
    # A greeting would be "* OK" (IMAP), "220"/"+" (SMTP, LMTP hand-over): bytes in clear.
    if result.startswith("answered "):
        data = bytes.fromhex(result.removeprefix("answered "))
        assert data[:1] == b"\x15", f"the dispatcher answered in clear: {data[:80]!r}"


async def test_nobody_gets_no_session_from_any_endpoint(router_host: RouterHost) -> None:
    dispatcher = the_dispatcher(router_host)
    sessions_before = len(dispatcher.latencies)
    results = await asyncio.to_thread(as_nobody, job_for(router_host))

    for service in ("lmtp", "imap", "smtp"):
        plain, tls = results[f"tcp {service}"], results[f"tls {service}"]
        assert not plain.startswith("connect"), plain     # the port is there ...
        assert_no_greeting(plain)                          # ... and says nothing usable
        assert tls.startswith(("tls ", "closed")), tls     # no certificate, no session
        assert results[f"unix {service}"] == "connect PermissionError", results
    # Not one session reached a container.
    assert len(dispatcher.latencies) == sessions_before


async def test_peer_credential_check_closes_a_stranger(
        router_host: RouterHost, opened_up: None, caplog: pytest.LogCaptureFixture) -> None:
    dispatcher = the_dispatcher(router_host)
    sessions_before = len(dispatcher.latencies)
    job = job_for(router_host)
    job["ports"] = {}
    with caplog.at_level(logging.WARNING, logger="mailfc.dispatcher"):
        results = await asyncio.to_thread(as_nobody, job)
    for service in LOCAL_SERVICES:
        result = results[f"unix {service}"]
        # Connected (the permissions let it), then closed without a word.
        assert result.startswith("closed"), results
        assert any(f"refused {service} connection on its unix socket" in r.getMessage()
                   and "uid 65534" in r.getMessage() for r in caplog.records), caplog.text
    assert len(dispatcher.latencies) == sessions_before


async def test_root_still_passes_the_check(router_host: RouterHost) -> None:
    """The check lets root (the routers) in: a PROXY header for a domain gets its
    greeting on the IMAP socket."""
    assert os.geteuid() == 0
    path = router_host.config.dispatcher_socket("imap")
    reader, writer = await asyncio.open_unix_connection(str(path))
    try:
        writer.write(proxy.encode("192.0.2.67", 40001, "127.0.0.1", 143,
                                  authority="a.example"))
        greeting = await asyncio.wait_for(reader.readuntil(b"\n"), 30)
        assert greeting.startswith(b"* OK"), greeting
    finally:
        writer.close()
