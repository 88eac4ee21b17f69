"""Fairness in the shared resident parts: one domain must not slow the others.

Per-domain containers isolate only what runs inside them; the resident services
work for every domain.  Two tools keep one domain from taking them over.

PER-KEY CAPS (PerKeyLimit)
    A service that works for every domain through one bounded resource (a database
    pool, connections towards containers) caps how many holders one key (a domain)
    may have at once; that key's waiters wait on it alone, never in a shared FIFO.
    Keys without holder or waiter are forgotten: tens of thousands of quiet domains
    cost nothing.

        limit = PerKeyLimit(3)
        async with limit.slot("a.example"):
            ...
        async with limit.slot("b.example", per_key=5):     # a cap of its own
            ...

ADMISSION UNDER PRESSURE (Admission)
    A domain flooding within its own limits (5 sends at once, back to back; two
    heavy IMAP commands at once, back to back) still spends the shared parts' CPU on
    every request: router TLS, dispatcher, milter, hook server, database,
    Filter-Out, SMTP-Out.  On a full host every other domain then waits for a CPU
    behind that work.  While the host is short of CPU, the domains asking for more
    than their fair share wait for their turn ("limit only when needed"): the
    submission router's new sessions, the hook server's heavy IMAP commands,
    SMTP-In's recipients (per recipient domain, at RCPT).

PRESSURE
    Every interval_s, the kernel's CPU pressure over the last interval (PSI,
    /proc/pressure/cpu "some": the share of time in which runnable tasks waited for
    a CPU).  No PSI (kernel without it): admission never holds anyone.

RATES (per domain, additive increase, multiplicative decrease)
    A domain's demand in an interval: the requests it made then plus those still
    waiting for their turn.  The fair share: all demand / the domains present (with
    demand, or named by the caller as present: the hook server names the domains
    with open IMAP sessions).  Pressure above `target`: each domain whose demand is
    above the fair share and above twice min_rate gets a rate of requests per
    second: min(its current rate, what it asked for) x min(DECREASE, target /
    pressure), at least min_rate (the further over the target, the deeper the cut,
    at most to a quarter per interval, so a flood is spaced out within seconds).
    Pressure below target / 2: each rated domain's rate grows by `increase` per
    interval; once that is more than twice what it asks for, it is no longer rated.
    Waiting requests count in the demand, so a spaced-out flood keeps its share
    large and a quiet domain never looks like it.

TURNS
    An unrated domain's request passes at once.  A rated domain's requests take
    tokens from a bucket filled at its rate (holding at most a second's worth), in
    arrival order; one that waits longer than max_wait_s is refused (the router
    and SMTP-In answer 451 4.7.1, the hook server NO [LIMIT]; clients try again
    later).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("mailfc.fairness")


class _Key:
    __slots__ = ("semaphore", "users")

    def __init__(self, per_key: int) -> None:
        self.semaphore = asyncio.Semaphore(per_key)
        self.users = 0          # holders and waiters


class PerKeyLimit:
    def __init__(self, per_key: int) -> None:
        if per_key < 1:
            raise ValueError("per_key must be at least 1")
        self.per_key = per_key
        self._keys: dict[str, _Key] = {}

    @contextlib.asynccontextmanager
    async def slot(self, key: str, per_key: int | None = None) -> AsyncIterator[None]:
        """Hold one of `key`'s slots.  `per_key` overrides the cap for a key that
        nobody holds yet (a key's cap is fixed while it is in use)."""
        entry = self._keys.get(key)
        if entry is None:
            entry = self._keys[key] = _Key(max(1, per_key or self.per_key))
        entry.users += 1
        try:
            async with entry.semaphore:
                yield
        finally:
            entry.users -= 1
            if entry.users == 0:
                del self._keys[key]

    def in_use(self, key: str) -> int:
        """Holders and waiters of `key` (0 for a key nobody uses)."""
        entry = self._keys.get(key)
        return entry.users if entry else 0


PSI_CPU = Path("/proc/pressure/cpu")
DECREASE = 0.7
DEEPEST_CUT = 0.25


def read_stall_us(path: Path = PSI_CPU) -> int | None:
    """The kernel's running total of CPU stall time ("some"), in microseconds."""
    try:
        first = path.read_text().splitlines()[0]
    except (OSError, IndexError):
        return None
    for word in first.split():
        if word.startswith("total="):
            return int(word[6:])
    return None


@dataclass
class Bucket:
    rate: float                 # sessions per second
    tokens: float = 1.0
    filled_at: float = field(default_factory=time.monotonic)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def take_wait(self, now: float) -> float:
        """Take a token now (0.0) or say how long until one is due."""
        self.tokens = min(max(1.0, self.rate), self.tokens + (now - self.filled_at) * self.rate)
        self.filled_at = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


class Admission:
    def __init__(self, *, target: float = 0.15, min_rate: float = 1.0, increase: float = 1.0,
                 max_wait_s: float = 30.0, interval_s: float = 1.0,
                 psi: Path = PSI_CPU) -> None:
        self.target = target
        self.min_rate = min_rate
        self.increase = increase
        self.max_wait_s = max_wait_s
        self.interval_s = interval_s
        self.psi = psi
        self.buckets: dict[str, Bucket] = {}
        self.opened: Counter[str] = Counter()
        self.waiting: Counter[str] = Counter()
        # Domains that count in the fair share without asking (see RATES).
        self.present: Callable[[], set[str]] = set
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if read_stall_us(self.psi) is None:
            log.warning("no CPU pressure information (%s): sessions are admitted without "
                        "regard to the host's load", self.psi)
            return
        self._task = asyncio.create_task(self._watch())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def admit(self, domain: str) -> bool:
        """Wait for `domain`'s turn; False when it does not come within max_wait_s."""
        if self._task is None:
            return True         # not watching the pressure (no PSI, or not started)
        self.opened[domain] += 1
        bucket = self.buckets.get(domain)
        if bucket is None:
            return True
        deadline = time.monotonic() + self.max_wait_s
        self.waiting[domain] += 1
        try:
            async with asyncio.timeout(self.max_wait_s), bucket.lock:
                while (wait := bucket.take_wait(time.monotonic())) > 0:
                    if time.monotonic() + wait > deadline:
                        return False
                    await asyncio.sleep(wait)
        except TimeoutError:
            return False
        finally:
            self.waiting[domain] -= 1
            if not self.waiting[domain]:
                del self.waiting[domain]
        return True

    def adjust(self, pressure: float, interval_s: float) -> None:
        """One step of the rates from the pressure of the last interval."""
        opened, self.opened = self.opened, Counter()
        demand = opened + self.waiting
        if pressure > self.target and demand:
            fair = sum(demand.values()) / len(set(demand) | self.present())
            for domain, count in demand.items():
                if count <= fair or count <= 2 * self.min_rate * interval_s:
                    continue
                asked = opened.get(domain, 0) / interval_s
                bucket = self.buckets.get(domain)
                cut = max(DEEPEST_CUT, min(DECREASE, self.target / pressure))
                rate = max(self.min_rate, cut * min(asked, bucket.rate if bucket else asked))
                if bucket is None:
                    log.info("CPU pressure %.0f%%: %s, %d sessions in %.0fs (fair share %.1f),"
                             " now %.1f new sessions/s", pressure * 100, domain, count,
                             interval_s, fair, rate)
                    self.buckets[domain] = Bucket(rate)
                else:
                    bucket.rate = rate
        elif pressure < self.target / 2:
            for domain in list(self.buckets):
                bucket = self.buckets[domain]
                bucket.rate += self.increase
                if bucket.rate > 2 * max(1.0, opened.get(domain, 0) / interval_s) \
                        and not bucket.lock.locked():
                    log.info("CPU pressure %.0f%%: %s admitted freely again", pressure * 100,
                             domain)
                    del self.buckets[domain]

    async def _watch(self) -> None:
        last_stall = read_stall_us(self.psi)
        last = time.monotonic()
        while True:
            await asyncio.sleep(self.interval_s)
            stall, now = read_stall_us(self.psi), time.monotonic()
            if stall is None or last_stall is None:
                last_stall, last = stall, now
                continue
            elapsed = now - last
            self.adjust(min(1.0, (stall - last_stall) / 1e6 / elapsed), elapsed)
            last_stall, last = stall, now
