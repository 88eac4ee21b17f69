"""Start events, pinned admin changes, orphans and a removed domain's mail, with real
runc containers and the real `mailfc domain` / `mailfc container` commands."""

from __future__ import annotations

import asyncio
import json
import os
import smtplib
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg
import pytest
from click.testing import CliRunner

from mailfc.cli.container import group as container_group
from mailfc.cli.domain import group as domain_group
from mailfc.runtime import Runtime, RuntimeSettings
from mailfc.runtime.starts import Trigger
from tests.runtime.conftest import TEST_HOST

pytestmark = pytest.mark.integration
NewDomain = Callable[..., Awaitable[str]]


def run(env: dict[str, str], group: object, *args: str) -> str:
    result = CliRunner().invoke(group, list(args), env=env)  # type: ignore[arg-type]
    assert result.exit_code == 0, (args, result.output, result.exception)
    return result.output


async def start_events(cmdb: asyncpg.Pool, domain: str) -> list[asyncpg.Record]:
    """The domain's start events, once there is one (written in the background)."""
    for _ in range(100):
        rows = list(await cmdb.fetch(
            "SELECT *, detail::text AS detail_text FROM events WHERE kind = 'start'"
            " AND domain = $1 ORDER BY id", domain))
        if rows:
            return rows
        await asyncio.sleep(0.05)
    raise AssertionError(f"no start event for {domain}")


async def test_a_start_is_an_event_with_its_trigger_and_cold_start_time(
        runtime: Runtime, cmdb: asyncpg.Pool, new_domain: NewDomain) -> None:
    domain = await new_domain()
    instance = await runtime.ensure(domain, "imap",
                                    Trigger("session", protocol="imap", peer="192.0.2.7:5123"))
    again = await runtime.ensure(domain, "lmtp", Trigger("session", protocol="lmtp"))
    assert again.name == instance.name   # no start, no second event

    rows = await start_events(cmdb, domain)
    assert len(rows) == 1
    row = rows[0]
    detail = json.loads(row["detail_text"])
    assert row["instance"] == instance.name and row["service"] == "imap"
    assert row["host"] == TEST_HOST
    assert detail["trigger"] == {"by": "session", "protocol": "imap", "peer": "192.0.2.7:5123"}
    assert detail["instance_id"] == instance.id and detail["pid"] == instance.pid
    assert 0 < detail["cold_start_ms"] < 5000 and detail["failed"] is False
    assert row["reason"].startswith("imap session from 192.0.2.7:5123: cold start ")


async def test_admin_changes_are_pinned_until_unpinned(
        cli_env: dict[str, str], runtime: Runtime, cmdb: asyncpg.Pool,
        new_domain: NewDomain) -> None:
    domain = await new_domain()

    def cli() -> tuple[dict[str, object], list[dict[str, object]], list[dict[str, object]],
                       str, list[dict[str, object]]]:
        started = json.loads(run(cli_env, container_group, "start", domain, "imap", "--json"))
        updated = json.loads(run(cli_env, container_group, "update", domain, "imap",
                                 "--cpu-quota", "120000", "--json"))
        listed = json.loads(run(cli_env, container_group, "list", domain, "--json"))
        timed = run(cli_env, container_group, "update", domain, "imap", "--memory", "300M",
                    "--pin-for", "1h")
        unpinned = json.loads(run(cli_env, container_group, "update", domain, "imap",
                                  "--unpin", "--json"))
        return started, updated, listed, timed, unpinned

    started, updated, listed, timed, unpinned = await asyncio.to_thread(cli)
    assert updated[0]["pinned"] == "cpu"
    assert listed[0]["pinned"] == "cpu" and listed[0]["cpu_pinned_until"]
    assert "pinned: cpu, memory until " in timed
    assert unpinned[0]["pinned"] == ""
    # The admin's start is an event too.
    rows = await start_events(cmdb, domain)
    assert json.loads(rows[0]["detail_text"])["trigger"] == {"by": "admin",
                                                             "why": "container start"}
    instance = await runtime.get(str(started["name"]))
    assert not instance.pinned("cpu") and not instance.pinned("memory")


async def test_sweep_removes_containers_no_row_owns(
        runtime: Runtime, cmdb: asyncpg.Pool, new_domain: NewDomain) -> None:
    kept_domain, orphan_domain = await new_domain(), await new_domain()
    kept = await runtime.ensure(kept_domain, "imap")
    orphan = await runtime.ensure(orphan_domain, "smtp")
    # The row goes as `DELETE FROM domains` (or an older `domain remove`) makes it go.
    await cmdb.execute("DELETE FROM domains WHERE name = $1", orphan_domain)
    assert await runtime.sweep() == [orphan.name]
    assert await runtime.backend.state(orphan.name) is None
    assert (await runtime.backend.state(kept.name)) is not None
    assert await runtime.sweep() == []


def _deliver(instance_socket: str, domain: str) -> None:
    with smtplib.LMTP(instance_socket, timeout=10) as lmtp:
        refused = lmtp.sendmail("alice@remote.example", [f"bob@{domain}"],
                                f"From: alice@remote.example\r\nTo: bob@{domain}\r\n"
                                "Subject: the old owner's mail\r\n\r\nsecret\r\n")
        assert refused == {}


async def test_domain_remove_stops_containers_and_archives_or_purges_mail(
        cli_env: dict[str, str], runtime: Runtime, settings: RuntimeSettings,
        new_domain: NewDomain) -> None:
    domain = await new_domain()
    instance = await runtime.ensure(domain, "lmtp")
    await asyncio.to_thread(_deliver, instance.socket("lmtp"), domain)
    maildir = settings.mail_dir / domain / "bob" / "Maildir"
    assert list((maildir / "new").iterdir())

    removed = json.loads(await asyncio.to_thread(
        run, cli_env, domain_group, "remove", domain, "--json"))
    assert removed["stopped"] == [instance.name]
    assert await runtime.backend.state(instance.name) is None
    assert not (settings.mail_dir / domain).exists()
    archive = Path(removed["archive"])
    assert archive.parent == settings.state_dir / "archive"
    assert archive.name.endswith(f"-{domain}")
    assert list((archive / "mail" / "bob" / "Maildir" / "new").iterdir())
    assert (archive / "state").is_dir()      # its queues and logs went along
    assert (os.stat(archive).st_mode & 0o777) == 0o700
    listed = json.loads(await asyncio.to_thread(
        run, cli_env, domain_group, "archives", domain, "--json"))
    assert [item["path"] for item in listed] == [str(archive)]

    # The same name again: a new owner, an empty mailbox.
    await asyncio.to_thread(run, cli_env, domain_group, "add", domain)
    again = await runtime.ensure(domain, "imap")
    assert again.name != instance.name
    assert not (settings.mail_dir / domain / "bob").exists()
    await asyncio.to_thread(_deliver, again.socket("lmtp"), domain)

    purged = json.loads(await asyncio.to_thread(
        run, cli_env, domain_group, "remove", domain, "--purge", "--json"))
    assert purged["stopped"] == [again.name] and purged["purged"]
    assert not (settings.mail_dir / domain).exists()
    assert not (settings.domains_dir / domain).exists()
    assert len(json.loads(await asyncio.to_thread(
        run, cli_env, domain_group, "archives", domain, "--json"))) == 1
