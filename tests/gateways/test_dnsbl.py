"""The "dnsbl" check against a DNS server of the test's own on 127.0.0.1 (dnspython
asks it as it would ask the system's resolver): listed, not listed, the list's
error code, and a server that never answers (timeout: not listed, in time)."""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import AsyncIterator
from typing import cast

import dns.message
import dns.rcode
import dns.rrset
import pytest

from mailfc.gateways.filter.checks import dnsbl
from mailfc.gateways.filter.dnsbl import Dnsbl, query_name
from mailfc.gateways.filter.message import FilterMessage
from mailfc.messages import BytesSource

LISTED = "4.3.2.1.bl.test."            # client 1.2.3.4
ERROR = "5.3.2.1.bl.test."             # 1.2.3.5: the list refuses the query
SILENT = "6.3.2.1.bl.test."            # 1.2.3.6: no answer at all


class StubDns(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's UDP transport does not derive from asyncio.DatagramTransport.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        query = dns.message.from_wire(data)
        name = query.question[0].name.to_text()
        if name == SILENT:
            return
        response = dns.message.make_response(query)
        answer = {LISTED: "127.0.0.2", ERROR: "127.255.255.254"}.get(name)
        if answer is None:
            response.set_rcode(dns.rcode.NXDOMAIN)
        else:
            response.answer.append(dns.rrset.from_text(name, 60, "IN", "A", answer))
        self.transport.sendto(response.to_wire(), addr)


@pytest.fixture
async def nameserver() -> AsyncIterator[str]:
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(StubDns, local_addr=("127.0.0.1", 0))
    port = transport.get_extra_info("sockname")[1]
    yield f"127.0.0.1:{port}"
    transport.close()


def from_client(ip: str) -> FilterMessage:
    return FilterMessage(sender="a@remote.example", recipients=["b@g1.example"],
                         headers=[("From", "a@remote.example")],
                         data=BytesSource(b"From: a@remote.example\r\n\r\nhi\r\n"),
                         body_offset=27, client_ip=ip)


def test_query_names() -> None:
    assert query_name(ipaddress.ip_address("1.2.3.4"), "bl.test") == LISTED
    name = query_name(ipaddress.ip_address("2001:db8::1"), "bl.test.")
    assert name.endswith(".8.b.d.0.1.0.0.2.bl.test.") and name.count(".") == 34


async def test_listed_clear_error_timeout(nameserver: str) -> None:
    lists = Dnsbl(["bl.test"], 0.5, [nameserver])
    assert await lists.lookup(ipaddress.ip_address("1.2.3.4"), "bl.test") == \
        ("listed", "127.0.0.2")
    assert (await lists.lookup(ipaddress.ip_address("1.2.3.9"), "bl.test"))[0] == "clear"
    assert (await lists.lookup(ipaddress.ip_address("1.2.3.5"), "bl.test"))[0] == "failed"
    started = time.monotonic()
    assert await lists.lookup(ipaddress.ip_address("1.2.3.6"), "bl.test") == \
        ("failed", "timeout")
    assert time.monotonic() - started < 2.0


async def test_check_verdicts(nameserver: str) -> None:
    check = dnsbl(["bl.test"], 0.5, [nameserver])
    listed = await check(from_client("1.2.3.4"))
    assert listed.action == "reject" and "bl.test" in listed.reason
    for ip in ("1.2.3.9", "1.2.3.5", "1.2.3.6", "127.0.0.1", "10.0.0.1", "not-an-ip"):
        assert (await check(from_client(ip))).action == "accept", ip
