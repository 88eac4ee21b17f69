"""What SMTP-In (aiosmtpd, the Internet-facing server) adds to aiosmtpd.

`ehlo_reply` builds the EHLO answer SMTP-In's handle_EHLO hook returns.
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


class CoalescedReplies:
    """aiosmtpd's push() for mailfc's servers: the replies to pipelined commands go
    out in one write.

    A success reply (2xx, 3xx) is held back while the client's next command is
    already waiting in the input buffer, and goes out with the next reply that is
    not held back: a client that pipelines MAIL, RCPT and DATA gets their three
    replies in one segment, as from Postfix.  Greetings and TLS (220), goodbye
    (221) and every error are written at once, with what was held before them, so
    nothing held back can be lost to a connection aiosmtpd closes after a reply.
    Mixed in before aiosmtpd's SMTP class.
    """

    _held = b""

    async def push(self, status: str | bytes) -> None:
        if isinstance(status, str):
            status = status.encode("utf-8" if self.enable_SMTPUTF8 else "ascii")  # type: ignore[attr-defined]
        line = status + b"\r\n"
        waiting = self._reader._buffer  # type: ignore[attr-defined]
        if line[:1] in (b"2", b"3") and not line.startswith((b"220", b"221")) \
                and b"\n" in waiting:
            self._held += line
            return
        line, self._held = self._held + line, b""
        self._writer.write(line)  # type: ignore[attr-defined]
        await self._writer.drain()  # type: ignore[attr-defined]

    def take_held(self) -> bytes:
        """Replies held back so far, for a writer that bypasses push()."""
        held, self._held = self._held, b""
        return held
