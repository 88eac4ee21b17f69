"""Running the real platform for a benchmark: `mailfc up` as an admin starts it."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

from mailfc.config import Config, render_toml
from mailfc.db.pool import embedded_cluster
from mailfc.protocols import dovecot
from mailfc.runtime.images import dovecot_socket
from mailfc.runtime.instance import Instance
from mailfc.runtime.readiness import read_banner

T = TypeVar("T")


def _load_child(load: Callable[..., Coroutine[Any, Any, T]], args: tuple[Any, ...],
                results: multiprocessing.Queue[T], started: Any) -> None:
    started.set()
    results.put(asyncio.run(load(*args)))


async def in_own_process(load: Callable[..., Coroutine[Any, Any, T]], *args: Any,
                         within_s: float = 300.0, idle: bool = False,
                         started: asyncio.Event | None = None) -> T:
    """await load(*args) in a process of its own: a client sharing the event loop (or
    the CPU time slice) of the service it measures would slow that service and skew
    the figure.  Spawned, not forked: a fork of a process running uvloop inherits
    libuv's state and can hang.  `load` must be a module-level function.

    idle: the process is SCHED_IDLE from its first instruction (its imports too: it
    gets a CPU only when nothing else wants one).  started: set once the process
    has imported what it needs and begins `load`."""
    context = multiprocessing.get_context("spawn")
    results: multiprocessing.Queue[T] = context.Queue()
    begun = context.Event()
    process = context.Process(
        target=_load_child, args=(load, args, results, begun))
    process.start()
    if idle:
        assert process.pid is not None
        os.sched_setscheduler(process.pid, os.SCHED_IDLE, os.sched_param(0))
    try:
        if started is not None:
            await asyncio.to_thread(begun.wait, within_s)
            started.set()
        result: T = await asyncio.to_thread(results.get, True, within_s)
    finally:
        await asyncio.to_thread(process.join, 30)
    return result


async def start_up(settings: Config, state_dir: Path, ready_port: int
                   ) -> asyncio.subprocess.Process:
    """`mailfc up` (supervised processes) on `settings`; returns once `ready_port`
    accepts connections (the last process to start listens there)."""
    config_file = state_dir / "mailfc.toml"
    config_file.write_text(render_toml(settings))
    with (state_dir / "up.log").open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "mailfc", "--config", str(config_file), "up",
            stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.returncode is not None:
            raise RuntimeError("mailfc up exited: " + (state_dir / "up.log").read_text()[-2000:])
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", ready_port)
            writer.close()
            return process
        except OSError:
            await asyncio.sleep(0.2)
    raise RuntimeError("mailfc up did not start in time")


@contextlib.contextmanager
def scratch_state(config_of: Callable[[Path], Config], bridge: str | None = None
                  ) -> Iterator[Path]:
    """A state directory under /tmp for one run, searchable by the `postgres` user
    (the embedded cluster runs as it); afterwards its cluster is stopped, the
    bridge (if named) deleted and the directory removed."""
    state_dir = Path(tempfile.mkdtemp(prefix="mailfc-bench-", dir="/tmp"))
    state_dir.chmod(0o711)
    try:
        yield state_dir
    finally:
        embedded_cluster(config_of(state_dir)).stop()
        if bridge:
            subprocess.run(["ip", "link", "del", bridge], capture_output=True, check=False)
        shutil.rmtree(state_dir, ignore_errors=True)


async def whole_machine_cpu(db: Any, domain: str) -> None:
    """The domain's Dovecot gets the machine's two CPUs from its start: with the
    default quota the controller scales it up in the middle of a run, and a
    comparison would measure that instead of what it compares."""
    await db.execute(
        "INSERT INTO container_specs (domain_id, service, cpu_quota_us, cpu_quota_max_us)"
        " SELECT id, 'imap', 200000, 200000 FROM domains WHERE name = $1", domain)


async def handed_over(pid: int, user: str) -> socket.socket:
    """Our end of an IMAP session of `user` handed to the Dovecot container whose init
    is `pid`, as the dispatcher does it.  It starts with `* PREAUTH ...`; non-blocking."""
    ours = await dovecot.handed_over_pair(
        dovecot_socket(pid, "auth-userdb"), dovecot_socket(pid, "imap-master"), user,
        greeting=b"* PREAUTH [bench] Handed over.\r\n")
    ours.setblocking(False)
    return ours


async def first_bytes(instance: Instance, service: str, user: str = "bench") -> bytes:
    """What a fresh session of `service` gets first from its container: the banner on
    the service's socket, or for IMAP the greeting of a session of `user` handed over
    (Dovecot's imap-master sends no banner of its own)."""
    if service != "imap":
        return await read_banner(instance.socket(service))
    assert instance.pid is not None
    ours = await handed_over(instance.pid, f"{user}@{instance.domain}")
    try:
        async with asyncio.timeout(5.0):
            return await asyncio.get_running_loop().sock_recv(ours, 1024)
    finally:
        ours.close()
