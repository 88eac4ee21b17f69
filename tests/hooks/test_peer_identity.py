"""Root in one domain's container reports another domain's user: the hook server refuses.

The client runs inside k1.example's Dovecot container (runc exec, as vmail like the
imap processes) and speaks the hook protocol itself on the shared socket: a SESSION
for bob@k2.example is answered with ERROR, and nothing is recorded, leased or counted
for k2.example; a SESSION of k1.example's own user on the same connection goes on, and
so do real IMAP sessions.
"""

from __future__ import annotations

import asyncio

import asyncpg

from mailfc.runtime.images import SOCKET_MOUNT
from tests.hooks.conftest import HooksHost, imap_close, imap_login, set_limit
from tests.inside import run_inside

# Stand-alone (the container has only the standard library): prints the lines read.
HOOK_CLIENT = r"""
import json, socket, sys, time
path, forged, own, client_ip = sys.argv[1:5]
sock = socket.socket(socket.AF_UNIX)
sock.settimeout(20)
sock.connect(path)
reader = sock.makefile("rb")
now = int(time.time() * 1e6)

def line():
    while True:
        text = reader.readline().decode().rstrip("\n")
        if not text.startswith("WATCH\t"):
            return text

def send(*fields):
    sock.sendall("\t".join(str(f) for f in fields).encode() + b"\n")

seen = [line()]
send("SESSION", 1, now, forged, client_ip, 0)
seen.append(line())
send("CMD", 1, 1, "SEARCH", "a1")
seen.append(line())
send("DONE", 1, 1, now, 1000, "SEARCH", "a1", "OK done", "ALL")
send("END", 1, 10, 20, "logout")
send("SESSION", 2, now, own, client_ip, 0)
seen.append(line())
send("END", 2, 10, 20, "logout")
print(json.dumps(seen))
"""
CLIENT_IP = "192.0.2.77"


def real_session() -> None:
    client = imap_login("carol@k1.example")
    try:
        assert client.select("INBOX")[0] == "OK"
    finally:
        imap_close(client)


async def test_a_container_cannot_report_sessions_of_another_domain(
        hooks_host: HooksHost, hooks_db: asyncpg.Pool) -> None:
    for target in ("k2.example", "bob@k2.example"):
        await set_limit(hooks_db, target, "imap_sessions", 5)
        await set_limit(hooks_db, target, "imap_commands", 100, window_s=3600)
    dovecot = await hooks_host.runtime.ensure("k1.example", "imap")
    socket = f"{SOCKET_MOUNT}/{hooks_host.runtime.settings.hook_socket}"
    errors_before = hooks_host.hooks.server.protocol_errors
    seen = await run_inside(hooks_host.runtime, dovecot, "vmail", HOOK_CLIENT, socket,
                            "bob@k2.example", "bob@k1.example", CLIENT_IP)
    assert isinstance(seen, list)
    hello, forged, command, own = seen
    assert hello.startswith("HELLO\t"), seen
    assert forged.startswith("ERROR\t") and "k1.example" in forged, seen
    assert command == "CMD\t1\t1\tOK", seen          # no such session: nothing counted
    assert own.startswith("SESSION\t2\tOK\t"), seen
    assert hooks_host.hooks.server.protocol_errors == errors_before + 1
    assert hooks_host.hooks.server.refused_peers == 0

    await asyncio.to_thread(real_session)
    for account in ("bob@k1.example", "carol@k1.example"):
        ended = await hooks_host.wait_recorded(
            "SELECT count(*) FROM imap_sessions WHERE account = $1 AND ended_at IS NOT NULL",
            account)
        assert ended == 1, account
    await hooks_host.hooks.recorder.flush()
    assert await hooks_db.fetchval(
        "SELECT (SELECT count(*) FROM imap_sessions WHERE domain = 'k2.example'"
        "        OR account LIKE '%@k2.example')"
        "     + (SELECT count(*) FROM imap_commands WHERE domain = 'k2.example'"
        "        OR account LIKE '%@k2.example')"
        "     + (SELECT count(*) FROM limit_leases WHERE subject LIKE '%k2.example')"
        "     + (SELECT count(*) FROM limit_counters WHERE subject LIKE '%k2.example')") == 0
