"""Running the real platform for a benchmark: `mailfc up` as an admin starts it."""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import uvloop

from mailfc.config import Config, parse_config, render_toml
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


async def handed_over(pid: int, user: str, *, over_tcp: bool = False) -> socket.socket:
    """Our end of an IMAP session of `user` handed to the Dovecot container whose init
    is `pid`, as the dispatcher does it.  It starts with `* PREAUTH ...`; non-blocking.
    `over_tcp`: a loopback TCP connection instead of a unix socket pair."""
    ours = await dovecot.handed_over_pair(
        dovecot_socket(pid, "auth-userdb"), dovecot_socket(pid, "imap-master"), user,
        greeting=b"* PREAUTH [bench] Handed over.\r\n", over_tcp=over_tcp)
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


# == Shared by bench/chaos.py, bench/big_messages.py and the integrity tests ==============
# A whole `mailfc up` with its own PostgreSQL, its processes by name (to kill one, or to
# read its memory), a streaming SMTP client, and a remote MX that keeps a digest of each
# message instead of the message.

MARK = "X-Mark"
_MARK_LINE = re.compile(rb"(?im)^x-mark:[ \t]*(\S+)")


def dot_stuffed(message: bytes) -> bytes:
    """`message` (CRLF line ends) as DATA carries it, without the final ".": stuffed once
    by the caller, so a client sending it many times does not copy 40 MB each time."""
    if not message.endswith(b"\r\n"):
        message += b"\r\n"
    stuffed = message.replace(b"\r\n.", b"\r\n..")
    return b"." + stuffed if stuffed.startswith(b".") else stuffed


def body_digest(message: bytes) -> str:
    """sha256 of a message's body (after the first empty line), line ends as LF: the
    wire has CRLF, a maildir LF (Dovecot), and every hop adds header lines."""
    normal = message.replace(b"\r\n", b"\n")
    return hashlib.sha256(normal.partition(b"\n\n")[2]).hexdigest()


def mark_of(header: bytes) -> str:
    found = _MARK_LINE.search(header)
    return found.group(1).decode("ascii", "replace") if found else ""


def maildir_files(mail_root: Path, address: str) -> list[Path]:
    """The messages delivered to `address` (new/ and cur/ of its INBOX)."""
    localpart, _, domain = address.partition("@")
    maildir = mail_root / domain / localpart / "Maildir"
    files: list[Path] = []
    for sub in ("new", "cur"):
        with contextlib.suppress(FileNotFoundError):
            files += [entry for entry in (maildir / sub).iterdir() if entry.is_file()]
    return files


def maildir_marks(mail_root: Path, address: str) -> collections.Counter[str]:
    """How often each X-Mark value is in `address`'s maildir (a file's header only)."""
    counts: collections.Counter[str] = collections.Counter()
    for path in maildir_files(mail_root, address):
        try:
            with path.open("rb") as handle:
                head = handle.read(65536)
        except FileNotFoundError:       # moved from new/ to cur/ meanwhile
            continue
        counts[mark_of(head.split(b"\n\n", 1)[0])] += 1
    return counts


# -- processes -------------------------------------------------------------------------

def children_of(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces and parentheses.
        if int(stat.rpartition(")")[2].split()[1]) == pid:
            found.append(int(entry))
    return found


def mailfc_processes(up_pid: int) -> dict[str, int]:
    """The supervised processes of the `mailfc up` whose pid is `up_pid`, by group name
    (mailfc.controller.supervisor: inbound, routers, outbound, ...), and "supervisor"."""
    found = {"supervisor": up_pid}
    for pid in children_of(up_pid):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for item in environ:
            if item.startswith(b"MAILFC_PROCESS="):
                found[item.partition(b"=")[2].decode()] = pid
    return found


def memory_kb(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of `pid` in kB; empty if it is gone."""
    values = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0])
    except (OSError, ValueError, IndexError):
        return {}
    return values


def reset_peak(pid: int) -> None:
    """Start VmHWM again from the current RSS (proc(5): clear_refs, "5")."""
    with contextlib.suppress(OSError):
        Path(f"/proc/{pid}/clear_refs").write_text("5")


def postmaster_pid(config: Config) -> int | None:
    """The embedded PostgreSQL's postmaster, from its postmaster.pid (None if down)."""
    try:
        pid = int((embedded_cluster(config).data_dir / "postmaster.pid").read_text()
                  .split()[0])
        os.kill(pid, 0)
    except (OSError, ValueError, IndexError):
        return None
    return pid


class Up:
    """`mailfc up` (supervised processes, its own embedded PostgreSQL when the settings
    name no database.dsn) in `state_dir`, on `settings`.  stop() ends it by its pid."""

    def __init__(self, settings: Config, state_dir: Path, ready_port: int) -> None:
        self.settings = settings
        self.state_dir = state_dir
        self.ready_port = ready_port
        self.process: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def log(self) -> Path:
        return self.state_dir / "up.log"

    async def start(self) -> None:
        self.process = await start_up(self.settings, self.state_dir, self.ready_port)

    def processes(self) -> dict[str, int]:
        return mailfc_processes(self.pid)

    def log_tail(self, chars: int = 3000) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_text(errors="replace")[-chars:]
        return ""

    def _ready_lines(self, name: str) -> int:
        with contextlib.suppress(OSError):
            return sum(1 for line in self.log.read_text(errors="replace").splitlines()
                       if line.startswith(f"[{name}] ") and "mailfc is up" in line)
        return 0

    async def kill(self, name: str) -> int:
        """kill -9 of the process of group `name`; its pid."""
        pid = self.processes()[name]
        os.kill(pid, signal.SIGKILL)
        return pid

    async def kill_and_wait(self, name: str, within_s: float = 90.0) -> float:
        """kill -9 the group's process, then wait until the supervisor's new one says it
        is up; the seconds that took."""
        before = self._ready_lines(name)
        old = await self.kill(name)
        began = time.monotonic()
        while time.monotonic() - began < within_s:
            pid = self.processes().get(name)
            if pid not in (None, old) and self._ready_lines(name) > before:
                return time.monotonic() - began
            await asyncio.sleep(0.1)
        raise RuntimeError(f"the {name} process did not come back within {within_s:g} s:\n"
                           + self.log_tail())

    async def stop(self) -> None:
        if self.process is None or self.process.returncode is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.process.wait(), 90)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()


async def container_pid(pool: Any, domain: str, service: str) -> int | None:
    """The init pid of `domain`'s running container of `service` ("imap": Dovecot,
    "smtp": Postfix), or None."""
    pid = await pool.fetchval(
        "SELECT c.pid FROM container_instances c JOIN domains d ON d.id = c.domain_id"
        " WHERE d.name = $1 AND c.service = $2 AND c.state = 'running'"
        " ORDER BY c.id DESC LIMIT 1", domain, service)
    return int(pid) if pid else None


# -- a streaming SMTP client -------------------------------------------------------------

ACCEPTED, REFUSED, UNKNOWN, UNREACHABLE = "accepted", "refused", "unknown", "unreachable"


async def _reply(reader: asyncio.StreamReader) -> tuple[int, str]:
    while True:
        line = await reader.readline()
        if not line.endswith(b"\n"):
            raise ConnectionError("connection closed")
        if line[3:4] != b"-":
            text = line.decode("utf-8", "replace").rstrip()
            return int(text[:3]), text


async def send_message(host: str, port: int, sender: str, recipients: list[str],
                       stuffed: bytes, *, tls: ssl.SSLContext | None = None,
                       login: tuple[str, str] | None = None, timeout_s: float = 120.0,
                       chunk: int = 1 << 20) -> tuple[str, str]:
    """One SMTP transaction: (outcome, last reply).  `stuffed` is dot_stuffed(message).
    Outcomes: ACCEPTED (250 at end of data), REFUSED (a 4xx/5xx reply before that),
    UNREACHABLE (no connection), UNKNOWN (the connection was lost, or no reply came
    within timeout_s, after the end of data was sent: it may or may not be queued)."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, limit=1 << 20), timeout_s)
    except (OSError, TimeoutError) as error:
        return UNREACHABLE, str(error)
    data_sent = False
    try:
        async with asyncio.timeout(timeout_s):
            code, text = await _reply(reader)
            if code != 220:
                return REFUSED, text

            async def command(line: str, expect: int) -> tuple[bool, str]:
                writer.write(line.encode() + b"\r\n")
                code, text = await _reply(reader)
                return code == expect, text

            ok, text = await command("EHLO client.bench", 250)
            if ok and tls is not None:
                ok, text = await command("STARTTLS", 220)
                if ok:
                    await writer.start_tls(tls)
                    ok, text = await command("EHLO client.bench", 250)
            if ok and login is not None:
                secret = base64.b64encode(f"\0{login[0]}\0{login[1]}".encode()).decode()
                ok, text = await command(f"AUTH PLAIN {secret}", 235)
            if ok:
                ok, text = await command(f"MAIL FROM:<{sender}> SIZE={len(stuffed)}", 250)
            if ok:
                taken = [await command(f"RCPT TO:<{rcpt}>", 250) for rcpt in recipients]
                ok = any(good for good, _ in taken)
                text = next((t for good, t in taken if not good), taken[-1][1])
            if ok:
                ok, text = await command("DATA", 354)
            if not ok:
                return REFUSED, text
            view = memoryview(stuffed)
            for start in range(0, len(view), chunk):
                writer.write(view[start:start + chunk])
                await writer.drain()
            writer.write(b".\r\n")
            data_sent = True
            code, text = await _reply(reader)
            with contextlib.suppress(Exception):
                writer.write(b"QUIT\r\n")
                await writer.drain()
            return (ACCEPTED if code == 250 else REFUSED), text
    except (OSError, ConnectionError, TimeoutError, ValueError, ssl.SSLError) as error:
        return (UNKNOWN if data_sent else REFUSED), f"{type(error).__name__}: {error}"
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


def trusting_client_tls() -> ssl.SSLContext:
    """The platform's certificate is self-signed: accepted here on purpose."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


# -- a remote MX that keeps digests, not messages -----------------------------------------

class _Buffered:
    """A StreamReader with a buffer of its own, so what follows the end of data
    (a pipelined QUIT) is not lost."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self.reader = reader
        self.buffer = b""

    async def more(self) -> None:
        chunk = await self.reader.read(1 << 18)
        if not chunk:
            raise ConnectionError("closed")
        self.buffer += chunk

    async def readline(self) -> bytes:
        while (end := self.buffer.find(b"\n")) < 0:
            if len(self.buffer) > 1 << 16:
                raise ConnectionError("line too long")
            await self.more()
        line, self.buffer = self.buffer[:end + 1], self.buffer[end + 1:]
        return line

    async def data(self) -> tuple[bytes, str, int]:
        """Until the end of data: (header, body digest as body_digest gives it, size),
        reading complete lines at a time and keeping none of the body."""
        digest = hashlib.sha256()
        header: bytes | None = None
        pending = b""          # the header, until its empty line
        size = 0
        while True:
            cut = self.buffer.rfind(b"\r\n") + 2
            if cut < 2:
                await self.more()
                continue
            lines, self.buffer = self.buffer[:cut], self.buffer[cut:]
            # `lines` starts at the start of a line: the end is a line ".".
            if lines.startswith(b".\r\n"):
                end = 0
            else:
                end = lines.find(b"\r\n.\r\n")
                end = end + 2 if end >= 0 else -1
            finished = end >= 0
            if finished:
                self.buffer = lines[end + 3:] + self.buffer
                lines = lines[:end]
            if lines.startswith(b".."):
                lines = lines[1:]
            lines = lines.replace(b"\r\n..", b"\r\n.")
            size += len(lines)
            if header is None:
                pending += lines
                at = 0 if pending.startswith(b"\r\n") else pending.find(b"\r\n\r\n") + 2
                if at >= 2 or pending.startswith(b"\r\n"):
                    header, lines = pending[:at], pending[at + 2:]
                    pending = b""
            if header is not None:
                digest.update(lines.replace(b"\r\n", b"\n"))
            if finished:
                return header if header is not None else pending, digest.hexdigest(), size
            if not self.buffer:
                await self.more()


async def _sink_session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                        record: Path) -> None:
    stream = _Buffered(reader)
    recipients: list[str] = []
    writer.write(b"220 mx.sink.bench ESMTP\r\n")
    try:
        while True:
            line = await stream.readline()
            verb = line[:4].upper()
            if verb == b"EHLO":
                writer.write(b"250-mx.sink.bench\r\n250-PIPELINING\r\n250-8BITMIME\r\n"
                             b"250 SIZE 209715200\r\n")
            elif verb == b"MAIL":
                recipients = []
                writer.write(b"250 2.1.0 ok\r\n")
            elif verb == b"RCPT":
                recipients.append(line[8:].strip().decode("utf-8", "replace").strip("<>"))
                writer.write(b"250 2.1.5 ok\r\n")
            elif verb == b"DATA":
                writer.write(b"354 go ahead\r\n")
                await writer.drain()
                header, digest, size = await stream.data()
                with record.open("a") as handle:
                    handle.write(json.dumps({"mark": mark_of(header), "sha256": digest,
                                             "size": size, "to": recipients,
                                             "at": time.time()}) + "\n")
                writer.write(b"250 2.0.0 kept\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 2.0.0 bye\r\n")
                await writer.drain()
                return
            elif verb in (b"HELO", b"RSET", b"NOOP"):
                writer.write(b"250 2.0.0 ok\r\n")
            else:
                writer.write(b"502 5.5.2 not here\r\n")
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


def _serve_sink(port: int, record: str) -> None:
    async def main() -> None:
        server = await asyncio.start_server(
            lambda r, w: _sink_session(r, w, Path(record)), "127.0.0.1", port,
            limit=1 << 20)
        async with server:
            await server.serve_forever()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())


class Sink:
    """A remote MX on 127.0.0.1:`port`, in a process of its own: each message it takes
    is one JSON line in `record` (its X-Mark, body digest, size, recipients)."""

    def __init__(self, port: int, record: Path) -> None:
        self.port = port
        self.record = record
        self._process: multiprocessing.process.BaseProcess | None = None

    def start(self, within_s: float = 30.0) -> None:
        context = multiprocessing.get_context("spawn")
        self._process = context.Process(target=_serve_sink, args=(self.port, str(self.record)),
                                        daemon=True)
        self._process.start()
        deadline = time.monotonic() + within_s
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if not self._process.is_alive() or time.monotonic() > deadline:
                    raise RuntimeError(f"the sink MX on port {self.port} did not start") \
                        from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.join(10)
            self._process = None

    def records(self) -> list[dict[str, Any]]:
        try:
            text = self.record.read_text()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines(keepends=True)
                if line.endswith("\n")]

    def marks(self) -> collections.Counter[str]:
        return collections.Counter(entry["mark"] for entry in self.records())


def cpu_seconds(pid: int) -> float:
    """User + system CPU time `pid` has used so far (0.0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        # After "(comm)": state is field 3 of stat(5), utime 14, stime 15.
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


# Benches drive thousands of connections from loopback to measure throughput, not the
# per-client connection caps (mailfc.anvil, 50 at once and 100 a minute by default):
# loopback is exempt in every bench configuration.
LOOPBACK_UNCAPPED: dict[str, dict[str, Any]] = {
    section: {"exempt_networks": ["127.0.0.0/8"]}
    for section in ("smtp_in_connections", "imap_router_connections", "submission_connections")}


def whole_platform_config(state_dir: Path, *, base: int, name: str, subnet: str,
                          prefix: str, **sections: dict[str, Any]) -> Config:
    """A whole `mailfc up` on ports base+25 (SMTP-In), base+587 (submission), ... and
    a bridge and container prefix of its own, SMTP-Out routed to a sink on base+525;
    `sections` add or replace sections."""
    data: dict[str, Any] = {
        "paths": {"state_dir": str(state_dir)},
        "host": {"name": f"bench-{name}"},
        "network": {"bridge": f"{prefix}0", "subnet": subnet},
        "runtime": {"name_prefix": prefix},
        "listen": {"smtp_in": f"127.0.0.1:{base + 25}", "imap_router": f"127.0.0.1:{base + 143}",
                   "imap_router_tls": f"127.0.0.1:{base + 993}",
                   "submission": f"127.0.0.1:{base + 587}",
                   "submissions": f"127.0.0.1:{base + 465}",
                   "milter": f"127.0.0.1:{base + 30}", "hook_server": f"127.0.0.1:{base + 31}"},
        "dispatcher": {"lmtp_port": base + 124, "imap_port": base + 243,
                       "smtp_port": base + 687},
        "smtp_out": {"routes": [f"*=127.0.0.1:{base + 525}"]},
        **LOOPBACK_UNCAPPED,
    }
    data.update(sections)
    return parse_config(data, f"{name} bench")
