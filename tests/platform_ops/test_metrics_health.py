"""Metrics, health, reload and the service unit of `mailfc up`, on one whole platform.

One `mailfc up` (tests.gateways.whole_platform, prefix mfcq, ports 324xx, its metrics
listener on 127.0.0.1:33210) for the whole module:
- after a message in (port 25), one out (587 to the remote MX) and an IMAP session,
  the counters of /metrics moved; every metric the Grafana dashboard names is in a
  scrape;
- /healthz is 200; /readyz is 200, 503 while a child is killed, 200 after its restart
  (with a "restart" event row);
- SIGHUP after a changed [log] level: the supervisor logs at the new level and cycles
  its children (new pids);
- the systemd unit passes `systemd-analyze verify` (its keys where systemd-analyze is
  missing), and `mailfc service install` writes it.
"""

from __future__ import annotations

import asyncio
import imaplib
import json
import os
import re
import shutil
import signal
import smtplib
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bench.platform import ACCEPTED, dot_stuffed, send_message, trusting_client_tls
from mailfc.cli.service import UNIT, render_unit
from mailfc.config import render_toml
from mailfc.controller.supervisor import GROUPS, NOT_CYCLED
from mailfc.metrics.names import SUPERVISOR_METRICS
from tests.gateways.whole_platform import (
    PASSWORD,
    WholePlatform,
    message,
    until,
    whole_platform,
)

PREFIX, SUBNET, BASE = "mfcq", "10.119.0.0/24", 32400
DOMAIN = "metrics.example"
USER = f"mia@{DOMAIN}"
ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "contrib" / "grafana" / "mailfc.json"
UNIT_FILE = ROOT / "contrib" / "systemd" / "mailfc.service"


@pytest.fixture(scope="module")
async def platform(state_dir: Path) -> AsyncIterator[WholePlatform]:
    async with whole_platform(state_dir, PREFIX, SUBNET, BASE, DOMAIN, ("mia",)) as running:
        yield running


def get(platform: WholePlatform, path: str) -> tuple[int, str]:
    url = f"http://{platform.settings.metrics.listen}{path}"
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def samples(text: str) -> dict[str, float]:
    """`name{labels}` -> value of every sample of a scrape."""
    found = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            found[key] = float(value)
    return found


def total(scrape: dict[str, float], name: str, **labels: str) -> float:
    wanted = [f'{key}="{value}"' for key, value in labels.items()]
    return sum(value for key, value in scrape.items()
               if key.split("{")[0] == name and all(part in key for part in wanted))


async def scrape(platform: WholePlatform) -> dict[str, float]:
    status, body = await asyncio.to_thread(get, platform, "/metrics")
    assert status == 200, body
    return samples(body)


def send_in(port: int, mark: str) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
        client.ehlo("client.test")
        client.mail("sender@remote.example")
        assert client.rcpt(USER)[0] == 250
        code, reply = client.data(message(mark, "sender@remote.example", USER))
        assert code == 250, reply


def imap_session(port: int) -> None:
    client = imaplib.IMAP4_SSL("127.0.0.1", port, ssl_context=trusting_client_tls(),
                               timeout=60)
    try:
        client.login(USER, PASSWORD)
        client.select("INBOX")
    finally:
        client.logout()


async def test_counters_move_after_mail_in_out_and_imap(platform: WholePlatform) -> None:
    before = await scrape(platform)
    await asyncio.to_thread(send_in, platform.smtp_in, "metrics-in")
    assert await until(lambda: platform.marks(USER)["metrics-in"] == 1, 60), platform.explain()
    outcome, reply = await send_message(
        "127.0.0.1", platform.submission, USER, ["far@remote.test"],
        dot_stuffed(message("metrics-out", USER, "far@remote.test")),
        tls=trusting_client_tls(), login=(USER, PASSWORD), timeout_s=60)
    assert outcome == ACCEPTED, reply
    assert await until(lambda: platform.sink.marks()["metrics-out"] == 1, 60), \
        platform.explain()
    imaps = int(platform.settings.listen.imap_router_tls.rpartition(":")[2])
    await asyncio.to_thread(imap_session, imaps)

    async def moved() -> dict[str, float]:
        deadline = time.monotonic() + 30
        while True:
            after = await scrape(platform)
            if (total(after, "mailfc_delivery_seconds_count") >= 2
                    and total(after, "mailfc_db_pool_connections") > 0) \
                    or time.monotonic() > deadline:
                return after
            await asyncio.sleep(1)
    after = await moved()

    def grew(name: str, **labels: str) -> bool:
        return total(after, name, **labels) > total(before, name, **labels)
    assert grew("mailfc_messages_total", service="smtp-in", verdict="accept")
    assert total(after, "mailfc_messages_total", domain=DOMAIN) > 0   # a top-N domain label
    assert grew("mailfc_messages_total", service="submission", verdict="accept")
    assert grew("mailfc_sessions_total", service="smtp-in")
    assert grew("mailfc_logins_total", protocol="imap", result="ok")
    assert grew("mailfc_logins_total", protocol="submission", result="ok")
    assert grew("mailfc_delivery_seconds_count")
    assert grew("mailfc_limit_decisions_total")
    assert grew("mailfc_container_starts_total", result="ok")
    assert grew("mailfc_container_cold_start_seconds_count")
    assert grew("mailfc_controller_decisions_total", kind="start")
    assert total(after, "mailfc_db_pool_connections", state="max") > 0
    assert total(after, "mailfc_process_up") == len(GROUPS)
    assert total(after, "mailfc_database_up") == 1


async def test_every_dashboard_metric_is_scraped(platform: WholePlatform) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    expressions = [target["expr"] for panel in dashboard["panels"]
                   for target in panel.get("targets", [])]
    named = {name for expr in expressions for name in re.findall(r"\bmailfc_[a-z_]+", expr)}
    assert named, "the dashboard names no mailfc metric"
    status, body = await asyncio.to_thread(get, platform, "/metrics")
    assert status == 200
    # Families as the scrape declares them (# TYPE), and their sample names
    # (a histogram's _bucket, _count; a counter's _total).
    present = set(re.findall(r"^# TYPE (\S+)", body, re.M)) | {
        line.split("{")[0].split(" ")[0] for line in body.splitlines()
        if line and not line.startswith("#")}
    missing = {name for name in named
               if name not in present and not any(name.startswith(family + "_")
                                                  and name.removeprefix(family) in
                                                  ("_total", "_bucket", "_count", "_sum")
                                                  for family in present)}
    assert not missing, f"the dashboard names metrics no scrape has: {sorted(missing)}"
    assert set(SUPERVISOR_METRICS) <= present


async def test_health_and_readiness_follow_a_killed_child(platform: WholePlatform) -> None:
    assert await asyncio.to_thread(get, platform, "/healthz") == (200, "ok\n")
    assert (await asyncio.to_thread(get, platform, "/readyz"))[0] == 200
    assert (await asyncio.to_thread(get, platform, "/nothing"))[0] == 404
    old = platform.up.processes()["hooks"]
    os.kill(old, signal.SIGKILL)
    saw_503 = ""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status, body = await asyncio.to_thread(get, platform, "/readyz")
        if status == 503:
            saw_503 = body
        elif saw_503 and status == 200:
            break
        await asyncio.sleep(0.05)
    assert "hooks" in saw_503, platform.explain()
    assert status == 200, f"/readyz stayed {status}: {body}" + platform.explain()
    assert platform.up.processes()["hooks"] != old
    scraped = await scrape(platform)
    assert total(scraped, "mailfc_process_restarts_total", process="hooks") >= 1
    events = await platform.pool.fetch(
        "SELECT reason, detail::text FROM events WHERE kind = 'restart' AND service = 'hooks'")
    assert events and f"pid {old}" in events[-1]["reason"]


async def test_sighup_applies_a_changed_log_level(platform: WholePlatform) -> None:
    config_file = platform.up.state_dir / "mailfc.toml"
    changed = platform.settings.model_copy(
        update={"log": platform.settings.log.model_copy(update={"level": "DEBUG"})})
    config_file.write_text(render_toml(changed))
    before = platform.up.processes()
    log_size = platform.up.log.stat().st_size
    os.kill(platform.up.pid, signal.SIGHUP)
    cycled = [name for name, _ in GROUPS if name not in NOT_CYCLED]

    def reloaded() -> bool:
        text = platform.up.log.read_text(errors="replace")[log_size:]
        return "processes replaced with the new configuration" in text
    assert await until(reloaded, 90), platform.explain()
    after_text = platform.up.log.read_text(errors="replace")[log_size:]
    assert "log level now DEBUG" in after_text
    assert "reload: debug logging is on" in after_text
    after = platform.up.processes()
    assert all(after[name] != before[name] for name in cycled), (before, after)
    assert after["host"] == before["host"]
    # Still serving: a message in after the reload.
    await asyncio.to_thread(send_in, platform.smtp_in, "after-reload")
    assert await until(lambda: platform.marks(USER)["after-reload"] == 1, 60), \
        platform.explain()


def test_unit_file_is_valid(tmp_path: Path) -> None:
    assert UNIT_FILE.read_text() == UNIT, "contrib/systemd/mailfc.service differs from" \
        " mailfc.cli.service.UNIT: keep them equal"
    keys = dict(line.split("=", 1) for line in UNIT.splitlines()
                if "=" in line and not line.startswith("#"))
    assert keys["Type"] == "notify"
    assert keys["Restart"] == "on-failure"
    assert keys["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert keys["WantedBy"] == "multi-user.target"
    installed = subprocess.run(
        [sys.executable, "-m", "mailfc", "--config", str(tmp_path / "mailfc.toml"),
         "service", "install", "--unit-dir", str(tmp_path), "--no-enable"],
        capture_output=True, text=True, check=False)
    assert installed.returncode == 0, installed.stderr
    unit = (tmp_path / "mailfc.service").read_text()
    assert unit == render_unit(str(tmp_path / "mailfc.toml"))
    assert f"ExecStart={sys.executable} -m mailfc --config {tmp_path}/mailfc.toml up" in unit
    if shutil.which("systemd-analyze") is None and os.environ.get("CI") != "true":
        return      # the keys above are what can be checked here
    verified = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "mailfc.service")],
                              capture_output=True, text=True, check=False)
    assert verified.returncode == 0, verified.stderr


def test_service_install_without_rights_says_why(tmp_path: Path) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("")
    done = subprocess.run([sys.executable, "-m", "mailfc", "service", "install",
                           "--unit-dir", str(blocked / "sub")],
                          capture_output=True, text=True, check=False)
    assert done.returncode != 0
    assert "cannot write" in done.stderr and "Traceback" not in done.stderr
