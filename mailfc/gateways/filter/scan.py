"""One pass over a message in chunks, looking for a signature raw and inside the
base64 and quoted-printable MIME parts, decoded as they go by.

Nothing is held whole: the raw search keeps the last len(signature)-1 bytes of the
previous chunk; lines are cut at MAX_LINE (a longer line is handed on in pieces);
a base64 decoder keeps at most 3 undecoded characters, a quoted-printable one at most
an escape cut in two; a part's header keeps only Content-Type and
Content-Transfer-Encoding, each at most MAX_FIELD bytes, and a part header longer than
MAX_PART_HEADER counts as body.  At most MAX_BOUNDARIES multipart boundaries are
followed, MAX_PARTS parts (as a virus scanner's MaxFiles) and MAX_HEADERS bytes of
headers, read line by line: past that only the raw search goes on, so a message of
empty parts or one-byte header lines costs no more than a plain one.

The MIME structure is read as RFC 2046 says, leniently: a line "--<boundary>" of any
multipart seen so far starts a part, "--<boundary>--" ends them; a message/rfc822
part's body is a header again.

The costs are a substring search per chunk and, in an encoded part, one C-level
decode per run of lines between boundary candidates.
"""

from __future__ import annotations

import binascii
import re
from collections.abc import Iterable

MAX_LINE = 64 * 1024
MAX_FIELD = 4096
MAX_PART_HEADER = 256 * 1024
MAX_BOUNDARIES = 64
MAX_PARTS = 10_000
MAX_HEADERS = 2 << 20

_BASE64_ALPHABET = (b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=")
_NOT_BASE64 = bytes(c for c in range(256) if c not in _BASE64_ALPHABET)
_BOUNDARY = re.compile(rb'boundary\s*=\s*(?:"([^"\r\n]{1,200})"|([^\s;"]{1,200}))', re.I)


class _Search:
    """A signature in a stream of pieces, found across their borders too."""

    def __init__(self, signature: bytes) -> None:
        self.signature = signature
        self.keep = len(signature) - 1
        self.tail = b""

    def feed(self, data: bytes) -> bool:
        if not data:
            return False
        if self.signature in data or self.signature in self.tail + data[:self.keep]:
            return True
        self.tail = (self.tail + data[-self.keep:])[-self.keep:]
        return False


class _Base64:
    def __init__(self, search: _Search) -> None:
        self.search = search
        self.pending = b""

    def feed(self, data: bytes) -> bool:
        text = self.pending + data.translate(None, _NOT_BASE64)
        start = 0
        while True:
            # Padding ends a run of groups; a part may go on after it (concatenated
            # encodings), so decoding starts again behind it.
            pad = text.find(b"=", start)
            whole = start + (len(text) - start) // 4 * 4
            end = whole if pad < 0 else min(whole, start + ((pad - start) // 4 + 1) * 4)
            if end <= start:
                self.pending = text[start:]         # at most 3 characters
                return False
            if self._decode(text[start:end]):
                return True
            start = end
            while text[start:start + 1] == b"=":
                start += 1                          # stray padding

    def _decode(self, text: bytes) -> bool:
        try:
            return self.search.feed(binascii.a2b_base64(text))
        except binascii.Error:
            return False


class _QuotedPrintable:
    def __init__(self, search: _Search) -> None:
        self.search = search
        self.pending = b""

    def feed(self, data: bytes) -> bool:
        text = self.pending + data
        # An escape ("=XX") a long line's cut went through waits for its rest.
        escape = text.rfind(b"=", max(0, len(text) - 2))
        if escape >= 0 and not text.endswith(b"\n"):
            text, self.pending = text[:escape], text[escape:]
        else:
            self.pending = b""
        return self.search.feed(binascii.a2b_qp(text))


class Scanner:
    """Feed chunks with feed(); True once the signature was seen; finish() at the end."""

    def __init__(self, signature: bytes) -> None:
        self.signature = signature
        self.raw = _Search(signature)
        self.found = False
        self.carry = b""
        self.mid_line = False          # the carry's line was partly handed on already
        self.boundaries: set[bytes] = set()
        self.parts = 0
        self.headers_total = 0
        self._start_header()

    def scan(self, chunks: Iterable[bytes]) -> bool:
        for chunk in chunks:
            if self.feed(chunk):
                return True
        return self.finish()

    def feed(self, chunk: bytes) -> bool:
        if self.found:
            return True
        if self.raw.feed(chunk):
            self.found = True
            return True
        data = self.carry + chunk
        last = data.rfind(b"\n") + 1
        lines, self.carry = data[:last], data[last:]
        if lines:
            self._lines(lines)
        if len(self.carry) > MAX_LINE and not self.found:
            # A line without end: what came of it is body (or a header line too long
            # to matter); its start can no longer be a boundary.
            piece, self.carry = self.carry, b""
            if not self.in_header:
                self._body(piece)
            self.mid_line = True
        return self.found

    def finish(self) -> bool:
        if self.carry and not self.found:
            self._lines(self.carry + b"\n")
            self.carry = b""
        return self.found

    # -- structure ------------------------------------------------------------------

    def _start_header(self) -> None:
        self.in_header = True
        self.header_bytes = 0
        self.fields: dict[bytes, bytes] = {}
        self.field: bytes | None = None
        self.decoder: _Base64 | _QuotedPrintable | None = None

    def _lines(self, data: bytes) -> None:
        """Complete lines (data ends with LF): header lines one by one, body in runs
        up to the next line that may be a boundary."""
        position, size = 0, len(data)
        if self.mid_line:
            end = data.find(b"\n") + 1
            if not self.in_header:
                self._body(data[:end])
            position, self.mid_line = end, False
        while position < size and not self.found:
            if self.in_header:
                end = data.find(b"\n", position) + 1
                self._header_line(data[position:end])
                position = end
                continue
            if not self.boundaries:
                self._body(data[position:])
                return
            candidate = self._next_delimiter(data, position)
            if candidate > position:
                self._body(data[position:candidate])
                position = candidate
                continue
            end = data.find(b"\n", position) + 1
            line = data[position:end]
            position = end
            if not self._boundary(line):
                self._body(line)

    def _next_delimiter(self, data: bytes, position: int) -> int:
        """Where the next line that starts with "--<a known boundary>" begins (`size`:
        none); lines with other dashes cost no step of this loop."""
        best = len(data)
        for boundary in self.boundaries:
            marker = b"--" + boundary
            if data.startswith(marker, position):
                return position
            found = data.find(b"\n" + marker, position, best)
            if found >= 0:
                best = found + 1
        return best

    def _boundary(self, line: bytes) -> bool:
        text = line.rstrip()
        if not text.startswith(b"--") or len(text) > 260:
            return False
        if text[2:] in self.boundaries:
            self.parts += 1
            if self.parts > MAX_PARTS:
                self._give_up()
                return True
            self._start_header()
            return True
        if text.endswith(b"--") and text[2:-2] in self.boundaries:
            self._start_header()
            self.in_header = False      # the epilogue: not decoded
            return True
        return False

    def _give_up(self) -> None:
        """Structure no longer followed: the rest is plain body for the raw search."""
        self.boundaries.clear()
        self.decoder = None
        self.in_header = False

    def _header_line(self, line: bytes) -> None:
        self.header_bytes += len(line)
        self.headers_total += len(line)
        if self.headers_total > MAX_HEADERS:
            self._give_up()
            return
        if not line.strip(b"\r\n"):
            self._end_header()
            return
        if self.header_bytes > MAX_PART_HEADER:
            self._end_header()
            self._body(line)
            return
        if line[:1] in (b" ", b"\t"):
            if self.field is not None and len(self.fields[self.field]) < MAX_FIELD:
                self.fields[self.field] += b" " + line.strip()
            return
        name, colon, value = line.partition(b":")
        name = name.strip().lower()
        if colon and name in (b"content-type", b"content-transfer-encoding"):
            self.field = name
            self.fields[name] = value.strip()[:MAX_FIELD]
        else:
            self.field = None

    def _end_header(self) -> None:
        content_type = self.fields.get(b"content-type", b"").lower()
        encoding = self.fields.get(b"content-transfer-encoding", b"").strip().lower()
        self.in_header = False
        if content_type.startswith(b"multipart/"):
            match = _BOUNDARY.search(self.fields.get(b"content-type", b""))
            if match and len(self.boundaries) < MAX_BOUNDARIES:
                self.boundaries.add((match.group(1) or match.group(2)).rstrip())
        elif content_type.startswith(b"message/rfc822") and encoding not in (
                b"base64", b"quoted-printable"):
            self._start_header()         # the enclosed message's own header
            return
        if encoding == b"base64":
            self.decoder = _Base64(_Search(self.signature))
        elif encoding == b"quoted-printable":
            self.decoder = _QuotedPrintable(_Search(self.signature))

    def _body(self, data: bytes) -> None:
        if self.decoder is not None and self.decoder.feed(data):
            self.found = True
