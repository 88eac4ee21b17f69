"""Every door a running platform opens, tried by a local user who is nobody.

A census rather than a list: every unix socket under the state directory (the
dispatcher's, the internal hops', the ones the containers mount, PostgreSQL's),
every socket inside the running domain containers (as the host sees them, under
/proc/<pid>/root) and the dispatcher's TCP ports.  A socket added later is tried
without anyone remembering to add it here.  Not one lets the intruder say a word.
"""

from __future__ import annotations

import asyncio
import os
import stat
import uuid
from pathlib import Path

from mailfc.runtime.images import dovecot_socket
from tests.intruder import intrude, kept_out
from tests.routers.conftest import RouterHost

# What the census must at least find, by name, or it proves nothing.
EXPECTED = ("lmtp.sock", "imap.sock", "smtp.sock", "milter.sock", "auth.sock")


def unix_sockets(top: Path) -> list[Path]:
    """Every unix socket under `top`, symbolic links not followed."""
    found = []
    for directory, _dirs, files in os.walk(top):
        for name in files:
            path = Path(directory, name)
            if stat.S_ISSOCK(path.lstat().st_mode):
                found.append(path)
    return found


async def test_nobody_gets_a_word_in_at_any_door(router_host: RouterHost) -> None:
    runtime = router_host.runtime
    postfix = await runtime.ensure("a.example", "smtp")
    dovecot = await runtime.ensure("a.example", "imap")
    assert postfix.pid and dovecot.pid
    sockets = unix_sockets(router_host.config.state_dir)
    assert {name for name in EXPECTED} <= {path.name for path in sockets}, sockets
    inside = [postfix.socket("smtp"), dovecot.socket("lmtp"), dovecot.socket("imap"),
              dovecot_socket(dovecot.pid, "auth-userdb"), dovecot_socket(dovecot.pid, "master")]
    settings = router_host.config.dispatcher
    tcp = [f"{settings.address}:{port}"
           for port in (settings.lmtp_port, settings.imap_port, settings.smtp_port)]
    targets = [f"unix:{path}" for path in [*sockets, *map(Path, inside)]] + tcp
    outcomes = await asyncio.to_thread(intrude, targets, "root@b.example", "bob@a.example",
                                       f"census-{uuid.uuid4()}")
    assert len(outcomes) == len(targets)
    assert all(kept_out(outcome) for outcome in outcomes.values()), {
        target: outcome for target, outcome in outcomes.items() if not kept_out(outcome)}
