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

User namespace: ids 0-65535 inside are id_base + N on the host (the same
range for every container of a host: their mount, pid, ipc and network
namespaces already keep them apart; what the range adds is that root inside,
and its capabilities, count for nothing on the host's own files, processes
and sockets).  Files of the host (/usr, the rendered /etc) appear owned by
the overflow id inside and stay readable; the persistent mounts belong to the
shifted ids (mailfc.runtime.storage).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import platform
import resource
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mailfc.config import CONTAINER_IDS
from mailfc.runtime.errors import RuntimeUnavailable
from mailfc.runtime.images import MAIL_MOUNT, SOCKET_MOUNT, Image

CAPABILITIES = [
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_FSETID", "CAP_SETUID", "CAP_SETGID",
    "CAP_SYS_CHROOT", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE", "CAP_KILL",
]
ROOTFS_DIRS = ("usr", "etc", "proc", "dev", "tmp", "run", "root", "srv/mail",
               "var/spool/postfix", "var/lib/postfix", "var/lib/dovecot", "var/tmp")
ROOTFS_LINKS = {"bin": "usr/bin", "sbin": "usr/sbin", "lib": "usr/lib", "lib64": "usr/lib64"}
NOFILE_WANTED = 65536

SECCOMP_DENIED = (
    # kernel keyrings, eBPF, perf, userfaultfd, io_uring
    "keyctl", "add_key", "request_key", "bpf", "perf_event_open", "userfaultfd",
    "io_uring_setup", "io_uring_enter", "io_uring_register",
    # namespaces and mounts
    "unshare", "setns", "mount", "umount", "umount2", "pivot_root", "move_mount", "open_tree",
    "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr",
    # the machine: swap, reboot, kernels and modules, time, accounting, quotas, logs
    "swapon", "swapoff", "reboot", "kexec_load", "kexec_file_load", "init_module",
    "finit_module", "delete_module", "create_module", "get_kernel_syms", "query_module",
    "clock_settime", "clock_adjtime", "settimeofday", "stime", "adjtimex", "acct",
    "quotactl", "quotactl_fd", "syslog", "nfsservctl", "sysfs", "_sysctl", "ustat",
    # file handles (open anything on a mounted filesystem), fanotify
    "open_by_handle_at", "name_to_handle_at", "fanotify_init",
    # other processes' memory
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd",
    # I/O ports, old and odd calls
    "iopl", "ioperm", "uselib", "vhangup", "lookup_dcookie", "vm86", "vm86old",
    # NUMA policy of other processes' memory
    "mbind", "migrate_pages", "move_pages", "set_mempolicy",
)
# personality(2) values programs use: PER_LINUX, PER_LINUX_32BIT, UNAME26
# variants, and 0xffffffff (a query: every bit set).  Any other flag (ADDR_NO_RANDOMIZE,
# READ_IMPLIES_EXEC, MMAP_PAGE_ZERO, ...) is refused.
PERSONALITY_ALLOWED_BITS = 0x0008 | 0x20000
CLONE_NAMESPACE_FLAGS = (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000,
                         0x20000000, 0x40000000)   # NEWNS, NEWCGROUP, NEWUTS .. NEWNET
SECCOMP_ARCHITECTURES = {
    "x86_64": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
    "aarch64": ["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"],
    "armv7l": ["SCMP_ARCH_ARM"],
    "i686": ["SCMP_ARCH_X86"],
    "ppc64le": ["SCMP_ARCH_PPC64LE"],
    "s390x": ["SCMP_ARCH_S390X", "SCMP_ARCH_S390"],
    "riscv64": ["SCMP_ARCH_RISCV64"],
}


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


def seccomp_architectures(machine: str | None = None) -> list[str]:
    machine = machine or platform.machine()
    try:
        return SECCOMP_ARCHITECTURES[machine]
    except KeyError:
        raise RuntimeUnavailable(
            f"no seccomp architecture known for this machine ({machine}): add it to "
            "mailfc.runtime.bundle.SECCOMP_ARCHITECTURES") from None


def _masked(index: int, mask: int, value: int) -> dict[str, Any]:
    return {"index": index, "value": mask, "valueTwo": value, "op": "SCMP_CMP_MASKED_EQ"}


def _personality_refused() -> list[tuple[int, int]]:
    """(mask, value) pairs: a persona matching any of them is refused.

    A filter rule cannot say "any other bit, unless the value is the query",
    so: an unusual bit b set while bit 31 is clear, or bit 31 (itself unusual)
    set while some other bit is clear, which the query never is.
    """
    top = 1 << 31
    refused = [(1 << bit | top, 1 << bit) for bit in range(31)
               if not PERSONALITY_ALLOWED_BITS & (1 << bit)]
    refused += [(top | 1 << bit, top) for bit in range(31)]
    return refused


def seccomp_profile(machine: str | None = None) -> dict[str, Any]:
    """The OCI seccomp section: allow by default, refuse SECCOMP_DENIED and more."""
    eperm = {"action": "SCMP_ACT_ERRNO", "errnoRet": errno.EPERM}
    # clone's flags are its first argument, except on s390 (second).
    flags_at = 1 if (machine or platform.machine()).startswith("s390") else 0
    rules: list[dict[str, Any]] = [{"names": list(SECCOMP_DENIED), **eperm}]
    rules += [{"names": ["clone"], **eperm, "args": [_masked(flags_at, flag, flag)]}
              for flag in CLONE_NAMESPACE_FLAGS]
    rules += [{"names": ["personality"], **eperm, "args": [_masked(0, mask, value)]}
              for mask, value in _personality_refused()]
    rules.append({"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.ENOSYS})
    return {"defaultAction": "SCMP_ACT_ALLOW",
            "architectures": seccomp_architectures(machine), "syscalls": rules}


def build_spec(
    *, name: str, image: Image, rootfs: Path, etc_dir: Path, mail_dir: Path, socket_dir: Path,
    state_dirs: dict[str, Path], netns_path: str, cgroups_path: str, limits: Limits,
    hostname: str, annotations: dict[str, str], id_base: int = 0,
) -> dict[str, Any]:
    """The OCI runtime spec (config.json) of one container; with `id_base`, in a
    user namespace whose ids 0-65535 are id_base + N on the host."""
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
        _bind(socket_dir, SOCKET_MOUNT, writable=False),
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
                {"type": "cgroup"},
                # In a user namespace the container gets a network namespace of its
                # own (only lo): one the host made belongs to the host's user
                # namespace, and `runc exec` could not join it from the container's.
                # Nothing inside needs the bridge: every door is a unix socket.
                {"type": "network"} if id_base else {"type": "network", "path": netns_path},
                *([{"type": "user"}] if id_base else []),
            ],
            **(_id_mappings(id_base) if id_base else {}),
            "maskedPaths": [
                "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys",
                "/proc/latency_stats", "/proc/timer_list", "/proc/timer_stats",
                "/proc/sched_debug", "/proc/scsi", "/sys/firmware",
            ],
            "readonlyPaths": [
                "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger",
            ],
            "seccomp": seccomp_profile(),
        },
    }


def _id_mappings(id_base: int) -> dict[str, Any]:
    mapping = [{"containerID": 0, "hostID": id_base, "size": CONTAINER_IDS}]
    return {"uidMappings": mapping, "gidMappings": mapping}


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
