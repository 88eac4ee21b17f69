"""The hook line protocol as a pure codec: escaping, parsing, framing, the C header."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailfc.policy.hooks import protocol
from mailfc.policy.hooks.protocol import LineSplitter, Oversized, ProtocolError

HEADER = Path(__file__).resolve().parents[2] / "plugins/dovecot_hooks/mailfc-hooks-protocol.h"


def test_escape_round_trip_matches_dovecot_tabescape() -> None:
    text = "a\tb\r\nc\x01d\0e"
    assert protocol.escape(text) == "a\x01tb\x01r\x01nc\x011d\x010e"
    assert protocol.unescape(protocol.escape(text)) == text
    assert protocol.encode("CMD", 1, "x\ty") == b"CMD\t1\tx\x01ty\n"


def test_parse_request_fields_and_numbers() -> None:
    request = protocol.parse_request(
        b"DONE\t3\t7\t1700000000000000\t1500\tUID FETCH\ta\x01t1\tOK Fetch completed.\t1:* FLAGS")
    assert request.word == protocol.DONE
    assert request.number("cid") == 7 and request.number("duration_us") == 1500
    assert request.text("tag") == "a\t1" and request.text("name") == "UID FETCH"


@pytest.mark.parametrize(("line", "message"), [
    (b"HELO\t1", "unknown request"),
    (b"CMD\t1\t2\tSEARCH", "takes 4 fields"),
    (b"CMD\tx\t2\tSEARCH\ta1", "sid must be a number"),
    (b"END\t1\t-5\t0\tbye", "bytes_in must be a number"),
    (b"\xff\xfe garbage", "unknown request"),
    (b"", "unknown request"),
])
def test_parse_request_refuses_garbage(line: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        protocol.parse_request(line)


def test_splitter_one_byte_at_a_time() -> None:
    splitter = LineSplitter()
    data = b"END\t1\t2\t3\tbye\nCMD\t1\t2\tFETCH\ta\n"
    out: list[bytes | Oversized] = []
    for byte in data:
        out += splitter.feed(bytes([byte]))
    assert out == [b"END\t1\t2\t3\tbye", b"CMD\t1\t2\tFETCH\ta"]


def test_splitter_discards_oversized_lines_and_resyncs() -> None:
    splitter = LineSplitter(max_line=16)
    out = splitter.feed(b"x" * 10)
    out += splitter.feed(b"y" * 30)          # no LF yet, over the limit: discarded
    out += splitter.feed(b"z\nEND\t1\n")
    assert isinstance(out[0], Oversized) and out[0].size == 41
    assert out[1:] == [b"END\t1"]
    assert isinstance(splitter.feed(b"q" * 20 + b"\n")[0], Oversized)


def test_watch_lists_follow_the_limit_kinds() -> None:
    assert protocol.watch_for([]) == protocol.WATCH_NONE
    assert protocol.watch_for(["imap_sessions"]) == protocol.WATCH_NONE
    assert protocol.watch_for(["imap_search"]) == \
        "SEARCH,SORT,THREAD,UID SEARCH,UID SORT,UID THREAD"
    assert protocol.watch_for(["imap_append", "imap_fetch"]) == "APPEND,FETCH,UID FETCH"
    assert "MOVE" in protocol.watch_for(["imap_heavy_concurrent"]).split(",")
    assert protocol.watch_for(["imap_commands", "imap_fetch"]) == protocol.WATCH_ALL


def test_every_imap_kind_is_known_to_the_protocol() -> None:
    from mailfc.policy.kinds import KINDS
    imap = {name for name, kind in KINDS.items() if kind.protocol == "imap"}
    covered = set(protocol.COMMAND_KINDS.values()) | {
        protocol.ALL_COMMANDS_KIND, protocol.SESSIONS_KIND, protocol.HEAVY_KIND}
    assert imap == covered


def test_committed_c_header_is_generated_from_this_module() -> None:
    assert HEADER.read_text() == protocol.c_header(), (
        "regenerate: python -m mailfc.policy.hooks.protocol > " + str(HEADER))
