"""A milter client: the filter gateway acting as the MTA towards any standard milter.

PROTOCOL
    Version 6 (packets and words from mailfc.policy.milter.codec).  Per message: a new
    connection, OPTNEG, then the stages the milter did not decline (SMFIP_NO*):

        macros j, {daemon_name}      CONNECT  hostname, family '4'/'6', port, address
        HELO helo                    macros i  MAIL <sender>   RCPT <recipient> (each)
        DATA   HEADER name\\0value\\0 (each)   EOH   BODY (64 KiB chunks)   macros i  BODYEOB

    A stage negotiated as no-reply (SMFIP_NR_*) is not waited for.  Replies: continue,
    accept (the rest is skipped: the message passes), reject, tempfail, discard,
    replycode ("550 5.7.1 text": given as it is), skip (the rest of the body is not
    sent).  At end of message the modification actions before the final reply are
    applied: add / insert / change (or delete) header, replace body, quarantine.
    The body goes out in chunks read from where the message lies (its file past the
    first 64 KiB), each after the milter took the previous one; a replacement body is
    written to a new MessageData as its chunks arrive: never a whole message in memory.
    Recipient and sender changes are not offered at OPTNEG (the spool's envelope is the
    record of who is owed the message).

FAILURES
    Connection refused, timeout (filter_*.milter_timeout_s per reply), or anything that
    is not the protocol: MilterUnavailable, which the chain turns into
    filter_*.milter_default_action (tempfail by default, like Postfix).
"""

from __future__ import annotations

import asyncio
import struct

from mailfc import netio
from mailfc.config import split_hostport
from mailfc.errors import TemporaryFailure
from mailfc.gateways.filter.message import ACCEPT, FilterMessage, Verdict
from mailfc.messages import MessageData
from mailfc.policy.milter import codec

BODY_CHUNK = 65535
OFFERED_ACTIONS = (codec.SMFIF_ADDHDRS | codec.SMFIF_CHGHDRS | codec.SMFIF_CHGBODY
                   | codec.SMFIF_QUARANTINE)
OFFERED_PROTOCOL = (codec.SMFIP_NOCONNECT | codec.SMFIP_NOHELO | codec.SMFIP_NOMAIL
                    | codec.SMFIP_NORCPT | codec.SMFIP_NOBODY | codec.SMFIP_NOHDRS
                    | codec.SMFIP_NOEOH | codec.SMFIP_NR_HDR | codec.SMFIP_NOUNKNOWN
                    | codec.SMFIP_NODATA | codec.SMFIP_SKIP | codec.SMFIP_NR_CONN
                    | codec.SMFIP_NR_HELO | codec.SMFIP_NR_MAIL | codec.SMFIP_NR_RCPT
                    | codec.SMFIP_NR_DATA | codec.SMFIP_NR_UNKN | codec.SMFIP_NR_EOH
                    | codec.SMFIP_NR_BODY)


class MilterUnavailable(TemporaryFailure):
    """The milter could not be asked (down, slow, or not speaking the protocol)."""


class _Stop(Exception):
    def __init__(self, verdict: Verdict) -> None:
        self.verdict = verdict


class _Skip(Exception):
    pass


class MilterClient:
    def __init__(self, spec: str, *, timeout: float, hostname: str, daemon: str) -> None:
        self.spec = spec
        self.timeout = timeout
        self.hostname = hostname
        self.daemon = daemon
        self.rule = f"milter:{spec}"

    async def check(self, message: FilterMessage) -> Verdict:
        try:
            reader, writer = await self._connect()
        except (OSError, TimeoutError) as error:
            raise MilterUnavailable(f"milter {self.spec} unreachable: "
                                    f"{getattr(error, 'strerror', None) or error or 'timeout'}"
                                    ) from None
        conversation = _Conversation(self, reader, writer)
        try:
            return await conversation.run(message)
        except (OSError, TimeoutError, asyncio.IncompleteReadError, codec.ProtocolError,
                struct.error, ValueError) as error:
            raise MilterUnavailable(f"milter {self.spec} failed: "
                                    f"{error or type(error).__name__}") from None
        finally:
            writer.write(codec.encode(codec.SMFIC_QUIT))
            await netio.close(writer)

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        kind, _, rest = self.spec.partition(":")
        if kind == "unix":
            return await asyncio.wait_for(asyncio.open_unix_connection(rest), self.timeout)
        host, port = split_hostport(rest)
        return await asyncio.wait_for(asyncio.open_connection(host, port), self.timeout)


class _Conversation:
    def __init__(self, client: MilterClient, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.client = client
        self.reader = reader
        self.writer = writer
        self.decoder = codec.Decoder()
        self.packets: list[codec.Packet] = []
        self.protocol = 0
        self.actions = 0

    async def run(self, message: FilterMessage) -> Verdict:
        await self._negotiate()
        try:
            await self._envelope(message)
            skip_body = False
            if not self.protocol & codec.SMFIP_NOHDRS:
                for name, value in message.headers:
                    await self._ask(codec.SMFIC_HEADER, _header_data(name, value),
                                    codec.SMFIP_NR_HDR)
            if not self.protocol & codec.SMFIP_NOEOH:
                await self._ask(codec.SMFIC_EOH, b"", codec.SMFIP_NR_EOH)
            if not self.protocol & codec.SMFIP_NOBODY:
                # Read from where the body lies, a chunk at a time (never whole).
                for chunk in message.body_chunks(BODY_CHUNK):
                    try:
                        await self._ask(codec.SMFIC_BODY, chunk, codec.SMFIP_NR_BODY)
                    except _Skip:
                        skip_body = True
                    if skip_body:
                        break
            self._send(codec.SMFIC_MACRO, codec.SMFIC_BODYEOB
                       + _macros({"i": message.queue_id or ""}))
            self._send(codec.SMFIC_BODYEOB)
            return await self._end_of_message(message)
        except _Stop as stop:
            return stop.verdict

    async def _negotiate(self) -> None:
        self._send(codec.SMFIC_OPTNEG, struct.pack("!III", codec.VERSION, OFFERED_ACTIONS,
                                                   OFFERED_PROTOCOL))
        packet = await self._read()
        if packet.command != codec.SMFIC_OPTNEG:
            raise codec.ProtocolError(f"expected OPTNEG, got {packet.command!r}")
        offer = codec.decode_optneg(packet.data)
        self.actions = offer.actions & OFFERED_ACTIONS
        self.protocol = offer.protocol & OFFERED_PROTOCOL

    async def _envelope(self, message: FilterMessage) -> None:
        client = self.client
        self._send(codec.SMFIC_MACRO, codec.SMFIC_CONNECT + _macros(
            {"j": client.hostname, "{daemon_name}": client.daemon,
             "{client_addr}": message.client_ip or ""}))
        if not self.protocol & codec.SMFIP_NOCONNECT:
            address = message.client_ip or ""
            family = b"6" if ":" in address else b"4"
            data = ((message.client_name or f"[{address}]").encode() + b"\0"
                    + (family + struct.pack("!H", 0) + address.encode() + b"\0"
                       if address else b"U"))
            await self._ask(codec.SMFIC_CONNECT, data, codec.SMFIP_NR_CONN)
        if not self.protocol & codec.SMFIP_NOHELO:
            await self._ask(codec.SMFIC_HELO, (message.helo or "unknown").encode() + b"\0",
                            codec.SMFIP_NR_HELO)
        self._send(codec.SMFIC_MACRO, codec.SMFIC_MAIL + _macros({"i": message.queue_id or ""}))
        if not self.protocol & codec.SMFIP_NOMAIL:
            await self._ask(codec.SMFIC_MAIL, f"<{message.sender}>".encode() + b"\0",
                            codec.SMFIP_NR_MAIL)
        if not self.protocol & codec.SMFIP_NORCPT:
            for recipient in message.recipients:
                await self._ask(codec.SMFIC_RCPT, f"<{recipient}>".encode() + b"\0",
                                codec.SMFIP_NR_RCPT)
        if not self.protocol & codec.SMFIP_NODATA:
            await self._ask(codec.SMFIC_DATA, b"", codec.SMFIP_NR_DATA)

    async def _ask(self, command: bytes, data: bytes, no_reply: int) -> None:
        """Send a stage; wait for its reply unless negotiated away.  _Stop ends the talk."""
        self._send(command, data)
        if self.protocol & no_reply:
            # Nothing to wait for, but no piling up either: a body goes out no faster
            # than the milter takes it (bounded memory, whatever the message's size).
            await asyncio.wait_for(self.writer.drain(), self.client.timeout)
            return
        while True:
            packet = await self._read()
            reply = packet.command
            if reply == codec.SMFIR_PROGRESS:
                continue
            if reply == codec.SMFIR_CONTINUE:
                return
            if reply == codec.SMFIR_SKIP and command == codec.SMFIC_BODY:
                raise _Skip()
            raise _Stop(self._final(packet))

    async def _end_of_message(self, message: FilterMessage) -> Verdict:
        quarantine: str | None = None
        new_body: MessageData | None = None
        while True:
            packet = await self._read()
            reply, data = packet.command, packet.data
            if reply == codec.SMFIR_PROGRESS:
                continue
            if reply == codec.SMFIR_ADDHEADER:
                name, value = _name_value(data)
                message.add_header(name, value)
            elif reply in (codec.SMFIR_INSHEADER, codec.SMFIR_CHGHEADER):
                (index,) = struct.unpack_from("!I", data)
                name, value = _name_value(data[4:])
                if reply == codec.SMFIR_INSHEADER:
                    message.insert_header(index, name, value)
                else:
                    message.change_header(name, index, value)
            elif reply == codec.SMFIR_REPLBODY:
                # Chunks of the new body follow one another; the first replaces.  They
                # go to a MessageData as they come (a file past its memory part).
                if new_body is None:
                    new_body = message.new_body()
                new_body.write(data)
            elif reply == codec.SMFIR_QUARANTINE:
                quarantine = codec.text(data.rstrip(b"\0")) or "quarantined by milter"
            elif reply in (codec.SMFIR_ADDRCPT, codec.SMFIR_DELRCPT, codec.SMFIR_CHGFROM):
                raise codec.ProtocolError(f"milter used an action it was not offered: "
                                          f"{reply!r}")
            else:
                verdict = self._final(packet)
                if quarantine is not None and verdict.action == "accept":
                    return Verdict("quarantine", quarantine, self.client.rule)
                return verdict

    def _final(self, packet: codec.Packet) -> Verdict:
        reply, rule = packet.command, self.client.rule
        if reply in (codec.SMFIR_ACCEPT, codec.SMFIR_CONTINUE):
            return ACCEPT
        if reply == codec.SMFIR_REJECT:
            return Verdict("reject", "rejected by milter", rule)
        if reply == codec.SMFIR_TEMPFAIL:
            return Verdict("tempfail", "temporarily refused by milter", rule)
        if reply == codec.SMFIR_DISCARD:
            return Verdict("discard", "discarded by milter", rule)
        if reply == codec.SMFIR_REPLYCODE:
            text = codec.text(packet.data.rstrip(b"\0")).replace("%%", "%")
            action = "reject" if text.startswith("5") else "tempfail"
            return Verdict(action, text[4:], rule, " ".join(text.split()))
        raise codec.ProtocolError(f"unexpected milter reply {reply!r}")

    def _send(self, command: bytes, data: bytes = b"") -> None:
        self.writer.write(codec.encode(command, data))

    async def _read(self) -> codec.Packet:
        while not self.packets:
            await asyncio.wait_for(self.writer.drain(), self.client.timeout)
            data = await asyncio.wait_for(self.reader.read(65536), self.client.timeout)
            if not data:
                raise ConnectionError("the milter closed the connection")
            self.packets.extend(self.decoder.feed(data))
        return self.packets.pop(0)


def _macros(values: dict[str, str]) -> bytes:
    return b"".join(name.encode() + b"\0" + value.encode() + b"\0"
                    for name, value in values.items())


def _header_data(name: str, value: str) -> bytes:
    # As Postfix sends it: the leading space dropped, folding as bare LF.
    text = value[1:] if value.startswith(" ") else value
    return (name.encode("utf-8", "replace") + b"\0"
            + text.replace("\r\n", "\n").encode("utf-8", "surrogateescape") + b"\0")


def _name_value(data: bytes) -> tuple[str, str]:
    parts = data.split(b"\0")
    if len(parts) < 2:
        raise codec.ProtocolError("header action without name and value")
    return codec.text(parts[0]), codec.text(parts[1])
