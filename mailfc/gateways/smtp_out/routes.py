"""Where mail for a domain goes: static routes first, then DNS (MX, then A).

    smtp_out.routes = ["example.net=192.0.2.25:25", "*=smarthost.isp.example:587"]

A static route names one host (and port) for a domain; `*` is the smarthost
for every domain without its own route.  Without a route, the domain's MX
records are looked up with dnspython and tried in preference order; a domain
without MX records gets its A/AAAA address (RFC 5321 5.1); a null MX
(`0 .`, RFC 7505) means the domain accepts no mail, a permanent failure.

Lookups that fail temporarily (SERVFAIL, timeout) are temporary failures: the
spool retries the message later.
"""

from __future__ import annotations

from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.resolver

from mailfc.config import split_hostport
from mailfc.errors import PermanentFailure, TemporaryFailure


@dataclass(frozen=True)
class Hop:
    host: str
    port: int = 25


class NoRoute(PermanentFailure):
    """The domain does not accept mail (null MX, NXDOMAIN)."""


class RouteUnknown(TemporaryFailure):
    """DNS did not answer now; worth retrying."""


def parse_routes(entries: list[str]) -> dict[str, Hop]:
    routes: dict[str, Hop] = {}
    for entry in entries:
        domain, sep, target = entry.partition("=")
        if not sep or not domain.strip() or not target.strip():
            raise ValueError(f"route {entry!r}: expected domain=host:port or *=host:port")
        host, port = split_hostport(target.strip()) if ":" in target else (target.strip(), 25)
        routes[domain.strip().lower()] = Hop(host, port)
    return routes


class Router:
    def __init__(self, routes: dict[str, Hop], *, timeout: float = 10.0) -> None:
        self.routes = routes
        self.resolver = dns.asyncresolver.Resolver()
        self.resolver.lifetime = timeout

    async def hops(self, domain: str) -> list[Hop]:
        """The hosts to try for `domain`, best first."""
        domain = domain.lower().rstrip(".")
        if domain in self.routes:
            return [self.routes[domain]]
        if "*" in self.routes:
            return [self.routes["*"]]
        try:
            answer = await self.resolver.resolve(domain, "MX")
        except dns.resolver.NXDOMAIN:
            raise NoRoute(f"domain {domain} does not exist") from None
        except dns.resolver.NoAnswer:
            return await self._address_fallback(domain)
        except (dns.exception.Timeout, dns.resolver.NoNameservers) as error:
            raise RouteUnknown(f"MX lookup of {domain} failed: {error}") from None
        records = sorted(answer, key=lambda r: r.preference)
        if len(records) == 1 and str(records[0].exchange) == ".":
            raise NoRoute(f"domain {domain} accepts no mail (null MX)")
        return [Hop(str(r.exchange).rstrip(".")) for r in records
                if str(r.exchange) != "."]

    async def _address_fallback(self, domain: str) -> list[Hop]:
        for kind in ("A", "AAAA"):
            try:
                await self.resolver.resolve(domain, kind)
            except (dns.resolver.NoAnswer, dns.resolver.NXDOMAIN):
                continue
            except (dns.exception.Timeout, dns.resolver.NoNameservers) as error:
                raise RouteUnknown(f"address lookup of {domain} failed: {error}") from None
            return [Hop(domain)]
        raise NoRoute(f"domain {domain} has neither MX nor address records")
