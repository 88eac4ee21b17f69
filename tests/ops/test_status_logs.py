"""`mailfc status --json` and the JSON hop log lines, on one whole platform.

One `mailfc up` (tests.gateways.whole_platform's settings, [log] format = "json")
takes a message on SMTP-In and delivers it to a maildir; then:
- `mailfc status --json` lists the supervisor and every supervised process (with
  uptime), both spools, the database, and says the platform is healthy;
- every log line of up.log is a JSON object, and the message's queue id is on the
  smtp-in and lmtp-router hop lines;
- without a running platform status exits 1 and says why; bad input gets a usage
  error, never a traceback.
"""

from __future__ import annotations

import asyncio
import json
import smtplib
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bench.platform import Up, trusting_client_tls
from mailfc.config import LogSection
from mailfc.controller.supervisor import GROUPS
from mailfc.db import accounts, connect, domains
from mailfc.db.pool import embedded_cluster
from mailfc.passwords import hash_password
from tests.cli.conftest import run_mailfc
from tests.conftest import require_binary, require_root
from tests.gateways.whole_platform import PASSWORD, message, settings_for, until

PREFIX = "mfcop"
SUBNET = "10.117.0.0/24"
BASE = 31300
DOMAIN = "ops.example"
USER = f"olga@{DOMAIN}"


@pytest.fixture(scope="module")
async def platform(state_dir: Path) -> AsyncIterator[Up]:
    require_root()
    require_binary("runc", "runc")
    require_binary("dovecot", "dovecot-lmtpd")
    require_binary("postfix", "postfix")
    own = state_dir / PREFIX
    own.mkdir(exist_ok=True)
    own.chmod(0o711)
    settings = settings_for(own, PREFIX, SUBNET, BASE)
    settings = settings.model_copy(update={"log": LogSection(format="json")})
    up = Up(settings, own, BASE + 25)
    try:
        await up.start()
        pool = await connect(settings)
        try:
            async with pool.acquire() as db:
                await domains.add(db, DOMAIN)
                await accounts.add(db, USER, hash_password(PASSWORD))
        finally:
            await pool.close()
        yield up
    finally:
        await up.stop()
        await asyncio.to_thread(embedded_cluster(settings).stop)
        await asyncio.to_thread(subprocess.run, ["ip", "link", "del", f"{PREFIX}0"],
                                capture_output=True, check=False)


def _send(port: int) -> str:
    """One message to USER through SMTP-In; its queue id from the 250 reply."""
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
        client.ehlo("client.test")
        client.mail("sender@remote.example")
        code, _ = client.rcpt(USER)
        assert code == 250
        code, reply = client.data(message("ops-1", "sender@remote.example", USER))
        assert code == 250, reply
    return reply.decode().rpartition(" ")[2]


def _submit(port: int) -> None:
    """One message from USER to a remote address through the SMTP Router (587)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
        client.starttls(context=trusting_client_tls())
        client.login(USER, PASSWORD)
        client.sendmail(USER, ["carol@remote.example"],
                        message("ops-2", USER, "carol@remote.example"))


def _log_records(up: Up) -> list[dict[str, Any]]:
    """up.log's lines as JSON objects (children's lines carry a "[group] " prefix)."""
    records = []
    for line in up.log.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        body = line.split("] ", 1)[1] if line.startswith("[") else line
        try:
            records.append(json.loads(body))
        except json.JSONDecodeError:
            pytest.fail(f"not a JSON log line: {line!r}")
    return records


async def test_status_and_hop_lines(platform: Up) -> None:
    queue_id = await asyncio.to_thread(_send, BASE + 25)
    delivered = await until(
        lambda: any(f'"lmtp-router: {queue_id}: to=<{USER}>' in line
                    for line in platform.log.read_text(errors="replace").splitlines()
                    if "status=sent" in line), 60)
    assert delivered, platform.log_tail()

    result = await asyncio.to_thread(
        run_mailfc, platform.state_dir / "mailfc.toml", "status", "--json")
    status = json.loads(result.out)
    names = {row["name"] for row in status["processes"]}
    assert {"supervisor", *(name for name, _ in GROUPS)} <= names, status
    assert all(row["uptime_s"] >= 0 for row in status["processes"])
    assert {row["spool"] for row in status["queues"]} == {"in", "out"}
    assert status["database"]["reachable"] is True
    assert result.code == 0 and status["healthy"], status["problems"]
    # A restore under the running platform is refused before it touches anything.
    fake_dump = platform.state_dir / "fake.dump"
    fake_dump.write_bytes(b"PGDMP-not-really")
    refused = await asyncio.to_thread(
        run_mailfc, platform.state_dir / "mailfc.toml", "db", "restore", str(fake_dump))
    assert refused.code == 1 and "stop it first" in refused.err, refused

    records = _log_records(platform)
    hops = [r for r in records if r.get("queue_id") == queue_id]
    assert any(r["message"].startswith(f"smtp-in: {queue_id}: from=<") for r in hops), hops
    assert any(r["message"].startswith(f"smtp-in: {queue_id}: to=<{USER}>, relay=lmtp-router")
               and "status=sent" in r["message"] for r in hops), hops
    assert any(r["message"].startswith(f"lmtp-router: {queue_id}: to=<{USER}>")
               for r in hops), hops
    assert all({"time", "level", "logger", "message"} <= r.keys() for r in records)

    # Submission: the SMTP Router logs Postfix's queue id; SMTP-Out takes the message
    # under its own and logs its attempt at the remote MX (none listens: deferred).
    await asyncio.to_thread(_submit, BASE + 587)
    tried = await until(lambda: any(
        '"smtp-out: ' in line and "to=<carol@remote.example>" in line
        for line in platform.log.read_text(errors="replace").splitlines()), 60)
    assert tried, platform.log_tail()
    records = _log_records(platform)
    print(*(r["message"] for r in records if r["logger"] == "mailfc.hop"), sep="\n")
    assert any(r["message"].startswith("submission: ") and f"sasl_username={USER}"
               in r["message"] for r in records), platform.log_tail()


def test_status_without_platform(config_file: Path, cmdb: object) -> None:
    result = run_mailfc(config_file, "status", "--json")
    assert result.code == 1
    status = json.loads(result.out)
    assert status["healthy"] is False
    assert any("mailfc up is not running" in p for p in status["problems"])
    human = run_mailfc(config_file, "status")
    assert human.code == 1 and "mailfc up is not running" in human.out


def test_status_bad_input(config_file: Path) -> None:
    for args in (("--max-queue-age", "-5"), ("--events", "many"), ("--bogus",)):
        result = run_mailfc(config_file, "status", *args)
        assert result.code == 2, result
        assert "Error" in result.err or "error" in result.err
