"""What the records and the abuse commands say, as an abuse desk reads them: a message
counted once across hops, scores never negative, IMAP limit hits in the account report,
Filter-Out described as the hop it is, detail as an object, a closed pipe taken quietly,
numbers and nouns as people write them."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import asyncpg

from mailfc.analysis.stats import severity
from mailfc.cli.common import number_text, rounded
from mailfc.policy.engine import _decision
from mailfc.policy.recorder import Recorder
from tests.analysis.conftest import History

HOP_IP = "192.0.2.231"


async def record_hops(pool: asyncpg.Pool) -> tuple[int, int]:
    """One submission as the platform records it: the Postfix hop, then Filter-Out."""
    recorder = Recorder(pool, holder="test/hops")
    first = recorder.new("smtp_sessions", component="postfix", domain="hop.abuse.example",
                         account="bob@hop.abuse.example", client_ip=HOP_IP, verdict="accept",
                         messages=1)
    recorder.new("smtp_messages", session_id=first, domain="hop.abuse.example",
                 account="bob@hop.abuse.example", client_ip=HOP_IP, queue_id="4HopQ1",
                 sender="bob@hop.abuse.example", recipient_count=1, verdict="accept")
    recorder.new("smtp_events", session_id=first, stage="mail", verdict="tempfail",
                 rule="limit:messages/1h@account", mode="shadow", reason="would defer",
                 detail={"size": 10})
    hop = recorder.new("smtp_sessions", component="filter-out", domain="hop.abuse.example",
                       client_ip=HOP_IP, verdict="accept", messages=1)
    recorder.new("smtp_messages", session_id=hop, domain="hop.abuse.example",
                 client_ip=HOP_IP, queue_id="hop.abuse.example:4HopQ1",
                 sender="bob@hop.abuse.example", recipient_count=1, verdict="accept",
                 hop="filter-out")
    imap = recorder.new("imap_sessions", domain="hop.abuse.example",
                        account="bob@hop.abuse.example", client_ip=HOP_IP, verdict="accept")
    recorder.new("imap_commands", session_id=imap, domain="hop.abuse.example",
                 account="bob@hop.abuse.example", name="SEARCH", tag="a1", result="NO",
                 verdict="tempfail", duration_ms=5.4019999504089355,
                 reason="account bob@hop.abuse.example reached its limit of 2 searches")
    await recorder.flush()
    assert first.id is not None and hop.id is not None
    return first.id, hop.id


async def test_records_read_as_an_abuse_desk_reads_them(history: History,
                                                         cmdb: asyncpg.Pool) -> None:
    first, hop = await record_hops(cmdb)

    def run() -> None:
        top = json.loads(history.ok("abuse", "top", "--by", "ip", "--since", "1h",
                                    "--json").out)
        assert [r["messages"] for r in top if r["subject"] == HOP_IP] == [1]
        by_domain = json.loads(history.ok("abuse", "top", "--by", "domain", "--since", "1h",
                                          "--json").out)
        assert [r["messages"] for r in by_domain if r["subject"] == "hop.abuse.example"] == [1]

        story = json.loads(history.ok("abuse", "why", str(hop), "--json").out)["story"]
        text = "\n".join(story)
        assert "Filter-Out" in text and "unauthenticated client" not in text
        assert "an unknown address" not in text and "message(s)" not in text

        shown = json.loads(history.ok("sessions", "show", str(first), "--json").out)
        assert shown["events"][0]["detail"] == {"size": 10}

        report = json.loads(history.ok("abuse", "account", "bob@hop.abuse.example",
                                       "--since", "1h", "--json").out)
        hits = {h["rule"]: h for h in report["hits"]}
        assert hits["imap:search"]["times"] == 1 and hits["imap:search"]["mode"] == "enforce"
        assert hits["limit:messages/1h@account"]["times"] == 1

        imap = json.loads(history.ok("sessions", "list", "--protocol", "imap", "--domain",
                                     "hop.abuse.example", "--json").out)
        shown_imap = json.loads(history.ok("sessions", "show", str(imap[0]["id"]),
                                           "--protocol", "imap", "--json").out)
        assert shown_imap["commands_detail"][0]["duration_ms"] == 5.402
        table = history.ok("sessions", "show", str(imap[0]["id"]), "--protocol", "imap").out
        assert " 5.4 " in table and "5.40199" not in table

        anomalies = json.loads(history.ok("abuse", "anomalies", "--json").out)
        assert anomalies and all(row["score"] >= 1 for row in anomalies)
        assert all(f["score"] >= 1 for row in anomalies for f in row["findings"])

    try:
        await asyncio.to_thread(run)
    finally:
        await cmdb.execute("DELETE FROM recorder_stats WHERE holder = 'test/hops'")


def test_a_reader_that_goes_away_ends_the_command_quietly(history: History) -> None:
    env = {**os.environ, "MAILFC_CONFIG": str(history.config_file)}
    env.pop("MAILFC_DEBUG", None)
    for command in ("sessions list --limit 5000", "sessions list --limit 5000 --json",
                    "abuse top --since 30d --limit 2000 --json"):
        result = subprocess.run(
            f"{sys.executable} -m mailfc {command} | head -n 1", shell=True, env=env,
            capture_output=True, text=True, timeout=120)
        assert result.stdout.count("\n") == 1, result.stdout
        assert result.stderr == "", result.stderr


def test_scores_numbers_and_nouns() -> None:
    assert severity(0.2, 0.3, 0.001) == 0.0          # under its bound: 0, never negative
    assert severity(0.6, 0.3, 0.001) == 1.0          # a ratio twice its bound
    assert severity(0.6, 0.3) == 0.0 and severity(20, 5) == 2.0
    assert number_text(5.4019999504089355) == "5.4" and number_text(0.01234) == "0.0123"
    assert number_text(1234.5) == "1234.5" and rounded(5.4019999504089355) == 5.402

    def reason(kind: str, value: int) -> str:
        return _decision({"kind": kind, "value": value, "window_s": 60, "used": value,
                          "subject": "account:a@x.example", "scope": "account",
                          "mode": "enforce"}).reason

    assert "limit of 2 searches per 1m" in reason("imap_search", 2)
    assert "limit of 1 message per 1m" in reason("messages", 1)
    assert "limit of 3 messages per 1m" in reason("messages", 3)
