"""mailfc.peers: the cgroup parser on real-looking lines; identify() on real sockets."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import asyncpg
import pytest

from mailfc import peers

# A runc container of this machine's cgroup v1 hybrid layout: every v1 hierarchy, the
# named systemd one and the unified one (0::) hold it at /<prefix>/<prefix>-<token>.
HYBRID = """\
9:name=systemd:/mailfc/mailfc-1a2b3c4d
8:pids:/mailfc/mailfc-1a2b3c4d
7:blkio:/mailfc/mailfc-1a2b3c4d
6:freezer:/mailfc/mailfc-1a2b3c4d
5:devices:/mailfc/mailfc-1a2b3c4d
4:memory:/mailfc/mailfc-1a2b3c4d
3:cpuset:/mailfc/mailfc-1a2b3c4d
2:cpuacct:/mailfc/mailfc-1a2b3c4d
1:cpu:/mailfc/mailfc-1a2b3c4d
0::/mailfc/mailfc-1a2b3c4d
"""
# cgroup v2 only; the tests' own prefixes.
UNIFIED = "0::/mfcm/mfcm-0f9e8d7c\n"
# Host processes: a systemd service, a login session, a sandbox's memory cgroup.
HOST_LINES = (
    "0::/system.slice/postfix@-.service\n",
    "1:name=systemd:/user.slice/user-0.slice/session-3.scope\n0::/user.slice/user-0.slice\n",
    "9:name=systemd:/\n8:pids:/\n4:memory:/process_api/dee462ddcdb72c24b374db8d2e44747f\n"
    "0::/\n",
)


def test_hybrid_and_unified_lines_name_the_container() -> None:
    assert peers.container_in(HYBRID) == "mailfc-1a2b3c4d"
    assert peers.container_in(UNIFIED) == "mfcm-0f9e8d7c"
    # Pure v1 without the unified hierarchy.
    v1_only = "".join(line + "\n" for line in HYBRID.splitlines() if not line.startswith("0::"))
    assert peers.container_in(v1_only) == "mailfc-1a2b3c4d"


@pytest.mark.parametrize("text", HOST_LINES)
def test_host_processes_are_in_no_container(text: str) -> None:
    assert peers.container_in(text) is None


def test_paths_below_or_relative_to_a_container_still_name_it() -> None:
    assert peers.container_of_path("/mfck/mfck-00aa11bb/postfix") == "mfck-00aa11bb"
    # Read from inside a cgroup namespace, a path is relative to its root.
    assert peers.container_of_path("/../../mfck/mfck-00aa11bb") == "mfck-00aa11bb"
    # cgroup v2 marks a cgroup removed while the process still runs.
    assert peers.container_in("0::/mfck/mfck-00aa11bb (deleted)\n") == "mfck-00aa11bb"


@pytest.mark.parametrize("path", [
    "/mfcm/mfcm-not-hex", "/other/mfcm-1a2b3c4d", "/mfcm-1a2b3c4d", "/mfcm/mfcm-",
    "/mfcm/mfcm-1A2B3C4D", "/", "", "/user.slice/user-0.slice",
])
def test_other_paths_name_no_container(path: str) -> None:
    assert peers.container_of_path(path) is None


def test_hierarchies_naming_two_containers_are_refused() -> None:
    with pytest.raises(peers.CgroupsDisagree):
        peers.container_in("8:pids:/mfcm/mfcm-00000001\n0::/mfcm/mfcm-00000002\n")


# -- identify() on real connections ----------------------------------------------------

class Listener:
    """A unix server that hands each accepted connection to the test's coroutine."""

    def __init__(self, path: Path, identity: peers.Peers) -> None:
        self.path = path
        self.identity = identity
        self.seen: asyncio.Queue[peers.Peer] = asyncio.Queue()
        self.before: Callable[[], Awaitable[None]] | None = None

    async def _serve(self, _reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                     ) -> None:
        if self.before is not None:
            await self.before()
        await self.seen.put(await self.identity.identify(writer))
        writer.close()


@pytest.fixture
async def listener(state_dir: Path, cmdb: asyncpg.Pool) -> AsyncIterator[Listener]:
    # Not pytest's tmp_path: its parents are 0700, closed to the test's other users.
    directory = Path(tempfile.mkdtemp(prefix="peers-", dir=state_dir))
    os.chmod(directory, 0o755)
    made = Listener(directory / "peer.sock", peers.Peers(cmdb))
    server = await asyncio.start_unix_server(made._serve, str(made.path))
    made.path.chmod(0o666)
    try:
        yield made
    finally:
        server.close()
        await server.wait_closed()
        shutil.rmtree(directory, ignore_errors=True)


async def test_this_process_is_host_root(listener: Listener) -> None:
    _reader, writer = await asyncio.open_unix_connection(str(listener.path))
    peer = await asyncio.wait_for(listener.seen.get(), 10)
    writer.close()
    assert (peer.kind, peer.pid, peer.uid) == (peers.HOST, os.getpid(), os.geteuid())
    assert peer.host_root and peer.domain is None


CONNECT_AND_WAIT = ("import socket, sys; s = socket.socket(socket.AF_UNIX);"
                    " s.connect(sys.argv[1]); s.recv(1)")


async def test_another_user_is_a_host_process_but_not_root(listener: Listener) -> None:
    process = await asyncio.create_subprocess_exec(
        "setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
        sys.executable, "-c", CONNECT_AND_WAIT, str(listener.path))
    try:
        peer = await asyncio.wait_for(listener.seen.get(), 10)
    finally:
        await process.wait()
    assert peer.kind == peers.HOST and peer.uid == 65534 and not peer.host_root


async def test_a_peer_that_exited_is_unknown(listener: Listener) -> None:
    async def exited() -> None:
        await process.wait()
    listener.before = exited      # looked at only after the peer is gone
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "import socket, sys; socket.socket(socket.AF_UNIX)"
        ".connect(sys.argv[1])", str(listener.path))
    peer = await asyncio.wait_for(listener.seen.get(), 10)
    assert peer.kind == peers.UNKNOWN and not peer.host_root
    assert "exited" in peer.why
