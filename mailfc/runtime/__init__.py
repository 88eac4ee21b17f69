"""mailfc.runtime: per-domain Postfix and Dovecot in runc containers, on demand.

NAME
    mailfc.runtime - the reactive container runtime (FastContainer's core)

SUMMARY
    from mailfc.runtime import Runtime, RuntimeSettings
    runtime = Runtime(RuntimeSettings(...), cmdb_pool)
    await runtime.open(); await runtime.recover()
    instance = await runtime.ensure("example.org", "lmtp")
    ... connect to instance.address : instance.port("lmtp") ...
    await runtime.stop(instance)

DESCRIPTION
    A domain's mail server exists only while it is needed.  ensure() starts
    the domain's container when none runs (about a tenth of a second) and
    returns its address; concurrent callers share one start.  Services:
    'smtp' -> a Postfix container; 'lmtp' and 'imap' -> one Dovecot container
    (recorded in the CMDB as service 'imap').  Readiness is the service port
    accepting a connection, never a sleep.

    Each container: read-only root, /usr bound read-only, a rendered /etc
    (containers/<image>/etc), writable only its domain's maildir root, its
    persistent per-instance state (queue) and the shared socket directory;
    own pid/ipc/uts/mount/cgroup/network namespaces; an address on the host
    bridge allocated through the CMDB; cgroup limits from the CMDB spec,
    changed live with update(); usage and throttling from stats().

MODULES
    settings    RuntimeSettings (every field has a default), from_config()
    lifecycle   Runtime: open, ensure, start, stop, update, stats, recover
    images      services -> images, ports, templates, host users
    bundle      OCI config.json and the shared read-only rootfs
    backend     the engine interface;  runc: RuncBackend
    network     bridge, netns/veth pool, addresses (pyroute2)
    cgroups     reading stats and limits (v1 and v2), removing leftovers
    cmdb        container_instances rows: address and slot claims, states
    recovery    adoption and cleanup after a crash
    readiness   connect() polling, pidfd exit waits, banner reads

SECURITY
    Containers keep ten capabilities (what the Postfix and Dovecot masters
    need), no new privileges, a pids limit, no /sys, no host /etc.  Bridge
    ports are isolated: a container reaches the host, never another container.
    Postfix and Dovecot trust XCLIENT, PROXY headers and password-less logins
    only from the dispatcher's address (the bridge address by default).

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
from mailfc.runtime.images import PORTS, SERVICES
from mailfc.runtime.instance import Instance
from mailfc.runtime.lifecycle import Runtime
from mailfc.runtime.settings import RuntimeSettings, from_config

__all__ = [
    "PORTS",
    "SERVICES",
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
