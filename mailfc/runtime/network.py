"""Container networking with pyroute2: one host bridge, a netns and veth per container.

    host:       bridge <settings.bridge> with <bridge address>/<prefix>, up
    container:  netns /run/netns/<prefix>-<token>; veth pair
                v<prefix[:6]><token> (host side, a port of the bridge, isolated)
                <-> eth0 (inside), with the container's address and a default
                route via the bridge address; lo up

The bridge has a fixed MAC (02:6d:<its IPv4 address>): by default a Linux
bridge takes the lowest MAC of its ports, which changes as veths come and go
and leaves containers sending to a stale gateway MAC.

Bridge ports are *isolated*: containers reach the host (the dispatcher, the
milter, Filter-Out on the bridge address) but never each other, so one
domain's container cannot speak PROXY or XCLIENT to another's.

Cost: pyroute2 creates namespaces and netns sockets in forked helper
processes (~10-25 ms each).  Here a worker thread unshares its own network
namespace, binds /proc/thread-self/ns/net to /run/netns/<name> with pyroute2's
netns.attach(), opens a netlink socket there and returns to the host
namespace; everything else is plain netlink: about 8 ms for a complete
endpoint, 1.5 ms for the address and route at claim time.

pyroute2's netlink sockets are datagram endpoints of a family (AF_NETLINK) that
only the standard selector event loop accepts; the resident processes run on
uvloop.  So all netlink work of a Network runs on a selector loop of its own in
one thread (`_NetlinkLoop`), and the methods marked @on_netlink_loop hand their
coroutine over to it, whatever loop their caller runs on.

The pool keeps `netns_pool_size` endpoints ready (lo up, veth in the bridge,
eth0 up, no address): they do not depend on any domain.  An endpoint's token
becomes its container's name, so netns, veth, cgroup and bundle of one
container share one name, and cleanup after a crash is by that name only.

Endpoints serve only containers without a user namespace
(settings.netns_by_path).  A container in a user namespace gets a network
namespace of its own from runc, with only lo: no endpoint, no pool, and its
name comes from new_name().
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ipaddress
import logging
import os
import secrets
import socket
import threading
from collections import deque
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

from pyroute2 import AsyncIPRoute, netns
from pyroute2.netlink.exceptions import NetlinkError

from mailfc.runtime.errors import RuntimeUnavailable
from mailfc.runtime.settings import RuntimeSettings

log = logging.getLogger(__name__)

NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


@dataclass
class Endpoint:
    """A network namespace with its veth pair, ready for one container."""

    name: str           # netns name == container name
    veth: str           # host side of the pair
    netlink_fd: int     # a netlink socket inside the netns (-1 once closed)
    address: ipaddress.IPv4Address | None = None

    @property
    def netns_path(self) -> str:
        return str(NETNS_DIR / self.name)


def names_for(prefix: str, token: str) -> tuple[str, str]:
    """(netns/container name, host veth name) of a token; veth names fit 15 bytes."""
    return f"{prefix}-{token}", f"v{prefix[:6]}{token}"


def _new_netns(name: str) -> int:
    """In a worker thread: create netns `name`, return a netlink socket fd inside it."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        if _libc.unshare(CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"unshare(CLONE_NEWNET): {os.strerror(err)}")
        netns.attach(name, "thread-self")
        return _netlink_socket()
    finally:
        # The thread goes back to the host namespace, always: it is reused.
        if _libc.setns(home, CLONE_NEWNET) != 0:
            os.close(home)
            raise SystemExit("cannot return a worker thread to the host network namespace")
        os.close(home)


def _socket_in(path: str) -> int:
    """In a worker thread: a netlink socket fd inside an existing netns."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(path, os.O_RDONLY)
    try:
        if _libc.setns(target, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
        return _netlink_socket()
    finally:
        os.close(target)
        if _libc.setns(home, CLONE_NEWNET) != 0:
            os.close(home)
            raise SystemExit("cannot return a worker thread to the host network namespace")
        os.close(home)


def _netlink_socket() -> int:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, 0)  # NETLINK_ROUTE
    return sock.detach()


P = ParamSpec("P")
R = TypeVar("R")


class _NetlinkLoop:
    """A standard selector event loop in a thread of its own, for pyroute2."""

    def __init__(self) -> None:
        self.loop = asyncio.SelectorEventLoop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True,
                                        name="mailfc-netlink")
        self._thread.start()

    async def run(self, coroutine: Coroutine[Any, Any, R]) -> R:
        if asyncio.get_running_loop() is self.loop:
            return await coroutine
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coroutine, self.loop))

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


def on_netlink_loop(method: Callable[Concatenate[Network, P], Coroutine[Any, Any, R]]
                    ) -> Callable[Concatenate[Network, P], Coroutine[Any, Any, R]]:
    """Run the method's body on the Network's netlink loop."""
    async def marshalled(self: Network, /, *args: P.args, **kwargs: P.kwargs) -> R:
        return await self._netlink.run(method(self, *args, **kwargs))
    marshalled.__name__ = method.__name__
    marshalled.__doc__ = method.__doc__
    return marshalled


class Network:
    """The bridge, the endpoint pool, and creating/removing endpoints."""

    def __init__(self, settings: RuntimeSettings) -> None:
        self.settings = settings
        self.net = settings.network
        self.gateway = settings.bridge_address
        self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="mailfc-netns")
        self._netlink = _NetlinkLoop()
        self._ipr: AsyncIPRoute | None = None
        self._bridge_index = 0
        self._pool: deque[Endpoint] = deque()
        self._refill: asyncio.Task[None] | None = None

    # -- host side -------------------------------------------------------------

    @on_netlink_loop
    async def open(self) -> None:
        if os.geteuid() != 0:
            raise RuntimeUnavailable("container networking needs root")
        self._ipr = AsyncIPRoute()
        await self._ipr.setup_endpoint()
        self._bridge_index = await self._ensure_bridge()

    @property
    def ipr(self) -> AsyncIPRoute:
        assert self._ipr is not None, "Network.open() first"
        return self._ipr

    async def _ensure_bridge(self) -> int:
        name = self.settings.bridge
        found = await self.ipr.link_lookup(ifname=name)
        if not found:
            with contextlib.suppress(NetlinkError):   # lost a race with another process
                await self.ipr.link("add", ifname=name, kind="bridge")
            found = await self.ipr.link_lookup(ifname=name)
        index = int(found[0])
        # A bridge without an explicit MAC takes the lowest MAC of its ports, so
        # adding a veth (the pool refills after every start) can change it; the
        # containers' ARP entries for the gateway then point at a port and their
        # packets to the host vanish.  A fixed MAC never changes.
        await self.ipr.link("set", index=index, address=self.bridge_mac)
        have = {a.get("address") async for a in await self.ipr.addr("dump", index=index)}
        if str(self.gateway) not in have:
            try:
                await self.ipr.addr("add", index=index, address=str(self.gateway),
                                    prefixlen=self.net.prefixlen)
            except NetlinkError as error:
                if error.code != 17:  # EEXIST
                    raise
        await self.ipr.link("set", index=index, state="up")
        return index

    @property
    def bridge_mac(self) -> str:
        """Locally administered, derived from the bridge address: stable across restarts."""
        octets = self.gateway.packed
        return "02:6d:" + ":".join(f"{b:02x}" for b in octets)

    async def close(self) -> None:
        if self._refill is not None:
            self._refill.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refill
        while self._pool:
            await self.release(self._pool.popleft())
        await self._close_netlink()
        self._netlink.stop()
        self._executor.shutdown(wait=True)

    @on_netlink_loop
    async def _close_netlink(self) -> None:
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None

    # -- endpoints -------------------------------------------------------------

    @on_netlink_loop
    async def create(self) -> Endpoint:
        """A new endpoint: netns with lo up, veth pair, host side in the bridge."""
        loop = asyncio.get_running_loop()
        name, veth = names_for(self.settings.name_prefix, secrets.token_hex(4))
        fd = await loop.run_in_executor(self._executor, _new_netns, name)
        endpoint = Endpoint(name=name, veth=veth, netlink_fd=fd)
        try:
            nsfd = os.open(endpoint.netns_path, os.O_RDONLY)
            try:
                await self.ipr.link("add", ifname=veth, kind="veth",
                                    peer={"ifname": "eth0", "net_ns_fd": nsfd})
            finally:
                os.close(nsfd)
            index = (await self.ipr.link_lookup(ifname=veth))[0]
            await self.ipr.link("set", index=index, master=self._bridge_index)
            await self.ipr.brport("set", index=index, isolated=1)
            await self.ipr.link("set", index=index, state="up")
            async with AsyncIPRoute(fileno=os.dup(fd)) as inner:
                for ifname in ("lo", "eth0"):
                    idx = (await inner.link_lookup(ifname=ifname))[0]
                    await inner.link("set", index=idx, state="up")
        except BaseException:
            await self.release(endpoint)
            raise
        return endpoint

    def new_name(self) -> str:
        """A container name for a start without an endpoint (same form as an endpoint's)."""
        return names_for(self.settings.name_prefix, secrets.token_hex(4))[0]

    @property
    def pool_size(self) -> int:
        """How many endpoints the pool keeps ready: none when containers do not join one."""
        return self.settings.netns_pool_size if self.settings.netns_by_path else 0

    async def acquire(self) -> Endpoint:
        """An endpoint from the pool, or a new one when the pool is empty."""
        if self._pool:
            return self._pool.popleft()
        return await self.create()

    def give_back(self, endpoint: Endpoint) -> None:
        """Return an unused endpoint (no address yet) to the pool."""
        assert endpoint.address is None
        self._pool.appendleft(endpoint)

    def refill_soon(self) -> None:
        """Top the pool up in the background (called after a start, off its path)."""
        if self.pool_size <= 0:
            return
        if self._refill is None or self._refill.done():
            self._refill = asyncio.get_running_loop().create_task(self._fill())

    async def fill(self) -> None:
        await self._fill()

    async def _fill(self) -> None:
        while len(self._pool) < self.pool_size:
            try:
                self._pool.append(await self.create())
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("could not pre-create a network namespace; pool stays short")
                return

    def pooled(self) -> list[str]:
        return [endpoint.name for endpoint in self._pool]

    @on_netlink_loop
    async def configure(self, endpoint: Endpoint, address: ipaddress.IPv4Address) -> None:
        """Give the endpoint its address and a default route via the bridge address."""
        # The address may have belonged to a container that just stopped: the host's
        # ARP entry still names that veth's MAC and connects would vanish for seconds.
        with contextlib.suppress(NetlinkError):
            await self.ipr.neigh("del", dst=str(address), ifindex=self._bridge_index)
        fd = endpoint.netlink_fd
        endpoint.netlink_fd = -1
        if fd < 0:
            fd = await asyncio.get_running_loop().run_in_executor(
                self._executor, _socket_in, endpoint.netns_path)
        async with AsyncIPRoute(fileno=fd) as inner:
            eth0 = (await inner.link_lookup(ifname="eth0"))[0]
            await inner.addr("add", index=eth0, address=str(address),
                             prefixlen=self.net.prefixlen)
            await inner.route("add", dst="0.0.0.0/0", gateway=str(self.gateway))
        endpoint.address = address

    @on_netlink_loop
    async def release(self, endpoint: Endpoint) -> None:
        """Remove the veth pair and the netns; missing parts are no error."""
        if endpoint.netlink_fd >= 0:
            os.close(endpoint.netlink_fd)
            endpoint.netlink_fd = -1
        await self.remove_by_name(endpoint.name, endpoint.veth)

    @on_netlink_loop
    async def remove_by_name(self, name: str, veth: str | None = None) -> None:
        if veth is None:
            veth = names_for(self.settings.name_prefix, name.rpartition("-")[2])[1]
        with contextlib.suppress(NetlinkError, IndexError):
            index = (await self.ipr.link_lookup(ifname=veth))[0]
            await self.ipr.link("del", index=index)
        if (NETNS_DIR / name).exists():
            with contextlib.suppress(OSError):
                netns.remove(name)

    # -- inventory, for recovery ---------------------------------------------------

    def list_netns(self) -> list[str]:
        prefix = self.settings.name_prefix + "-"
        try:
            return sorted(n for n in os.listdir(NETNS_DIR) if n.startswith(prefix))
        except FileNotFoundError:
            return []

    @on_netlink_loop
    async def list_veths(self) -> list[str]:
        prefix = "v" + self.settings.name_prefix[:6]
        names = []
        async for link in await self.ipr.link("dump"):
            name = link.get("ifname") or ""
            if name.startswith(prefix) and len(name) == len(prefix) + 8:
                names.append(name)
        return sorted(names)

    def netns_exists(self, name: str) -> bool:
        return (NETNS_DIR / name).exists()
