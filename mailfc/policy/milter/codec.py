"""The Sendmail milter protocol, version 6, as a pure codec (no sockets).

WIRE FORMAT
    Every packet in both directions is

        uint32 length (network order, counts the command byte and the data)
        char   command
        bytes  data (length - 1 bytes)

    MTA -> milter commands (SMFIC_*), with their data:

        O  OPTNEG    uint32 version, uint32 actions, uint32 protocol flags
        D  MACRO     char command the macros belong to, then name\\0value\\0 pairs
        C  CONNECT   hostname\\0, char family ('4', '6', 'L', 'U'), uint16 port, address\\0
                     (family 'U' = unknown: no port and no address follow)
        H  HELO      helo\\0
        M  MAIL      "<sender>"\\0 then each ESMTP argument\\0 ("SIZE=1234")
        R  RCPT      "<recipient>"\\0 then each ESMTP argument\\0
        T  DATA      (nothing)
        L  HEADER    name\\0value\\0
        N  EOH       (nothing)
        B  BODY      a chunk of the body
        E  BODYEOB   end of message (nothing)
        A  ABORT     the transaction is over without end of message (no reply)
        Q  QUIT      the connection is over (no reply)
        K  QUIT_NC   this session is over, another one follows on the connection (no reply)
        U  UNKNOWN   an unknown SMTP command\\0

    milter -> MTA replies (SMFIR_*):

        O  OPTNEG    uint32 version, uint32 actions, uint32 protocol flags, then optionally
                     uint32 stage + macro names\\0 pairs (which macros we want per stage)
        c  CONTINUE  a  ACCEPT  r  REJECT  t  TEMPFAIL  d  DISCARD  s  SKIP
        y  REPLYCODE "451 4.7.1 text"\\0 (the SMTP reply the MTA gives instead of its own)

    A stage negotiated with a no-reply flag (SMFIP_NR_*) gets no reply at all; the codec's
    users decide which stages those are, the codec only encodes the flags.

LIMITS
    A packet longer than `max_packet` (default 1 MiB + 64 bytes: body chunks are at most 64 KiB
    unless the MTA negotiated bigger ones, which we never offer) is a protocol error, as is a
    length of zero: the connection is closed, the milter goes on serving others.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

VERSION = 6

# MTA -> milter commands.
SMFIC_ABORT = b"A"
SMFIC_BODY = b"B"
SMFIC_CONNECT = b"C"
SMFIC_MACRO = b"D"
SMFIC_BODYEOB = b"E"
SMFIC_HELO = b"H"
SMFIC_QUIT_NC = b"K"
SMFIC_HEADER = b"L"
SMFIC_MAIL = b"M"
SMFIC_EOH = b"N"
SMFIC_OPTNEG = b"O"
SMFIC_QUIT = b"Q"
SMFIC_RCPT = b"R"
SMFIC_DATA = b"T"
SMFIC_UNKNOWN = b"U"

# milter -> MTA replies.
SMFIR_ACCEPT = b"a"
SMFIR_CONTINUE = b"c"
SMFIR_DISCARD = b"d"
SMFIR_REJECT = b"r"
SMFIR_SKIP = b"s"
SMFIR_TEMPFAIL = b"t"
SMFIR_REPLYCODE = b"y"

# milter -> MTA modification actions at end of message (used by the filter gateway's
# milter client; each needs its SMFIF_* action negotiated at OPTNEG).
SMFIR_ADDRCPT = b"+"
SMFIR_DELRCPT = b"-"
SMFIR_REPLBODY = b"b"
SMFIR_CHGFROM = b"e"
SMFIR_ADDHEADER = b"h"
SMFIR_INSHEADER = b"i"
SMFIR_CHGHEADER = b"m"
SMFIR_PROGRESS = b"p"
SMFIR_QUARANTINE = b"q"

# Actions (what a milter may change), negotiated at OPTNEG.
SMFIF_ADDHDRS = 0x1
SMFIF_CHGBODY = 0x2
SMFIF_ADDRCPT = 0x4
SMFIF_DELRCPT = 0x8
SMFIF_CHGHDRS = 0x10
SMFIF_QUARANTINE = 0x20
SMFIF_CHGFROM = 0x40

# Protocol flags (what the milter does not want, or will not reply to).
SMFIP_NOCONNECT = 0x1
SMFIP_NOHELO = 0x2
SMFIP_NOMAIL = 0x4
SMFIP_NORCPT = 0x8
SMFIP_NOBODY = 0x10
SMFIP_NOHDRS = 0x20
SMFIP_NOEOH = 0x40
SMFIP_NR_HDR = 0x80
SMFIP_NOUNKNOWN = 0x100
SMFIP_NODATA = 0x200
SMFIP_SKIP = 0x400
SMFIP_RCPT_REJ = 0x800
SMFIP_NR_CONN = 0x1000
SMFIP_NR_HELO = 0x2000
SMFIP_NR_MAIL = 0x4000
SMFIP_NR_RCPT = 0x8000
SMFIP_NR_DATA = 0x10000
SMFIP_NR_UNKN = 0x20000
SMFIP_NR_EOH = 0x40000
SMFIP_NR_BODY = 0x80000
SMFIP_HDR_LEADSPC = 0x100000

# Macro stages in the OPTNEG reply (SMFIM_*).
SMFIM_CONNECT = 0
SMFIM_HELO = 1
SMFIM_ENVFROM = 2
SMFIM_ENVRCPT = 3
SMFIM_DATA = 4
SMFIM_EOM = 5
SMFIM_EOH = 6

HEADER = struct.Struct("!IB")
MAX_PACKET = (1 << 20) + 64


class ProtocolError(Exception):
    """The peer sent something that is not the milter protocol; close the connection."""


@dataclass(frozen=True)
class Packet:
    command: bytes
    data: bytes


class Decoder:
    """Splits a byte stream into packets; feed it any number of bytes at a time."""

    def __init__(self, max_packet: int = MAX_PACKET) -> None:
        self.max_packet = max_packet
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Packet]:
        self._buffer += data
        packets: list[Packet] = []
        buffer = self._buffer
        start = 0
        while len(buffer) - start >= 4:
            (length,) = struct.unpack_from("!I", buffer, start)
            if length == 0 or length > self.max_packet:
                raise ProtocolError(f"packet length {length} out of range 1-{self.max_packet}")
            if len(buffer) - start < 4 + length:
                break
            command = bytes(buffer[start + 4:start + 5])
            packets.append(Packet(command, bytes(buffer[start + 5:start + 4 + length])))
            start += 4 + length
        if start:
            del buffer[:start]
        return packets

    @property
    def pending(self) -> int:
        """Bytes of an incomplete packet held back (0 at a packet boundary)."""
        return len(self._buffer)


def encode(command: bytes, data: bytes = b"") -> bytes:
    return struct.pack("!I", len(data) + 1) + command + data


# -- decoding the data of each command --------------------------------------------


def _strings(data: bytes) -> list[bytes]:
    """NUL-terminated strings; a missing final NUL is tolerated (some MTAs omit it)."""
    if not data:
        return []
    parts = data.split(b"\0")
    if parts[-1] == b"":
        parts.pop()
    return parts


def text(value: bytes) -> str:
    # Addresses and header values may carry 8-bit bytes (SMTPUTF8 or worse):
    # keep them readable and never fail on them.
    return value.decode("utf-8", "surrogateescape").encode("utf-8", "replace").decode("utf-8")


@dataclass(frozen=True)
class OptNeg:
    version: int
    actions: int
    protocol: int


def decode_optneg(data: bytes) -> OptNeg:
    if len(data) < 12:
        raise ProtocolError(f"OPTNEG with {len(data)} bytes, expected 12")
    version, actions, protocol = struct.unpack_from("!III", data)
    return OptNeg(version, actions, protocol)


def decode_macros(data: bytes) -> tuple[bytes, dict[str, str]]:
    """(command the macros belong to, {name: value}) with names without braces.

    Postfix sends `{auth_authen}` with braces and `i`, `j` without; one spelling
    ("auth_authen") is used everywhere after this point.
    """
    if not data:
        raise ProtocolError("MACRO without a command byte")
    parts = _strings(data[1:])
    macros: dict[str, str] = {}
    for index in range(0, len(parts) - 1, 2):
        name = text(parts[index]).strip("{}")
        macros[name] = text(parts[index + 1])
    return data[:1], macros


@dataclass(frozen=True)
class Connect:
    hostname: str
    family: str      # "4", "6", "L" (unix socket), "U" (unknown)
    port: int | None
    address: str | None


def decode_connect(data: bytes) -> Connect:
    end = data.find(b"\0")
    if end < 0 or len(data) < end + 2:
        raise ProtocolError("CONNECT without hostname and family")
    hostname = text(data[:end])
    family = chr(data[end + 1])
    if family == "U":
        return Connect(hostname, family, None, None)
    rest = data[end + 2:]
    if len(rest) < 2:
        raise ProtocolError("CONNECT without a port")
    (port,) = struct.unpack_from("!H", rest)
    address = text(rest[2:].split(b"\0", 1)[0])
    return Connect(hostname, family, port, address)


def decode_helo(data: bytes) -> str:
    parts = _strings(data)
    return text(parts[0]) if parts else ""


@dataclass(frozen=True)
class Envelope:
    address: str                 # without the angle brackets; "" for the null sender
    arguments: dict[str, str]    # ESMTP arguments, names upper-case ("SIZE": "1234")


def decode_envelope(data: bytes) -> Envelope:
    parts = _strings(data)
    if not parts:
        raise ProtocolError("MAIL/RCPT without an address")
    address = text(parts[0]).strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1]
    arguments: dict[str, str] = {}
    for part in parts[1:]:
        name, _, value = text(part).partition("=")
        arguments[name.upper()] = value
    return Envelope(address, arguments)


def decode_header(data: bytes) -> tuple[str, str]:
    parts = data.split(b"\0")
    if len(parts) < 2:
        raise ProtocolError("HEADER without name and value")
    return text(parts[0]), text(parts[1])


# -- encoding replies ----------------------------------------------------------------


def encode_optneg(actions: int, protocol: int,
                  macros: dict[int, tuple[str, ...]] | None = None) -> bytes:
    data = struct.pack("!III", VERSION, actions, protocol)
    for stage, names in (macros or {}).items():
        data += struct.pack("!I", stage) + " ".join(names).encode() + b"\0"
    return encode(SMFIC_OPTNEG, data)


def encode_replycode(code: int, status: str, message: str) -> bytes:
    """An SMTP reply for the MTA to send; `%` is doubled (the MTA treats it as a format)."""
    # One line only: CR/LF in a reason must never split the SMTP reply.
    clean = " ".join(message.replace("%", "%%").split())
    return encode(SMFIR_REPLYCODE, f"{code} {status} {clean}".encode() + b"\0")


# Replies without data, prebuilt.
CONTINUE = encode(SMFIR_CONTINUE)
ACCEPT = encode(SMFIR_ACCEPT)
TEMPFAIL = encode(SMFIR_TEMPFAIL)
REJECT = encode(SMFIR_REJECT)
