"""The login throttle's rules, on a clock the test moves (mailfc.routers.throttle)."""

from __future__ import annotations

import datetime
import ipaddress

import pytest

from mailfc.db import bans
from mailfc.errors import InvalidInput
from mailfc.routers.throttle import LoginThrottle, ThrottleLimits, account_key

A, B = "192.0.2.1", "192.0.2.2"
BOB = "bob@a.example"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def throttle(**limits: float) -> tuple[LoginThrottle, Clock]:
    clock = Clock()
    return LoginThrottle(ThrottleLimits(**limits), clock), clock  # type: ignore[arg-type]


@pytest.mark.parametrize("typed", [
    "bob@a.example", "BOB@A.Example", "bob@a.example.", " bob@a.example ", "bob\t@a.example",
    "bob@\uff41.example",       # a full-width "a" (NFKC through IDNA)
    "Bob@A.EXAMPLE.\t",
])
def test_name_variants_share_one_key(typed: str) -> None:
    assert account_key(typed) == BOB


def test_a_name_that_is_no_address_keys_on_its_text() -> None:
    assert account_key("  Not-An-Address ") == "not-an-address"


def test_the_account_count_only_delays() -> None:
    guard, _ = throttle(account_delay_after=3, account_delay_s=0.5, account_delay_max_s=2.0,
                        max_failures_per_pair=100, max_failures_per_ip=100)
    delays = []
    for _ in range(8):
        delays.append(guard.check(A, BOB).delay_s)
        guard.failed(A, BOB)
    assert delays == [0.0, 0.0, 0.0, 0.5, 1.0, 2.0, 2.0, 2.0]
    # Another address: not refused, same delay, and clean (so its right
    # password is checked at once; only its failure waits).
    verdict = guard.check(B, BOB)
    assert verdict.refused is None and verdict.clean and verdict.delay_s == 2.0


def test_pair_and_address_limits_refuse_only_that_address() -> None:
    guard, _ = throttle(max_failures_per_pair=3, max_failures_per_ip=5, spray_accounts=100)
    for _ in range(3):
        assert guard.check(A, BOB).refused is None
        guard.failed(A, BOB)
    assert guard.check(A, BOB).refused == "pair"
    assert guard.check(A, "carol@a.example").refused is None
    assert guard.check(B, BOB).refused is None
    guard.failed(A, "carol@a.example")
    guard.failed(A, "dave@a.example")
    assert guard.check(A, "erin@a.example").refused == "address"
    assert guard.check(B, "erin@a.example").refused is None


def test_failures_age_out_of_the_window() -> None:
    guard, clock = throttle(window_s=60, max_failures_per_pair=2, account_delay_after=1)
    guard.failed(A, BOB)
    guard.failed(A, BOB)
    assert guard.check(A, BOB).refused == "pair"
    clock.now += 61
    verdict = guard.check(A, BOB)
    assert verdict.refused is None and verdict.clean and verdict.delay_s == 0.0


def test_refusals_keep_the_guesser_out_but_do_not_delay_the_owner() -> None:
    guard, clock = throttle(window_s=60, max_failures_per_pair=2, account_delay_after=2)
    guard.failed(A, BOB)
    guard.failed(A, BOB)
    # Trying on faster than the limit per window, past the window's end too.
    for _ in range(20):
        clock.now += 10
        assert guard.check(A, BOB).refused == "pair"
        guard.failed(A, BOB, checked=False)     # refused unchecked: counts for A only
    assert guard.account_delay(BOB) == 0.0


def test_in_flight_checks_count_against_the_address() -> None:
    guard, _ = throttle(max_failures_per_ip=3)
    for _ in range(3):
        assert guard.check(A, BOB).refused is None
        guard.begin(A)
    assert guard.check(A, BOB).refused == "address"
    guard.end(A)
    assert guard.check(A, BOB).refused is None


def test_success_forgets_the_address_failures_for_that_account_only() -> None:
    guard, _ = throttle(account_delay_after=1)
    guard.failed(A, BOB)
    guard.failed(A, "carol@a.example")
    guard.succeeded(A, BOB)
    assert not guard.check(A, "x@a.example").clean       # carol's failure stays
    guard.succeeded(A, "carol@a.example")
    assert guard.check(A, BOB).clean
    # The account's own count stays: an attacker's guesses go on counting.
    assert guard.account_delay(BOB) > 0


def test_distinct_accounts_per_address_reveal_spraying() -> None:
    guard, _ = throttle(spray_accounts=3, max_failures_per_ip=100)
    assert guard.failed(A, BOB) == 1
    assert guard.failed(A, account_key("BOB@a.example.")) == 1
    assert guard.failed(A, "carol@a.example") == 2
    assert guard.failed(A, "dave@a.example") == 3
    assert guard.failed(B, BOB) == 1


def test_memory_per_address_is_bounded() -> None:
    guard, _ = throttle(max_failures_per_ip=5, spray_accounts=5)
    for number in range(1000):
        guard.failed(A, f"user{number}@a.example", checked=False)
    assert len(guard._by_address[A]) == 20


def test_ban_matching() -> None:
    now = datetime.datetime.now(datetime.UTC)
    later = now + datetime.timedelta(hours=1)
    found = bans.Bans(
        {"192.0.2.7": bans.Ban(bans.parse_target("192.0.2.7"), "r", "auto", later),
         "192.0.2.8": bans.Ban(bans.parse_target("192.0.2.8"), "r", "auto",
                               now - datetime.timedelta(seconds=1))},
        (bans.Ban(bans.parse_target("198.51.100.0/24"), "net", "admin", None),
         bans.Ban(bans.parse_target("2001:db8::/32"), "net6", "admin", None)))
    assert found.match("192.0.2.7") is not None
    assert found.match("192.0.2.8") is None                   # expired
    assert found.match("198.51.100.200") is not None
    assert found.match("::ffff:198.51.100.1") is not None     # IPv4-mapped
    assert found.match("2001:db8::5") is not None
    assert found.match("192.0.2.9") is None
    assert found.match("not an address") is None
    more = found.with_ban(bans.Ban(bans.parse_target("192.0.2.9"), "r", "auto", later))
    assert more.match("192.0.2.9") is not None and found.match("192.0.2.9") is None


def test_ban_targets() -> None:
    assert bans.show(bans.parse_target(" 192.0.2.7 ")) == "192.0.2.7"
    assert bans.show(bans.parse_target("::ffff:192.0.2.7")) == "192.0.2.7"
    assert bans.parse_target("192.0.2.0/24") == ipaddress.ip_network("192.0.2.0/24")
    for wrong in ("192.0.2.7/24", "example.org", "", "300.1.1.1"):
        with pytest.raises(InvalidInput):
            bans.parse_target(wrong)
