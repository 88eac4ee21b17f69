"""Property tests of the pure codecs: PROXY v2, milter packets, hook lines, IMAP
arguments, xtext, SMTP paths.

Each takes arbitrary bytes (split anywhere) and raises nothing but its own protocol
error, holds no more than its limit, and gives back what its encoder wrote.
"""

from __future__ import annotations

import contextlib
import ipaddress
import struct

from hypothesis import given
from hypothesis import strategies as st

from mailfc.policy.hooks import protocol as hooks
from mailfc.policy.milter import codec as milter
from mailfc.protocols import imap, proxy
from mailfc.protocols.lmtp import xforward_attributes, xtext, xtext_decode
from mailfc.protocols.smtp_server import _path
from tests.fuzz.strategies import chunked, noisy, split_at

# -- PROXY v2 ------------------------------------------------------------------------

IPV4 = st.ip_addresses(v=4).map(str)
IPV6 = st.ip_addresses(v=6).map(str)
PORT = st.integers(0, 65535)
AUTHORITY = st.one_of(st.none(), st.from_regex(r"\A[a-z0-9.-]{0,60}\Z"))


@st.composite
def proxy_headers(draw: st.DrawFn) -> tuple[bytes, tuple[str, int, str, int, str | None]]:
    family = draw(st.sampled_from((IPV4, IPV6)))
    fields = (draw(family), draw(PORT), draw(st.one_of(IPV4, IPV6)), draw(PORT),
              draw(AUTHORITY))
    source, sport, destination, dport, authority = fields
    return proxy.encode(source, sport, destination, dport, authority=authority), fields


def _same_address(decoded: str | None, original: str) -> bool:
    assert decoded is not None
    mapped = ipaddress.ip_address(original)
    if isinstance(mapped, ipaddress.IPv6Address) and mapped.ipv4_mapped is not None:
        mapped = mapped.ipv4_mapped
    return ipaddress.ip_address(decoded) == mapped


def _decode_incrementally(pieces: list[bytes]) -> tuple[proxy.ProxyHeader, int] | None:
    """What a dispatcher does: decode what came so far after every read."""
    received = b""
    for piece in pieces:
        received += piece
        assert len(received) <= proxy.MAX_HEADER + len(piece)
        result = proxy.decode(received)
        if result is not None:
            return result
    return None


@given(proxy_headers(), st.binary(max_size=16), st.lists(st.integers(0, 200), max_size=8))
def test_proxy_v2_round_trips_split_anywhere(header: tuple[bytes, tuple[str, int, str, int,
                                                                        str | None]],
                                             after: bytes, cuts: list[int]) -> None:
    encoded, (source, sport, destination, dport, authority) = header
    result = _decode_incrementally(split_at(encoded + after, cuts))
    assert result is not None
    decoded, consumed = result
    assert consumed == len(encoded)
    assert _same_address(decoded.source, source) and decoded.source_port == sport
    assert _same_address(decoded.destination, destination)
    assert decoded.destination_port == dport
    assert decoded.authority == authority


PROXY_NOISE = st.one_of(
    st.binary(max_size=80),
    noisy(proxy_headers().map(lambda pair: pair[0])),
    st.builds(lambda body, ver, fam: proxy.SIGNATURE + struct.pack("!BBH", ver, fam, len(body))
              + body, st.binary(max_size=64), st.integers(0, 255),
              st.sampled_from((0x00, 0x11, 0x21, 0x31, 0x12, 0xFF))))


@given(chunked(PROXY_NOISE))
def test_proxy_v2_decode_raises_only_its_own_error(pieces: list[bytes]) -> None:
    try:
        result = _decode_incrementally(pieces)
    except proxy.ProxyError:
        return
    if result is not None:
        assert result[1] <= proxy.MAX_HEADER


# -- milter ------------------------------------------------------------------------------

MILTER_PACKETS = st.lists(st.tuples(st.binary(min_size=1, max_size=1), st.binary(max_size=300)),
                          max_size=10)


@given(MILTER_PACKETS, st.lists(st.integers(0, 3000), max_size=12), st.booleans())
def test_milter_packets_round_trip_split_anywhere(packets: list[tuple[bytes, bytes]],
                                                  cuts: list[int], bytewise: bool) -> None:
    stream = b"".join(milter.encode(command, data) for command, data in packets)
    pieces = [stream[i:i + 1] for i in range(len(stream))] if bytewise else split_at(stream,
                                                                                        cuts)
    decoder = milter.Decoder()
    decoded: list[milter.Packet] = []
    for piece in pieces:
        decoded += decoder.feed(piece)
    assert [(p.command, p.data) for p in decoded] == packets
    assert decoder.pending == 0


MILTER_NOISE = st.one_of(
    st.binary(max_size=200),
    noisy(MILTER_PACKETS.map(lambda ps: b"".join(milter.encode(c, d) for c, d in ps))),
    st.builds(lambda length, rest: struct.pack("!I", length) + rest,
              st.sampled_from((0, 1, 2, milter.MAX_PACKET, milter.MAX_PACKET + 1, 2**32 - 1,
                               300)), st.binary(max_size=64)))


@given(chunked(MILTER_NOISE))
def test_milter_decoder_raises_only_protocol_error_and_stays_bounded(
        pieces: list[bytes]) -> None:
    decoder = milter.Decoder(max_packet=256)
    try:
        for piece in pieces:
            for packet in decoder.feed(piece):
                _decode_packet_data(packet)
            # Never more than one packet's worth (and its length word) held back.
            assert decoder.pending <= 4 + 256 + len(piece)
    except milter.ProtocolError:
        return


def _decode_packet_data(packet: milter.Packet) -> None:
    """Each command's data decoder: ProtocolError or a value, never anything else."""
    decoders = {milter.SMFIC_OPTNEG: milter.decode_optneg, milter.SMFIC_MACRO:
                milter.decode_macros, milter.SMFIC_CONNECT: milter.decode_connect,
                milter.SMFIC_HELO: milter.decode_helo, milter.SMFIC_MAIL:
                milter.decode_envelope, milter.SMFIC_RCPT: milter.decode_envelope,
                milter.SMFIC_HEADER: milter.decode_header}
    decoder = decoders.get(packet.command)
    if decoder is not None:
        with contextlib.suppress(milter.ProtocolError):
            decoder(packet.data)  # type: ignore[operator]


@given(st.binary(max_size=300))
def test_milter_data_decoders_raise_only_protocol_error(data: bytes) -> None:
    for command in (milter.SMFIC_OPTNEG, milter.SMFIC_MACRO, milter.SMFIC_CONNECT,
                    milter.SMFIC_HELO, milter.SMFIC_MAIL, milter.SMFIC_HEADER):
        _decode_packet_data(milter.Packet(command, data))


# -- the hook line protocol --------------------------------------------------------------

FIELD_TEXT = st.text(max_size=40)


@given(st.lists(FIELD_TEXT, min_size=1, max_size=6))
def test_hook_fields_round_trip_through_escape(fields: list[str]) -> None:
    line = hooks.encode(*fields)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    parts = line[:-1].decode("utf-8", "replace").split("\t")
    expected = [f.encode("utf-8", "replace").decode("utf-8", "replace") for f in fields]
    assert [hooks.unescape(p) for p in parts] == expected


@st.composite
def hook_requests(draw: st.DrawFn) -> tuple[str, dict[str, str | int]]:
    word = draw(st.sampled_from(sorted(hooks.FIELDS)))
    values: dict[str, str | int] = {}
    for name in hooks.FIELDS[word]:
        values[name] = (draw(st.integers(0, 2**62)) if name in hooks.INTEGER_FIELDS
                        else draw(st.text(st.characters(blacklist_categories=("Cs",)),
                                          max_size=30)))
    return word, values


@given(hook_requests(), st.lists(st.integers(0, 400), max_size=6))
def test_hook_requests_round_trip_through_the_line_splitter(
        request: tuple[str, dict[str, str | int]], cuts: list[int]) -> None:
    word, values = request
    line = hooks.encode(word, *values.values())
    splitter = hooks.LineSplitter()
    lines: list[bytes | hooks.Oversized] = []
    for piece in split_at(line, cuts):
        lines += splitter.feed(piece)
    assert len(lines) == 1 and isinstance(lines[0], bytes)
    parsed = hooks.parse_request(lines[0])
    assert parsed.word == word and parsed.values == values


HOOK_NOISE = st.one_of(
    st.binary(max_size=300),
    noisy(hook_requests().map(lambda r: hooks.encode(r[0], *r[1].values()))),
    st.builds(lambda n: b"CMD\t" + b"x" * n + b"\n", st.integers(60, 700)))


@given(chunked(HOOK_NOISE))
def test_hook_splitter_and_parser_stay_bounded_and_raise_only_protocol_error(
        pieces: list[bytes]) -> None:
    limit = 64
    splitter = hooks.LineSplitter(max_line=limit)
    for piece in pieces:
        for line in splitter.feed(piece):
            if isinstance(line, hooks.Oversized):
                assert line.size > limit
                continue
            assert len(line) <= limit
            with contextlib.suppress(hooks.ProtocolError):
                hooks.parse_request(line)
        assert len(splitter._buffer) <= limit + len(piece)


# -- IMAP arguments, xtext, SMTP paths ---------------------------------------------------

@given(st.binary(max_size=200))
def test_imap_parse_segment_raises_only_imap_syntax_error(line: bytes) -> None:
    try:
        segment = imap.parse_segment(line)
    except imap.ImapSyntaxError:
        return
    if segment.literal is not None:
        assert 0 <= segment.literal <= imap.MAX_LITERAL


@given(st.binary(max_size=200))
def test_imap_split_tag_raises_only_imap_syntax_error(line: bytes) -> None:
    try:
        tag, command, _ = imap.split_tag(line)
    except imap.ImapSyntaxError:
        return
    assert tag and command


@given(st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=200))
def test_imap_quote_round_trips_through_parse_segment(value: str) -> None:
    assert imap.parse_segment(imap.quote(value)).arguments == [value.encode()]


@given(st.text(max_size=60))
def test_xtext_round_trips(value: str) -> None:
    encoded = xtext(value)
    assert all(33 <= ord(c) <= 126 and c != "=" for c in encoded)
    assert xtext_decode(encoded) == value.encode("utf-8", "replace").decode("utf-8", "replace")


@given(st.text(max_size=80))
def test_xforward_attributes_never_raise(argument: str) -> None:
    attributes = xforward_attributes(argument)
    assert attributes is None or set(attributes) <= {"NAME", "ADDR", "PROTO", "HELO", "IDENT"}


@given(st.sampled_from(("FROM:", "TO:")), st.text(max_size=80))
def test_smtp_path_parser_never_raises(keyword: str, argument: str) -> None:
    parsed = _path(keyword + argument, keyword)
    if parsed is not None:
        address, options = parsed
        assert "<" not in address or address.startswith('"')
        assert all(option and not option.isspace() for option in options)
