"""anvil: per-client connection count and connection rate limits of the public listeners.

NAME
    anvil - how many connections one client may hold, and open per minute, at
    SMTP-In (25), the IMAP Router (143, 993) and the SMTP Router (587, 465)

SUMMARY
    anvil = Anvil.for_service(config, "smtp-in")     # one per service and process
    ticket = anvil.connect(peer_host)                 # on accept, before the greeting
    if ticket.refusal:                                # over a limit: say so, close
        send(anvil.refusal_line(ticket.client)); close()
    ...
    ticket.release()                                  # when the connection ends

DESCRIPTION
    Named after Postfix's anvil(8) server, which counts, for smtpd, the connections
    of each (service, client) and the connections made per time unit.  Here each
    service counts in its own process: one Anvil per service, shared by its ports
    (993 counts with 143, 465 with 587), and by the generations of a cycled
    listener.  Nothing is shared between hosts or processes: a limit is per
    process, as Postfix's is per host.

    The client is its address: an IPv4-mapped IPv6 address (::ffff:192.0.2.1)
    counts as its IPv4 address; an IPv6 client counts as its /64 (one end site
    owns a /64 and can pick any address in it, so per-address counting would
    not limit it at all).  A peer that is not an IP address (a unix socket) is
    not counted.

    connect() counts the connection first, then checks, as anvil and smtpd do:
        count:  connections open at once, this one included, over max_per_client
        rate:   connections begun within the client's current window of
                rate_window_s (a window begins with the client's first
                connection and the first one after a window ended, as anvil's
                anvil_rate_time_unit), this one included, over
                max_rate_per_client.  Refused attempts count:
                a client that keeps hammering stays refused until it pauses.
    A refused connection holds no count (its ticket's release() does nothing).
    Addresses in exempt_networks are never counted nor refused.

REPLIES (the service's own protocol, then the connection is closed)
    SMTP (25, 587, 465):  421 4.7.0 <host> Error: too many connections from <client>
    IMAP (143, 993):      * BYE Too many connections from your address

    The implicit-TLS ports (993, 465) check once the TLS handshake is done, so the
    client can read the refusal; the handshake itself is bounded by its timeout.

DIAGNOSTICS
    WARNING "<service>: too many connections from <client> (<n> at once, limit <l>)"
    or "(<n> in <w>s, limit <l>)": the first refusal of a client in each window;
    later ones in that window are counted and reported with the next warning, so
    a flood costs one log line per client per window.

SECURITY
    Memory: one small entry per client with open connections or a live window;
    entries idle for a window are dropped on the next connect after that.

CONFIGURATION PARAMETERS
    [smtp_in_connections], [imap_router_connections], [submission_connections]:
    max_per_client (50; IMAP 100: mail clients hold several connections each),
    max_rate_per_client (100), rate_window_s (60), exempt_networks ([]).
    0 turns a limit off.  Postfix's defaults are smtpd_client_connection_count_limit
    = 50 and smtpd_client_connection_rate_limit = 0 (off) per anvil_rate_time_unit
    = 60s; mailfc turns the rate limit on, with room for any real sender.

SEE ALSO
    Postfix anvil(8), TUNING_README; mailfc.protocols.smtp_server (SMTP-In's error
    limits); docs/security.md ("Connection floods and SMTP errors").
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from mailfc.config import Config, ConnectionLimitsSection
from mailfc.metrics import names as metrics

log = logging.getLogger("mailfc.anvil")

SMTP = "smtp"
IMAP = "imap"
SMTP_REFUSAL = "421 4.7.0 {host} Error: too many connections from {client}"
IMAP_REFUSAL = "* BYE Too many connections from your address"
REFUSALS = {SMTP: SMTP_REFUSAL, IMAP: IMAP_REFUSAL}
# Which configuration section and which protocol each public service has.
SERVICES = {
    "smtp-in": ("smtp_in_connections", SMTP),
    "imap-router": ("imap_router_connections", IMAP),
    "submission-router": ("submission_connections", SMTP),
}
IPV6_CLIENT_PREFIX = 64

COUNT = "count"
RATE = "rate"


IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def ip_of(address: str) -> IpAddress | None:
    """The peer's IP address, an IPv4-mapped one as IPv4; None: not an IP address."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def client_of(address: str) -> str | None:
    """The client an address counts as (see DESCRIPTION); None: not an IP address."""
    ip = ip_of(address)
    if isinstance(ip, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((ip, IPV6_CLIENT_PREFIX), strict=False))
    return None if ip is None else str(ip)


class _Client:
    __slots__ = ("open", "rate", "refused", "window_start")

    def __init__(self, now: float) -> None:
        self.open = 0
        self.rate = 0
        self.window_start = now
        # Refusals in this window (the first is logged, the rest counted).
        self.refused = 0


@dataclass
class Ticket:
    """One connection's place in the count.  refusal: None when admitted, else why
    not ("count" or "rate")."""

    anvil: Anvil | None
    client: str
    refusal: str | None = None

    def release(self) -> None:
        """The connection ended (once; later calls do nothing)."""
        if self.anvil is not None and self.refusal is None:
            self.anvil._release(self.client)
        self.anvil = None


class Anvil:
    """The counts of one service: see the module's manual."""

    def __init__(self, service: str, limits: ConnectionLimitsSection, *, dialect: str = SMTP,
                 host: str = "localhost", clock: Callable[[], float] = time.monotonic) -> None:
        self.service = service
        self.limits = limits
        self.dialect = dialect
        self.host = host
        self.clock = clock
        self.exempt = [ipaddress.ip_network(item, strict=False)
                       for item in limits.exempt_networks]
        self.clients: dict[str, _Client] = {}
        self._last_sweep = clock()

    @classmethod
    def for_service(cls, config: Config, service: str) -> Anvil:
        section, dialect = SERVICES[service]
        limits: ConnectionLimitsSection = getattr(config, section)
        return cls(service, limits, dialect=dialect, host=config.host_name)

    def refusal_line(self, client: str) -> bytes:
        return REFUSALS[self.dialect].format(host=self.host, client=client).encode() + b"\r\n"

    def connect(self, address: str | None) -> Ticket:
        """Count a new connection from `address` (the peer's host part)."""
        ip = ip_of(address or "")
        if ip is None or any(ip in network for network in self.exempt):
            return Ticket(None, str(ip or address))
        client = client_of(str(ip))
        assert client is not None
        now = self.clock()
        self._sweep(now)
        entry = self.clients.get(client)
        if entry is None:
            entry = self.clients[client] = _Client(now)
        elif now - entry.window_start >= self.limits.rate_window_s:
            entry.window_start, entry.rate, suppressed = now, 0, entry.refused
            entry.refused = 0
            if suppressed > 1:
                log.warning("%s: %d more connections from %s were refused in the last"
                            " window", self.service, suppressed - 1, client)
        entry.rate += 1
        limits = self.limits
        refusal = None
        if limits.max_per_client and entry.open + 1 > limits.max_per_client:
            refusal = COUNT
        elif limits.max_rate_per_client and entry.rate > limits.max_rate_per_client:
            refusal = RATE
        if refusal is None:
            entry.open += 1
            return Ticket(self, client)
        entry.refused += 1
        metrics.REFUSALS.labels(self.service, f"connections:{refusal}").inc()
        if entry.refused == 1:
            detail = (f"{entry.open + 1} at once, limit {limits.max_per_client}"
                      if refusal == COUNT else
                      f"{entry.rate} in {limits.rate_window_s:g}s, limit "
                      f"{limits.max_rate_per_client}")
            log.warning("%s: too many connections from %s (%s)", self.service, client,
                        detail)
        return Ticket(None, client, refusal)

    def open_count(self, address: str) -> int:
        """Connections counted for the client of `address` (for tests and reports)."""
        entry = self.clients.get(client_of(address) or "")
        return entry.open if entry is not None else 0

    def _release(self, client: str) -> None:
        entry = self.clients.get(client)
        if entry is not None and entry.open > 0:
            entry.open -= 1

    def _sweep(self, now: float) -> None:
        """Drop the entries of clients with nothing open and a window gone by."""
        window = self.limits.rate_window_s
        if now - self._last_sweep < window:
            return
        self._last_sweep = now
        for client in [client for client, entry in self.clients.items()
                       if entry.open == 0 and now - entry.window_start >= window]:
            del self.clients[client]
