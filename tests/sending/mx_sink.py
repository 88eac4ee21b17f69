"""A remote MX for the sending tests, run inside the test's own network namespace.

    python -m tests.sending.mx_sink ADDRESS PORT DIRECTORY

Accepts mail and writes each message to DIRECTORY/<n>.eml with its envelope
in DIRECTORY/<n>.json.  Recipients whose local part starts with
  "temp"   get 451 4.3.2 the first time and 250 afterwards,
  "reject" get 550 5.1.1 always.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path

from aiosmtpd.smtp import SMTP, Envelope, Session


class Sink:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.seen: set[str] = set()
        self.count = 0

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, options: list[str]) -> str:
        local = address.split("@")[0]
        if local.startswith("reject"):
            return "550 5.1.1 no such user here"
        if local.startswith("temp") and address not in self.seen:
            self.seen.add(address)
            return "451 4.3.2 try again later"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.count += 1
        base = self.directory / str(self.count)
        base.with_suffix(".eml").write_bytes(envelope.original_content or b"")
        base.with_suffix(".json").write_text(json.dumps(
            {"from": envelope.mail_from, "to": envelope.rcpt_tos}))
        return "250 2.0.0 accepted"


async def main(address: str, port: int, directory: Path) -> None:
    handler = Sink(directory)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: SMTP(handler, hostname="mx.remote.example"),
                                      address, port)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    (directory / "ready").write_text("ok")
    await stop.wait()
    server.close()


if __name__ == "__main__":
    Path(sys.argv[3]).mkdir(parents=True, exist_ok=True)
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])))
