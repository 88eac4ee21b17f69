"""Commands counted in PostgreSQL ahead of use, so a busy account's commands skip a round trip.

Every watched IMAP command is counted atomically in PostgreSQL (LimitEngine.check).
For an account sending hundreds of SEARCHes a second under a limit far away, that
round trip per command costs more than the command.  So when a command is counted,
the hook server may count a few more with it, in the same atomic call, and let that
many following commands of the same account and kind pass without asking:

    extra = min(MAX_EXTRA, commands seen for the key in the last RATE_S,
                headroom // HEADROOM_SHARE)

where headroom is what the tightest enforced or shadow limit of the counted kinds
still allowed after the previous call.  So:

- a limit that is near (headroom under HEADROOM_SHARE) is counted one command at a
  time, exactly as without prepaying: `3 SEARCH per minute` refuses the 4th;
- a slow session (fewer than one command per RATE_S) never prepays;
- prepaid commands not used within TTL_S are dropped: they stay counted, so the
  count can run ahead of the commands by at most one batch (at most what the account
  used in the last RATE_S, and at most 1/HEADROOM_SHARE of what its limit had left);
- a limit change (the server's limit watcher) drops every prepaid command, so a
  lowered limit applies to the next command;
- commands that take a concurrency lease (heavy commands under an
  imap_heavy_concurrent limit) and calls that reported any decision (a shadow limit
  over) are never prepaid: each of those needs its own answer.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field

from mailfc.policy.engine import Check

MAX_EXTRA = 32
RATE_S = 1.0
TTL_S = 1.0
HEADROOM_SHARE = 8


@dataclass
class _Account:
    left: int = 0
    expires: float = 0.0
    headroom: int = 0
    seen: list[float] = field(default_factory=list)


class Prepaid:
    """Prepaid commands per key (subject and command kind) of one hook server."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._keys: dict[Hashable, _Account] = {}
        self._clock = clock

    def take(self, key: Hashable) -> bool:
        """True when a prepaid command of `key` was left (and is now used)."""
        now = self._clock()
        account = self._keys.setdefault(key, _Account())
        account.seen.append(now)
        if account.left > 0 and now < account.expires:
            account.left -= 1
            return True
        account.left = 0
        return False

    def extra(self, key: Hashable) -> int:
        """How many commands to count beyond the one being asked about."""
        account = self._keys.get(key)
        if account is None:
            return 0
        since = self._clock() - RATE_S
        account.seen = [t for t in account.seen if t > since]
        return max(0, min(MAX_EXTRA, len(account.seen) - 1,
                          account.headroom // HEADROOM_SHARE))

    def paid(self, key: Hashable, extra: int, check: Check, counted: Iterable[str]) -> None:
        """Note a counting call: `extra` commands beyond the asked one were counted."""
        account = self._keys.setdefault(key, _Account())
        kinds = set(counted)
        windows = [u.value - (u.used or 0) for u in check.usage
                   if u.kind in kinds and u.window_s]
        amount = 1 + extra
        account.headroom = max(0, min(windows) - amount) if windows else 0
        if check.decisions or not check.admitted:
            account.left = 0
            account.headroom = 0
            return
        account.left = extra
        account.expires = self._clock() + TTL_S

    def clear(self) -> None:
        """Limits changed: nothing prepaid counts any more."""
        self._keys.clear()

    def forget_idle(self) -> None:
        """Drop keys without a command in the last RATE_S (bounded memory)."""
        since = self._clock() - max(RATE_S, TTL_S)
        self._keys = {k: a for k, a in self._keys.items() if a.seen and a.seen[-1] > since}
