"""`abuse block|unblock` feed the limit engine: the next session is refused, then passes.

The milter runs in this process on its own socket (tests.policy.conftest.running_milter)
and is driven over the real milter protocol; the block is set with the real CLI.
"""

from __future__ import annotations

import json
from pathlib import Path

import asyncpg

from bench.abuse_data import PLANTS
from tests.analysis.conftest import History
from tests.policy.conftest import running_milter
from tests.policy.mta import MtaClient, reply_text

BULK = PLANTS["bulk"]
DOMAIN = "d1.abuse.example"


async def _send(socket: Path, account: str, client_ip: str = "192.0.2.7") -> str:
    client = await MtaClient.open(socket, DOMAIN, client_ip)
    try:
        answer = reply_text(await client.mail(account, account=account))
        if answer == "c":
            assert reply_text(await client.rcpt("someone@remote.example")) == "c"
            answer = reply_text(await client.end_of_message())
        return answer
    finally:
        await client.quit()


async def test_block_takes_effect_on_the_next_session(history: History, cmdb: asyncpg.Pool,
                                                      state_dir: Path) -> None:
    socket = state_dir / "abuse-milter" / "milter.sock"
    async with running_milter(cmdb, socket) as milter:
        assert await _send(socket, BULK) == "c"
        history.ok("abuse", "block", BULK, "--reason", "spam run, ticket 4711")
        answer = await _send(socket, BULK)
        assert answer.startswith("550 5.7.1"), answer
        assert "spam run, ticket 4711" in answer
        # Another account of the domain is not affected.
        assert await _send(socket, "u1@" + DOMAIN) == "c"
        await milter.recorder.flush()
        event = await cmdb.fetchrow(
            "SELECT e.rule, e.verdict, e.session_id FROM smtp_events e"
            " JOIN smtp_sessions s ON s.id = e.session_id"
            " WHERE s.account = $1 AND e.rule LIKE 'block:%'", BULK)
        assert (event["rule"], event["verdict"]) == ("block:account", "reject")
        why = history.ok("abuse", "why", str(event["session_id"])).out
        assert "refused it permanently (550 5.7.1)" in why
        assert "It is still in force" in why

        history.ok("abuse", "unblock", BULK, "--reason", "customer cleaned up")
        assert await _send(socket, BULK) == "c"

        # An IP block (a network) refuses every account from it, at once.
        history.ok("abuse", "block", "192.0.2.0/28", "--for", "1h")
        assert (await _send(socket, "u1@" + DOMAIN, "192.0.2.9")).startswith("550 5.7.1")
        assert await _send(socket, "u1@" + DOMAIN, "192.0.2.99") == "c"
        history.ok("abuse", "unblock", "192.0.2.9/28")
        assert await _send(socket, "u1@" + DOMAIN, "192.0.2.9") == "c"

        await milter.recorder.flush()

    events = await cmdb.fetch("SELECT action, kind, value, reason FROM admin_events"
                              " ORDER BY id")
    assert [(e["action"], e["kind"], e["value"]) for e in events] == [
        ("block", "account", BULK), ("unblock", "account", BULK),
        ("block", "ip", "192.0.2.0/28"), ("unblock", "ip", "192.0.2.0/28")]
    assert events[1]["reason"] == "customer cleaned up"
    # The account's timeline shows who blocked it.
    report = json.loads(history.ok("abuse", "account", BULK, "--since", "1h", "--json",
                                   "--limit", "5000").out)
    admin = [row for row in report["timeline"] if row["what"] == "admin"]
    assert [row["detail"].split(" by ")[0] for row in admin] == [
        f"unblock account {BULK}", f"block account {BULK}"]


def test_block_input_errors(history: History) -> None:
    history.fails("abuse", "block", "nobody@d1.abuse.example", says="no account")
    history.fails("abuse", "block", "nowhere.example", says="no domain")
    history.fails("abuse", "block", "300.1.2.3", says="invalid ip address")
    history.fails("abuse", "block", "bad@@address", says="invalid")
    history.fails("abuse", "unblock", "198.51.100.1", says="no ip block")
    history.fails("abuse", "block", "d1.abuse.example", "--for", "soon", says="--for")
    # A remote sender needs no account here.
    out = json.loads(history.ok("abuse", "block", "--kind", "sender", "Spammer@Remote.Example",
                                "--json").out)
    assert out[0]["value"] == "spammer@remote.example"
    rows = json.loads(history.ok("abuse", "blocks", "--json").out)
    assert [(r["kind"], r["active"]) for r in rows] == [("sender", True)]
    history.ok("abuse", "unblock", "--kind", "sender", "spammer@remote.example")
