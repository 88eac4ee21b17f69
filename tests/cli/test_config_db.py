"""`mailfc config show` and `mailfc db`: configuration errors and migrations."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import asyncpg

from mailfc.config import Config
from mailfc.db import migrate
from mailfc.db.pool import embedded_cluster
from tests.cli.conftest import Mailfc, run_mailfc


def test_config_show_round_trips(mailfc: Mailfc, config_file: Path) -> None:
    shown = mailfc.ok("config", "show").out
    parsed = tomllib.loads(shown)
    assert parsed["paths"]["state_dir"] == str(config_file.parent)
    assert parsed["listen"]["smtp_in"] == "0.0.0.0:25"
    assert parsed["network"]["bridge"] == "mailfc0"
    as_json = json.loads(mailfc.ok("config", "show", "--json").out)
    assert as_json == parsed


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[listen]\nsmtp_inn = "0.0.0.0:25"\n')
    result = run_mailfc(bad, "config", "show")
    assert result.code != 0 and "unknown key 'listen.smtp_inn'" in result.err

    bad.write_text("[dispatcher]\nlmtp_port = \"24\"\n")
    result = run_mailfc(bad, "config", "show")
    assert result.code != 0 and "dispatcher.lmtp_port" in result.err

    bad.write_text('[listen]\nsmtp_in = "nowhere"\n')
    result = run_mailfc(bad, "config", "show")
    assert result.code != 0 and "listen.smtp_in" in result.err and "host:port" in result.err

    bad.write_text("[paths\n")
    result = run_mailfc(bad, "config", "show")
    assert result.code != 0 and "not valid TOML" in result.err

    result = run_mailfc(tmp_path / "missing.toml", "config", "show")
    assert result.code != 0 and "no such file" in result.err


def test_db_status_and_migrate(mailfc: Mailfc) -> None:
    status = json.loads(mailfc.ok("db", "status", "--json").out)
    labels = [row["migration"] for row in status]
    assert labels[:2] == ["0001_cmdb", "0002_sessions"]
    assert all(row["applied_at"] for row in status)
    assert json.loads(mailfc.ok("db", "migrate", "--json").out) == {"applied": []}
    maintained = json.loads(mailfc.ok("db", "maintain", "--json").out)
    assert maintained["partitions_dropped"] == 0


async def test_migrations_apply_to_empty_database_once(
    cmdb: asyncpg.Pool, mailfc_config: Config
) -> None:
    async with cmdb.acquire() as connection:
        await connection.execute("DROP DATABASE IF EXISTS migrate_check")
        await connection.execute("CREATE DATABASE migrate_check")
    dsn = embedded_cluster(mailfc_config).dsn.replace("/mailfc?", "/migrate_check?")
    connection = await asyncpg.connect(dsn)
    try:
        applied = await migrate.apply(connection)
        assert [m.label for m in applied] == [m.label for m in migrate.available()]
        assert await migrate.apply(connection) == []
        assert await migrate.pending(connection) == []
        # The session tables are partitioned by day around today.
        partitions = await connection.fetchval(
            "SELECT count(*) FROM pg_inherits WHERE inhparent = 'smtp_sessions'::regclass")
        assert partitions >= 9  # default + yesterday .. today + 7
        await connection.execute(
            "INSERT INTO smtp_sessions (started_at, component) VALUES (now(), 'test'),"
            " (now() - interval '400 days', 'test')")
        dropped = await connection.fetchval("SELECT mailfc_drop_partitions(0)")
        assert dropped >= 1
    finally:
        await connection.close()
    async with cmdb.acquire() as admin:
        await admin.execute("DROP DATABASE migrate_check")


async def test_changed_migration_is_refused(cmdb: asyncpg.Pool) -> None:
    async with cmdb.acquire() as connection:
        await connection.execute(
            "UPDATE schema_migrations SET checksum = 'x' WHERE version = 1")
        try:
            try:
                await migrate.status(connection)
            except Exception as error:
                assert "changed after it was applied" in str(error)
            else:
                raise AssertionError("a changed migration must be refused")
        finally:
            first = migrate.available()[0]
            await connection.execute(
                "UPDATE schema_migrations SET checksum = $1 WHERE version = 1", first.checksum)
