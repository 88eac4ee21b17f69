"""The limit kinds, defined once for the CLI, the milter, the hook and the tests.

A kind either counts something over a sliding window (`windowed`: messages per
hour) or caps a value at an instant (concurrent transactions, recipients in one
message).  `mailfc limit set` checks a window is given exactly when the kind
needs one.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LimitKind:
    name: str
    windowed: bool
    protocol: str  # smtp or imap
    description: str


KINDS: dict[str, LimitKind] = {
    kind.name: kind
    for kind in (
        LimitKind("concurrent_sends", False, "smtp", "open SMTP transactions at once"),
        LimitKind("messages", True, "smtp", "messages sent per window"),
        LimitKind("recipients", True, "smtp", "recipients addressed per window"),
        LimitKind("bytes", True, "smtp", "bytes sent per window"),
        LimitKind("recipients_per_message", False, "smtp", "recipients in one message"),
        LimitKind("received_messages", True, "smtp", "inbound messages received per window"),
        LimitKind("imap_sessions", False, "imap", "IMAP sessions open at once"),
        LimitKind("imap_commands", True, "imap", "IMAP commands of any kind per window"),
        LimitKind("imap_search", True, "imap", "SEARCH/SORT/THREAD commands per window"),
        LimitKind("imap_fetch", True, "imap", "FETCH commands per window"),
        LimitKind("imap_append", True, "imap", "APPEND commands per window"),
        LimitKind("imap_store", True, "imap", "STORE commands per window"),
        LimitKind("imap_copy", True, "imap", "COPY/MOVE commands per window"),
        LimitKind("imap_heavy_concurrent", False, "imap",
                  "heavy commands (SEARCH, SORT, THREAD, COPY, MOVE) running at once"),
    )
}

MODES = ("enforce", "shadow")
