"""Grants of commands counted ahead: exact near a limit, growing with a busy session."""

from __future__ import annotations

from mailfc.policy.engine import SHADOW, TEMPFAIL, Check, Decision, Usage
from mailfc.policy.hooks.grants import GRANT_S, MAX_GRANT, Grants

NAME = "UID SEARCH"
KINDS = ["imap_commands", "imap_search"]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def counted(limit: int, used: int, *decisions: Decision) -> Check:
    usage = (Usage("account", "account:bob@example.org", "imap_search", limit, 60, "enforce",
                   used),)
    return Check(not any(d.refuses for d in decisions), decisions, (), usage)


def ask(grants: Grants, clock: Clock, limit: int, used: int, *decisions: Decision) -> int:
    """One CMD of a session asking every 10 ms: the grant it is sent."""
    clock.now += 0.01
    return grants.counted(NAME, grants.size(NAME), counted(limit, used, *decisions), KINDS)


def test_a_busy_session_far_from_its_limit_gets_growing_bounded_grants() -> None:
    clock = Clock()
    grants = Grants(clock)
    sent = [ask(grants, clock, 10**6, n * 40) for n in range(10)]
    assert sent[:7] == [0, 1, 2, 4, 8, 16, 32]
    assert max(sent) == MAX_GRANT


def test_near_a_limit_every_command_is_counted_alone() -> None:
    clock = Clock()
    grants = Grants(clock)
    assert [ask(grants, clock, 3, used) for used in range(3)] == [0, 0, 0]
    # Grants are at most an eighth of what the limit has left.
    grants = Grants(clock)
    sent = [ask(grants, clock, 100, 20 + n) for n in range(8)]
    assert all(g <= (100 - 20 - n - 1) // 8 for n, g in enumerate(sent))


def test_a_slow_session_is_never_granted() -> None:
    clock = Clock()
    grants = Grants(clock)
    for _ in range(5):
        clock.now += GRANT_S + 0.5
        assert grants.counted(NAME, grants.size(NAME), counted(10**6, 0), KINDS) == 0


def test_a_limit_change_or_a_decision_starts_from_exact_counting() -> None:
    clock = Clock()
    grants = Grants(clock)
    for n in range(6):
        ask(grants, clock, 10**6, n)
    assert grants.size(NAME) > 0
    grants.clear()
    assert grants.size(NAME) == 0
    for n in range(6):
        ask(grants, clock, 10**6, n)
    shadow = Decision(TEMPFAIL, "over", "limit:imap_search", SHADOW)
    assert ask(grants, clock, 10**6, 0, shadow) == 0
    assert grants.size(NAME) == 0
    refused = Decision(TEMPFAIL, "over", "limit:imap_search")
    assert ask(grants, clock, 10**6, 0, refused) == 0
