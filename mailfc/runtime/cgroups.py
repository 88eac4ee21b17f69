"""Reading and tidying a container's cgroups (v1, hybrid, or v2).

runc creates a container's cgroups at the absolute cgroupsPath
/<prefix>/<name> in every hierarchy (an absolute path: a relative one would
nest under the caller's own cgroups).  This module reads them directly (no
subprocess) for the controller:

    stats(path)   -> CgroupStats: cpu_usage_us, nr_periods, nr_throttled,
                     throttled_us, memory_bytes, pids
    limits(path)  -> Limits: cpu_quota_us (-1 = none), cpu_period_us,
                     memory_bytes, pids_limit
    remove(path)  rmdir the container's directories in every hierarchy (runc
                  delete normally does; after a crash they may stay behind)
    children(parent) names of container cgroups under /<prefix>

v1 files: cpuacct.usage, cpu.stat, cpu.cfs_quota_us/cfs_period_us,
memory.usage_in_bytes, memory.limit_in_bytes, pids.current/max.
v2 files: cpu.stat (usage_usec, throttled_usec), cpu.max, memory.current,
memory.max, pids.current/max.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from mailfc.runtime.bundle import Limits

CONTROLLERS = ("cpu", "cpuacct", "memory", "pids", "devices", "freezer", "blkio", "cpuset",
               "net_cls", "net_prio", "perf_event", "hugetlb", "rdma", "misc", "name=systemd")
UNLIMITED = 2**62


@dataclass(frozen=True)
class CgroupStats:
    cpu_usage_us: int
    nr_periods: int
    nr_throttled: int
    throttled_us: int
    memory_bytes: int
    pids: int


@dataclass(frozen=True)
class Hierarchies:
    v1: dict[str, Path]      # controller -> mount point (empty on pure v2)
    unified: Path | None     # the cgroup2 mount

    @property
    def is_v1(self) -> bool:
        return "memory" in self.v1

    def roots(self) -> list[Path]:
        """Every distinct mount point a container's cgroup directories live under."""
        seen: dict[Path, None] = dict.fromkeys(self.v1.values()) if self.is_v1 else {}
        # Hybrid: runc also makes a directory in the unified hierarchy.
        if self.unified is not None:
            seen[self.unified] = None
        return list(seen)


@cache
def hierarchies() -> Hierarchies:
    v1: dict[str, Path] = {}
    unified: Path | None = None
    with open("/proc/self/mountinfo") as handle:
        for line in handle:
            left, _, right = line.partition(" - ")
            fields, tail = left.split(), right.split()
            if not tail:
                continue
            mount_point = Path(fields[4].replace("\\040", " "))
            if tail[0] == "cgroup2":
                unified = mount_point
            elif tail[0] == "cgroup":
                options = tail[2].split(",") if len(tail) > 2 else []
                for option in options:
                    if option in CONTROLLERS:
                        v1[option] = mount_point
    return Hierarchies(v1=v1, unified=unified)


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _int(text: str, default: int = 0) -> int:
    if text == "max":
        return UNLIMITED
    try:
        return int(text)
    except ValueError:
        return default


def _kv(text: str) -> dict[str, int]:
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        out[key] = _int(value)
    return out


def _dir(controller: str, path: str) -> Path:
    h = hierarchies()
    if h.is_v1:
        return h.v1[controller] / path.lstrip("/")
    assert h.unified is not None, "no cgroup hierarchy mounted"
    return h.unified / path.lstrip("/")


def stats(path: str) -> CgroupStats:
    if hierarchies().is_v1:
        cpu = _kv(_read(_dir("cpu", path) / "cpu.stat"))
        return CgroupStats(
            cpu_usage_us=_int(_read(_dir("cpuacct", path) / "cpuacct.usage")) // 1000,
            nr_periods=cpu.get("nr_periods", 0),
            nr_throttled=cpu.get("nr_throttled", 0),
            throttled_us=cpu.get("throttled_time", 0) // 1000,
            memory_bytes=_int(_read(_dir("memory", path) / "memory.usage_in_bytes")),
            pids=_int(_read(_dir("pids", path) / "pids.current")))
    base = _dir("cpu", path)
    cpu = _kv(_read(base / "cpu.stat"))
    return CgroupStats(
        cpu_usage_us=cpu.get("usage_usec", 0), nr_periods=cpu.get("nr_periods", 0),
        nr_throttled=cpu.get("nr_throttled", 0), throttled_us=cpu.get("throttled_usec", 0),
        memory_bytes=_int(_read(base / "memory.current")),
        pids=_int(_read(base / "pids.current")))


def limits(path: str) -> Limits:
    if hierarchies().is_v1:
        cpu = _dir("cpu", path)
        return Limits(
            cpu_quota_us=_int(_read(cpu / "cpu.cfs_quota_us"), -1),
            cpu_period_us=_int(_read(cpu / "cpu.cfs_period_us")),
            memory_bytes=_int(_read(_dir("memory", path) / "memory.limit_in_bytes")),
            pids_limit=_int(_read(_dir("pids", path) / "pids.max")))
    base = _dir("cpu", path)
    quota, _, period = _read(base / "cpu.max").partition(" ")
    return Limits(
        cpu_quota_us=-1 if quota == "max" else _int(quota),
        cpu_period_us=_int(period),
        memory_bytes=_int(_read(base / "memory.max")),
        pids_limit=_int(_read(base / "pids.max")))


def exists(path: str) -> bool:
    return any((root / path.lstrip("/")).is_dir() for root in hierarchies().roots())


def remove(path: str) -> None:
    """Remove the cgroup directories of `path` (deepest first); busy or gone is fine."""
    for root in hierarchies().roots():
        top = root / path.lstrip("/")
        if not top.is_dir():
            continue
        for dirpath, _dirs, _files in sorted(os.walk(top), key=lambda item: -len(item[0])):
            with contextlib.suppress(OSError):
                os.rmdir(dirpath)


def remove_if_empty(path: str) -> None:
    """rmdir `path` in every hierarchy when it has no children left (the shared parent)."""
    for root in hierarchies().roots():
        with contextlib.suppress(OSError):
            os.rmdir(root / path.lstrip("/"))


def children(parent: str) -> list[str]:
    """Names of the cgroup directories directly under `parent`, in any hierarchy."""
    names: set[str] = set()
    for root in hierarchies().roots():
        base = root / parent.lstrip("/")
        with contextlib.suppress(OSError):
            names.update(entry.name for entry in os.scandir(base) if entry.is_dir())
    return sorted(names)
