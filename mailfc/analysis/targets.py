"""What an admin names on the command line: an account, a domain, or an IP address/network.

    classify("Bob@Example.org")   -> Target("account", "bob@example.org")
    classify("example.org")       -> Target("domain", "example.org")
    classify("192.0.2.7")         -> Target("ip", "192.0.2.7")
    classify("192.0.2.0/24")      -> Target("ip", "192.0.2.0/24")

Malformed input is an InvalidInput naming what was expected.  `require_account` and
`require_domain` check the CMDB: an unknown name is a NotFound, not an empty answer.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import asyncpg

from mailfc.addresses import normalize_address, normalize_domain
from mailfc.errors import InvalidInput, NotFound

ACCOUNT = "account"
DOMAIN = "domain"
IP = "ip"


@dataclass(frozen=True)
class Target:
    kind: str
    value: str


def normalize_ip(text: str) -> str:
    """An address stays an address; a network is written in its canonical form."""
    try:
        if "/" in text:
            network = ipaddress.ip_network(text.strip(), strict=False)
            if network.num_addresses == 1:
                return str(network.network_address)
            return str(network)
        return str(ipaddress.ip_address(text.strip()))
    except ValueError:
        raise InvalidInput(f"invalid IP address {text!r}: expected e.g. 192.0.2.7,"
                           " 2001:db8::1 or 192.0.2.0/24") from None


def account_address(text: str) -> str:
    """The stored form of an account address; the error names the whole address."""
    try:
        return normalize_address(text)
    except InvalidInput as error:
        message = str(error)
        if text in message:
            raise
        raise InvalidInput(f"invalid address {text!r}: {message}") from None


def looks_like_ip(text: str) -> bool:
    head = text.strip().split("/", 1)[0]
    return bool(head) and (":" in head or all(part.isdigit() for part in head.split(".")))


def classify(text: str) -> Target:
    if not text.strip():
        raise InvalidInput("empty target: give an account, a domain or an IP address")
    if "@" in text:
        return Target(ACCOUNT, account_address(text))
    if looks_like_ip(text):
        return Target(IP, normalize_ip(text))
    return Target(DOMAIN, normalize_domain(text))


async def account_known(db: asyncpg.Connection, address: str) -> bool:
    localpart, _, domain = address.partition("@")
    return bool(await db.fetchval(
        "SELECT 1 FROM accounts a JOIN domains d ON d.id = a.domain_id"
        " WHERE a.localpart = $1 AND d.name = $2", localpart, domain))


async def require_account(db: asyncpg.Connection, address: str) -> str:
    account = account_address(address)
    if not await account_known(db, account):
        raise NotFound(f"no account {account}: see mailfc account list")
    return account


async def require_domain(db: asyncpg.Connection, name: str) -> str:
    domain = normalize_domain(name)
    if not await db.fetchval("SELECT 1 FROM domains WHERE name = $1", domain):
        raise NotFound(f"no domain {domain}: see mailfc domain list")
    return domain
