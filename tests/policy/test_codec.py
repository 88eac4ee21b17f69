"""The milter codec: packets split at any byte boundary, each command's data decoded."""

from __future__ import annotations

import struct

import pytest

from mailfc.policy.milter import codec

# What Postfix sends for one short message (protocol 6), as seen on the wire.
TRANSCRIPT = b"".join([
    codec.encode(codec.SMFIC_OPTNEG, struct.pack("!III", 6, 0x1FF, 0x1FFFFF)),
    codec.encode(codec.SMFIC_MACRO, b"C{daemon_name}\0m1.example\0j\0mail.m1.example\0"),
    codec.encode(codec.SMFIC_CONNECT, b"client.example\x004" + struct.pack("!H", 40123)
                 + b"192.0.2.7\0"),
    codec.encode(codec.SMFIC_HELO, b"client.example\0"),
    codec.encode(codec.SMFIC_MACRO, b"M{auth_authen}\0bob@m1.example\0{auth_type}\0PLAIN\0"),
    codec.encode(codec.SMFIC_MAIL, b"<bob@m1.example>\0SIZE=1234\0BODY=8BITMIME\0"),
    codec.encode(codec.SMFIC_RCPT, b"<x@remote.example>\0"),
    codec.encode(codec.SMFIC_HEADER, b"Subject\0hello\0"),
    codec.encode(codec.SMFIC_EOH),
    codec.encode(codec.SMFIC_BODY, b"body\r\n"),
    codec.encode(codec.SMFIC_MACRO, b"Ei\x004XyZ12\0"),
    codec.encode(codec.SMFIC_BODYEOB),
    codec.encode(codec.SMFIC_QUIT),
])
COMMANDS = [b"O", b"D", b"C", b"H", b"D", b"M", b"R", b"L", b"N", b"B", b"D", b"E", b"Q"]


def test_one_byte_at_a_time_gives_the_same_packets() -> None:
    whole = codec.Decoder().feed(TRANSCRIPT)
    decoder = codec.Decoder()
    trickled: list[codec.Packet] = []
    for index in range(len(TRANSCRIPT)):
        trickled += decoder.feed(TRANSCRIPT[index:index + 1])
    assert trickled == whole
    assert [p.command for p in whole] == COMMANDS
    assert decoder.pending == 0


@pytest.mark.parametrize("split", [1, 2, 3, 4, 5, 7, 13])
def test_any_split_point(split: int) -> None:
    decoder = codec.Decoder()
    packets = decoder.feed(TRANSCRIPT[:split]) + decoder.feed(TRANSCRIPT[split:])
    assert [p.command for p in packets] == COMMANDS


def test_stage_data_is_decoded() -> None:
    packets = codec.Decoder().feed(TRANSCRIPT)
    assert codec.decode_optneg(packets[0].data) == codec.OptNeg(6, 0x1FF, 0x1FFFFF)
    assert codec.decode_macros(packets[1].data) == (
        b"C", {"daemon_name": "m1.example", "j": "mail.m1.example"})
    assert codec.decode_connect(packets[2].data) == codec.Connect(
        "client.example", "4", 40123, "192.0.2.7")
    assert codec.decode_helo(packets[3].data) == "client.example"
    assert codec.decode_envelope(packets[5].data) == codec.Envelope(
        "bob@m1.example", {"SIZE": "1234", "BODY": "8BITMIME"})
    assert codec.decode_header(packets[7].data) == ("Subject", "hello")
    assert codec.decode_macros(packets[10].data) == (b"E", {"i": "4XyZ12"})


def test_unknown_family_and_null_sender() -> None:
    assert codec.decode_connect(b"unknown\0U") == codec.Connect("unknown", "U", None, None)
    assert codec.decode_envelope(b"<>\0").address == ""


def test_eight_bit_input_never_fails() -> None:
    name, value = codec.decode_header(b"Subject\0caf\xe9 \xff\0")
    assert name == "Subject" and value.startswith("caf")


@pytest.mark.parametrize("length", [0, codec.MAX_PACKET + 1])
def test_bad_lengths_are_protocol_errors(length: int) -> None:
    with pytest.raises(codec.ProtocolError):
        codec.Decoder().feed(struct.pack("!I", length) + b"X")


@pytest.mark.parametrize("command,data", [
    (codec.decode_optneg, b"\0\0\0\6"),
    (codec.decode_connect, b"nohostterminator"),
    (codec.decode_envelope, b""),
    (codec.decode_header, b"only-a-name"),
    (codec.decode_macros, b""),
])
def test_truncated_data_is_a_protocol_error(command: object, data: bytes) -> None:
    assert callable(command)
    with pytest.raises(codec.ProtocolError):
        command(data)


def test_replies() -> None:
    assert codec.CONTINUE == b"\0\0\0\1c"
    reply = codec.encode_replycode(451, "4.7.1", "100% over\r\nlimit")
    assert reply[4:5] == codec.SMFIR_REPLYCODE
    assert reply[5:] == b"451 4.7.1 100%% over limit\0"
    assert struct.unpack("!I", reply[:4])[0] == len(reply) - 4
    optneg = codec.encode_optneg(0x100, 0x1000, {codec.SMFIM_EOM: ("i",)})
    assert optneg[5:] == struct.pack("!IIII", 6, 0x100, 0x1000, 5) + b"i\0"
