"""The container engine interface: what the lifecycle needs from an OCI runtime.

Callers (mailfc.runtime.lifecycle) speak only this interface, so another engine
(crun, Podman, containerd) can be added without touching them.  See RuncBackend
in mailfc.runtime.runc for the one implementation.

Contract
    check()                      raise RuntimeUnavailable (naming the Debian
                                 package) when the engine cannot run here
    run(name, bundle, log)       create and start a detached container from an
                                 OCI bundle; its stdio is /dev/null and `log`
                                 (never pipes: a detached runc keeps them open
                                 and the caller hangs); returns the init pid;
                                 raises StartFailed with the engine's message
    kill(name, signal, all)      send a signal (to every process with all=True);
                                 a container that is already gone is no error
    delete(name)                 remove a stopped container (force: kill first);
                                 gone is no error
    state(name)                  ContainerState or None when unknown
    containers()                 every container this engine instance knows
    update(name, cpu_quota_us, cpu_period_us, memory_bytes)
                                 change cgroup limits of a running container live
    exec(name, argv)             run a command inside (admins, tests); returns
                                 (exit status, combined output)
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ContainerState:
    name: str
    status: str          # created | running | paused | stopped
    pid: int
    bundle: Path
    annotations: dict[str, str]


class Backend(abc.ABC):
    @abc.abstractmethod
    def check(self) -> None: ...

    @abc.abstractmethod
    async def run(self, name: str, bundle: Path, log: Path) -> int: ...

    @abc.abstractmethod
    async def kill(self, name: str, signal: str = "TERM", *, all_processes: bool = False
                   ) -> None: ...

    @abc.abstractmethod
    async def delete(self, name: str, *, force: bool = False) -> None: ...

    @abc.abstractmethod
    async def state(self, name: str) -> ContainerState | None: ...

    @abc.abstractmethod
    async def containers(self) -> list[ContainerState]: ...

    @abc.abstractmethod
    async def exec(self, name: str, argv: list[str]) -> tuple[int, str]: ...

    @abc.abstractmethod
    async def update(self, name: str, *, cpu_quota_us: int | None = None,
                     cpu_period_us: int | None = None, memory_bytes: int | None = None
                     ) -> None: ...
