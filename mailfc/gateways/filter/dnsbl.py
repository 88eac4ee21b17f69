"""DNSBL lookups for the filter gateway's "dnsbl" check, through dnspython.

    Dnsbl(zones, timeout_s, nameservers).listed(address) -> (zone, answer) | None

For client 192.0.2.1 and zone zen.spamhaus.org the A record of
1.2.0.192.zen.spamhaus.org is asked (IPv6: the 32 reversed nibbles), every zone at
once through dns.asyncresolver, each with `timeout_s` in all (retries included).
An answer in 127.0.0.0/8 means listed, except 127.255.255.0/24: the list's own
error codes (a query refused, e.g. through a public resolver), which are logged
and count as not listed.  NXDOMAIN / no answer: not listed.  A timeout or a
failing server: not listed (fail open, as Postfix's postscreen does: a DNSBL that
is down must not stop the mail), logged once per lookup with the zone.

Answers are cached (dnspython's LRU cache, the records' TTLs).

CONFIGURATION ([filter_in] / [filter_out])
    dnsbl_zones ([]), dnsbl_timeout_s (2.0), dnsbl_nameservers ([]: the system's
    resolv.conf; else "address" or "address:port" entries, e.g. a local caching
    resolver; IPv6 as "[::1]:53").
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from typing import Literal

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.rdatatype
import dns.resolver

log = logging.getLogger("mailfc.gateways.filter.dnsbl")

Outcome = Literal["listed", "clear", "failed"]
ERROR_CODES = ipaddress.ip_network("127.255.255.0/24")
LISTED = ipaddress.ip_network("127.0.0.0/8")
CACHE_ENTRIES = 10_000


def query_name(address: ipaddress.IPv4Address | ipaddress.IPv6Address, zone: str) -> str:
    """The name to ask: the address reversed (nibbles for IPv6) under `zone`."""
    reversed_name = address.reverse_pointer.rsplit(".", 2)[0]
    return f"{reversed_name}.{zone.strip('.')}."


def nameserver_of(entry: str) -> dns.nameserver.Do53Nameserver:
    """ "192.0.2.53", "192.0.2.53:5353", "[2001:db8::53]:53" or "2001:db8::53"."""
    text = entry.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = int(rest[1:]) if rest.startswith(":") else 53
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
        port = int(port_text)
    else:
        host, port = text, 53
    ipaddress.ip_address(host)          # a name here would need a resolver itself
    return dns.nameserver.Do53Nameserver(host, port)


def make_resolver(timeout_s: float, nameservers: list[str]) -> dns.asyncresolver.Resolver:
    if nameservers:
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [nameserver_of(entry) for entry in nameservers]
    else:
        try:
            resolver = dns.asyncresolver.Resolver()
        except dns.resolver.NoResolverConfiguration:
            log.warning("dnsbl: no usable /etc/resolv.conf; asking 127.0.0.1 "
                        "(set dnsbl_nameservers)")
            resolver = dns.asyncresolver.Resolver(configure=False)
            resolver.nameservers = ["127.0.0.1"]
    resolver.lifetime = timeout_s
    resolver.timeout = timeout_s
    resolver.cache = dns.resolver.LRUCache(CACHE_ENTRIES)
    return resolver


class Dnsbl:
    def __init__(self, zones: list[str], timeout_s: float, nameservers: list[str]) -> None:
        self.zones = zones
        self.timeout_s = timeout_s
        self.nameservers = nameservers
        self._resolver: dns.asyncresolver.Resolver | None = None

    @property
    def resolver(self) -> dns.asyncresolver.Resolver:
        # Made at the first lookup: a chain without "dnsbl" never reads resolv.conf.
        if self._resolver is None:
            self._resolver = make_resolver(self.timeout_s, self.nameservers)
        return self._resolver

    async def listed(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address
                     ) -> tuple[str, str] | None:
        """The first zone (in configuration order) listing `address`, with its answer."""
        outcomes = await asyncio.gather(*(self.lookup(address, zone) for zone in self.zones))
        for zone, (outcome, answer) in zip(self.zones, outcomes, strict=True):
            if outcome == "listed":
                return zone, answer
        return None

    async def lookup(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address,
                     zone: str) -> tuple[Outcome, str]:
        name = query_name(address, zone)
        try:
            answer = await self.resolver.resolve(name, dns.rdatatype.A,
                                                 lifetime=self.timeout_s, search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return "clear", ""
        except dns.exception.Timeout:
            log.warning("dnsbl: %s: no answer within %.1f s (counted as not listed)",
                        name, self.timeout_s)
            return "failed", "timeout"
        except dns.exception.DNSException as error:
            log.warning("dnsbl: %s: lookup failed: %s (counted as not listed)", name, error)
            return "failed", type(error).__name__
        addresses = [ipaddress.ip_address(record.address) for record in answer]
        hits = [a for a in addresses if a in LISTED and a not in ERROR_CODES]
        if hits:
            return "listed", str(hits[0])
        if any(a in ERROR_CODES for a in addresses):
            log.warning("dnsbl: %s answered %s, the list's error code (query refused?): "
                        "counted as not listed", zone, addresses[0])
            return "failed", str(addresses[0])
        return "clear", ""
