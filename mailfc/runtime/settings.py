"""RuntimeSettings: everything the container runtime needs to know, with defaults.

The defaults run one host on one machine, matching mailfc.config's defaults;
`from_config()` derives the settings from the platform's Config so the
dispatcher, the controller and the CLI all agree.

Fields (default)
    state_dir (/var/lib/mailfc)        bundles, runc state, per-domain queues under
                                        <state_dir>/runtime
    mail_root (<state_dir>/mail)       maildirs: <mail_root>/<domain>/<localpart>/Maildir
    socket_dir (<state_dir>/private/sockets)
                                        mounted read-only at /run/mailfc in every
                                        container: the milter, hook server, SASL and
                                        Filter-Out sockets live there.  Its parent must
                                        be a directory only root may enter (0700), so no
                                        other local user reaches a socket in it
                                        (storage.prepare_socket_dir)
    bridge (mailfc0), subnet (10.77.0.0/16)
                                        host bridge; it takes the subnet's first address,
                                        containers the others
    host_name ("")                     the hosts row this runtime runs containers for
                                        (empty: this machine's hostname)
    host_id (None)                     the hosts row id; None: looked up by host_name
    name_prefix (mailfc)               containers, netns, cgroups: <prefix>-<token>;
                                        veths v<prefix[:6]><token>.  Cleanup is by this
                                        name, so two runtimes with different prefixes never
                                        touch each other's things
    start_timeout (5.0 s), stop_timeout (5.0 s)
    ready_poll_interval (0.002 s)      how often readiness looks for the listening socket
    netns_pool_size (2)                pre-made netns+veth pairs (domain independent),
                                        used only without a user namespace (id_base 0):
                                        see netns_by_path
    milter_socket (milter.sock), hook_socket (hooks.sock),
    filter_out_socket (filter-out.sock) names inside socket_dir; Postfix relays all
                                        mail by LMTP to Filter-Out's
    dovecot_hook_plugin (mailfc_hooks) loaded by Dovecot when its .so is installed
    vmail_uid/vmail_gid (5000)         owner of the maildirs (inside the containers)
    id_base (0x70000000)               uid/gid N inside a container is id_base + N on
                                        the host (a user namespace); 0: none, root
                                        inside is the host's root
    nfs_safe (True)                    Dovecot dotlock/fsync/no-mmap settings
    nameservers (())                   resolv.conf inside the containers
    runc (runc)                        the runc binary (Debian package runc)
    message_size_limit (52428800)      the one size limit (messages.size_limit); the
                                        domains' main.cf derives Postfix's own from it
    postfix_retry_s (10)               the domains' Postfix backoff for deferred mail
                                        (runtime.postfix_retry_s)
    images_dir (None)                  the containers/ directory of the images; None: the
                                        one next to this package's source tree
"""

from __future__ import annotations

import dataclasses
import ipaddress
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mailfc.config import CONTAINER_ID_BASE, unix_socket_name

if TYPE_CHECKING:
    from mailfc.config import Config


@dataclass(frozen=True)
class RuntimeSettings:
    state_dir: Path = Path("/var/lib/mailfc")
    mail_root: Path | None = None
    socket_dir: Path | None = None
    bridge: str = "mailfc0"
    subnet: str = "10.77.0.0/16"
    host_name: str = ""
    host_id: int | None = None
    name_prefix: str = "mailfc"
    start_timeout: float = 5.0
    stop_timeout: float = 5.0
    ready_poll_interval: float = 0.002
    netns_pool_size: int = 2
    milter_socket: str = "milter.sock"
    hook_socket: str = "hooks.sock"
    filter_out_socket: str = "filter-out.sock"
    dovecot_hook_plugin: str = "mailfc_hooks"
    vmail_uid: int = 5000
    vmail_gid: int = 5000
    id_base: int = CONTAINER_ID_BASE
    nfs_safe: bool = True
    nameservers: tuple[str, ...] = ()
    runc: str = "runc"
    images_dir: Path | None = None
    message_size_limit: int = 52_428_800
    postfix_retry_s: int = 10
    # A container's log is rotated at its start past this size, keeping this many
    # old files (log.container_log_max_bytes / container_log_keep; storage.rotate_log).
    log_max_bytes: int = 10 * 1024 * 1024
    log_keep: int = 3

    def __post_init__(self) -> None:
        network = ipaddress.ip_network(self.subnet, strict=True)
        if network.version != 4 or network.num_addresses < 8:
            raise ValueError(
                f"runtime subnet {self.subnet}: expected an IPv4 subnet of /29 or larger")
        if not self.name_prefix.isalnum() or len(self.name_prefix) > 12:
            raise ValueError(f"name_prefix {self.name_prefix!r}: 1-12 letters or digits")

    # -- derived values: one place decides every path and address ----------------

    @property
    def network(self) -> ipaddress.IPv4Network:
        net = ipaddress.ip_network(self.subnet)
        assert isinstance(net, ipaddress.IPv4Network)
        return net

    @property
    def bridge_address(self) -> ipaddress.IPv4Address:
        return self.network.network_address + 1

    @property
    def netns_by_path(self) -> bool:
        """Containers join a network namespace the runtime made (the pool's, with a
        veth on the bridge) instead of getting a new one from runc.

        Only without a user namespace: in one, runc makes the container a network
        namespace of its own (only lo; bundle.build_spec), and an endpoint made
        beforehand would be addressed, refilled and removed for nothing.  Measured
        on a 2-core host: joining a pre-made network namespace (or user and network
        namespace pair) saved nothing over runc making one; the unused endpoint's
        work around each start cost 5-10 ms of a cold start.
        """
        return not self.id_base

    def outside_id(self, inside: int) -> int:
        """The host's uid/gid for uid/gid `inside` of a container."""
        return self.id_base + inside

    @property
    def mail_dir(self) -> Path:
        return self.mail_root or self.state_dir / "mail"

    @property
    def sockets(self) -> Path:
        return self.socket_dir or self.state_dir / "private" / "sockets"

    @property
    def runtime_dir(self) -> Path:
        return self.state_dir / "runtime"

    @property
    def runc_root(self) -> Path:
        return self.runtime_dir / "runc"

    @property
    def bundles_dir(self) -> Path:
        return self.runtime_dir / "bundles"

    @property
    def domains_dir(self) -> Path:
        """Persistent per-domain state (Postfix queues, Dovecot state, logs)."""
        return self.runtime_dir / "domains"

    @property
    def rootfs(self) -> Path:
        return self.runtime_dir / "rootfs"

    @property
    def cgroup_parent(self) -> str:
        return "/" + self.name_prefix

    @property
    def resolved_host_name(self) -> str:
        return self.host_name or socket.gethostname()

    def replace(self, **changes: Any) -> RuntimeSettings:
        return dataclasses.replace(self, **changes)


def from_config(config: Config, **overrides: Any) -> RuntimeSettings:
    """The runtime settings the platform's Config implies (overrides win)."""
    values: dict[str, Any] = {
        "state_dir": config.state_dir,
        "mail_root": config.mail_root,
        "bridge": config.network.bridge,
        "subnet": config.network.subnet,
        "host_name": config.host_name,
        "start_timeout": config.runtime.start_timeout_s,
        "stop_timeout": config.runtime.stop_timeout_s,
        "name_prefix": config.runtime.name_prefix,
        "id_base": config.runtime.container_id_base,
        "message_size_limit": config.messages.size_limit,
        "postfix_retry_s": config.runtime.postfix_retry_s,
        "log_max_bytes": config.log.container_log_max_bytes,
        "log_keep": config.log.container_log_keep,
    }
    # Filter-Out listens on a socket in the socket directory the containers mount.
    values["filter_out_socket"] = unix_socket_name(config.listen.filter_out)
    values.update(overrides)
    return RuntimeSettings(**values)
