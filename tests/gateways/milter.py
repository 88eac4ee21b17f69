"""A small milter for the filter tests, speaking the protocol as libmilter does.

It asks for every stage with a reply, and at end of message acts on the Subject:
    contains REJECT_MARK    SMFIR_REPLYCODE with REJECT_REPLY
    contains TEMPFAIL_MARK  SMFIR_TEMPFAIL
    contains REPLACE_MARK   a new body (REPLACED_BODY, sent in several SMFIR_REPLBODY
                            packets) and a header X-Test-Milter: replaced
    anything else           SMFIR_ADDHEADER X-Test-Milter: seen, then accept
Per message (by Subject) it notes how many body bytes came and the biggest BODY packet.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from dataclasses import dataclass

from mailfc.policy.milter import codec

REJECT_MARK = "milter-reject-me"
TEMPFAIL_MARK = "milter-tempfail-me"
REPLACE_MARK = "milter-replace-body"
REJECT_REPLY = "550 5.7.1 the test milter refuses this message"
REPLACED_BODY = b"".join(b"replaced line %06d\r\n" % n for n in range(20000))


@dataclass
class Seen:
    body_bytes: int = 0
    biggest_chunk: int = 0
    packets: int = 0


class TestMilter:
    __test__ = False      # not a pytest test class

    def __init__(self, port: int) -> None:
        self.port = port
        self.seen: dict[str, Seen] = {}
        self.server: asyncio.Server | None = None

    @property
    def spec(self) -> str:
        return f"inet:127.0.0.1:{self.port}"

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._session, "127.0.0.1", self.port)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 5)

    async def _session(self, reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter) -> None:
        decoder = codec.Decoder()
        subject = ""
        seen = Seen()
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    return
                for packet in decoder.feed(data):
                    command = packet.command
                    if command == codec.SMFIC_OPTNEG:
                        writer.write(codec.encode(codec.SMFIC_OPTNEG, struct.pack(
                            "!III", codec.VERSION,
                            codec.SMFIF_ADDHDRS | codec.SMFIF_CHGBODY, 0)))
                    elif command in (codec.SMFIC_MACRO, codec.SMFIC_ABORT):
                        continue
                    elif command == codec.SMFIC_QUIT:
                        return
                    elif command == codec.SMFIC_HEADER:
                        name, _, value = packet.data.partition(b"\0")
                        if name.lower() == b"subject":
                            subject = value.rstrip(b"\0").decode("utf-8", "replace").strip()
                        writer.write(codec.encode(codec.SMFIR_CONTINUE))
                    elif command == codec.SMFIC_BODY:
                        seen.body_bytes += len(packet.data)
                        seen.biggest_chunk = max(seen.biggest_chunk, len(packet.data))
                        seen.packets += 1
                        writer.write(codec.encode(codec.SMFIR_CONTINUE))
                    elif command == codec.SMFIC_BODYEOB:
                        self.seen[subject] = seen
                        self._end_of_message(writer, subject)
                        subject, seen = "", Seen()
                    else:
                        writer.write(codec.encode(codec.SMFIR_CONTINUE))
                await writer.drain()
        except (ConnectionError, codec.ProtocolError):
            return
        finally:
            writer.close()

    @staticmethod
    def _end_of_message(writer: asyncio.StreamWriter, subject: str) -> None:
        if REJECT_MARK in subject:
            writer.write(codec.encode(codec.SMFIR_REPLYCODE, REJECT_REPLY.encode() + b"\0"))
        elif TEMPFAIL_MARK in subject:
            writer.write(codec.encode(codec.SMFIR_TEMPFAIL))
        elif REPLACE_MARK in subject:
            for start in range(0, len(REPLACED_BODY), 60000):
                writer.write(codec.encode(codec.SMFIR_REPLBODY,
                                          REPLACED_BODY[start:start + 60000]))
            writer.write(codec.encode(codec.SMFIR_ADDHEADER, b"X-Test-Milter\0replaced\0"))
            writer.write(codec.encode(codec.SMFIR_CONTINUE))
        else:
            writer.write(codec.encode(codec.SMFIR_ADDHEADER, b"X-Test-Milter\0seen\0"))
            writer.write(codec.encode(codec.SMFIR_ACCEPT))
