"""The hook line protocol between the Dovecot plugin and the hook server, defined once.

Used by the server (session.py), the tests, and the C plugin through the header this
module generates (`python -m mailfc.policy.hooks.protocol > plugins/dovecot_hooks/
mailfc-hooks-protocol.h`; a test checks the committed header matches).  The README in
plugins/dovecot_hooks documents the same protocol for humans.

FRAMING
    One message per line, ended by LF.  Fields are separated by TAB and escaped the way
    Dovecot's str_tabescape() does it: \\001 -> \\001 1, TAB -> \\001 t, CR -> \\001 r,
    LF -> \\001 n, NUL -> \\001 0.  A line longer than MAX_LINE bytes is discarded up to
    its LF and answered with ERROR.  Unknown words and wrong field counts are answered
    with ERROR; the connection stays open.

PLUGIN -> SERVER (the first word names the message)
    SESSION sid start_us user client_ip resumed
            an IMAP session began (resumed=1: announced again after a reconnect; it is
            recorded but never refused).  Reply: SESSION sid OK watch | SESSION sid NO text
    CMD     sid cid name tag
            may this command run?  Sent only for commands in the session's watch list.
            Reply: CMD sid cid OK [grant] | CMD sid cid NO text
            grant (optional, a number): the server counted that many more commands of
            this name for the session already; the plugin runs them without asking,
            for at most GRANT_MS, and forgets the grant at the next WATCH.
    DONE    sid cid start_us duration_us name tag reply args
            a command finished (reply: its tagged reply without the tag, e.g. "OK Fetch
            completed."; args: a summary, at most MAX_ARGS bytes).  No reply.
    END     sid bytes_in bytes_out reason
            the session ended.  No reply.

SERVER -> PLUGIN
    HELLO   version timeout_ms failure      first line on every connection: the protocol
                                            version and the plugin's failure settings
    WATCH   sid watch                       the watch list changed (a limit was set or
                                            removed while the session runs)
    ERROR   text                            a line the server could not use

    sid: the plugin's number for the session, unique within its connection; cid: the
    command's number within the session.  Times: microseconds since the Unix epoch.
    watch: "*" every command, "-" none, else command names separated by commas
    ("SEARCH,UID SEARCH").  NO texts start with an IMAP response code: "[LIMIT] ...",
    "[UNAVAILABLE] ...".
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from dataclasses import dataclass

VERSION = 2
GRANT_MS = 1000   # how long a CMD grant lasts in the plugin
MAX_LINE = 16384
MAX_ARGS = 1024      # the plugin truncates DONE's args to this many bytes
MAX_REPLY = 512      # ... and the tagged reply text to this many
MAX_READ = 1 << 16

# Plugin -> server.
SESSION = "SESSION"
CMD = "CMD"
DONE = "DONE"
END = "END"
# Server -> plugin.
HELLO = "HELLO"
WATCH = "WATCH"
ERROR = "ERROR"
OK = "OK"
NO = "NO"

WATCH_ALL = "*"
WATCH_NONE = "-"
FAILURE_OPEN = "open"
FAILURE_CLOSED = "closed"
FAILURES = (FAILURE_OPEN, FAILURE_CLOSED)

# IMAP response codes of refusals (RFC 5530).
CODE_LIMIT = "LIMIT"
CODE_UNAVAILABLE = "UNAVAILABLE"

FIELDS: dict[str, tuple[str, ...]] = {
    SESSION: ("sid", "start_us", "user", "client_ip", "resumed"),
    CMD: ("sid", "cid", "name", "tag"),
    DONE: ("sid", "cid", "start_us", "duration_us", "name", "tag", "reply", "args"),
    END: ("sid", "bytes_in", "bytes_out", "reason"),
}
INTEGER_FIELDS = frozenset({"sid", "cid", "start_us", "duration_us", "resumed", "bytes_in",
                            "bytes_out"})

# Which limit kind (mailfc.policy.kinds) each IMAP command counts against.  Names are
# Dovecot's command names; UID commands are resolved by the plugin ("UID FETCH").
COMMAND_KINDS: dict[str, str] = {
    **dict.fromkeys(("SEARCH", "UID SEARCH", "SORT", "UID SORT", "THREAD", "UID THREAD"),
                    "imap_search"),
    **dict.fromkeys(("FETCH", "UID FETCH"), "imap_fetch"),
    "APPEND": "imap_append",
    **dict.fromkeys(("STORE", "UID STORE"), "imap_store"),
    **dict.fromkeys(("COPY", "UID COPY", "MOVE", "UID MOVE"), "imap_copy"),
}
ALL_COMMANDS_KIND = "imap_commands"
SESSIONS_KIND = "imap_sessions"
HEAVY_KIND = "imap_heavy_concurrent"
HEAVY_COMMANDS = frozenset(("SEARCH", "UID SEARCH", "SORT", "UID SORT", "THREAD",
                            "UID THREAD", "COPY", "UID COPY", "MOVE", "UID MOVE"))
# Never refused, so a client over its limits can still end its session cleanly; also
# what runs when the server is unreachable and the failure policy is "closed".
ALWAYS_ALLOWED = ("LOGOUT", "CAPABILITY", "NOOP")


class ProtocolError(ValueError):
    """A line that is not a valid message (answered with ERROR, never fatal)."""


def watch_for(kinds: Iterable[str]) -> str:
    """The watch list for a session to which limits of these kinds apply."""
    present = set(kinds)
    if ALL_COMMANDS_KIND in present:
        return WATCH_ALL
    names = {name for name, kind in COMMAND_KINDS.items() if kind in present}
    if HEAVY_KIND in present:
        names |= HEAVY_COMMANDS
    names -= set(ALWAYS_ALLOWED)
    return ",".join(sorted(names)) or WATCH_NONE


# -- escaping (Dovecot's str_tabescape / str_tabunescape) --------------------------

_ESCAPES = {"\x01": "\x011", "\t": "\x01t", "\r": "\x01r", "\n": "\x01n", "\0": "\x010"}
_UNESCAPES = {"1": "\x01", "t": "\t", "r": "\r", "n": "\n", "0": "\0"}


def escape(text: str) -> str:
    if not any(c in text for c in _ESCAPES):
        return text
    return "".join(_ESCAPES.get(c, c) for c in text)


def unescape(text: str) -> str:
    if "\x01" not in text:
        return text
    out: list[str] = []
    chars = iter(text)
    for char in chars:
        if char == "\x01":
            following = next(chars, "")
            out.append(_UNESCAPES.get(following, following))
        else:
            out.append(char)
    return "".join(out)


def encode(*fields: object) -> bytes:
    return ("\t".join(escape(str(f)) for f in fields) + "\n").encode("utf-8", "replace")


# -- messages ---------------------------------------------------------------------

@dataclass(frozen=True)
class Request:
    word: str
    values: dict[str, str | int]

    def text(self, name: str) -> str:
        return str(self.values[name])

    def number(self, name: str) -> int:
        value = self.values[name]
        assert isinstance(value, int)
        return value


def parse_request(line: bytes) -> Request:
    """One plugin line (without its LF) -> Request; ProtocolError when it is not one."""
    text = line.decode("utf-8", "replace").removesuffix("\r")
    parts = text.split("\t")
    word = parts[0]
    names = FIELDS.get(word)
    if names is None:
        raise ProtocolError(f"unknown request {word[:40]!r}")
    if len(parts) - 1 != len(names):
        raise ProtocolError(f"{word} takes {len(names)} fields, got {len(parts) - 1}")
    values: dict[str, str | int] = {}
    for name, raw in zip(names, parts[1:], strict=True):
        value = unescape(raw)
        if name in INTEGER_FIELDS:
            # isdigit() alone takes "²" and other Unicode digits, which int() refuses.
            if not (value.isascii() and value.isdigit()) or len(value) > 19:
                raise ProtocolError(f"{word}: {name} must be a number, got {value[:40]!r}")
            values[name] = int(value)
        else:
            values[name] = value
    return Request(word, values)


def hello(timeout_ms: int, failure: str) -> bytes:
    return encode(HELLO, VERSION, timeout_ms, failure)


def session_ok(sid: int, watch: str) -> bytes:
    return encode(SESSION, sid, OK, watch)


def session_no(sid: int, text: str) -> bytes:
    return encode(SESSION, sid, NO, text)


def cmd_ok(sid: int, cid: int, grant: int = 0) -> bytes:
    if grant > 0:
        return encode(CMD, sid, cid, OK, grant)
    return encode(CMD, sid, cid, OK)


def cmd_no(sid: int, cid: int, text: str) -> bytes:
    return encode(CMD, sid, cid, NO, text)


def watch(sid: int, names: str) -> bytes:
    return encode(WATCH, sid, names)


def error(text: str) -> bytes:
    return encode(ERROR, text)


class Oversized:
    """Stands for a line longer than MAX_LINE (already discarded)."""

    def __init__(self, size: int) -> None:
        self.size = size


class LineSplitter:
    """Bytes in, complete lines out; a line over MAX_LINE becomes one Oversized."""

    def __init__(self, max_line: int = MAX_LINE) -> None:
        self.max_line = max_line
        self._buffer = bytearray()
        self._discarding = 0     # bytes of an oversized line dropped so far

    def feed(self, data: bytes) -> list[bytes | Oversized]:
        out: list[bytes | Oversized] = []
        self._buffer += data
        while True:
            end = self._buffer.find(b"\n")
            if end < 0:
                if len(self._buffer) > self.max_line:
                    self._discarding += len(self._buffer)
                    self._buffer.clear()
                return out
            if self._discarding or end > self.max_line:
                out.append(Oversized(self._discarding + end))
                self._discarding = 0
            else:
                out.append(bytes(self._buffer[:end]))
            del self._buffer[:end + 1]


# -- the C header -----------------------------------------------------------------

def c_header() -> str:
    """The plugin's mailfc-hooks-protocol.h: the same words, for C."""
    words = [("VERSION", str(VERSION)), ("GRANT_MSECS", str(GRANT_MS)),
             ("MAX_ARGS", str(MAX_ARGS)),
             ("MAX_REPLY", str(MAX_REPLY)), ("MAX_LINE", str(MAX_LINE))]
    strings = [("SESSION", SESSION), ("CMD", CMD), ("DONE", DONE), ("END", END),
               ("HELLO", HELLO), ("WATCH", WATCH), ("ERROR", ERROR), ("OK", OK), ("NO", NO),
               ("WATCH_ALL", WATCH_ALL), ("WATCH_NONE", WATCH_NONE),
               ("FAILURE_OPEN", FAILURE_OPEN), ("FAILURE_CLOSED", FAILURE_CLOSED),
               ("CODE_LIMIT", CODE_LIMIT), ("CODE_UNAVAILABLE", CODE_UNAVAILABLE)]
    lines = ["/* mailfc-hooks-protocol.h: the hook line protocol's words.",
             "   GENERATED by `python -m mailfc.policy.hooks.protocol` from",
             "   mailfc/policy/hooks/protocol.py; do not edit (a test compares). */",
             "#ifndef MAILFC_HOOKS_PROTOCOL_H", "#define MAILFC_HOOKS_PROTOCOL_H", ""]
    lines += [f"#define MAILFC_HOOKS_{name} {value}" for name, value in words]
    lines += [f'#define MAILFC_HOOKS_{name} "{value}"' for name, value in strings]
    allowed = ", ".join(f'"{name}"' for name in ALWAYS_ALLOWED)
    lines += ["", "/* Commands never refused (see protocol.py ALWAYS_ALLOWED). */",
              f"#define MAILFC_HOOKS_ALWAYS_ALLOWED {{ {allowed}, NULL }}", "",
              "#endif", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(c_header())
