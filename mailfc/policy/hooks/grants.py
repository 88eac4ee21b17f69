"""Commands counted in PostgreSQL ahead of use, so a busy session skips the round trips.

Every watched IMAP command is counted atomically in PostgreSQL (LimitEngine.check),
and the imap process waits for the answer.  For a session sending hundreds of
SEARCHes a second under a limit far away, that wait costs more than the command.
So when a command is counted, the hook server may count a few more of the same name
with it, in the same atomic call, and grant them to the session (`CMD sid cid OK
grant`): the plugin runs that many following commands of that name without asking,
for at most protocol.GRANT_MS.  Each is still recorded (DONE).

The grant grows with the session's pace and shrinks with the headroom:

    grant = 0                                   the first ask, or the last grant is
                                                older than GRANT_MS (a slow session)
    grant = min(MAX_GRANT, max(1, 2 * last),    the last grant was used up within
                headroom // HEADROOM_SHARE)     GRANT_MS (a busy session)

where headroom is what the tightest limit of the counted kinds still allowed after
the previous call.  So:

- a limit that is near (headroom under HEADROOM_SHARE) is counted one command at a
  time, exactly as without grants: `3 SEARCH per minute` refuses the 4th;
- commands granted but not run stay counted: the count runs ahead of the commands by
  at most one grant (at most twice what the session ran in the last GRANT_MS, at most
  MAX_GRANT, at most 1/HEADROOM_SHARE of what the limit had left);
- a limit change drops the grants: the server forgets its state (clear()) and the
  plugin its grant at the next WATCH, or when the grant expires;
- commands that take a concurrency lease (heavy commands under an
  imap_heavy_concurrent limit) and calls that reported any decision (a shadow limit
  over, a refusal) are never granted: each of those needs its own answer.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass

from mailfc.policy.engine import Check
from mailfc.policy.hooks.protocol import GRANT_MS

MAX_GRANT = 32
HEADROOM_SHARE = 8
GRANT_S = GRANT_MS / 1000


@dataclass
class _Pace:
    grant: int = 0
    granted_at: float = float("-inf")
    headroom: int = 0


class Grants:
    """Grant sizes of one session, per key (the command name)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._keys: dict[Hashable, _Pace] = {}
        self._clock = clock

    def size(self, key: Hashable) -> int:
        """How many commands to count (and grant) beyond the one being asked about."""
        pace = self._keys.get(key)
        if pace is None or self._clock() - pace.granted_at > GRANT_S:
            return 0
        return max(0, min(MAX_GRANT, max(1, 2 * pace.grant),
                          pace.headroom // HEADROOM_SHARE))

    def counted(self, key: Hashable, grant: int, check: Check, kinds: Iterable[str]) -> int:
        """Note a counting call that counted 1 + `grant`; returns the grant to send."""
        pace = self._keys.setdefault(key, _Pace())
        wanted = set(kinds)
        left = [u.value - (u.used or 0) for u in check.usage
                if u.kind in wanted and u.window_s]
        pace.headroom = max(0, min(left) - 1 - grant) if left else 0
        if check.decisions or not check.admitted:
            grant = 0
            pace.headroom = 0
        pace.grant = grant
        pace.granted_at = self._clock()
        return grant

    def clear(self) -> None:
        """Limits changed: start every session from exact counting again."""
        self._keys.clear()
