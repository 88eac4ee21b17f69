"""Login throttling for the routers: slow the guesser, never lock out the owner.

NAME
    LoginThrottle: failed logins counted per client address, per (address,
    account) and per account, in a sliding window (LoginSection.failure_window_s).

DESCRIPTION
    `check(address, account)` before the password is checked says one of:
        refused      the address is past max_failures_per_ip, or the pair
                     (address, account) past max_failures_per_pair: refuse
                     without checking (no Argon2 time spent, nothing learnt);
        delay_s      the account's growing delay: 0 below account_delay_after
                     failures of the account, then account_delay_s doubling
                     per further failure, up to account_delay_max_s;
        clean        the address has no recent failure.
    The router (mailfc.routers.listeners) checks a clean address's password at
    once and makes only its failure wait delay_s; an address with failures of
    its own waits delay_s before its password is checked.  So the account's count,
    which anyone can raise, only slows guessing: the owner, from an address of
    theirs with no failures, logs in at once with the right password.
    `failed(address, account)` counts a failure and answers how many distinct
    accounts the address failed for in the window: spray_accounts or more is
    password spraying, which the router turns into a ban (mailfc.db.bans).
    Refusals of an address past its limits count for it too (a persistent
    guesser stays refused) but not for the account: refused attempts guess nothing.
    `succeeded` forgets the address's failures for that account (the owner's
    own typo), not the account's count (the attacker goes on guessing).
    Checks in flight count against the address limit, so a burst of parallel
    guesses cannot outrun the count.

ACCOUNT NAMES
    Counters key on `account_key(username)`: the name the directory looks up
    (mailfc.addresses.normalize_address, which Directory.account applies through
    split_address: whitespace, case, trailing dot of the domain, IDNA/NFKC),
    so `Carol@T1.sec.test.` counts against carol@t1.sec.test.

MEMORY
    In process: each router instance counts what it sees (the bans are shared
    through PostgreSQL).  Per address at most a few times its limit of stamps is
    kept; past MAX_KEYS addresses or accounts the stalest are forgotten.

BANS
    `BanList`: the active bans (mailfc.db.bans), read again every
    login.ban_refresh_s; `add` writes a router's own ban to PostgreSQL (so every
    router and `mailfc ban list` see it) and applies it here at once.  When
    the database cannot be written the ban still holds in this process until
    the next read.
"""

from __future__ import annotations

import asyncio
import collections
import datetime
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import asyncpg

from mailfc.addresses import normalize_address
from mailfc.config import LoginSection
from mailfc.db import bans
from mailfc.errors import InvalidInput
from mailfc.policy.snapshot import Snapshot

log = logging.getLogger("mailfc.routers")

MAX_KEYS = 100_000


def account_key(username: str) -> str:
    """The canonical account name a login names (what Directory.account looks up);
    a name that is no address at all keys on its stripped, lower-case text."""
    try:
        return normalize_address(username)
    except InvalidInput:
        return username.strip().lower()[:320]


@dataclass(frozen=True)
class ThrottleLimits:
    window_s: float = 300.0
    max_failures_per_ip: int = 20
    max_failures_per_pair: int = 5
    account_delay_after: int = 5
    account_delay_s: float = 0.5
    account_delay_max_s: float = 8.0
    spray_accounts: int = 10

    @classmethod
    def of(cls, settings: LoginSection) -> ThrottleLimits:
        return cls(window_s=float(settings.failure_window_s),
                   max_failures_per_ip=settings.max_failures_per_ip,
                   max_failures_per_pair=settings.max_failures_per_pair,
                   account_delay_after=settings.account_delay_after,
                   account_delay_s=settings.account_delay_s,
                   account_delay_max_s=settings.account_delay_max_s,
                   spray_accounts=settings.spray_accounts)


@dataclass(frozen=True)
class Verdict:
    # Why the login is refused unchecked ("address" or "pair"), or None.
    refused: str | None
    delay_s: float
    clean: bool


class LoginThrottle:
    def __init__(self, limits: ThrottleLimits,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self._clock = clock
        # address -> (stamp, account) of its failures, oldest first
        self._by_address: dict[str, collections.deque[tuple[float, str]]] = {}
        self._by_account: dict[str, collections.deque[float]] = {}
        self._in_flight: collections.Counter[str] = collections.Counter()
        self._keep = max(limits.max_failures_per_ip, limits.spray_accounts) * 4

    def _address(self, address: str, now: float) -> collections.deque[tuple[float, str]]:
        stamps = self._by_address.get(address)
        if stamps is None:
            return collections.deque()
        while stamps and stamps[0][0] <= now - self.limits.window_s:
            stamps.popleft()
        if not stamps:
            del self._by_address[address]
        return stamps

    def _account(self, account: str, now: float) -> collections.deque[float]:
        stamps = self._by_account.get(account)
        if stamps is None:
            return collections.deque()
        while stamps and stamps[0] <= now - self.limits.window_s:
            stamps.popleft()
        if not stamps:
            del self._by_account[account]
        return stamps

    def account_delay(self, account: str) -> float:
        """The account's delay now (see DESCRIPTION)."""
        limits = self.limits
        over = len(self._account(account, self._clock())) - limits.account_delay_after
        if over < 0 or limits.account_delay_s <= 0:
            return 0.0
        return min(limits.account_delay_max_s, limits.account_delay_s * 2.0 ** min(over, 32))

    def check(self, address: str, account: str) -> Verdict:
        now = self._clock()
        failures = self._address(address, now)
        delay = self.account_delay(account)
        if len(failures) + self._in_flight[address] >= self.limits.max_failures_per_ip:
            return Verdict("address", delay, False)
        if sum(1 for _, name in failures if name == account) >= \
                self.limits.max_failures_per_pair:
            return Verdict("pair", delay, False)
        return Verdict(None, delay, not failures)

    def begin(self, address: str) -> None:
        """A password check for `address` is under way (until `end`)."""
        self._in_flight[address] += 1

    def end(self, address: str) -> None:
        self._in_flight[address] -= 1
        if self._in_flight[address] <= 0:
            del self._in_flight[address]

    def failed(self, address: str, account: str, *, checked: bool = True) -> int:
        """Count a failure; the distinct accounts `address` failed for in the window.
        `checked`: the password was checked (a refusal unchecked counts only for
        the address)."""
        now = self._clock()
        failures = self._address(address, now)
        if not failures:
            failures = self._by_address[address] = collections.deque()
        failures.append((now, account))
        while len(failures) > self._keep:
            failures.popleft()
        if checked:
            self._account(account, now)
            self._by_account.setdefault(account, collections.deque()).append(now)
        self._bound()
        return len({name for _, name in failures})

    def succeeded(self, address: str, account: str) -> None:
        failures = self._by_address.get(address)
        if failures:
            kept = collections.deque(item for item in failures if item[1] != account)
            if kept:
                self._by_address[address] = kept
            else:
                del self._by_address[address]

    def _bound(self) -> None:
        # Under a spray of distinct keys memory stays bounded: forget the stalest
        # (dicts keep insertion order, and a key's first failure put it there).
        for table in (self._by_address, self._by_account):
            if len(table) > MAX_KEYS:
                for stale in list(table)[:MAX_KEYS // 10]:
                    del table[stale]


class BanList(Snapshot[bans.Bans]):
    what = "login bans"

    def __init__(self, pool: asyncpg.Pool, refresh_s: float) -> None:
        super().__init__(pool, bans.Bans({}), refresh_s)

    async def read(self) -> bans.Bans:
        return await bans.active(self.pool)

    async def add(self, address: str, reason: str, expires_s: int,
                  host: str | None = None) -> None:
        expires = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=expires_s)
        try:
            network = bans.parse_target(address)
        except InvalidInput as error:
            log.warning("cannot ban %s: %s", address, error)
            return
        self.value = self.value.with_ban(bans.Ban(network, reason, bans.AUTO, expires))
        try:
            await bans.auto_ban(self.pool, address, reason=reason, expires_s=expires_s,
                                host=host)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
            log.warning("cannot store the ban of %s (it holds in this router until its"
                        " next read of the bans): %s", address, error)


async def delay_failure(seconds: float) -> None:
    """Sleep at least `seconds` by the monotonic clock before a failure is answered.

    uvloop's timers count from the loop time cached when the loop iteration began
    (in whole milliseconds), so a plain sleep can end early by as much as that
    iteration has run; the delay is a promise to the client (no faster guessing),
    so the lag is added."""
    lag = max(0.0, time.monotonic() - asyncio.get_running_loop().time())
    await asyncio.sleep(seconds + lag + 0.001)
