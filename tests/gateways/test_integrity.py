"""Mail integrity on a whole platform: a flood, and kill -9 of mailfc's processes under load.

Every message carries a unique X-Mark header; what the maildir (inbound) or the remote MX
(outbound) holds is counted by it.  A message is "accepted" when its client got 250 at the
end of data; an attempt that was refused, or whose reply never came (the connection died
with the process), is tried again as a new message with a new mark, as a client would.
Accepted messages must arrive exactly once; no message at all may arrive twice (a kill of
a mailfc process must never duplicate; Dovecot and Postfix are not killed here).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from bench.platform import (
    ACCEPTED,
    UNKNOWN,
    dot_stuffed,
    send_message,
    trusting_client_tls,
)
from tests.gateways.whole_platform import PASSWORD, WholePlatform, message, until, whole_platform

DOMAIN = "integrity.example"
USER = f"ida@{DOMAIN}"
SENDER = "someone@remote.example"


@pytest.fixture(scope="module")
async def platform(state_dir: Path) -> AsyncIterator[WholePlatform]:
    async with whole_platform(state_dir, "mfci", "10.98.0.0/24", 25000, DOMAIN,
                              ("ida", "ian")) as running:
        yield running


@dataclass
class Ledger:
    """Each attempt's mark and outcome."""

    outcomes: dict[str, str] = field(default_factory=dict)
    replies: collections.Counter[str] = field(default_factory=collections.Counter)

    def accepted(self) -> set[str]:
        return {mark for mark, outcome in self.outcomes.items() if outcome == ACCEPTED}

    def unknown(self) -> set[str]:
        return {mark for mark, outcome in self.outcomes.items() if outcome == UNKNOWN}

    def record(self, mark: str, outcome: str, reply: str) -> None:
        self.outcomes[mark] = outcome
        if outcome != ACCEPTED:
            self.replies[f"{outcome}: {reply[:70]}"] += 1


async def load(send: Callable[[str], Awaitable[tuple[str, str]]], prefix: str,
               messages: int, senders: int, ledger: Ledger, *, pause_s: float = 0.0,
               keep_going: Callable[[], bool] = lambda: False, retries: int = 100,
               explain: Callable[[], str] = lambda: "") -> None:
    """`senders` concurrent clients until `messages` messages were accepted (and while
    keep_going()); a message not accepted is tried again under a new mark."""
    numbers = itertools.count()

    async def sender() -> None:
        while True:
            n = next(numbers)
            if n >= messages and not keep_going():
                return
            for attempt in range(retries):
                mark = f"{prefix}-{n}-{attempt}"
                outcome, reply = await send(mark)
                ledger.record(mark, outcome, reply)
                if outcome == ACCEPTED:
                    break
                await asyncio.sleep(0.2)
            else:
                raise AssertionError(f"message {n} was never accepted: {reply}" + explain())
            await asyncio.sleep(pause_s)

    await asyncio.gather(*(sender() for _ in range(senders)))


def inbound(platform: WholePlatform, recipient: str) -> Callable[[str], Awaitable[tuple[str, str]]]:
    async def send(mark: str) -> tuple[str, str]:
        return await send_message("127.0.0.1", platform.smtp_in, SENDER, [recipient],
                                  dot_stuffed(message(mark, SENDER, recipient)), timeout_s=60)
    return send


def outbound(platform: WholePlatform, user: str, recipient: str
             ) -> Callable[[str], Awaitable[tuple[str, str]]]:
    tls = trusting_client_tls()

    async def send(mark: str) -> tuple[str, str]:
        return await send_message("127.0.0.1", platform.submission, user, [recipient],
                                  dot_stuffed(message(mark, user, recipient)), tls=tls,
                                  login=(user, PASSWORD), timeout_s=60)
    return send


def check_exactly_once(ledger: Ledger, arrived: collections.Counter[str], where: str,
                       explain: str) -> None:
    accepted = ledger.accepted()
    lost = sorted(accepted - set(arrived))
    twice = {mark: count for mark, count in arrived.items() if count > 1}
    strangers = set(arrived) - set(ledger.outcomes)
    unacknowledged = set(arrived) - accepted
    print(f"{where}: {len(accepted)} accepted, {len(ledger.unknown())} without a reply"
          f" ({len(ledger.unknown() & set(arrived))} of them delivered), "
          f"{len(ledger.outcomes) - len(accepted) - len(ledger.unknown())} refused;"
          f" {sum(arrived.values())} delivered; {dict(ledger.replies.most_common(4))}")
    assert not lost, f"{len(lost)} accepted messages never reached {where}: {lost[:10]}" \
        + explain
    assert not twice, f"messages in {where} more than once: {dict(list(twice.items())[:10])}" \
        + explain
    assert not strangers, f"messages nobody sent in {where}: {sorted(strangers)[:10]}"
    # A message whose reply was lost with a killed process may or may not be there: it
    # counts as neither lost nor duplicate, but only those may arrive unacknowledged.
    assert unacknowledged <= ledger.unknown(), \
        f"messages refused with a reply, yet delivered: {sorted(unacknowledged)[:10]}"


async def settled(count: Callable[[], collections.Counter[str]], expected: set[str],
                  within_s: float) -> collections.Counter[str]:
    """Wait until every expected mark arrived, then a moment longer (a duplicate comes
    late: after a retry), and return the final counts."""
    await until(lambda: expected <= set(count()), within_s)
    await asyncio.sleep(3.0)
    return await asyncio.to_thread(count)


async def test_flood_to_one_domain_arrives_exactly_once(platform: WholePlatform) -> None:
    # Warm: the domain's Dovecot starts with its first delivery (not what is measured).
    warm = Ledger()
    await load(inbound(platform, USER), "warm", 1, 1, warm, retries=20,
               explain=platform.explain)
    assert await until(lambda: warm.accepted() <= set(platform.marks(USER)), 60), \
        "the warm-up message did not arrive" + platform.explain()

    ledger = Ledger()
    began = time.monotonic()
    # No retries: without a fault, a flood must be accepted, every message at once.
    await load(inbound(platform, USER), "flood", 2000, 50, ledger, retries=1,
               explain=platform.explain)
    accepting = time.monotonic() - began
    assert len(ledger.accepted()) == 2000, ledger.replies
    arrived = await settled(lambda: platform.marks(USER), ledger.accepted(), 90)
    check_exactly_once(ledger, collections.Counter(
        {mark: count for mark, count in arrived.items() if mark.startswith("flood-")}),
        "the maildir", platform.explain())
    print(f"flood: 2000 messages accepted in {accepting:.1f} s, delivered in "
          f"{time.monotonic() - began:.1f} s")


async def test_kill_9_of_inbound_processes_under_load(platform: WholePlatform) -> None:
    ledger = Ledger()
    faults_done = asyncio.Event()
    # SMTP-In, the LMTP Router's process and (while it exists) Filter-In's.
    victims = [name for name in ("inbound", "filter", "routers")
               if name in platform.up.processes()]
    assert "inbound" in victims and "routers" in victims, platform.up.processes()

    async def faults() -> None:
        try:
            for name in victims:
                await asyncio.sleep(1.5)
                await platform.up.kill_and_wait(name)
        finally:
            faults_done.set()

    fault_task = asyncio.create_task(faults())
    await load(inbound(platform, USER), "fault", 300, 20, ledger, pause_s=0.2,
               keep_going=lambda: not faults_done.is_set(), explain=platform.explain)
    await fault_task
    arrived = await settled(lambda: platform.marks(USER), ledger.accepted(), 60)
    check_exactly_once(ledger, collections.Counter(
        {mark: count for mark, count in arrived.items() if mark.startswith("fault-")}),
        "the maildir", platform.explain())
    assert len(ledger.accepted()) >= 300


async def test_kill_9_of_outbound_processes_under_load(platform: WholePlatform) -> None:
    """Submission -> the domain's Postfix -> Filter-Out -> SMTP-Out -> remote MX, with the
    outbound process (Filter-Out and SMTP-Out) and the submission router killed."""
    sender = f"ian@{DOMAIN}"
    warm = Ledger()
    await load(outbound(platform, sender, "warm@remote.example"), "out-warm", 1, 1, warm,
               retries=20, explain=platform.explain)
    assert await until(lambda: warm.accepted() <= set(platform.sink.marks()), 60), \
        "the warm-up submission did not reach the remote MX" + platform.explain()

    ledger = Ledger()
    faults_done = asyncio.Event()

    async def faults() -> None:
        try:
            for name in ("outbound", "submission", "outbound"):
                await asyncio.sleep(1.5)
                await platform.up.kill_and_wait(name)
        finally:
            faults_done.set()

    fault_task = asyncio.create_task(faults())
    await load(outbound(platform, sender, "friend@remote.example"), "out", 100, 8, ledger,
               pause_s=0.2, keep_going=lambda: not faults_done.is_set(),
               explain=platform.explain)
    await fault_task

    def sunk() -> collections.Counter[str]:
        return collections.Counter({mark: count for mark, count in platform.sink.marks().items()
                                    if mark.startswith("out-") and
                                    not mark.startswith("out-warm")})

    arrived = await settled(sunk, ledger.accepted(), 60)
    check_exactly_once(ledger, arrived, "the remote MX", platform.explain())
