"""PROXY v2 codec: round trips, byte-at-a-time decoding, hostile input."""

from __future__ import annotations

import pytest

from mailfc.protocols import proxy


def test_round_trip_ipv4_with_authority() -> None:
    data = proxy.encode("192.0.2.7", 40000, "10.0.0.1", 143, authority="example.org")
    header, consumed = proxy.decode(data + b"a1 CAPABILITY\r\n") or (None, 0)
    assert header is not None and consumed == len(data)
    assert (header.source, header.source_port) == ("192.0.2.7", 40000)
    assert (header.destination, header.destination_port) == ("10.0.0.1", 143)
    assert header.authority == "example.org"


def test_round_trip_ipv6_and_mixed_families() -> None:
    header, _ = proxy.decode(proxy.encode("2001:db8::1", 1, "2001:db8::2", 2)) or (None, 0)
    assert header is not None and header.source == "2001:db8::1"
    header, _ = proxy.decode(proxy.encode("192.0.2.1", 1, "2001:db8::2", 2)) or (None, 0)
    assert header is not None and header.source == "192.0.2.1"


def test_decode_one_byte_at_a_time() -> None:
    data = proxy.encode("192.0.2.7", 1, "192.0.2.8", 2, authority="a.example")
    for end in range(len(data)):
        assert proxy.decode(data[:end]) is None
    assert proxy.decode(data) is not None


@pytest.mark.parametrize("garbage", [
    b"GET / HTTP/1.1\r\n\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n",
    proxy.SIGNATURE + b"\x31\x11\x00\x0c" + bytes(12),          # version 3
    proxy.SIGNATURE + b"\x21\x11\xff\xff",                      # absurd length
    proxy.SIGNATURE + b"\x21\x11\x00\x04" + bytes(4),           # truncated addresses
    proxy.SIGNATURE + b"\x21\x11\x00\x0f" + bytes(12) + b"\x02\x00\x09",  # TLV overruns
])
def test_garbage_is_refused(garbage: bytes) -> None:
    with pytest.raises(proxy.ProxyError):
        proxy.decode(garbage)


def test_local_command_has_no_source() -> None:
    header, _ = proxy.decode(proxy.SIGNATURE + b"\x20\x00\x00\x00") or (None, 0)
    assert header is not None and header.source is None
