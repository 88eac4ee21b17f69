"""Debian's OpenDKIM as a real third-party milter for the filter tests."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

from tests.conftest import require_binary


def wait_port(port: int, timeout: float, process: subprocess.Popen[bytes]) -> None:
    import socket
    import time
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError("opendkim exited; see opendkim.log")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"opendkim did not listen on {port}")


@contextlib.contextmanager
def opendkim_signing(directory: Path, domain: str, port: int) -> Iterator[Path]:
    """OpenDKIM signing `domain` (and verifying) on 127.0.0.1:`port`."""
    binary = require_binary("opendkim", "opendkim")
    keygen = require_binary("opendkim-genkey", "opendkim-tools")
    directory.mkdir(exist_ok=True)
    subprocess.run([keygen, "-D", str(directory), "-d", domain, "-s", "test"],
                   check=True, capture_output=True)
    conf = directory / "opendkim.conf"
    conf.write_text(f"Syslog no\nMode sv\nSocket inet:{port}@127.0.0.1\n"
                    f"Domain {domain}\nSelector test\nKeyFile {directory}/test.private\n"
                    "RequireSafeKeys false\nCanonicalization relaxed/relaxed\n")
    with (directory / "opendkim.log").open("wb") as log:
        process = subprocess.Popen([binary, "-f", "-x", str(conf)], stdout=log,
                                   stderr=subprocess.STDOUT)
    try:
        wait_port(port, 10, process)
        yield directory
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
