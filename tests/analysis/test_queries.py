"""The abuse commands on a generated history with planted incidents, through the real CLI.

Plants (bench/abuse_data.py): a hijacked account, a credential-stuffing source, a bulk
sender within its limits, and a newsletter whose weekly spike is legitimate.
"""

from __future__ import annotations

import csv
import datetime
import io
import json
from pathlib import Path

import asyncpg

from bench.abuse_data import PLANTS
from tests.analysis.conftest import History

PLANTED = {PLANTS["hijacked"], PLANTS["bulk"], PLANTS["stuffing_ip"]}


def test_anomalies_rank_the_plants_first_and_spare_the_newsletter(history: History) -> None:
    suspects = json.loads(history.ok("abuse", "anomalies", "--json").out)
    top = {s["subject"] for s in suspects[:3]}
    assert top == PLANTED, suspects
    flagged = {s["subject"] for s in suspects}
    assert PLANTS["newsletter"] not in flagged
    # Nothing of the ordinary traffic passes the robust bounds.
    assert flagged == PLANTED, [s for s in suspects if s["subject"] not in PLANTED]
    by_subject = {s["subject"]: s for s in suspects}
    hijack = by_subject[PLANTS["hijacked"]]
    assert {"volume", "fanout", "new_ip_send", "refusals", "bounces"} <= set(
        hijack["rules"].split(", "))
    assert any(PLANTS["hijack_ip"] in e and "had not used" in e for e in hijack["evidence"])
    stuffing = by_subject[PLANTS["stuffing_ip"]]
    assert stuffing["kind"] == "ip" and stuffing["rules"] == "stuffing"
    assert any(PLANTS["victim"] in e for e in stuffing["evidence"])
    bulk = by_subject[PLANTS["bulk"]]
    assert "volume" in bulk["rules"] and "refusals" not in bulk["rules"]
    # The table names them too.
    table = history.ok("abuse", "anomalies").out
    assert PLANTS["hijacked"] in table and PLANTS["newsletter"] not in table


def test_anomalies_in_one_domain_and_bad_options(history: History) -> None:
    suspects = json.loads(history.ok("abuse", "anomalies", "--domain", "d1.abuse.example",
                                     "--json").out)
    assert [s["subject"] for s in suspects] == [PLANTS["bulk"]]
    history.fails("abuse", "anomalies", "--window", "1x", says="--window")
    history.fails("abuse", "anomalies", "--window", "2d", "--baseline", "1d",
                  says="shorter than --window")
    history.fails("abuse", "anomalies", "--domain", "nowhere.example", says="no domain")


def test_top_by_each_subject_and_metric(history: History, tmp_path: Path) -> None:
    rows = json.loads(history.ok("abuse", "top", "--since", "1d", "--json").out)
    assert [r["subject"] for r in rows[:3]] == [PLANTS["newsletter"], PLANTS["bulk"],
                                                 PLANTS["hijacked"]]
    assert rows[2]["deferrals"] == 200 and rows[0]["rank"] == 1
    rows = json.loads(history.ok("abuse", "top", "--by", "ip", "--metric", "auth_failures",
                                 "--since", "2h", "--json").out)
    assert rows[0]["subject"] == PLANTS["stuffing_ip"] and rows[0]["auth_failures"] == 300
    text = history.ok("abuse", "top", "--by", "domain", "--metric", "deferrals",
                      "--since", "1d", "--csv").out
    parsed = list(csv.DictReader(io.StringIO(text)))
    assert parsed[0]["subject"] == "d0.abuse.example" and int(parsed[0]["deferrals"]) >= 200
    rows = json.loads(history.ok("abuse", "top", "--by", "sender", "--since", "1d",
                                 "--domain", "d2.abuse.example", "--limit", "1",
                                 "--json").out)
    assert [r["subject"] for r in rows] == [PLANTS["newsletter"]]
    plot = tmp_path / "top.png"
    history.ok("abuse", "top", "--since", "1d", "--plot", str(plot))
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_empty_results_are_empty_tables(history: History) -> None:
    between = ("--between", "2001-01-01", "2001-01-02")
    assert json.loads(history.ok("abuse", "top", *between, "--json").out) == []
    assert history.ok("abuse", "top", *between, "--csv").out.strip() == (
        "rank,subject,messages,recipients,bytes,deferrals,rejects")
    assert "nothing found" in history.ok("abuse", "top", *between).out
    assert json.loads(history.ok("abuse", "blocks", "--json").out) == []


def test_bad_input_is_refused_clearly(history: History) -> None:
    history.fails("abuse", "top", "--since", "yesterday", says="give a duration")
    history.fails("abuse", "top", "--by", "sender", "--metric", "auth_failures",
                  says="does not apply")
    history.fails("abuse", "top", "--json", "--csv", says="either --json or --csv")
    history.fails("abuse", "top", "--plot", "out.svg", says=".png")
    history.fails("abuse", "account", "nobody@d0.abuse.example", says="no account")
    history.fails("abuse", "account", "not-an-address@", says="invalid")
    history.fails("abuse", "why", "<nothing@nowhere.example>", says="no smtp message id")
    history.fails("abuse", "why", "what?!", says="not a session id")


def test_account_timeline_marks_the_new_address(history: History, tmp_path: Path) -> None:
    report = json.loads(history.ok("abuse", "account", PLANTS["hijacked"].upper(),
                                   "--since", "1d", "--limit", "2000", "--json").out)
    ips = {row["ip"]: row for row in report["ips"]}
    assert ips[PLANTS["hijack_ip"]]["new"] is True
    assert ips["10.200.0.1"]["new"] is False
    assert report["summary"]["deferred"] == 200 and report["summary"]["accepted"] == 205
    assert report["limits"][0]["kind"] == "messages" and report["limits"][0]["value"] == 100
    assert report["hits"][0]["rule"] == "limit:messages/1h@account"
    assert report["hits"][0]["times"] == 200
    whats = {row["what"] for row in report["timeline"]}
    assert {"smtp", "decision", "login", "imap"} <= whats
    plot = tmp_path / "account.png"
    table = history.ok("abuse", "account", PLANTS["hijacked"], "--since", "3h", "--plot",
                       str(plot)).out
    assert "NEW" in table and plot.stat().st_size > 1000
    rows = list(csv.DictReader(io.StringIO(history.ok(
        "abuse", "account", PLANTS["hijacked"], "--csv", "--limit", "5").out)))
    assert len(rows) == 5 and rows[0]["what"] in ("smtp", "decision")


def test_why_explains_a_deferred_message(history: History) -> None:
    text = history.ok("abuse", "why", "HIJ0002").out
    assert "queue id HIJ0002" in text
    assert "deferred it (451 4.7.1" in text
    assert "reached its limit of 100 messages per 1h" in text
    assert "The rule was the account's own limit: messages per 1h." in text
    assert "It is now 100 per 1h (enforce) on account hijacked@d0.abuse.example" in text
    assert "nothing is lost" in text
    story = json.loads(history.ok("abuse", "why", "<hij2@d0.abuse.example>", "--json").out)
    decision = story["attempts"][0]["decisions"][0]
    assert decision["rule"] == "limit:messages/1h@account" and decision["mode"] == "enforce"
    accepted = history.ok("abuse", "why", "hij3@d0.abuse.example").out
    assert "no limit or rule objected" in accepted
    session = story["attempts"][0]["message"]["session_id"]
    assert "SMTP session" in history.ok("abuse", "why", str(session)).out


async def test_simulate_matches_a_direct_computation(history: History,
                                                     cmdb: asyncpg.Pool) -> None:
    end = history.anchor
    start = end - datetime.timedelta(days=2)
    between = ("--between", start.isoformat(), end.isoformat())
    result = json.loads(history.ok("limit", "simulate", "d0.abuse.example", "messages", "20",
                                   "--window", "1h", "--per-account", *between, "--json",
                                   "--limit", "1000").out)
    rows = await cmdb.fetch(
        "SELECT account, coalesce(ended_at, started_at) AS t, recipient_count FROM"
        " smtp_messages WHERE domain = 'd0.abuse.example' AND account IS NOT NULL"
        " AND verdict = 'accept' AND started_at >= $1 AND started_at < $2", start, end)
    expected = _direct(rows, 20, 3600, lambda r: 1)
    got = {s["subject"]: s["deferred"] for s in result["subjects"]}
    assert got == expected
    assert expected[PLANTS["hijacked"]] > 0 and result["totals"]["deferred"] == sum(
        expected.values())
    # The domain as a whole, counting recipients.
    result = json.loads(history.ok("limit", "simulate", "d0.abuse.example", "recipients",
                                   "500", "--window", "1h", *between, "--json").out)
    whole = _direct([{**dict(r), "account": "d0.abuse.example"} for r in rows], 500, 3600,
                    lambda r: r["recipient_count"])
    assert {s["subject"]: s["deferred"] for s in result["subjects"]} == whole
    assert result["limit"]["scope"] == "domain"
    history.fails("limit", "simulate", "nobody@d0.abuse.example", "messages", "5",
                  "--window", "1h", says="no account")
    history.fails("limit", "simulate", "d0.abuse.example", "messages", "5", says="--window")
    history.fails("limit", "simulate", "d0.abuse.example", "imap_search", "5", "--window",
                  "1h", says="simulate replays SMTP sending limits")


def _direct(rows: list[dict[str, object]] | list[asyncpg.Record], value: int, window: int,
            amount: object) -> dict[str, int]:
    """Brute force: each admitted amount counts while its window/12 bucket is in the window."""
    assert callable(amount)
    sub = window // 12
    per: dict[str, list[tuple[float, int]]] = {}
    for row in rows:
        t = row["t"]
        assert isinstance(t, datetime.datetime)
        per.setdefault(str(row["account"]), []).append((t.timestamp(), int(amount(row))))
    deferred = {}
    for subject, items in per.items():
        admitted: list[tuple[float, int]] = []
        count = 0
        for moment, need in sorted(items):
            used = sum(a for when, a in admitted
                       if (when // sub) * sub > moment - (window + sub))
            if used + need > value:
                count += 1
            else:
                admitted.append((moment, need))
        deferred[subject] = count
    return deferred
