"""OCI bundles: the shared read-only root filesystem and each container's config.json.

Layout under <state_dir>/runtime:

    rootfs/                 shared by every container, mounted read-only: empty
                            mount points plus bin, sbin, lib, lib64 -> usr/...
                            (Debian 12 has merged /usr, so binding /usr is enough)
    bundles/<name>/         one per container: config.json, etc/ (the rendered
                            /etc skeleton, bound read-only), pid, runc.log
    domains/<domain>/<image>-<slot>/
                            persistent per-instance state bound read-write
                            (Postfix queue and data_directory, Dovecot state_dir)
                            and <image>-<slot>.log, the container's stdout/stderr

The container sees: /usr (ro), /etc (ro, rendered), its domain's maildir root
at /srv/mail, its own state mounts, the socket directory at /run/mailfc,
tmpfs /tmp and /run, /proc, a minimal /dev.  No /sys, no host /etc, no other
domain.  Capabilities are the ten the Postfix and Dovecot masters need, no new
privileges, a pids limit, RLIMIT_NOFILE at most the host's hard limit (runc
fails with "error setting rlimit type 7" above it).
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mailfc.runtime.images import MAIL_MOUNT, SOCKET_MOUNT, Image

CAPABILITIES = [
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_FSETID", "CAP_SETUID", "CAP_SETGID",
    "CAP_SYS_CHROOT", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE", "CAP_KILL",
]
ROOTFS_DIRS = ("usr", "etc", "proc", "dev", "tmp", "run", "root", "srv/mail",
               "var/spool/postfix", "var/lib/postfix", "var/lib/dovecot", "var/tmp")
ROOTFS_LINKS = {"bin": "usr/bin", "sbin": "usr/sbin", "lib": "usr/lib", "lib64": "usr/lib64"}
NOFILE_WANTED = 65536


@dataclass(frozen=True)
class Limits:
    """cgroup limits of one container (from its CMDB spec)."""

    cpu_quota_us: int
    cpu_period_us: int
    memory_bytes: int
    pids_limit: int


def ensure_rootfs(rootfs: Path) -> None:
    """Create the shared root filesystem once; idempotent and safe to race."""
    for sub in ROOTFS_DIRS:
        (rootfs / sub).mkdir(parents=True, exist_ok=True)
    for link, target in ROOTFS_LINKS.items():
        path = rootfs / link
        if not path.is_symlink():
            with contextlib.suppress(FileExistsError):
                path.symlink_to(target)
    (rootfs / "tmp").chmod(0o1777)


def _bind(source: Path | str, destination: str, *, writable: bool) -> dict[str, Any]:
    options = ["rbind", "nosuid", "nodev", "rw" if writable else "ro"]
    return {"destination": destination, "type": "bind", "source": str(source),
            "options": options}


def nofile_limit() -> int:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        return NOFILE_WANTED
    return min(hard, NOFILE_WANTED)


def build_spec(
    *, name: str, image: Image, rootfs: Path, etc_dir: Path, mail_dir: Path, socket_dir: Path,
    state_dirs: dict[str, Path], netns_path: str, cgroups_path: str, limits: Limits,
    hostname: str, annotations: dict[str, str],
) -> dict[str, Any]:
    """The OCI runtime spec (config.json) of one container."""
    nofile = nofile_limit()
    caps = list(CAPABILITIES)
    mounts: list[dict[str, Any]] = [
        {"destination": "/proc", "type": "proc", "source": "proc",
         "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=1m"]},
        {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "nodev", "mode=1777", "size=64m"]},
        {"destination": "/run", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "nodev", "mode=755", "size=16m"]},
        _bind("/usr", "/usr", writable=False),
        _bind(etc_dir, "/etc", writable=False),
        _bind(mail_dir, MAIL_MOUNT, writable=True),
        _bind(socket_dir, SOCKET_MOUNT, writable=True),
    ]
    for inside, source in state_dirs.items():
        mounts.append(_bind(source, inside, writable=True))
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": 0, "gid": 0},
            "args": list(image.args),
            "env": ["PATH=/usr/sbin:/usr/bin", "LANG=C.UTF-8", "HOME=/root"],
            "cwd": "/",
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": nofile, "soft": nofile}],
            "noNewPrivileges": True,
        },
        "root": {"path": str(rootfs), "readonly": True},
        "hostname": hostname[:64],
        "mounts": mounts,
        "annotations": annotations,
        "linux": {
            "cgroupsPath": cgroups_path,
            "resources": {
                "devices": [{"allow": False, "access": "rwm"}],
                "cpu": {"quota": limits.cpu_quota_us, "period": limits.cpu_period_us},
                "memory": {"limit": limits.memory_bytes},
                "pids": {"limit": limits.pids_limit},
            },
            "namespaces": [
                {"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"},
                {"type": "cgroup"}, {"type": "network", "path": netns_path},
            ],
            "maskedPaths": [
                "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys",
                "/proc/latency_stats", "/proc/timer_list", "/proc/timer_stats",
                "/proc/sched_debug", "/proc/scsi", "/sys/firmware",
            ],
            "readonlyPaths": [
                "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger",
            ],
        },
    }


def write_spec(bundle: Path, spec: dict[str, Any]) -> None:
    tmp = bundle / "config.json.tmp"
    tmp.write_text(json.dumps(spec, indent=1))
    os.replace(tmp, bundle / "config.json")


def read_annotations(bundle: Path) -> dict[str, str]:
    """The annotations of a bundle's config.json ({} when it is gone or broken)."""
    try:
        data = json.loads((bundle / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    annotations = data.get("annotations") or {}
    return {str(k): str(v) for k, v in annotations.items()}
