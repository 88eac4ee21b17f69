"""What a domain's container and a local user cannot do: real runc, Postfix and Dovecot.

Root inside one domain's container can neither change the shared socket directory
nor see another domain's mail; a process running as `nobody` on the host reaches
no container service and no socket of the platform; each container has a user
and a network namespace of its own (only lo: no address on the host's bridge to
reach); the seccomp filter refuses what the runtime's deny-list names.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import socket
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from mailfc.runtime import SOCKETS, Runtime, RuntimeSettings
from mailfc.runtime.images import SOCKET_MOUNT, dovecot_socket
from mailfc.runtime.instance import Instance
from mailfc.runtime.network import NETNS_DIR
from tests.conftest import require, require_binary
from tests.runtime.conftest import interfaces

pytestmark = pytest.mark.integration

NewDomain = Callable[..., Awaitable[str]]
PROBE = "isolation-probe.sock"
# ioctl(2) on a namespace file: a descriptor of the user namespace that owns it.
NS_GET_USERNS = 0xB701

# Run as nobody by the system's python3 (the project's virtualenv may not be
# readable for nobody); prints what each attempt ended with.
AS_NOBODY = r"""
import json, socket, sys
targets = json.loads(sys.argv[1])
results = {}
for path in targets["unix"]:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
        results[path] = "connected"
    except OSError as error:
        results[path] = type(error).__name__
    finally:
        probe.close()
print(json.dumps(results))
"""


@pytest.fixture
def probe_socket(settings: RuntimeSettings, runtime: Runtime) -> Iterator[Path]:
    """A listening socket anyone may connect to (mode 0666, like auth.sock), in the
    socket directory every container mounts: only its directory protects it."""
    path = settings.sockets / PROBE
    path.unlink(missing_ok=True)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    path.chmod(0o666)
    server.listen(8)
    try:
        yield path
    finally:
        server.close()
        path.unlink(missing_ok=True)


async def inside(runtime: Runtime, instance: Instance, script: str) -> tuple[int, str]:
    """Run `script` as root in the container (runc exec, the container's own
    namespaces, capabilities and seccomp filter)."""
    return await runtime.backend.exec(instance.name, ["/usr/bin/sh", "-c", script])


async def can_run_inside(runtime: Runtime, instance: Instance) -> None:
    """A refusal below must come from the container, not from a failed runc exec."""
    code, out = await inside(runtime, instance, "id -u")
    assert code == 0 and out.strip().endswith("0"), f"runc exec into {instance.name}: {out}"


async def test_root_in_a_container_cannot_touch_the_sockets_or_another_domain(
        runtime: Runtime, settings: RuntimeSettings, new_domain: NewDomain,
        probe_socket: Path) -> None:
    domain_a, domain_b = await new_domain(), await new_domain()
    postfix_a = await runtime.ensure(domain_a, "smtp")
    dovecot_a = await runtime.ensure(domain_a, "imap")
    await runtime.ensure(domain_b, "imap")
    b_maildir = settings.mail_dir / domain_b / "carol" / "Maildir"
    b_maildir.mkdir(parents=True)
    (b_maildir / "secret").write_text("domain B only")
    before = os.stat(probe_socket).st_ino
    listing = sorted(os.listdir(settings.sockets))

    probe = f"{SOCKET_MOUNT}/{PROBE}"
    attempts = {
        "create": f"touch {SOCKET_MOUNT}/new-file",
        "mkdir": f"mkdir {SOCKET_MOUNT}/new-dir",
        "write": f"echo x > {probe}",
        "unlink": f"rm -f {probe}",
        "rename": f"mv {probe} {SOCKET_MOUNT}/moved.sock",
        "replace": f"ln -sf /etc/passwd {probe}",
        "chmod": f"chmod 0777 {SOCKET_MOUNT}",
        "remount": f"mount -o remount,rw {SOCKET_MOUNT}",
    }
    for instance in (postfix_a, dovecot_a):
        await can_run_inside(runtime, instance)
        for what, script in attempts.items():
            code, out = await inside(runtime, instance, script)
            assert code != 0, f"{what} in {instance.image}'s {SOCKET_MOUNT} worked: {out}"
    assert os.stat(probe_socket).st_ino == before
    assert sorted(os.listdir(settings.sockets)) == listing

    # Only its own domain is under /srv/mail: B's mailbox is not there by any name.
    await can_run_inside(runtime, dovecot_a)
    code, out = await inside(runtime, dovecot_a, "ls -a /srv/mail; ls /srv/mail/carol")
    assert code != 0 and "carol" in out and "No such file" in out, out
    code, out = await inside(runtime, dovecot_a,
                             f"cat /srv/mail/../{domain_b}/carol/Maildir/secret")
    assert code != 0 and "domain B only" not in out, out
    code, out = await inside(runtime, dovecot_a, "cat /proc/mounts")
    assert code == 0 and domain_b not in out, out


async def test_nobody_on_the_host_reaches_no_container_and_no_socket(
        runtime: Runtime, settings: RuntimeSettings, new_domain: NewDomain,
        probe_socket: Path) -> None:
    setpriv = require_binary("setpriv", "util-linux")
    # The system's, which nobody may run (a python3 earlier on root's PATH may not be).
    python = "/usr/bin/python3"
    require(os.access(python, os.X_OK), f"{python} (apt-get install python3)")
    domains = [await new_domain(), await new_domain()]
    running = [await runtime.ensure(d, s) for d in domains for s in ("smtp", "imap")]
    unix = [str(path) for path in settings.sockets.iterdir()]
    # The link the milter and hook server use by default leads there too.
    unix.append(str(settings.state_dir / "sockets" / PROBE))
    for instance in running:
        assert instance.pid is not None
        unix += [instance.socket(s) for s in ("smtp", "lmtp", "imap") if instance.serves(s)]
        if instance.image == "dovecot":
            unix.append(dovecot_socket(instance.pid, "auth-userdb"))
    assert str(probe_socket) in unix

    process = await asyncio.create_subprocess_exec(
        setpriv, "--reuid", "nobody", "--regid", "nogroup", "--clear-groups",
        python, "-c", AS_NOBODY, json.dumps({"unix": unix}),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd="/")
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()
    results = json.loads(out)

    # No TCP: a container has no address anywhere but on its own lo
    # (test_each_container_has_its_own_network_namespace_with_only_lo).
    for path in unix:
        assert results[path] in ("PermissionError", "FileNotFoundError"), (path, results[path])
    # And the containers' sockets do serve root, so the refusals above are no accident.
    for instance in running:
        code, _ = await inside(runtime, instance, f"test -S {SOCKETS[instance.service]}")
        assert code == 0
        with socket.socket(socket.AF_UNIX) as root_client:
            assert root_client.connect_ex(instance.socket()) == 0


async def test_the_seccomp_filter_is_in_force(runtime: Runtime,
                                              new_domain: NewDomain) -> None:
    domain = await new_domain()
    for instance in (await runtime.ensure(domain, "smtp"), await runtime.ensure(domain, "imap")):
        assert instance.pid is not None
        status = await asyncio.to_thread(Path(f"/proc/{instance.pid}/status").read_text)
        assert "\nSeccomp:\t2\n" in status, f"{instance.image}'s init runs without a filter"
        await can_run_inside(runtime, instance)
        # EPERM, which mount(8) words as "permission denied".
        for script in ("unshare -U true", "unshare -n true",
                       "mount -t tmpfs none /tmp", "setarch $(uname -m) -R true"):
            code, out = await inside(runtime, instance, script)
            assert code != 0 and ("Operation not permitted" in out
                                  or "permission denied" in out), (script, out)
        # What the services need still works under the filter.
        code, out = await inside(runtime, instance, "echo fine > /tmp/probe && cat /tmp/probe")
        assert code == 0 and "fine" in out, out


def _namespace(pid: int | str, kind: str) -> int:
    return os.stat(f"/proc/{pid}/ns/{kind}").st_ino


def _owner_of_netns(pid: int) -> int:
    """The inode of the user namespace that owns `pid`'s network namespace."""
    with open(f"/proc/{pid}/ns/net") as netns:
        owner = fcntl.ioctl(netns.fileno(), NS_GET_USERNS)
    try:
        return os.fstat(owner).st_ino
    finally:
        os.close(owner)


async def test_each_container_has_its_own_network_namespace_with_only_lo(
        runtime: Runtime, settings: RuntimeSettings, new_domain: NewDomain) -> None:
    domain_a, domain_b = await new_domain(), await new_domain()
    running = [await runtime.ensure(domain_a, "smtp"), await runtime.ensure(domain_a, "imap"),
               await runtime.ensure(domain_b, "imap")]
    host_net, host_user = _namespace("self", "net"), _namespace("self", "user")
    seen_net, seen_user = set(), set()
    for instance in running:
        pid = instance.pid
        assert pid is not None
        net, user = _namespace(pid, "net"), _namespace(pid, "user")
        assert net != host_net and user != host_user
        # Made by runc inside the container's own user namespace, not one the
        # host made beforehand (which the host's user namespace would own).
        assert _owner_of_netns(pid) == user, f"{instance.name}'s netns is not its own"
        seen_net.add(net)
        seen_user.add(user)
        assert interfaces(pid) == {"lo"}, (instance.name, interfaces(pid))
        code, out = await inside(runtime, instance, "cat /proc/net/dev")
        assert code == 0 and "lo:" in out and "eth0" not in out, out
        # Nothing of the runtime's own for it: no named netns, no veth on the bridge.
        assert not (NETNS_DIR / instance.name).exists()
        veth = f"v{settings.name_prefix[:6]}{instance.name.rpartition('-')[2]}"
        assert veth not in await runtime.network.list_veths()
    assert len(seen_net) == len(running), "two containers share a network namespace"
    assert len(seen_user) == len(running), "two containers share a user namespace"
    assert runtime.network.pooled() == [], "endpoints made for containers that never join one"
