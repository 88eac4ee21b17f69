"""mailfc.anvil without sockets: who counts as one client, the count, the rate, exempt
networks, and that releasing gives the place back."""

from __future__ import annotations

import pytest

from mailfc.anvil import COUNT, IMAP_REFUSAL, RATE, Anvil, client_of
from mailfc.config import Config, ConnectionLimitsSection, parse_config
from mailfc.errors import ConfigError


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def anvil(clock: Clock | None = None, **limits: object) -> Anvil:
    return Anvil("test", ConnectionLimitsSection.model_validate(limits), host="mx.test",
                 clock=clock or Clock())


@pytest.mark.parametrize(("address", "client"), [
    ("192.0.2.7", "192.0.2.7"),
    ("::ffff:192.0.2.7", "192.0.2.7"),
    ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
    ("2001:db8:1:2:ffff::9%eth0", "2001:db8:1:2::/64"),
    ("/run/some.sock", None),
    ("", None),
])
def test_who_counts_as_one_client(address: str, client: str | None) -> None:
    assert client_of(address) == client


def test_count_refuses_past_the_limit_and_release_gives_the_place_back() -> None:
    counts = anvil(max_per_client=3, max_rate_per_client=0)
    tickets = [counts.connect("192.0.2.1") for _ in range(3)]
    assert all(t.refusal is None for t in tickets)
    over = counts.connect("::ffff:192.0.2.1")       # the same client, mapped
    assert over.refusal == COUNT and over.client == "192.0.2.1"
    assert counts.connect("192.0.2.2").refusal is None   # another client is served
    over.release()                                   # a refusal held no place
    assert counts.open_count("192.0.2.1") == 3
    tickets[0].release()
    tickets[0].release()                             # twice: once
    assert counts.open_count("192.0.2.1") == 2
    assert counts.connect("192.0.2.1").refusal is None


def test_an_ipv6_site_counts_as_its_slash_64() -> None:
    counts = anvil(max_per_client=2, max_rate_per_client=0)
    assert counts.connect("2001:db8::1").refusal is None
    assert counts.connect("2001:db8::2").refusal is None
    assert counts.connect("2001:db8::ffff:3").refusal == COUNT
    assert counts.connect("2001:db8:0:1::1").refusal is None     # the next /64


def test_rate_counts_attempts_per_window() -> None:
    clock = Clock()
    counts = anvil(clock, max_per_client=0, max_rate_per_client=5, rate_window_s=60.0)
    for _ in range(5):
        counts.connect("198.51.100.9").release()
    assert counts.connect("198.51.100.9").refusal == RATE
    clock.now += 59.0
    assert counts.connect("198.51.100.9").refusal == RATE   # hammering: still refused
    clock.now += 1.0                                         # the window is over
    assert counts.connect("198.51.100.9").refusal is None


def test_exempt_networks_are_never_counted() -> None:
    counts = anvil(max_per_client=1, exempt_networks=["127.0.0.0/8", "2001:db8::/48"])
    held = [counts.connect("127.0.0.1") for _ in range(10)]
    held += [counts.connect("::ffff:127.0.0.5") for _ in range(10)]
    held += [counts.connect("2001:db8::7") for _ in range(10)]
    assert all(t.refusal is None for t in held)
    assert counts.clients == {}
    assert counts.connect("192.0.2.1").refusal is None
    assert counts.connect("192.0.2.1").refusal == COUNT


def test_idle_clients_are_forgotten() -> None:
    clock = Clock()
    counts = anvil(clock, rate_window_s=10.0)
    for index in range(100):
        counts.connect(f"10.0.{index}.1").release()
    held = counts.connect("10.1.0.1")
    clock.now += 10.0
    counts.connect("10.2.0.1")
    assert set(counts.clients) == {"10.1.0.1", "10.2.0.1"}   # open or in a live window
    held.release()


def test_refusal_lines_and_defaults() -> None:
    config = Config()
    smtp = Anvil.for_service(config, "smtp-in")
    assert smtp.refusal_line("192.0.2.1") == (
        f"421 4.7.0 {config.host_name} Error: too many connections from 192.0.2.1\r\n"
        .encode())
    imap = Anvil.for_service(config, "imap-router")
    assert imap.refusal_line("192.0.2.1") == IMAP_REFUSAL.encode() + b"\r\n"
    assert Anvil.for_service(config, "submission-router").dialect == "smtp"
    # Postfix's anvil: 50 at once; the rate limit on, none exempt.
    assert config.smtp_in_connections.max_per_client == 50
    assert config.submission_connections.max_per_client == 50
    assert config.imap_router_connections.max_per_client == 100
    assert config.smtp_in_connections.max_rate_per_client == 100
    assert config.smtp_in_connections.rate_window_s == 60.0
    assert config.smtp_in_connections.exempt_networks == []


def test_bad_configuration_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"smtp_in_connections\.exempt_networks"):
        parse_config({"smtp_in_connections": {"exempt_networks": ["not a network"]}})
    with pytest.raises(ConfigError, match=r"imap_router_connections\.max_per_client"):
        parse_config({"imap_router_connections": {"max_per_client": -1}})
