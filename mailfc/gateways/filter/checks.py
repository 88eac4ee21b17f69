"""The built-in checks of the filter gateway: EICAR, header sanity, DNSBL.

    eicar     the EICAR anti-virus test signature anywhere in the message, raw or inside
              a base64 / quoted-printable MIME part: reject (550 5.7.1).  One pass over
              the message in chunks (scan.py), decoding encoded parts as they go by;
              a message over SCAN_INLINE bytes is read in a thread, so a big one does
              not hold the other sessions of the loop.
    headers   RFC 5322 sanity: a From field, no second From, Sender, Reply-To, To, Cc,
              Bcc, Subject, Date, Message-ID, In-Reply-To or References (a second From is
              the classic trick to show one sender and have another verified), no header
              line that is not `name: value`, no NUL: reject (550 5.6.0).
    dnsbl     the client's address (SMTP-In: the connecting client; Filter-Out: Postfix's
              XFORWARD ADDR) looked up in each of filter_*.dnsbl_zones through
              dnspython (dnsbl.py; dnsbl_timeout_s, dnsbl_nameservers); listed
              (127.0.0.0/8 but the lists' 127.255.255.x error codes): reject
              (550 5.7.1).  Off unless "dnsbl" is in checks; a lookup that fails or
              times out counts as not listed, and is logged.  Loopback and private
              clients are not looked up.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Awaitable, Callable

from mailfc.gateways.filter.dnsbl import Dnsbl
from mailfc.gateways.filter.message import ACCEPT, FilterMessage, Verdict
from mailfc.gateways.filter.scan import Scanner
from mailfc.messages import Source

EICAR = (b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*")
SINGLETONS = ("from", "sender", "reply-to", "to", "cc", "bcc", "subject", "date",
              "message-id", "in-reply-to", "references")
SCAN_INLINE = 256 * 1024

Check = Callable[[FilterMessage], Awaitable[Verdict]]


async def eicar(message: FilterMessage) -> Verdict:
    source = message.source()
    if source.size <= SCAN_INLINE:
        infected = has_eicar(source)
    else:
        infected = await asyncio.to_thread(has_eicar, source)
    if infected:
        return Verdict("reject", "infected: EICAR-Test-Signature found", "filter:eicar")
    return ACCEPT


def has_eicar(source: Source) -> bool:
    """The signature raw or in a decoded base64 / quoted-printable part (scan.py)."""
    return Scanner(EICAR).scan(source.chunks())


async def headers(message: FilterMessage) -> Verdict:
    def bad(reason: str) -> Verdict:
        return Verdict("reject", reason, "filter:headers",
                       f"550 5.6.0 message header rejected: {reason}")

    if message.malformed:
        return bad(f"malformed header line {message.malformed[0][:60]!r}")
    counts: dict[str, int] = {}
    for name, value in message.headers:
        if "\0" in value:
            return bad(f"NUL byte in {name}")
        lower = name.lower()
        counts[lower] = counts.get(lower, 0) + 1
    if not counts.get("from"):
        return bad("no From field")
    for name in SINGLETONS:
        if counts.get(name, 0) > 1:
            return bad(f"{counts[name]} {name} fields (at most one allowed)")
    return ACCEPT


def dnsbl(zones: list[str], timeout_s: float = 2.0,
          nameservers: list[str] | None = None) -> Check:
    lists = Dnsbl(zones, timeout_s, nameservers or [])

    async def check(message: FilterMessage) -> Verdict:
        if not message.client_ip or not zones:
            return ACCEPT
        try:
            address = ipaddress.ip_address(message.client_ip)
        except ValueError:
            return ACCEPT
        if address.is_loopback or address.is_private:
            return ACCEPT
        found = await lists.listed(address)
        if found is not None:
            zone, answer = found
            return Verdict("reject", f"client {address} is listed in {zone} ({answer})",
                           f"filter:dnsbl:{zone}")
        return ACCEPT

    return check


def built_in(names: list[str], dnsbl_zones: list[str], *, dnsbl_timeout_s: float = 2.0,
             dnsbl_nameservers: list[str] | None = None) -> list[tuple[str, Check]]:
    table: dict[str, Check] = {"eicar": eicar, "headers": headers,
                               "dnsbl": dnsbl(dnsbl_zones, dnsbl_timeout_s,
                                              dnsbl_nameservers)}
    return [(name, table[name]) for name in names]
