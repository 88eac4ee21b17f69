"""recover(): after a crash of the managing process, adopt or remove what it left.

Containers run detached, so they outlive the process that started them; its
netns pool, half-made starts and CMDB rows may be left behind too.  Called
once at start-up (before serving), recover() reconciles, by name only
(<prefix>-<token>; nothing else on the host is ever touched):

    runc container running + live CMDB row of this host     -> adopted: row
         'running' with the current pid (a row still 'starting' is adopted
         only if its socket listens within a second)
    a live row whose container was 'draining'                -> stopped now
    runc container without a live row, or not running        -> removed
    live row without a running container                    -> row 'stopped'
                                                                ("lost while the
                                                                manager was down")
    netns, veth, cgroup dir, bundle of no adopted container  -> removed
         (except the endpoints of this runtime's own netns pool)

Only one runtime per state directory and name prefix should run; recover()
in a second one would treat the first one's half-made starts as leftovers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mailfc.runtime import cgroups, cmdb, storage
from mailfc.runtime.images import SOCKETS
from mailfc.runtime.instance import Instance
from mailfc.runtime.readiness import wait_listen_socket

if TYPE_CHECKING:
    from mailfc.runtime.lifecycle import Runtime

ADOPT_READY_TIMEOUT = 1.0


@dataclass
class RecoveryReport:
    adopted: list[str] = field(default_factory=list)
    stopped: list[str] = field(default_factory=list)     # CMDB rows closed
    removed: list[str] = field(default_factory=list)     # things deleted, "kind name"

    def __str__(self) -> str:
        return (f"adopted {len(self.adopted)}, rows closed {len(self.stopped)},"
                f" removed {len(self.removed)}")


async def recover(runtime: Runtime) -> RecoveryReport:
    settings = runtime.settings
    prefix = settings.name_prefix + "-"
    report = RecoveryReport()
    rows = {r["name"]: r for r in await cmdb.instances_on_host(runtime.db, runtime.host_id)}
    containers = {c.name: c for c in await runtime.backend.containers()
                  if c.name.startswith(prefix)}
    adopted: set[str] = set()

    for name, container in containers.items():
        row = rows.get(name)
        keep = row is not None and container.status == "running" and row["state"] in (
            "running", "starting")
        if keep and row is not None and row["state"] == "starting":
            try:
                await wait_listen_socket(container.pid, SOCKETS[row["service"]],
                                         time.monotonic() + ADOPT_READY_TIMEOUT)
            except (TimeoutError, ProcessLookupError):
                keep = False
        if keep and row is not None:
            await cmdb.mark_running(runtime.db, row["id"], container.pid)
            adopted.add(name)
            report.adopted.append(name)
            continue
        if row is not None and row["state"] == "draining" and container.status == "running":
            await runtime.stop(Instance.from_record(row), reason="drain finished after restart")
            report.stopped.append(name)
            report.removed.append(f"container {name}")
            rows.pop(name)
            continue
        await runtime.backend.delete(name, force=True)
        report.removed.append(f"container {name}")

    for name, row in rows.items():
        if name not in adopted:
            await cmdb.mark_stopped(runtime.db, row["id"], "lost while the manager was down")
            report.stopped.append(name)

    owned = adopted | set(runtime.network.pooled())
    for name in runtime.network.list_netns():
        if name not in owned:
            await runtime.network.remove_by_name(name)
            report.removed.append(f"netns {name}")
    veth_of = {runtime_veth(runtime, name): name for name in owned}
    for veth in await runtime.network.list_veths():
        if veth not in veth_of:
            token = veth[-8:]
            await runtime.network.remove_by_name(prefix + token, veth)
            report.removed.append(f"veth {veth}")
    for name in cgroups.children(settings.cgroup_parent):
        if name.startswith(prefix) and name not in adopted:
            cgroups.remove(runtime.cgroup_path(name))
            report.removed.append(f"cgroup {name}")
    for name in storage.list_bundles(settings):
        if name not in adopted:
            storage.remove_bundle(settings, name)
            report.removed.append(f"bundle {name}")
    if not adopted and not cgroups.children(settings.cgroup_parent):
        cgroups.remove_if_empty(settings.cgroup_parent)
    return report


def runtime_veth(runtime: Runtime, name: str) -> str:
    from mailfc.runtime.network import names_for
    return names_for(runtime.settings.name_prefix, name.rpartition("-")[2])[1]
