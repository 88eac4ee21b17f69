"""`mailfc sessions` as an admin runs it: a real process on the test CMDB."""

from __future__ import annotations

import asyncio
import datetime
import json
from pathlib import Path
from typing import Any

import asyncpg

from mailfc.policy.recorder import Recorder, now
from tests.cli.conftest import run_mailfc


async def record(pool: asyncpg.Pool) -> tuple[int, int]:
    recorder = Recorder(pool, holder="test/cli")
    old = recorder.new("smtp_sessions", started_at=now() - datetime.timedelta(hours=3),
                       component="postfix", domain="m1.example", account="bob@m1.example",
                       client_ip="192.0.2.7", verdict="accept")
    new = recorder.new("smtp_sessions", component="postfix", domain="m1.example",
                       account="carol@m1.example", client_ip="198.51.100.9", helo="mua",
                       verdict="tempfail", reason="over a limit", messages=0)
    message = recorder.new("smtp_messages", session_id=new, domain="m1.example",
                           account="carol@m1.example", sender="carol@m1.example",
                           verdict="tempfail", reason="over a limit")
    recorder.new("smtp_events", session_id=new, message_id=message, stage="mail",
                 verdict="tempfail", reason="over a limit", rule="limit:messages/1m@account",
                 mode="enforce")
    await recorder.flush()
    await recorder._write_stats()
    assert old.id is not None and new.id is not None
    return old.id, new.id


def mailfc_json(config_file: Path, *args: str) -> Any:
    result = run_mailfc(config_file, "sessions", *args, "--json")
    assert result.code == 0, result.err
    return json.loads(result.out)


async def test_sessions_list_show_stats(policy_db: asyncpg.Pool, config_file: Path) -> None:
    old_id, new_id = await record(policy_db)

    def run() -> None:
        every = mailfc_json(config_file, "list", "--domain", "m1.example")
        assert [s["id"] for s in every] == [new_id, old_id]
        assert mailfc_json(config_file, "list", "--domain", "m1.example", "--since", "1h"
                           ) == [every[0]]
        assert [s["id"] for s in mailfc_json(
            config_file, "list", "--ip", "192.0.2.0/24", "--domain", "m1.example")] == [old_id]
        assert [s["account"] for s in mailfc_json(
            config_file, "list", "--verdict", "tempfail", "--domain", "m1.example")] == [
            "carol@m1.example"]
        assert mailfc_json(config_file, "list", "--account", "nobody@m1.example") == []
        shown = mailfc_json(config_file, "show", str(new_id))
        assert isinstance(shown, dict)
        assert shown["client_ip"] == "198.51.100.9" and shown["helo"] == "mua"
        assert [m["sender"] for m in shown["messages_detail"]] == ["carol@m1.example"]
        assert [e["rule"] for e in shown["events"]] == ["limit:messages/1m@account"]
        stats = mailfc_json(config_file, "stats")
        assert any(s["holder"] == "test/cli" and s["written"] == 4
                   for s in stats)

        table = run_mailfc(config_file, "sessions", "show", str(new_id))
        assert table.code == 0 and "limit:messages/1m@account" in table.out
        assert "carol@m1.example" in run_mailfc(config_file, "sessions", "list").out
        bad = run_mailfc(config_file, "sessions", "list", "--ip", "not-an-ip")
        assert bad.code != 0 and "expected an address or a network" in bad.err
        missing = run_mailfc(config_file, "sessions", "show", "999999999")
        assert missing.code != 0 and "no smtp session 999999999" in missing.err
        assert run_mailfc(config_file, "sessions", "list", "--since", "yesterday").code != 0

    await asyncio.to_thread(run)
    await policy_db.execute("DELETE FROM recorder_stats WHERE holder = 'test/cli'")
