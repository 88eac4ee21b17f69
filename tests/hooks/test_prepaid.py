"""Prepaid commands: exact near a limit, batched far from it, never for slow sessions."""

from __future__ import annotations

from mailfc.policy.engine import SHADOW, TEMPFAIL, Check, Decision, Usage
from mailfc.policy.hooks.prepaid import MAX_EXTRA, TTL_S, Prepaid

KEY = ("account bob@example.org", ("imap_search",))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def counted(limit: int, used: int, *decisions: Decision) -> Check:
    usage = (Usage("account", "account:bob@example.org", "imap_search", limit, 60, "enforce",
                   used),)
    return Check(not any(d.refuses for d in decisions), decisions, (), usage)


def busy(prepaid: Prepaid, clock: Clock, commands: int) -> None:
    """`commands` asked within one second, each counted alone."""
    for _ in range(commands):
        clock.now += 0.01
        assert not prepaid.take(KEY)


def test_near_a_limit_every_command_is_counted_alone() -> None:
    clock = Clock()
    prepaid = Prepaid(clock)
    busy(prepaid, clock, 50)
    prepaid.paid(KEY, 0, counted(limit=3, used=0), ["imap_search"])
    assert prepaid.extra(KEY) == 0
    assert not prepaid.take(KEY)


def test_a_busy_account_far_from_its_limit_prepays_a_bounded_batch() -> None:
    clock = Clock()
    prepaid = Prepaid(clock)
    busy(prepaid, clock, 50)
    prepaid.paid(KEY, 0, counted(limit=10**6, used=100), ["imap_search"])
    extra = prepaid.extra(KEY)
    assert extra == MAX_EXTRA
    prepaid.paid(KEY, extra, counted(limit=10**6, used=101), ["imap_search"])
    assert all(prepaid.take(KEY) for _ in range(extra))
    assert not prepaid.take(KEY)          # the batch is used up: ask again


def test_the_batch_is_a_fraction_of_the_headroom_and_of_the_recent_rate() -> None:
    clock = Clock()
    prepaid = Prepaid(clock)
    busy(prepaid, clock, 5)
    prepaid.paid(KEY, 0, counted(limit=1000, used=0), ["imap_search"])
    assert prepaid.extra(KEY) == 4                    # 5 seen in the last second
    busy(prepaid, clock, 50)
    prepaid.paid(KEY, 0, counted(limit=100, used=20), ["imap_search"])
    assert prepaid.extra(KEY) == (100 - 20 - 1) // 8


def test_a_slow_session_never_prepays() -> None:
    clock = Clock()
    prepaid = Prepaid(clock)
    for _ in range(10):
        clock.now += 5
        assert not prepaid.take(KEY)
        prepaid.paid(KEY, prepaid.extra(KEY), counted(limit=10**6, used=0), ["imap_search"])
        assert prepaid.extra(KEY) == 0


def test_prepaid_commands_expire_and_a_limit_change_drops_them() -> None:
    clock = Clock()
    prepaid = Prepaid(clock)
    busy(prepaid, clock, 50)
    prepaid.paid(KEY, 10, counted(limit=10**6, used=0), ["imap_search"])
    assert prepaid.take(KEY)
    clock.now += TTL_S + 0.1
    assert not prepaid.take(KEY)
    prepaid.paid(KEY, 10, counted(limit=10**6, used=0), ["imap_search"])
    prepaid.clear()
    assert not prepaid.take(KEY)


def test_a_shadow_decision_or_a_refusal_prepays_nothing() -> None:
    clock = Clock()
    prepaid = Prepaid(clock)
    busy(prepaid, clock, 50)
    shadow = Decision(TEMPFAIL, "over", "limit:imap_search", SHADOW)
    prepaid.paid(KEY, 10, counted(10**6, 0, shadow), ["imap_search"])
    assert not prepaid.take(KEY)
    assert prepaid.extra(KEY) == 0
    refused = Decision(TEMPFAIL, "over", "limit:imap_search")
    prepaid.paid(KEY, 10, counted(10**6, 0, refused), ["imap_search"])
    assert not prepaid.take(KEY)
