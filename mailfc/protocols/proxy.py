"""The HAProxy PROXY protocol, version 2 (and version 1 for encoding only).

Routers put a v2 header in front of every session they hand to a dispatcher:

    signature(12) ver_cmd(1)=0x21 fam(1) len(2) src dst sport dport TLVs...

carrying the original client address and, in the AUTHORITY TLV (type 0x02),
the mail domain the session is for; the dispatcher reads it, picks the
domain's container and sends a fresh header with the same client address on
to Postfix or Dovecot, which both speak PROXY v2 (Postfix
`smtpd_upstream_proxy_protocol = haproxy`, Dovecot `haproxy = yes`).

`decode` takes the bytes read so far and returns (header, consumed) once a whole
header is there, None while more bytes are needed, and raises ProxyError on
anything that is not a valid v2 header.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, field

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
HEADER_FIXED = 16
MAX_HEADER = 16 + 536 + 1024  # addresses plus room for TLVs; larger is hostile

CMD_LOCAL = 0x20
CMD_PROXY = 0x21
FAM_TCP4 = 0x11
FAM_TCP6 = 0x21
FAM_UNSPEC = 0x00

TLV_AUTHORITY = 0x02


class ProxyError(ValueError):
    """Not a valid PROXY v2 header."""


@dataclass(frozen=True)
class ProxyHeader:
    source: str | None  # None for LOCAL (health checks) and UNSPEC
    source_port: int = 0
    destination: str | None = None
    destination_port: int = 0
    tlvs: dict[int, bytes] = field(default_factory=dict)

    @property
    def authority(self) -> str | None:
        value = self.tlvs.get(TLV_AUTHORITY)
        return value.decode("ascii", "replace") if value is not None else None


def encode(
    source: str, source_port: int, destination: str, destination_port: int,
    *, authority: str | None = None,
) -> bytes:
    src = ipaddress.ip_address(source)
    dst = ipaddress.ip_address(destination)
    if src.version != dst.version:
        # Mixed families: present both as IPv6 (v4-mapped), which v2 allows.
        src = _as_v6(src)
        dst = _as_v6(dst)
    if src.version == 4:
        family = FAM_TCP4
        addresses = src.packed + dst.packed + struct.pack("!HH", source_port, destination_port)
    else:
        family = FAM_TCP6
        addresses = src.packed + dst.packed + struct.pack("!HH", source_port, destination_port)
    tlvs = b""
    if authority is not None:
        value = authority.encode("ascii")
        tlvs += struct.pack("!BH", TLV_AUTHORITY, len(value)) + value
    body = addresses + tlvs
    return SIGNATURE + struct.pack("!BBH", CMD_PROXY, family, len(body)) + body


def encode_v1(source: str, source_port: int, destination: str, destination_port: int) -> bytes:
    family = "TCP4" if ipaddress.ip_address(source).version == 4 else "TCP6"
    return f"PROXY {family} {source} {destination} {source_port} {destination_port}\r\n".encode()


def _as_v6(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv6Address:
    if isinstance(address, ipaddress.IPv6Address):
        return address
    return ipaddress.IPv6Address("::ffff:" + str(address))


def decode(data: bytes) -> tuple[ProxyHeader, int] | None:
    prefix = data[: len(SIGNATURE)]
    if not SIGNATURE.startswith(prefix):
        raise ProxyError("no PROXY v2 signature")
    if len(data) < HEADER_FIXED:
        return None
    ver_cmd, family, length = struct.unpack("!BBH", data[12:16])
    if ver_cmd >> 4 != 2:
        raise ProxyError(f"unsupported PROXY version {ver_cmd >> 4}")
    if HEADER_FIXED + length > MAX_HEADER:
        raise ProxyError(f"PROXY header of {length} bytes is too long")
    if len(data) < HEADER_FIXED + length:
        return None
    body = data[HEADER_FIXED:HEADER_FIXED + length]
    consumed = HEADER_FIXED + length
    command = ver_cmd & 0x0F
    if command == 0x0:
        return ProxyHeader(None), consumed
    if command != 0x1:
        raise ProxyError(f"unknown PROXY command {command}")
    if family == FAM_TCP4:
        if len(body) < 12:
            raise ProxyError("truncated TCP4 addresses")
        source = str(ipaddress.IPv4Address(body[0:4]))
        destination = str(ipaddress.IPv4Address(body[4:8]))
        sport, dport = struct.unpack("!HH", body[8:12])
        rest = body[12:]
    elif family == FAM_TCP6:
        if len(body) < 36:
            raise ProxyError("truncated TCP6 addresses")
        source = _unmap(ipaddress.IPv6Address(body[0:16]))
        destination = _unmap(ipaddress.IPv6Address(body[16:32]))
        sport, dport = struct.unpack("!HH", body[32:36])
        rest = body[36:]
    elif family == FAM_UNSPEC:
        return ProxyHeader(None, tlvs=_tlvs(body)), consumed
    else:
        raise ProxyError(f"unsupported address family 0x{family:02x}")
    return ProxyHeader(source, sport, destination, dport, _tlvs(rest)), consumed


def _unmap(address: ipaddress.IPv6Address) -> str:
    return str(address.ipv4_mapped or address)


def _tlvs(data: bytes) -> dict[int, bytes]:
    tlvs: dict[int, bytes] = {}
    offset = 0
    while offset < len(data):
        if len(data) - offset < 3:
            raise ProxyError("truncated TLV")
        kind, length = struct.unpack("!BH", data[offset:offset + 3])
        offset += 3
        if offset + length > len(data):
            raise ProxyError("TLV longer than the header")
        tlvs[kind] = data[offset:offset + length]
        offset += length
    return tlvs
