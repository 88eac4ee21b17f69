"""A remote MX that never holds a message in memory, in a process of its own.

    python -m tests.gateways.stream_sink PORT OUTPUT [CERT KEY]

Serves SMTP on 127.0.0.1:PORT with mailfc's own server (which streams DATA into a
temporary file), STARTTLS when CERT and KEY are given, SIZE 64 MiB.  Each message
accepted becomes one JSON line in OUTPUT: sender, recipients, MAIL parameters,
size and sha256 of the message as received (dot-unstuffed, CRLF line ends).
Tests use it for large messages: a sink in the test process would count its own
memory against what the test measures.  big_message() and PeakMemory are what such
tests need besides.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mailfc.protocols.smtp_server import Envelope, Session, SmtpServer


@contextlib.contextmanager
def running_sink(directory: Path, cert: Path | None = None, key: Path | None = None
                 ) -> Iterator[tuple[Path, int]]:
    """This sink in a process of its own: (its OUTPUT file, its port)."""
    output = directory / "received.jsonl"
    output.touch()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    tls = [str(cert), str(key)] if cert and key else []
    process = subprocess.Popen([sys.executable, "-m", "tests.gateways.stream_sink", str(port),
                                str(output), *tls],
                               stdout=subprocess.PIPE, cwd=Path(__file__).parents[2])
    try:
        assert process.stdout is not None and process.stdout.readline() == b"ready\n"
        yield output, port
    finally:
        process.terminate()
        process.wait(timeout=30)
        if process.stdout is not None:
            process.stdout.close()


def received(output: Path) -> list[dict[str, Any]]:
    """What the sink took so far, one record per message."""
    return [json.loads(line) for line in output.read_text().splitlines()]


def big_message(path: Path, size: int, marker: str) -> tuple[str, str]:
    """A message of about `size` bytes (CRLF lines, some starting with a dot) written to
    path piece by piece; its sha256 as sent, and with LF line ends (as Dovecot stores
    it)."""
    crlf, lf = hashlib.sha256(), hashlib.sha256()
    header = (f"From: big@remote.example\r\nTo: someone\r\nSubject: {marker}\r\n"
              f"Message-ID: <{marker}@remote.example>\r\n\r\n").encode()
    written = 0
    with path.open("wb") as handle:
        piece = header
        line = 0
        while written < size:
            lines = []
            for _ in range(10_000):
                line += 1
                start = "." if line % 97 == 0 else ""
                lines.append(f"{start}line {line:09d} {'x' * 60}\r\n")
            piece += "".join(lines).encode()
            handle.write(piece)
            crlf.update(piece)
            lf.update(piece.replace(b"\r\n", b"\n"))
            written += len(piece)
            piece = b""
    return crlf.hexdigest(), lf.hexdigest()


class PeakMemory:
    """How far this process's resident memory rose above what it was on entry: writing
    5 to /proc/self/clear_refs resets the peak (VmHWM) to the current RSS."""

    grown_bytes = 0     # the rise, once the block has ended

    def __enter__(self) -> PeakMemory:
        Path("/proc/self/clear_refs").write_text("5")
        self.base = _status_kib("VmRSS")
        return self

    def __exit__(self, *exc: object) -> None:
        self.grown_bytes = (_status_kib("VmHWM") - self.base) * 1024


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/self/status")


class Sink:
    def __init__(self, output: Path) -> None:
        self.output = output

    async def handle_DATA(self, session: Session, envelope: Envelope) -> str:
        assert envelope.message is not None
        digest = hashlib.sha256()
        for chunk in envelope.message.chunks():
            digest.update(chunk)
        record = {"from": envelope.mail_from, "to": envelope.rcpt_tos,
                  "options": envelope.mail_options, "size": envelope.message.size,
                  "sha256": digest.hexdigest(), "tls": session.tls}
        with self.output.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        return "250 2.0.0 stored"


async def main(port: int, output: Path, cert: str | None, key: str | None) -> None:
    context = None
    if cert and key:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, key)
    server = SmtpServer(Sink(output), hostname="sink.remote.example",
                        data_size_limit=64 << 20, tls_context=context,
                        message_dir=output.parent)
    loop = asyncio.get_running_loop()
    listening = await loop.create_server(server, "127.0.0.1", port)
    stop = loop.create_future()
    loop.add_signal_handler(signal.SIGTERM, stop.set_result, None)
    print("ready", flush=True)
    await stop
    listening.close()


if __name__ == "__main__":
    arguments = sys.argv[1:]
    asyncio.run(main(int(arguments[0]), Path(arguments[1]),
                     arguments[2] if len(arguments) > 2 else None,
                     arguments[3] if len(arguments) > 3 else None))
