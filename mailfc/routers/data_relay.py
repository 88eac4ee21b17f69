"""Where a relayed DATA section ends, found the way the next hop will find it.

The submission router passes a message to the domain's Postfix as it arrives, in
chunks of at most a read's size, without holding a line or the message: `EndOfData`
takes each chunk and returns the part that may go on now, until it has seen the end.

THE END
    A line that is a single dot, ended by CRLF or by a bare LF: Postfix's smtpd
    (smtpd_forbid_bare_newline = no, its default) reads lines up to a LF and drops
    one CR before it, so "\\n.\\n" ends a message for it as surely as "\\r\\n.\\r\\n".
    The router must end the message at the same byte: were it to see "\\n.\\n" as
    content, what follows would reach Postfix as commands the router never checked
    (SMTP smuggling: a MAIL FROM of somebody else's address).  The dot line itself is
    not returned; the caller sends ".\\r\\n" in its place.  What came after it (the
    client's next, pipelined commands) is returned as `rest`.

MEMORY
    Between chunks at most three bytes are held back ("\\n", "\\n." or "\\n.\\r", the
    start of an end that the next chunk may finish).
"""

from __future__ import annotations


class EndOfData:
    def __init__(self) -> None:
        # The line end before the first line (not part of the message): it lets one
        # search find a "." alone on the first line too.
        self._held = b"\n"
        self._virtual = True
        self.ended = False

    def feed(self, chunk: bytes) -> tuple[bytes, bytes | None]:
        """(content to pass on now, rest after the end line or None before the end)."""
        assert not self.ended, "the message has ended"
        data = self._held + chunk
        search = 0
        while True:
            newline = data.find(b"\n.", search)
            if newline < 0:
                # Hold a final LF back: the next chunk may start with the dot.
                cut = len(data) - 1 if data.endswith(b"\n") else len(data)
                break
            after_dot = newline + 2
            if data.startswith(b"\n", after_dot):
                return self._end(data, newline, after_dot + 1)
            if data.startswith(b"\r\n", after_dot):
                return self._end(data, newline, after_dot + 2)
            if len(data) - after_dot == 0 or data[after_dot:] == b"\r":
                cut = newline  # undecided until the next chunk
                break
            search = after_dot
        self._held = data[cut:]
        return self._content(data[:cut]), None

    def _end(self, data: bytes, newline: int, after: int) -> tuple[bytes, bytes]:
        self.ended = True
        self._held = b""
        # The line end before the dot belongs to the message's last line.
        return self._content(data[:newline + 1]), data[after:]

    def _content(self, content: bytes) -> bytes:
        if self._virtual and content:
            self._virtual = False
            return content[1:]
        return content
