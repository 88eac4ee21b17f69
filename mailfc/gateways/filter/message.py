"""A message as the filter chain sees it: envelope, client, header fields, and a body
that stays where it is.

HEADER
    Only the header block is read into memory, and at most HEADER_LIMIT (1 MiB) of it
    (Postfix's header_size_limit idea): a message whose blank line after the header
    does not come within that is HeaderTooLarge, which the chain answers with
    552 5.3.4.  Header fields keep their raw value (after the colon, folding included),
    so a message no check changes leaves the filter byte for byte as it came.

BODY
    Never read into memory: it stays in the Source the message came as (a
    mailfc.messages.MessageData, from body_offset on).  Checks and milters read it in
    chunks (body_chunks, source).  A milter's replacement body is written to a new
    MessageData (new_body) as its chunks arrive; close() lets go of it.

SOURCE
    source() is the whole message as it now is: the Source it came as when nothing
    changed, else the new header block in front of the (original or new) body
    (mailfc.messages.Prefixed), read from where it lies when it is sent on.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from mailfc.messages import CHUNK, MessageData, Prefixed, Source, head_of

HEADER_LIMIT = 1 << 20


class HeaderTooLarge(Exception):
    """No blank line ends the header within the limit."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"message header exceeds {limit} bytes (or no blank line ends it)")
        self.limit = limit


@dataclass
class Verdict:
    """The outcome of one check.  action: accept | reject | tempfail | discard | quarantine.

    `reply` is the exact SMTP reply to give (a milter's SMFIR_REPLYCODE); else the
    gateway's own reply for the action is used with `reason`.
    """

    action: str = "accept"
    reason: str = ""
    rule: str = ""
    reply: str | None = None

    @property
    def final(self) -> bool:
        return self.action != "accept"


ACCEPT = Verdict()


@dataclass
class FilterMessage:
    sender: str
    recipients: list[str]
    headers: list[tuple[str, str]]
    # The message as it came, and where its body starts in it.
    data: Source
    body_offset: int
    client_ip: str | None = None
    client_name: str | None = None
    helo: str | None = None
    queue_id: str | None = None
    malformed: list[bytes] = field(default_factory=list)
    # The header list differs from the header block that came.
    changed: bool = False
    # Where a milter's new body goes once it is past MessageData's memory part.
    temporary_dir: str | Path | None = None
    _head: bytes = b""
    _body: MessageData | None = None

    @staticmethod
    def parse(data: Source, sender: str, recipients: list[str], *,
              header_limit: int = HEADER_LIMIT,
              temporary_dir: str | Path | None = None) -> FilterMessage:
        """The header of `data` parsed; its body left in `data`.  Raises HeaderTooLarge."""
        head = head_of(data, header_limit + 4)
        if head.startswith(b"\r\n"):
            header, body_offset = b"", 2
        else:
            end = head.find(b"\r\n\r\n")
            if end >= 0:
                header, body_offset = head[:end + 2], end + 4
            elif data.size <= len(head):
                header, body_offset = head, data.size      # all header, no body
            else:
                raise HeaderTooLarge(header_limit)
        lines = header.split(b"\r\n") if header else []
        if lines and not lines[-1]:
            lines.pop()
        headers: list[tuple[str, str]] = []
        malformed: list[bytes] = []
        for line in lines:
            if line[:1] in (b" ", b"\t") and headers:
                name, value = headers[-1]
                headers[-1] = (name, value + "\r\n" + line.decode("utf-8", "surrogateescape"))
                continue
            name_bytes, colon, value_bytes = line.partition(b":")
            if not colon or not name_bytes or b" " in name_bytes.strip(b" \t") \
                    or name_bytes != name_bytes.rstrip(b" \t"):
                malformed.append(line[:200])
                continue
            headers.append((name_bytes.decode("ascii", "replace"),
                            value_bytes.decode("utf-8", "surrogateescape")))
        return FilterMessage(sender, recipients, headers, data, body_offset,
                             malformed=malformed, temporary_dir=temporary_dir,
                             _head=head[:body_offset])

    # -- reading ------------------------------------------------------------------------

    def values(self, name: str) -> list[str]:
        lower = name.lower()
        return [value for header, value in self.headers if header.lower() == lower]

    def header_bytes(self) -> bytes:
        """The header block as it now is, with the blank line that ends it."""
        if not self.changed:
            return self._head
        return b"".join(f"{name}:{value}\r\n".encode("utf-8", "surrogateescape")
                        for name, value in self.headers) + b"\r\n"

    @property
    def body_size(self) -> int:
        return self._body.size if self._body is not None else \
            self.data.size - self.body_offset

    @property
    def size(self) -> int:
        return len(self.header_bytes()) + self.body_size

    def body_chunks(self, chunk: int = CHUNK) -> Iterator[bytes]:
        """The body as it now is, in pieces of at most `chunk` bytes."""
        if self._body is not None:
            yield from self._body.chunks(chunk)
            return
        yield from pieces(self.data, chunk, self.body_offset)

    def source(self) -> Source:
        """The whole message as it now is (see SOURCE)."""
        if not self.changed and self._body is None:
            return self.data
        if self._body is not None:
            return Prefixed(self.header_bytes(), self._body)
        return Prefixed(self.header_bytes(), self.data, start=self.body_offset)

    # -- changes (milter modification actions) --------------------------------------

    def add_header(self, name: str, value: str) -> None:
        self.headers.append((name, _crlf(value)))
        self.changed = True

    def insert_header(self, index: int, name: str, value: str) -> None:
        self.headers.insert(max(0, min(index, len(self.headers))), (name, _crlf(value)))
        self.changed = True

    def change_header(self, name: str, occurrence: int, value: str) -> None:
        """The occurrence-th (1-based) field called `name` gets `value`; empty deletes it."""
        lower, seen = name.lower(), 0
        for position, (header, _) in enumerate(self.headers):
            if header.lower() == lower:
                seen += 1
                if seen == max(occurrence, 1):
                    if value:
                        self.headers[position] = (header, _crlf(value))
                    else:
                        del self.headers[position]
                    self.changed = True
                    return
        if value:
            self.add_header(name, value)

    def new_body(self) -> MessageData:
        """An empty body replacing the current one; the caller writes it in chunks."""
        if self._body is not None:
            self._body.close()
        self._body = MessageData(self.temporary_dir)
        return self._body

    def replace_body(self, body: bytes) -> None:
        self.new_body().write(body)

    def close(self) -> None:
        """Let go of a replacement body (the original data is its owner's to close)."""
        if self._body is not None:
            self._body.close()


def pieces(source: Source, chunk: int, start: int = 0) -> Iterator[bytes]:
    """`source` from `start` on in pieces of at most `chunk` bytes (a Prefixed source
    is cut too)."""
    if isinstance(source, MessageData):
        yield from source.chunks(chunk, start)     # read from `start`, nothing skipped
        return
    skip = start
    for data in source.chunks(chunk):
        if skip >= len(data):
            skip -= len(data)
            continue
        if skip:
            data, skip = data[skip:], 0
        for offset in range(0, len(data), chunk):
            yield data[offset:offset + chunk]


def _crlf(value: str) -> str:
    """A value from a milter: folded with bare LF; keep one leading space like Postfix."""
    text = value.replace("\r\n", "\n").replace("\n", "\r\n")
    return text if text.startswith((" ", "\t")) else " " + text
