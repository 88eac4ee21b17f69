"""The MTA side of the milter protocol, from the codec, for tests that drive a milter directly."""

from __future__ import annotations

import asyncio
import struct
from pathlib import Path

from mailfc.policy.milter import codec


class MtaClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.decoder = codec.Decoder()
        self.protocol = 0

    @classmethod
    async def open(cls, socket: Path, domain: str, client_ip: str = "192.0.2.7"
                   ) -> MtaClient:
        reader, writer = await asyncio.open_unix_connection(str(socket))
        client = cls(reader, writer)
        client.send(codec.SMFIC_OPTNEG, struct.pack("!III", 6, 0x1FF, 0x1FFFFF))
        reply = await client.reply()
        client.protocol = codec.decode_optneg(reply.data).protocol
        client.send(codec.SMFIC_MACRO, b"C{daemon_name}\0" + domain.encode() + b"\0")
        client.send(codec.SMFIC_CONNECT, b"client.example\x004" + struct.pack("!H", 4000)
                    + client_ip.encode() + b"\0")
        client.send(codec.SMFIC_HELO, b"client.example\0")
        return client

    def send(self, command: bytes, data: bytes = b"") -> None:
        self.writer.write(codec.encode(command, data))

    async def reply(self) -> codec.Packet:
        while True:
            data = await asyncio.wait_for(self.reader.read(4096), 10)
            if not data:
                raise ConnectionError("the milter closed the connection")
            packets = self.decoder.feed(data)
            if packets:
                assert len(packets) == 1, packets
                return packets[0]

    async def mail(self, sender: str, account: str | None = None) -> codec.Packet:
        if account:
            self.send(codec.SMFIC_MACRO, b"M{auth_authen}\0" + account.encode() + b"\0")
        self.send(codec.SMFIC_MAIL, f"<{sender}>".encode() + b"\0")
        return await self.reply()

    async def rcpt(self, recipient: str) -> codec.Packet:
        self.send(codec.SMFIC_RCPT, f"<{recipient}>".encode() + b"\0")
        return await self.reply()

    async def end_of_message(self, body: bytes = b"hello\r\n") -> codec.Packet:
        self.send(codec.SMFIC_HEADER, b"Subject\0test\0")
        self.send(codec.SMFIC_EOH)
        self.send(codec.SMFIC_BODY, body)
        self.send(codec.SMFIC_MACRO, b"Ei\0QUEUE1\0")
        self.send(codec.SMFIC_BODYEOB)
        return await self.reply()

    def abort(self) -> None:
        self.send(codec.SMFIC_ABORT)

    async def quit(self) -> None:
        self.send(codec.SMFIC_QUIT)
        await self.writer.drain()
        self.writer.close()
        await self.writer.wait_closed()


def reply_text(packet: codec.Packet) -> str:
    """'c' for continue, else the SMTP reply text of a REPLYCODE."""
    if packet.command == codec.SMFIR_REPLYCODE:
        return packet.data.rstrip(b"\0").decode()
    return packet.command.decode()
