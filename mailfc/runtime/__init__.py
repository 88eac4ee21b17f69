"""mailfc.runtime: per-domain Postfix and Dovecot in runc containers, on demand.

NAME
    mailfc.runtime - the reactive container runtime (FastContainer's core)

SUMMARY
    from mailfc.runtime import Runtime, RuntimeSettings
    runtime = Runtime(RuntimeSettings(...), cmdb_pool)
    await runtime.open(); await runtime.recover()
    instance = await runtime.ensure("example.org", "lmtp")
    ... connect to the unix socket instance.socket("lmtp") (host root only) ...
    await runtime.stop(instance)

DESCRIPTION
    A domain's mail server exists only while it is needed.  ensure() starts
    the domain's container when none runs (about a tenth of a second) and
    returns it; concurrent callers share one start.  Services:
    'smtp' -> a Postfix container; 'lmtp' and 'imap' -> one Dovecot container
    (recorded in the CMDB as service 'imap').  Readiness is the service's unix
    socket listening in the kernel's socket table, never a sleep.

    Each container: read-only root, /usr bound read-only, a rendered /etc
    (containers/<image>/etc), writable only its domain's maildir root, its
    persistent per-instance state (queue); the shared socket directory
    read-only;
    own pid/ipc/uts/mount/cgroup/network namespaces; an address on the host
    bridge allocated through the CMDB; cgroup limits from the CMDB spec,
    changed live with update(); usage and throttling from stats().

MODULES
    settings    RuntimeSettings (every field has a default), from_config()
    lifecycle   Runtime: open, ensure, start, stop, update, stats, recover
    images      services -> images, sockets, templates, host users
    bundle      OCI config.json and the shared read-only rootfs
    backend     the engine interface;  runc: RuncBackend
    network     bridge, netns/veth pool, addresses (pyroute2)
    cgroups     reading stats and limits (v1 and v2), removing leftovers
    cmdb        container_instances rows: address and slot claims, states
    recovery    adoption and cleanup after a crash
    readiness   socket-table polling, pidfd exit waits, banner reads

SECURITY
    Containers keep ten capabilities (what the Postfix and Dovecot masters
    need), no new privileges, a seccomp filter (bundle.SECCOMP_DENIED), a
    pids limit, no /sys, no host /etc.  Nothing in a container listens on the
    network: the dispatcher reaches Postfix and Dovecot only through unix
    sockets inside the container, which on the host only root can follow
    (/proc/<pid>/root), so Postfix honours XCLIENT and Dovecot takes a
    session only from the dispatcher.  The socket directory (milter, hooks,
    SASL, Filter-Out) is mounted read-only, and on the host it sits in a
    directory only root may enter (storage.prepare_socket_dir).

DIAGNOSTICS
    RuntimeUnavailable names the missing Debian package; StartFailed carries
    runc's or the server's own last words; nothing of a failed start is left.
"""

from mailfc.runtime.errors import (
    AddressExhausted,
    CapacityExhausted,
    NotRunning,
    RuntimeUnavailable,
    StartFailed,
    UnknownDomain,
)
from mailfc.runtime.images import SERVICES, SOCKETS
from mailfc.runtime.instance import Instance
from mailfc.runtime.lifecycle import Runtime
from mailfc.runtime.settings import RuntimeSettings, from_config

__all__ = [
    "SERVICES",
    "SOCKETS",
    "AddressExhausted",
    "CapacityExhausted",
    "Instance",
    "NotRunning",
    "Runtime",
    "RuntimeSettings",
    "RuntimeUnavailable",
    "StartFailed",
    "UnknownDomain",
    "from_config",
]
