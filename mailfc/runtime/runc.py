"""RuncBackend: the Backend interface on runc (Debian package runc).

Every call is `runc --root <state_dir>/runtime/runc ...`, so the containers of
one state directory are the only ones it lists or touches.  crun refuses this
machine's cgroup v1 hybrid layout; runc works with both v1 and v2.

runc's own diagnostics go to `--log <bundle>/runc.log` (JSON lines); a failed
`run` raises StartFailed with the last error from there.  The container's
stdin is /dev/null and stdout/stderr the per-domain log file.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path

from mailfc.runtime.backend import Backend, ContainerState
from mailfc.runtime.bundle import read_annotations
from mailfc.runtime.errors import NotRunning, RuntimeUnavailable, StartFailed

# Not found in runc's state: these phrases mean "already gone".
_GONE = ("does not exist", "not exist", "container not running", "no such")


class RuncBackend(Backend):
    def __init__(self, root: Path, binary: str = "runc") -> None:
        self.root = root
        self.binary = binary

    def check(self) -> None:
        path = shutil.which(self.binary) or (
            f"/usr/sbin/{self.binary}" if os.access(f"/usr/sbin/{self.binary}", os.X_OK)
            else None)
        if path is None:
            raise RuntimeUnavailable(f"{self.binary} is missing: apt-get install runc")
        if os.geteuid() != 0:
            raise RuntimeUnavailable("the container runtime needs root (namespaces, cgroups)")
        self.binary = path
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)

    async def _runc(self, *args: str, log: Path | None = None) -> tuple[int, str]:
        argv = [self.binary, "--root", str(self.root)]
        if log is not None:
            argv += ["--log", str(log), "--log-format", "json"]
        process = await asyncio.create_subprocess_exec(
            *argv, *args, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        out, _ = await process.communicate()
        assert process.returncode is not None
        return process.returncode, out.decode(errors="replace").strip()

    async def run(self, name: str, bundle: Path, log: Path) -> int:
        runc_log = bundle / "runc.log"
        pid_file = bundle / "pid"
        # The container inherits these descriptors: /dev/null and a file, never a pipe.
        stdin = os.open(os.devnull, os.O_RDONLY)
        output = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        try:
            process = await asyncio.create_subprocess_exec(
                self.binary, "--root", str(self.root), "--log", str(runc_log),
                "--log-format", "json", "run", "--detach", "--bundle", str(bundle),
                "--pid-file", str(pid_file), name,
                stdin=stdin, stdout=output, stderr=output)
            code = await process.wait()
        finally:
            os.close(stdin)
            os.close(output)
        if code != 0:
            raise StartFailed(f"runc run {name} failed: {_last_error(runc_log)}")
        try:
            return int(pid_file.read_text().strip())
        except (OSError, ValueError) as error:
            raise StartFailed(f"runc run {name}: no pid file ({error})") from None

    async def kill(self, name: str, signal: str = "TERM", *, all_processes: bool = False
                   ) -> None:
        args = ["kill", *(["--all"] if all_processes else []), name, signal]
        code, out = await self._runc(*args)
        if code != 0 and not _is_gone(out):
            raise NotRunning(f"runc kill {name} {signal}: {out}")

    async def delete(self, name: str, *, force: bool = False) -> None:
        code, out = await self._runc("delete", *(["--force"] if force else []), name)
        if code != 0 and not _is_gone(out):
            raise NotRunning(f"runc delete {name}: {out}")

    async def state(self, name: str) -> ContainerState | None:
        code, out = await self._runc("state", name)
        if code != 0:
            return None
        return _parse_state(json.loads(out))

    async def containers(self) -> list[ContainerState]:
        code, out = await self._runc("list", "--format", "json")
        if code != 0:
            raise RuntimeUnavailable(f"runc list failed: {out}")
        items = json.loads(out or "null") or []
        return [_parse_state(item) for item in items]

    async def exec(self, name: str, argv: list[str]) -> tuple[int, str]:
        return await self._runc("exec", name, *argv)

    async def update(self, name: str, *, cpu_quota_us: int | None = None,
                     cpu_period_us: int | None = None, memory_bytes: int | None = None
                     ) -> None:
        args = ["update"]
        if cpu_period_us is not None:
            args += ["--cpu-period", str(cpu_period_us)]
        if cpu_quota_us is not None:
            args += ["--cpu-quota", str(cpu_quota_us)]
        if memory_bytes is not None:
            args += ["--memory", str(memory_bytes)]
        code, out = await self._runc(*args, name)
        if code != 0:
            raise NotRunning(f"runc update {name}: {out}")


def _parse_state(item: dict[str, object]) -> ContainerState:
    bundle = Path(str(item.get("bundle") or ""))
    annotations = item.get("annotations")
    if not isinstance(annotations, dict):
        annotations = read_annotations(bundle)
    pid = item.get("pid")
    return ContainerState(
        name=str(item.get("id")), status=str(item.get("status")),
        pid=pid if isinstance(pid, int) else 0, bundle=bundle,
        annotations={str(k): str(v) for k, v in annotations.items()})


def _is_gone(message: str) -> bool:
    lower = message.lower()
    return any(phrase in lower for phrase in _GONE)


def _last_error(runc_log: Path) -> str:
    """The last error line runc logged, as plain text."""
    try:
        lines = runc_log.read_text().splitlines()
    except OSError:
        return "(no runc log)"
    for line in reversed(lines):
        try:
            entry = json.loads(line)
        except ValueError:
            return line
        if entry.get("level") in ("error", "fatal"):
            return str(entry.get("msg", line))
    return lines[-1] if lines else "(empty runc log)"
