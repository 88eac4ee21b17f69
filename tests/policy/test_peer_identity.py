"""Who may speak to the milter is the kernel's word (mailfc.peers), not the MTA's.

Root in m1.example's Postfix container (runc exec) speaks the milter protocol itself on
the shared socket, naming {daemon_name} m2.example and {auth_authen} bob@m2.example:
the session is m1.example's, nothing is recorded or counted for m2.example or its
account.  A host process that is neither root nor in a container is not served.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
from pathlib import Path

import asyncpg

from mailfc.runtime.images import SOCKET_MOUNT
from tests.inside import run_inside
from tests.policy.conftest import (
    MilterUnderTest,
    PostfixHost,
    running_milter,
    set_limit,
    wait_for,
)

# Stand-alone (the container has only the standard library): one SMTP transaction's
# packets; prints the first byte of each reply the milter owes ("closed" when it hung up).
MILTER_CLIENT = r"""
import json, socket, struct, sys
path, daemon_name, account, client_ip = sys.argv[1:5]
sock = socket.socket(socket.AF_UNIX)
sock.settimeout(20)
sock.connect(path)

def send(command, data=b""):
    sock.sendall(struct.pack("!I", len(data) + 1) + command + data)

def receive(size):
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data

def reply():
    head = receive(4)
    body = head and receive(struct.unpack("!I", head)[0])
    return body[:1].decode() if body else "closed"

replies = []
try:
    send(b"O", struct.pack("!III", 6, 0x1FF, 0x1FFFFF))
    replies.append(reply())
    send(b"D", b"C{daemon_name}\0" + daemon_name.encode() + b"\0")
    send(b"C", b"forger.example\0" b"4" + struct.pack("!H", 4000) + client_ip.encode() + b"\0")
    send(b"H", b"forger.example\0")
    send(b"D", b"M{auth_authen}\0" + account.encode() + b"\0")
    send(b"M", b"<" + account.encode() + b">\0")
    replies.append(reply())
    send(b"R", b"<someone@remote.example>\0")
    replies.append(reply())
    send(b"L", b"Subject\0forged\0")
    send(b"N")
    send(b"B", b"hello\r\n")
    send(b"D", b"Ei\0FORGED1\0")
    send(b"E")
    replies.append(reply())
    send(b"Q")
except (BrokenPipeError, ConnectionResetError):
    replies.append("closed")    # hung up before we had sent it all
except OSError as error:
    replies.append(type(error).__name__)
print(json.dumps(replies))
"""
CLIENT_IP = "192.0.2.66"
HOST_CLIENT_IP = "192.0.2.67"


async def test_a_container_cannot_record_or_spend_for_another_domain(
        postfix_host: PostfixHost, milter: MilterUnderTest, policy_db: asyncpg.Pool) -> None:
    for target in ("m1.example", "m2.example", "bob@m2.example"):
        await set_limit(policy_db, target, "messages", 100, window_s=3600)
    postfix = await postfix_host.postfix("m1.example")
    socket = f"{SOCKET_MOUNT}/{postfix_host.runtime.settings.milter_socket}"
    replies = await run_inside(postfix_host.runtime, postfix, "postfix", MILTER_CLIENT,
                               socket, "m2.example", "bob@m2.example", CLIENT_IP)
    # Negotiated, then MAIL, RCPT and end of message continue: m1.example's limits allow it.
    assert replies == ["O", "c", "c", "c"], replies

    async def ended() -> bool:
        return bool(await policy_db.fetchval(
            "SELECT count(*) FROM smtp_sessions WHERE client_ip = $1 AND ended_at IS NOT NULL",
            CLIENT_IP))
    await wait_for(ended)
    await milter.recorder.flush()
    session = await policy_db.fetchrow("SELECT * FROM smtp_sessions WHERE client_ip = $1",
                                       CLIENT_IP)
    assert session["domain"] == "m1.example" and session["account"] is None
    message = await policy_db.fetchrow("SELECT * FROM smtp_messages WHERE session_id = $1",
                                       session["id"])
    assert message["domain"] == "m1.example" and message["account"] is None
    assert message["queue_id"] == "FORGED1" and message["verdict"] == "accept"

    others = await policy_db.fetchval(
        "SELECT (SELECT count(*) FROM smtp_sessions WHERE domain = 'm2.example'"
        "        OR account LIKE '%@m2.example')"
        "     + (SELECT count(*) FROM smtp_messages WHERE domain = 'm2.example'"
        "        OR account LIKE '%@m2.example')")
    assert others == 0

    async def spent(subject: str) -> int:
        return int(await policy_db.fetchval(
            "SELECT coalesce(sum(amount), 0) FROM limit_counters"
            " WHERE subject = $1 AND kind = 'messages'", subject))
    assert await spent("domain:m2.example") == 0
    assert await spent("account:bob@m2.example") == 0
    assert await spent("domain:m1.example") == 1
    assert milter.server.refused_peers == 0


async def test_a_host_process_that_is_not_root_is_not_served(
        policy_db: asyncpg.Pool, state_dir: Path) -> None:
    # A socket a host user may reach (the platform's sits under a root-only
    # directory, where no such process gets at all).
    directory = Path(tempfile.mkdtemp(prefix="milter-peer-", dir=state_dir))
    os.chmod(directory, 0o755)
    async with running_milter(policy_db, directory / "milter.sock") as milter:
        # nobody, in the socket's group (so the file mode lets it connect).
        group = os.stat(milter.socket).st_gid
        process = await asyncio.create_subprocess_exec(
            "setpriv", "--reuid=nobody", f"--regid={group}", "--clear-groups",
            "/usr/bin/python3", "-c", MILTER_CLIENT, str(milter.socket), "m2.example",
            "bob@m2.example", HOST_CLIENT_IP, stdout=asyncio.subprocess.PIPE)
        out, _ = await asyncio.wait_for(process.communicate(), 30)
        assert milter.server.refused_peers == 1
    replies = json.loads(out.decode().splitlines()[-1])
    # Hung up on before the negotiation was answered.
    assert replies[0] == "closed", replies
    assert await policy_db.fetchval(
        "SELECT count(*) FROM smtp_sessions WHERE client_ip = $1", HOST_CLIENT_IP) == 0
