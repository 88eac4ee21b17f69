"""mailfc configuration: one TOML file, every value with a working default.

The file is found through `--config FILE`, else the environment variable
MAILFC_CONFIG, else no file at all (the embedded defaults run the whole
platform on one machine).  Unknown keys and values of the wrong type are errors
that name the key, e.g. `listen.smtp_in: expected "host:port"`.

Sections and their defaults are the classes below; `mailfc config show`
prints the effective configuration as TOML.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import tomllib
from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    PositiveInt,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from mailfc.errors import ConfigError

CONFIG_ENV = "MAILFC_CONFIG"


class Section(BaseModel):
    # strict: a port given as "25" is a mistake worth naming, not coercing.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def connect_address(value: str) -> tuple[str, int]:
    """Where to connect to a service listening on `value`: a wildcard listen
    address ("0.0.0.0:25") is reached on loopback."""
    host, port = split_hostport(value)
    return ("127.0.0.1" if host == "0.0.0.0" else host), port


UNIX_PREFIX = "unix:"


def unix_socket_name(value: str) -> str:
    """`"unix:filter-out.sock"` -> "filter-out.sock" (a name inside a socket directory:
    the containers' for listen.filter_out, the internal hops' for the others)."""
    name = value.removeprefix(UNIX_PREFIX)
    if (not value.startswith(UNIX_PREFIX) or not name or "/" in name or name.startswith(".")
            or len(name) > 64):
        raise ValueError(f'expected "unix:<socket name>" (a name of at most 64 characters, '
                         f'no "/", e.g. "unix:filter-out.sock"), got {value!r}')
    return name


def listen_address(value: str, directory: Path) -> Path | tuple[str, int]:
    """Where a service with listen value `value` listens: "unix:<name>" is the socket
    `directory`/<name>; "host:port" is (host, port)."""
    if value.startswith(UNIX_PREFIX):
        return directory / unix_socket_name(value)
    return split_hostport(value)


def split_hostport(value: str) -> tuple[str, int]:
    """`"127.0.0.1:24"` -> ("127.0.0.1", 24); `"[::1]:24"` -> ("::1", 24)."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not port_text.isdigit():
        raise ValueError(f'expected "host:port", got {value!r}')
    port = int(port_text)
    if not 0 < port < 65536:
        raise ValueError(f"port {port} out of range 1-65535")
    host = host.strip("[]") or "0.0.0.0"
    return host, port


class PathsSection(Section):
    state_dir: str = "/var/lib/mailfc"
    # Empty: <state_dir>/mail.  Across hosts, a filesystem every host mounts.
    mail_root: str = ""


class DatabaseSection(Section):
    # Empty: a private PostgreSQL cluster under <state_dir>/postgres, started on demand.
    dsn: str = ""
    pool_min_size: int = 1
    pool_max_size: int = 10
    # The embedded cluster runs as this unprivileged user (PostgreSQL refuses root).
    embedded_user: str = "postgres"
    # Session rows older than this are dropped with their daily partition.
    retention_days: int = 90
    command_timeout_s: float = 30.0


# The internal hops: "unix:<name>" (a socket in Config.hops_dir, root and the
# service's own user only) or "host:port" (mutual TLS with the cluster's
# certificates, for a hop on another host); see mailfc.hops.
HOP_LISTENERS = ("smtp_out", "lmtp_router")


class ListenSection(Section):
    """Where each resident service listens, as "host:port" (or "unix:<name>")."""

    smtp_in: str = "0.0.0.0:25"
    # "unix:<name>": a socket of that name in the socket directory every Postfix
    # container mounts (<state_dir>/private/sockets), where the domains' Postfix
    # reach Filter-Out and no other local user can.
    filter_out: str = "unix:filter-out.sock"
    smtp_out: str = "unix:smtp-out.sock"
    lmtp_router: str = "unix:lmtp-router.sock"
    imap_router: str = "0.0.0.0:143"
    imap_router_tls: str = "0.0.0.0:993"
    submission: str = "0.0.0.0:587"
    submissions: str = "0.0.0.0:465"
    milter: str = "127.0.0.1:10030"
    hook_server: str = "127.0.0.1:10031"

    @field_validator("*")
    @classmethod
    def _is_hostport(cls, value: str, info: ValidationInfo) -> str:
        unix = info.field_name == "filter_out" or (
            info.field_name in HOP_LISTENERS and value.startswith(UNIX_PREFIX))
        if unix:
            unix_socket_name(value)
        else:
            split_hostport(value)
        return value


class DispatcherSection(Section):
    """This host's dispatcher: the routers connect here, nobody else may.

    Routers on this host use its unix sockets (root or the dispatcher's own uid
    only); routers on other hosts its TCP ports with mutual TLS ([cluster]).
    allowed_clients only narrows who may try the TLS handshake: an address
    authenticates nothing."""

    address: str = "127.0.0.1"
    lmtp_port: int = 10024
    imap_port: int = 10143
    smtp_port: int = 10587
    allowed_clients: list[str] = ["127.0.0.0/8"]
    # A router that connects must send its PROXY header within this time.
    header_timeout_s: float = 5.0
    connect_timeout_s: float = 5.0

    @field_validator("address")
    @classmethod
    def _is_ip(cls, value: str) -> str:
        ipaddress.ip_address(value)
        return value

    @field_validator("allowed_clients")
    @classmethod
    def _are_networks(cls, value: list[str]) -> list[str]:
        for item in value:
            ipaddress.ip_network(item, strict=False)
        return value


class ClusterSection(Section):
    """This host's credentials towards the other hosts (mailfc.cluster): all three
    files or none.  Empty: <state_dir>/cluster/ca.pem, host.pem, host.key,
    created on first need on the first host; another host gets its files from
    `mailfc host add`."""

    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    # Empty: <state_dir>/cluster/ca.key.  Only the host that issues credentials needs it.
    ca_key_file: str = ""


class HostSection(Section):
    # Empty: this machine's hostname.  The row in the CMDB's hosts table.
    name: str = ""
    capacity: int = 1000


class NetworkSection(Section):
    """The container network of this host: one bridge, one subnet."""

    bridge: str = "mailfc0"
    # The bridge takes the subnet's first address; containers get the others.
    subnet: str = "10.77.0.0/16"

    @field_validator("subnet")
    @classmethod
    def _is_network(cls, value: str) -> str:
        network = ipaddress.ip_network(value, strict=True)
        if network.version != 4 or network.num_addresses < 8:
            raise ValueError("expected an IPv4 subnet of at least /29")
        return value

    @field_validator("bridge")
    @classmethod
    def _is_ifname(cls, value: str) -> str:
        if not 0 < len(value) <= 15 or "/" in value or " " in value:
            raise ValueError("expected an interface name of 1-15 characters")
        return value


class TlsSection(Section):
    # Empty: a self-signed certificate generated into <state_dir>/tls.
    cert_file: str = ""
    key_file: str = ""


class LoginSection(Section):
    """What every router that takes logins (IMAP, submission) has."""

    # Every failed login is answered only after this delay.
    auth_failure_delay_s: float = 1.0
    # Login abuse (mailfc.routers.throttle; docs/security.md, "Login abuse").
    # Failures are counted within failure_window_s per client address, per
    # (address, account) and per account, under the account's canonical name.
    # An address past max_failures_per_ip, or an address past
    # max_failures_per_pair for one account, is refused without the password
    # being checked, whoever else logs in.
    max_failures_per_ip: PositiveInt = 20
    max_failures_per_pair: PositiveInt = 5
    failure_window_s: PositiveInt = 300
    # The account's own count never refuses anyone: from account_delay_after
    # failures on, a failure waits account_delay_s more, doubling with each
    # further failure up to account_delay_max_s (an address with failures of its
    # own waits before its password is checked).  A right password from an
    # address without recent failures always logs in at once.
    account_delay_after: PositiveInt = 5
    account_delay_s: float = 0.5
    account_delay_max_s: float = 8.0
    # Password spraying: an address failing for this many distinct accounts
    # within the window is banned (table bans, `mailfc ban list`) for
    # spray_ban_s; every router reads the bans again every ban_refresh_s.
    spray_accounts: PositiveInt = 10
    spray_ban_s: PositiveInt = 3600
    ban_refresh_s: float = 5.0
    # Before login a client must finish within this time.
    login_timeout_s: float = 60.0


class ImapRouterSection(LoginSection):
    # LOGIN/AUTHENTICATE over a connection without TLS (port 143 before STARTTLS).
    allow_plaintext_auth: bool = False


class SubmissionSection(LoginSection):
    """The SMTP Router (submission, 587/465): see mailfc.routers.submission."""

    # After AUTH, a client silent for this long is disconnected (RFC 5321: 5 min).
    idle_timeout_s: float = 300.0
    # Admission under CPU pressure (mailfc.fairness): the PSI share above
    # which domains over their fair share of new sessions are spaced out (1: never),
    # their lowest rate (sessions/s) and how long a session may wait for its turn.
    pressure_target: float = 0.15
    pressure_min_rate: float = 1.0
    pressure_max_wait_s: float = 30.0


class LmtpRouterSection(Section):
    # Deliveries in flight towards one domain's container; other domains'
    # deliveries never wait behind them.
    per_domain_concurrency: int = 8
    # A delivery to a domain's dispatcher gives up after this (451 for that domain).
    delivery_timeout_s: float = 60.0


class ControllerSection(Section):
    """The controller (mailfc.controller.controller): see decisions.py for the rules."""

    interval_s: float = 2.0
    scale_up_share: float = 0.2
    scale_step: float = 1.5
    memory_high: float = 0.85
    scale_down_after_s: float = 30.0
    scale_out_sessions: int = 50
    scale_in_after_s: float = 60.0
    # Another host whose heartbeat is older than this is marked down.
    host_down_after_s: float = 60.0
    adaptive_interval_s: float = 30.0
    # A stopped domain Postfix with deferred mail is started again this often.
    deferred_retry_s: float = 300.0
    # `mailfc up` replaces each stateless resident process (routers, submission,
    # inbound, outbound, milter, hooks) after this long: a new one takes over
    # the listening sockets before the old one drains.  0: never.
    resident_lifetime_s: float = 86400.0


# The ids a container's user namespace maps (mailfc.runtime.bundle), from the base.
CONTAINER_IDS = 65536
CONTAINER_ID_BASE = 0x70000000


class RuntimeSection(Section):
    start_timeout_s: float = 5.0
    stop_timeout_s: float = 5.0
    # Containers, network namespaces and cgroups of this host are named
    # <name_prefix>-...; start-up cleans up leftovers by this prefix, so two
    # platforms on one machine need different prefixes.
    name_prefix: str = "mailfc"
    # Containers run in a user namespace: uid and gid N inside (root, postfix,
    # vmail, ...) is container_id_base + N on the host, for N below 65536, so
    # root in a domain's container is nobody the host knows.  Keep it the same
    # on every host that shares the mail root (the maildirs' owners), and away
    # from the ranges /etc/subuid gives users.  0: no user namespace.
    container_id_base: int = CONTAINER_ID_BASE
    # A domain's Postfix retries deferred mail after this many seconds (its
    # minimal_backoff_time and queue_run_delay; maximal_backoff_time is 6 times it),
    # not Postfix's 300 s: every deferral there is a failure of mailfc's own next
    # hop (Filter-Out), which is back within seconds.
    postfix_retry_s: PositiveInt = 10

    @field_validator("name_prefix")
    @classmethod
    def _is_prefix(cls, value: str) -> str:
        if not value.isalnum() or not value.isascii() or len(value) > 12:
            raise ValueError("expected 1-12 ASCII letters or digits")
        return value

    @field_validator("container_id_base")
    @classmethod
    def _is_id_range(cls, value: int) -> int:
        if value % CONTAINER_IDS or not 0 <= value < 2**32 - CONTAINER_IDS:
            raise ValueError(f"expected 0 or a multiple of {CONTAINER_IDS} below "
                             f"{2**32 - CONTAINER_IDS}")
        return value

    def outside_id(self, inside: int) -> int:
        """The host's uid/gid for uid/gid `inside` of a container."""
        return self.container_id_base + inside


class MilterSection(Section):
    """The mailfc milter (mailfc.policy.milter), attached to every per-domain Postfix."""

    # Empty: <state_dir>/private/sockets/milter.sock, mounted into every Postfix container.
    socket: str = ""
    # Group allowed to connect (the containers' Postfix runs as the host's postfix user);
    # the socket is mode 0660.  Empty: mode 0666.
    socket_group: str = "postfix"
    # Also listen on listen.milter (TCP), for MTAs outside the containers.
    tcp: bool = False
    # A connection whose MTA sends nothing for this long is closed.
    idle_timeout_s: float = 900.0


class PolicySection(Section):
    """The limit engine (mailfc.policy.engine), shared by the milter, gateways and hooks."""

    # A concurrency slot whose holder stopped renewing it returns after this.
    lease_s: float = 60.0
    # A decision the database cannot give within this time follows the failure policy.
    decision_timeout_s: float = 2.0
    # Database calls one domain may have open at once in one process (of the pool's
    # database.pool_max_size): a flooding domain's decisions queue on their own.
    per_domain_calls: PositiveInt = 3
    # A client over an enforced limit hears 451 after this long (the milter, SMTP-In).
    refusal_delay_s: float = 1.0
    # Database unreachable: "tempfail" (451 4.3.0) or "accept" (pass, record later).
    on_db_error_submission: str = "tempfail"
    on_db_error_inbound: str = "accept"

    @field_validator("on_db_error_submission", "on_db_error_inbound")
    @classmethod
    def _is_policy(cls, value: str) -> str:
        if value not in ("tempfail", "accept"):
            raise ValueError('expected "tempfail" or "accept"')
        return value


class RecorderSection(Section):
    """Batched session recording (mailfc.policy.recorder)."""

    flush_interval_s: float = 0.2
    batch_size: int = 2000
    # Rows kept in memory while the database does not take writes; beyond, the
    # oldest are dropped, counted and logged.
    max_pending: int = 200_000
    flush_timeout_s: float = 10.0


class SmtpInSection(Section):
    """SMTP-In (mailfc.gateways.smtp_in): the MX of every hosted domain."""

    max_recipients: int = 100
    # 8-bit bytes in a message whose MAIL FROM did not say BODY=8BITMIME get 554 5.6.0.
    require_8bitmime: bool = True
    # A client silent for this long between commands is disconnected.
    timeout_s: float = 300.0
    # "Limit only when needed": a domain with this many messages waiting in the
    # spool gets 451 4.7.1 for new recipients until its queue shrinks.
    max_queued_per_domain: int = 20_000
    # Replace the listener after this long (0: never); see gateways/listener.py.
    cycle_after_s: float = 0.0
    # Errors (any 4xx/5xx reply, unknown recipients included) as Postfix's smtpd
    # counts them: past soft_error_limit every reply waits error_sleep_s; at
    # hard_error_limit 421 and close; more than junk_command_limit NOOP/RSET/VRFY/
    # HELO count as errors (0: no limit).  See protocols/smtp_server.py, ERRORS.
    soft_error_limit: PositiveInt = 10
    hard_error_limit: PositiveInt = 20
    error_sleep_s: float = 1.0
    junk_command_limit: int = 100
    # Where RCPT TO:<postmaster> without a domain goes (RFC 5321 4.5.1: an MX must
    # take it): a hosted address such as postmaster@example.org; empty: the message
    # is written to the [filter_in] quarantine (filter_in.quarantine_dir) for the admin.
    postmaster: str = ""
    # Admission under CPU pressure (mailfc.fairness), per recipient domain at RCPT:
    # while the host's CPU pressure (PSI) is above pressure_target (1: never), a
    # domain receiving more recipients than its fair share is spaced out, down to
    # pressure_min_rate recipients/s; a RCPT waits up to pressure_max_wait_s for its
    # turn, then hears 451 4.7.1 (the sending MTA tries again later).  A domain
    # asking for less than twice pressure_min_rate is never spaced out: 10/s lets a
    # steadily busy domain (864,000 recipients a day) through while a flood is cut.
    pressure_target: float = 0.15
    pressure_min_rate: float = 10.0
    pressure_max_wait_s: float = 5.0

    @field_validator("postmaster")
    @classmethod
    def _is_postmaster(cls, value: str) -> str:
        value = value.strip()
        local, at, domain = value.rpartition("@")
        if value and not (at and local and "." in domain
                          and not any(c in value for c in " <>\r\n")):
            raise ValueError(f"{value!r}: expected empty (quarantine) or a hosted address"
                             " such as postmaster@example.org")
        return value

    @field_validator("pressure_target")
    @classmethod
    def _is_share(cls, value: float) -> float:
        if not 0 < value <= 1:
            raise ValueError("expected a share of the time above 0 and at most 1 (1: never)")
        return value

    @field_validator("pressure_min_rate")
    @classmethod
    def _is_rate(cls, value: float) -> float:
        if value <= 0:
            raise ValueError("expected recipients per second > 0")
        return value

    @field_validator("pressure_max_wait_s")
    @classmethod
    def _is_rcpt_wait(cls, value: float) -> float:
        # RFC 5321 4.5.3.2.3: a client waits 5 minutes for the reply to RCPT.
        if not 0 < value <= 300:
            raise ValueError("expected seconds above 0 and at most 300 (the client's RCPT"
                             " timeout)")
        return value


class ConnectionLimitsSection(Section):
    """Per-client connection limits of one public service (mailfc.anvil, named after
    Postfix's anvil): [smtp_in_connections], [imap_router_connections],
    [submission_connections].  A client is an address (IPv6: its /64); 0: no limit."""

    # Connections one client may hold open at once (smtpd_client_connection_count_limit).
    max_per_client: int = 50
    # Connections one client may open per rate_window_s (Postfix: off by default).
    max_rate_per_client: int = 100
    rate_window_s: float = 60.0
    # Networks never limited ("192.0.2.0/24", "2001:db8::/48"): none by default.
    exempt_networks: list[str] = []

    @field_validator("max_per_client", "max_rate_per_client")
    @classmethod
    def _is_count(cls, value: int) -> int:
        if value < 0:
            raise ValueError("expected a number of connections >= 0 (0: no limit)")
        return value

    @field_validator("rate_window_s")
    @classmethod
    def _is_window(cls, value: float) -> float:
        if value <= 0:
            raise ValueError("expected seconds > 0")
        return value

    @field_validator("exempt_networks")
    @classmethod
    def _are_networks(cls, value: list[str]) -> list[str]:
        for item in value:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(f"{item!r}: expected an address or network such as"
                                 " \"192.0.2.0/24\"") from None
        return value


class ImapConnectionLimitsSection(ConnectionLimitsSection):
    # Mail clients hold several connections each (one per watched folder).
    max_per_client: int = 100


class SpoolSection(Section):
    """The durable spools of SMTP-In and SMTP-Out (mailfc.gateways.spool)."""

    # Where the spools live: <directory>/smtp-in and <directory>/smtp-out (each service
    # its own, so one never delivers the other's mail); empty: <state_dir>/spool.
    directory: str = ""
    # Below this much free space new messages get 452 4.3.1.
    min_free_bytes: int = 104_857_600
    # Deliveries in flight in all, and towards one recipient domain.
    max_deliveries: int = 32
    per_domain_concurrency: int = 4
    # Retries: retry_base_s, doubling up to retry_max_s, until max_lifetime_s
    # after which the sender gets a DSN bounce.
    retry_base_s: float = 60.0
    retry_max_s: float = 3600.0
    max_lifetime_s: float = 432_000.0
    delivery_timeout_s: float = 120.0
    # How often the spool looks for messages other processes queued and for
    # requests of `mailfc queue retry|delete`.
    scan_interval_s: float = 1.0
    # A bounce (or other null-sender mail) that fails for good: "quarantine" keeps
    # it in <spool>/quarantine (see `mailfc queue quarantine`); an address (the
    # platform's postmaster) gets it as a new message, quarantined if that fails too.
    undeliverable_bounces: str = "quarantine"

    @field_validator("undeliverable_bounces")
    @classmethod
    def _is_target(cls, value: str) -> str:
        value = value.strip()
        local, at, domain = value.rpartition("@")
        if value != "quarantine" and not (at and local and "." in domain
                                          and not any(c in value for c in " <>\r\n")):
            raise ValueError(f"{value!r}: expected \"quarantine\" or an address such as"
                             " postmaster@example.org")
        return value


class SmtpOutSection(Section):
    """SMTP-Out (mailfc.gateways.smtp_out): delivery to the recipients' MX hosts."""

    # Static routes before DNS: "domain=host:port"; "*=host:port" is a smarthost.
    routes: list[str] = []
    # One SMTP conversation (connect, each command, DATA) gives up after this.
    timeout_s: float = 60.0
    dns_timeout_s: float = 10.0

    @field_validator("routes")
    @classmethod
    def _are_routes(cls, value: list[str]) -> list[str]:
        for entry in value:
            domain, sep, target = entry.partition("=")
            if not sep or not domain.strip() or not target.strip():
                raise ValueError(f"route {entry!r}: expected domain=host:port or *=host:port")
        return value


class FilterSection(Section):
    """A filter chain (mailfc.gateways.filter): [filter_in] runs inside SMTP-In at end
    of data, [filter_out] in Filter-Out."""

    # Built-in checks in order: "eicar", "headers", "dnsbl".
    checks: list[str] = ["eicar", "headers"]
    # DNSBL zones asked when "dnsbl" is among the checks (e.g. "zen.spamhaus.org").
    dnsbl_zones: list[str] = []
    # Each zone's lookup in all; no answer by then counts as not listed (and is logged).
    dnsbl_timeout_s: float = 2.0
    # Empty: the system's resolv.conf; else "address" or "address:port" (IP addresses).
    dnsbl_nameservers: list[str] = []
    # Milters, Postfix syntax: "inet:127.0.0.1:8891" or "unix:/run/opendkim.sock".
    milters: list[str] = []
    milter_timeout_s: float = 30.0
    # A milter that cannot be reached: "tempfail" (451 4.7.1) or "accept".
    milter_default_action: str = "tempfail"
    # Filter-Out's next hop (not used in [filter_in]: SMTP-In's spool delivers to
    # listen.lmtp_router).  Empty: SMTP-Out's intake (listen.smtp_out).  Else a listen
    # value: "unix:<name>" (in the hops' directory) or "host:port" (mutual TLS).
    next_hop: str = ""
    # Empty: <state_dir>/quarantine.
    quarantine_dir: str = ""

    @field_validator("checks")
    @classmethod
    def _are_checks(cls, value: list[str]) -> list[str]:
        for name in value:
            if name not in ("eicar", "headers", "dnsbl"):
                raise ValueError(f'unknown check {name!r}: one of "eicar", "headers", "dnsbl"')
        return value

    @field_validator("dnsbl_timeout_s")
    @classmethod
    def _is_dnsbl_timeout(cls, value: float) -> float:
        if not 0 < value <= 30:
            raise ValueError(f"{value}: between 0 and 30 seconds (each zone's lookup in all)")
        return value

    @field_validator("dnsbl_nameservers")
    @classmethod
    def _are_nameservers(cls, value: list[str]) -> list[str]:
        for entry in value:
            host = entry.strip()
            if host.startswith("["):
                host = host[1:].partition("]")[0]
            elif host.count(":") == 1:
                host, _, port = host.partition(":")
                if not port.isdigit() or not 0 < int(port) < 65536:
                    raise ValueError(f"{entry!r}: the port must be 1-65535")
            try:
                ipaddress.ip_address(host)
            except ValueError:
                raise ValueError(f"{entry!r}: expected an IP address, optionally with "
                                 ":port (IPv6 as [address]:port)") from None
        return value

    @field_validator("milters")
    @classmethod
    def _are_milters(cls, value: list[str]) -> list[str]:
        for spec in value:
            kind, _, rest = spec.partition(":")
            if kind == "inet":
                split_hostport(rest)
            elif kind != "unix" or not rest.startswith("/"):
                raise ValueError(f'expected "inet:host:port" or "unix:/path", got {spec!r}')
        return value

    @field_validator("milter_default_action")
    @classmethod
    def _is_action(cls, value: str) -> str:
        if value not in ("tempfail", "accept"):
            raise ValueError('expected "tempfail" or "accept"')
        return value


class HooksSection(Section):
    """The IMAP hook server (mailfc.policy.hooks) and its Dovecot plugin."""

    # Empty: <state_dir>/private/sockets/hooks.sock, the socket every Dovecot container sees
    # at /run/mailfc/hooks.sock.
    socket: str = ""
    # Group of the socket (mode 0660): the gid the containers' imap processes run as
    # (the runtime's vmail_gid).
    socket_gid: int = 5000
    # Sent to every plugin when it connects: how long it waits for an answer, and
    # what it does when the server is down or slower: "open" (commands run unchecked
    # and unrecorded; Dovecot's log says so) or "closed" (NO [UNAVAILABLE]).
    timeout_ms: int = 500
    failure: str = "open"
    # Limit database unreachable: "accept" (pass, record why) or "tempfail"
    # (NO [UNAVAILABLE]).
    on_db_error: str = "accept"
    # How often running sessions look for changed limits.
    limits_poll_s: float = 1.0
    # Admission under CPU pressure for heavy commands (mailfc.fairness): the PSI share
    # above which domains over their fair share wait for their turn (1: never), and
    # their lowest rate (commands/s).  A command waits at most half of timeout_ms.
    pressure_target: float = 0.15
    pressure_min_rate: float = 2.0

    @field_validator("failure")
    @classmethod
    def _is_failure(cls, value: str) -> str:
        if value not in ("open", "closed"):
            raise ValueError('expected "open" or "closed"')
        return value

    @field_validator("on_db_error")
    @classmethod
    def _is_db_policy(cls, value: str) -> str:
        if value not in ("accept", "tempfail"):
            raise ValueError('expected "accept" or "tempfail"')
        return value

    @field_validator("timeout_ms")
    @classmethod
    def _is_timeout(cls, value: int) -> int:
        if not 0 < value <= 60_000:
            raise ValueError("expected milliseconds between 1 and 60000")
        return value

    @field_validator("limits_poll_s")
    @classmethod
    def _is_interval(cls, value: float) -> float:
        if value <= 0:
            raise ValueError("expected seconds > 0")
        return value


class MessagesSection(Section):
    """What every hop allows of a message (issue: one size limit, bounded memory)."""

    # The one size limit: what SMTP-In, submission, Filter-Out, SMTP-Out's intake and
    # the LMTP Router announce in SIZE and enforce (552 5.3.4), and what the domains'
    # Postfix (message_size_limit) and Dovecot (lmtp) are rendered with.
    size_limit: int = 52_428_800
    # Where a message past its first 64 KiB waits while a hop handles it (unlinked
    # files); empty: <state_dir>/tmp/messages.  Keep it on a disk, not on tmpfs.
    temporary_dir: str = ""

    @field_validator("size_limit")
    @classmethod
    def _is_size(cls, value: int) -> int:
        if value < 65536:
            raise ValueError("expected at least 65536 bytes")
        return value


class JournalSection(Section):
    """The delivered journals (mailfc.gateways.journal) of the LMTP Router and of
    SMTP-Out's intake: a retry of a message they already took after its reply was
    lost is answered from the journal instead of being delivered again."""

    # An entry lives at least this long (and at most twice as long): it must cover
    # the time from a lost reply to the sender's next successful retry, i.e. an outage
    # of the hop plus the sender's longest backoff (spool.retry_max_s, Postfix's
    # maximal_backoff_time).  Past it a retry is delivered again (a duplicate).
    keep_s: float = 172_800.0
    # At most this many entries in memory (about 120 bytes each); a busier host rotates
    # sooner than keep_s and logs that it did.
    max_entries: int = 500_000

    @field_validator("keep_s")
    @classmethod
    def _is_keep(cls, value: float) -> float:
        if value < 60:
            raise ValueError("expected at least 60 seconds")
        return value

    @field_validator("max_entries")
    @classmethod
    def _is_cap(cls, value: int) -> int:
        if value < 1000:
            raise ValueError("expected at least 1000 entries")
        return value


class LogSection(Section):
    """How the processes log (mailfc.logsetup) and how big a domain container's log
    under <state_dir>/runtime/domains/ may grow (mailfc.runtime.storage.rotate_log)."""

    # "text": `time logger LEVEL message`, as before; "json": one JSON object a line
    # (time, level, logger, process, message, and queue_id on a message's hop lines).
    format: str = "text"
    # DEBUG, INFO, WARNING or ERROR (`mailfc up --verbose` means DEBUG).
    level: str = "INFO"
    # A container's log past this size is rotated when the container starts:
    # <name>.log -> <name>.log.1 -> ... -> <name>.log.<container_log_keep>.
    container_log_max_bytes: int = 10 * 1024 * 1024
    container_log_keep: int = 3

    @field_validator("format")
    @classmethod
    def _is_format(cls, value: str) -> str:
        if value not in ("text", "json"):
            raise ValueError(f'expected "text" or "json", got {value!r}')
        return value

    @field_validator("level")
    @classmethod
    def _is_level(cls, value: str) -> str:
        if value.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ValueError(f"expected DEBUG, INFO, WARNING or ERROR, got {value!r}")
        return value.upper()

    @field_validator("container_log_max_bytes")
    @classmethod
    def _is_log_size(cls, value: int) -> int:
        if value < 4096:
            raise ValueError("expected at least 4096 bytes")
        return value

    @field_validator("container_log_keep")
    @classmethod
    def _is_keep_count(cls, value: int) -> int:
        if not 0 <= value <= 100:
            raise ValueError("expected 0 to 100 old files")
        return value


class MetricsSection(Section):
    """The supervisor's Prometheus and health listener (mailfc.metrics.http)."""

    # GET /metrics, /healthz, /readyz; loopback by default (it tells the traffic).
    listen: str = "127.0.0.1:9810"

    @field_validator("listen")
    @classmethod
    def _is_address(cls, value: str) -> str:
        split_hostport(value)
        return value


class Config(Section):
    paths: PathsSection = PathsSection()
    messages: MessagesSection = MessagesSection()
    journal: JournalSection = JournalSection()
    database: DatabaseSection = DatabaseSection()
    listen: ListenSection = ListenSection()
    dispatcher: DispatcherSection = DispatcherSection()
    host: HostSection = HostSection()
    cluster: ClusterSection = ClusterSection()
    network: NetworkSection = NetworkSection()
    tls: TlsSection = TlsSection()
    imap_router: ImapRouterSection = ImapRouterSection()
    lmtp_router: LmtpRouterSection = LmtpRouterSection()
    submission: SubmissionSection = SubmissionSection()
    runtime: RuntimeSection = RuntimeSection()
    controller: ControllerSection = ControllerSection()
    milter: MilterSection = MilterSection()
    policy: PolicySection = PolicySection()
    recorder: RecorderSection = RecorderSection()
    hooks: HooksSection = HooksSection()
    smtp_in: SmtpInSection = SmtpInSection()
    smtp_in_connections: ConnectionLimitsSection = ConnectionLimitsSection()
    imap_router_connections: ImapConnectionLimitsSection = ImapConnectionLimitsSection()
    submission_connections: ConnectionLimitsSection = ConnectionLimitsSection()
    spool: SpoolSection = SpoolSection()
    filter_in: FilterSection = FilterSection()
    filter_out: FilterSection = FilterSection()
    smtp_out: SmtpOutSection = SmtpOutSection()
    metrics: MetricsSection = MetricsSection()
    log: LogSection = LogSection()

    @property
    def state_dir(self) -> Path:
        return Path(self.paths.state_dir)

    @property
    def container_sockets_dir(self) -> Path:
        """The shared services' sockets the domain containers mount read-only
        (milter, hook server, Filter-Out, SASL; mailfc.runtime.storage)."""
        return self.state_dir / "private" / "sockets"

    @property
    def hops_dir(self) -> Path:
        """The internal hops' unix sockets (listen.smtp_out, lmtp_router as
        "unix:<name>"): a directory only root enters, which no container mounts."""
        return self.state_dir / "private" / "hops"

    def dispatcher_socket(self, service: str) -> Path:
        """The dispatcher's unix socket for routers on its own host (root only)."""
        return self.state_dir / "dispatcher" / f"{service}.sock"

    @property
    def hop_size_limit(self) -> int:
        """What internal hops (Filter-Out, SMTP-Out's intake, the LMTP Router) take: the
        size limit plus room for the trace headers the hops before them add, so a
        message a client was given 250 for is never refused on its way for its size
        (the domains' Postfix gets the same allowance: main.cf.j2)."""
        limit = self.messages.size_limit
        return limit + limit // 64 + 65536

    @property
    def message_dir(self) -> Path:
        """Where hops keep messages too big for memory while handling them."""
        return (Path(self.messages.temporary_dir) if self.messages.temporary_dir
                else self.state_dir / "tmp" / "messages")

    @property
    def journal_dir(self) -> Path:
        """The delivered journals of the hops (mailfc.gateways.journal)."""
        return self.state_dir / "journal"

    @property
    def mail_root(self) -> Path:
        return Path(self.paths.mail_root) if self.paths.mail_root else self.state_dir / "mail"

    @property
    def host_name(self) -> str:
        return self.host.name or socket.gethostname()

    @property
    def uses_embedded_database(self) -> bool:
        return not self.database.dsn


def _describe(error: ValidationError, source: str) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"])
        if item["type"] == "extra_forbidden":
            lines.append(f"{source}: unknown key {key!r}")
        else:
            message = item["msg"].removeprefix("Value error, ")
            lines.append(f"{source}: {key}: {message}")
    return "\n".join(lines)


def parse_config(data: dict[str, Any], source: str = "<config>") -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_describe(error, source)) from None


def load_config(path: str | Path | None = None) -> Config:
    """Load the configuration from `path`, $MAILFC_CONFIG, or the defaults."""
    if path is None:
        path = os.environ.get(CONFIG_ENV) or None
    if path is None:
        return Config()
    path = Path(path)
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file (check --config or ${CONFIG_ENV})") from None
    except OSError as error:
        raise ConfigError(f"{path}: cannot read: {error.strerror}") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML: {error}") from None
    return parse_config(data, str(path))


def render_toml(config: Config) -> str:
    """The effective configuration as TOML, one table per section."""
    lines: list[str] = []
    for section_name, section in config.model_dump().items():
        if lines:
            lines.append("")
        lines.append(f"[{section_name}]")
        for key, value in section.items():
            lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'
