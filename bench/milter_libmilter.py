"""A bare python-libmilter milter (ThreadFactory, accept everything, record nothing).

    python -m bench.milter_libmilter SOCKET

The reference point that made mailfc write its own asyncio milter: bench/milter_postfix.py
runs it behind the same Postfix as the mailfc milter.  It asks for the same stages as the
mailfc milter and no reply for connect, helo, headers, end of headers and body (the best
case for the library), and does nothing in them.
"""

from __future__ import annotations

import signal
import sys
import types
from typing import Any

import libmilter as lm


class BareMilter(lm.ThreadMixin, lm.MilterProtocol):  # type: ignore[misc]
    def __init__(self, opts: int = 0, protos: int = 0) -> None:
        lm.MilterProtocol.__init__(self, opts, protos)
        lm.ThreadMixin.__init__(self)

    def log(self, msg: str) -> None:
        pass

    @lm.noReply
    def connect(self, hostname: str, family: str, ip: str, port: int, cmd: Any) -> bytes:
        return lm.CONTINUE

    @lm.noReply
    def helo(self, heloname: str) -> bytes:
        return lm.CONTINUE

    def mailFrom(self, address: str, cmd: Any) -> bytes:
        return lm.CONTINUE

    def rcpt(self, recipient: str, cmd: Any) -> bytes:
        return lm.CONTINUE

    @lm.noReply
    def header(self, key: str, value: str, cmd: Any) -> bytes:
        return lm.CONTINUE

    @lm.noReply
    def eoh(self, cmd: Any) -> bytes:
        return lm.CONTINUE

    @lm.noReply
    def body(self, chunk: bytes, cmd: Any) -> bytes:
        return lm.CONTINUE

    def eob(self, cmd: Any) -> bytes:
        return lm.CONTINUE

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


def main() -> None:
    factory = lm.ThreadFactory(sys.argv[1], BareMilter, lm.SMFIF_ALLOPTS)

    def stop(signum: int, frame: types.FrameType | None) -> None:
        factory.close()
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    print("ready", flush=True)
    factory.run()


if __name__ == "__main__":
    main()
