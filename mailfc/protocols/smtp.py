"""What mailfc's aiosmtpd servers (SMTP-In, the filters, the LMTP Router) share.

`ehlo_reply` builds the EHLO/LHLO answer their handle_EHLO hooks return.
aiosmtpd writes each element of that list with a write of its own; the
whole multi-line reply in one element goes out in one write, which for a
short session (a message per connection) is a third of its writes.
"""

from __future__ import annotations

from collections.abc import Collection


def ehlo_reply(responses: list[str], extensions: list[str],
               keep: Collection[str] | None = None) -> list[str]:
    """aiosmtpd's lines (`250-host`, then its keywords, those in `keep` only when
    given) followed by `extensions`, as one multi-line reply."""
    words = [line[4:] for line in responses[1:]
             if keep is None or line[4:].split(" ", 1)[0] in keep]
    lines = [responses[0][4:], *words, *extensions]
    return ["\r\n".join([*(f"250-{line}" for line in lines[:-1]), f"250 {lines[-1]}"])]
