"""A message as the filter chain sees it: envelope, client, header fields, body.

Header fields keep their raw value (after the colon, folding included) so a message that
no check changes leaves the filter byte for byte as it came; changes from milters
(add, insert, change, delete a field) are applied to the list and the message is
rebuilt only then.
"""

from __future__ import annotations

from dataclasses import dataclass, field


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
    body: bytes
    client_ip: str | None = None
    client_name: str | None = None
    helo: str | None = None
    queue_id: str | None = None
    malformed: list[bytes] = field(default_factory=list)
    changed: bool = False
    _raw: bytes = b""

    @staticmethod
    def parse(raw: bytes, sender: str, recipients: list[str]) -> FilterMessage:
        if raw.startswith(b"\r\n"):
            head, body = b"", raw[2:]
        else:
            end = raw.find(b"\r\n\r\n")
            head, body = (raw, b"") if end < 0 else (raw[:end + 2], raw[end + 4:])
        headers: list[tuple[str, str]] = []
        malformed: list[bytes] = []
        for line in head.split(b"\r\n")[:-1] if head else []:
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
        message = FilterMessage(sender, recipients, headers, body, malformed=malformed)
        message._raw = raw
        return message

    def as_bytes(self) -> bytes:
        if not self.changed and self._raw:
            return self._raw
        head = b"".join(f"{name}:{value}\r\n".encode("utf-8", "surrogateescape")
                        for name, value in self.headers)
        return head + b"\r\n" + self.body

    def values(self, name: str) -> list[str]:
        lower = name.lower()
        return [value for header, value in self.headers if header.lower() == lower]

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

    def replace_body(self, body: bytes) -> None:
        self.body = body
        self.changed = True


def _crlf(value: str) -> str:
    """A value from a milter: folded with bare LF; keep one leading space like Postfix."""
    text = value.replace("\r\n", "\n").replace("\n", "\r\n")
    return text if text.startswith((" ", "\t")) else " " + text
