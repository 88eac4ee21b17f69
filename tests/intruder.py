"""A local process running as `nobody` that tries to hand mail to the internal hops.

`intrude(targets, sender, recipient, marker)` runs the script below with setpriv as
nobody/nogroup (no supplementary groups), with the system's python3 and its standard
library only, and returns what happened at each target:

    "refused: <errno name>"   the connection itself failed (EACCES, ECONNREFUSED, ...)
    "closed"                  connected, then closed before any greeting
    "greeted: <reply>"        a greeting came; the script then tried a whole LMTP
                              transaction (LHLO, MAIL, RCPT, DATA) and <reply> is the last
                              reply it got: the hop is open to anyone
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.conftest import require, require_binary

PYTHON = "/usr/bin/python3"

SCRIPT = r'''
import errno, json, socket, sys

targets, sender, recipient, marker = json.loads(sys.argv[1])

def reply(sock):
    data = b""
    while not data.endswith(b"\r\n") or data.split(b"\r\n")[-2][3:4] == b"-":
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data.decode("ascii", "replace").strip()

def attempt(target):
    if target.startswith("unix:"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        address = target[len("unix:"):]
    else:
        host, _, port = target.rpartition(":")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        address = (host, int(port))
    sock.settimeout(5)
    with sock:
        try:
            sock.connect(address)
        except OSError as error:
            return "refused: " + errno.errorcode.get(error.errno, str(error.errno))
        try:
            greeting = reply(sock)
        except OSError:
            greeting = ""
        if not greeting:
            return "closed"
        last = greeting
        try:
            for line in ("LHLO intruder", "MAIL FROM:<%s>" % sender, "RCPT TO:<%s>" % recipient,
                         "DATA"):
                sock.sendall(line.encode() + b"\r\n")
                last = reply(sock)
            sock.sendall(("From: <%s>\r\nSubject: %s\r\n\r\nintruder\r\n.\r\n"
                          % (sender, marker)).encode())
            last = reply(sock)
        except OSError as error:
            last += " / " + str(error)
        return "greeted: " + last

print(json.dumps({target: attempt(target) for target in targets}))
'''


def intrude(targets: list[str], sender: str, recipient: str, marker: str) -> dict[str, str]:
    setpriv = require_binary("setpriv", "util-linux")
    require(Path(PYTHON).exists(), f"{PYTHON} (apt-get install python3)")
    result = subprocess.run(
        [setpriv, "--reuid", "nobody", "--regid", "nogroup", "--clear-groups", PYTHON, "-c",
         SCRIPT, json.dumps([targets, sender, recipient, marker])],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    outcomes: dict[str, str] = json.loads(result.stdout)
    return outcomes


def kept_out(outcome: str) -> bool:
    """Whether a target let the intruder say nothing at all."""
    return outcome.startswith("refused: ") or outcome == "closed"
