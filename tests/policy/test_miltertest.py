"""OpenDKIM's miltertest drives the milter directly; the records land in PostgreSQL."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import asyncpg

from tests.conftest import require_binary
from tests.policy.conftest import MilterUnderTest, set_limit, wait_for

SCRIPTS = Path(__file__).parent / "scripts"


async def run_miltertest(script: str, socket: Path) -> str:
    binary = require_binary("miltertest", "miltertest")
    process = await asyncio.create_subprocess_exec(
        binary, "-s", str(SCRIPTS / script), env={**os.environ, "MILTER_SOCKET": str(socket)},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(process.communicate(), 60)
    text = out.decode(errors="replace")
    assert process.returncode == 0, text
    return text


async def test_miltertest_script(milter: MilterUnderTest, policy_db: asyncpg.Pool) -> None:
    await set_limit(policy_db, "bob@m1.example", "recipients_per_message", 2)
    await policy_db.execute("INSERT INTO blocks (kind, value, reason)"
                            " VALUES ('sender_domain', 'spam.example', 'spam run')")
    out = await run_miltertest("limits.lua", milter.socket)
    assert "miltertest script done" in out

    async def recorded() -> bool:
        return bool(await policy_db.fetchval(
            "SELECT count(*) = 1 FROM smtp_sessions WHERE domain = 'm1.example'"
            " AND ended_at IS NOT NULL"))
    await wait_for(recorded)
    session = await policy_db.fetchrow(
        "SELECT * FROM smtp_sessions WHERE domain = 'm1.example'")
    assert session["component"] == "postfix" and session["host"] == "milter-host"
    assert str(session["client_ip"]) == "192.0.2.7"
    assert session["client_name"] == "client.example" and session["helo"] == "client.example"
    assert session["account"] == "bob@m1.example"
    assert (session["messages"], session["recipients"]) == (1, 2)
    assert session["verdict"] == "reject" and "spam run" in session["reason"]

    messages = await policy_db.fetch(
        "SELECT * FROM smtp_messages WHERE session_id = $1 ORDER BY id", session["id"])
    assert [m["verdict"] for m in messages] == ["accept", "aborted", "reject"]
    first = messages[0]
    assert first["sender"] == "bob@m1.example" and first["account"] == "bob@m1.example"
    assert first["recipients"] == ["one@remote.example", "two@remote.example"]
    assert first["recipient_count"] == 2 and first["queue_id"] == "MT1QUEUE"
    assert first["message_id"] == "<mt-1@m1.example>"
    assert first["subject_digest"] is not None and len(first["subject_digest"]) == 16
    assert first["size"] > len("hello\r\n") and first["ended_at"] >= first["started_at"]

    events = await policy_db.fetch(
        "SELECT stage, verdict, rule, mode, message_id, reason FROM smtp_events"
        " WHERE session_id = $1 ORDER BY id", session["id"])
    assert [(e["stage"], e["verdict"], e["rule"]) for e in events] == [
        ("rcpt", "tempfail", "limit:recipients_per_message@account"),
        ("mail", "reject", "block:sender_domain"),
    ]
    assert events[0]["message_id"] == first["id"]
    assert events[1]["message_id"] == messages[2]["id"]
