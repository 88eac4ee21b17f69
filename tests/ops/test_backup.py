"""`mailfc db dump` / `mailfc db restore`: a domain survives the round trip, and
the refusals (file exists, non-empty database, not a dump) are clear errors."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from mailfc.config import parse_config
from mailfc.db.pool import embedded_cluster
from tests.cli.conftest import Mailfc

DOMAIN = "backup.example"


@pytest.fixture
def fresh_config() -> Iterator[Path]:
    """A second state directory (its own embedded cluster, empty)."""
    state = Path(tempfile.mkdtemp(prefix="mailfc-restore-", dir="/tmp"))
    state.chmod(0o711)
    config_file = state / "mailfc.toml"
    config_file.write_text(f'[paths]\nstate_dir = "{state}"\n')
    try:
        yield config_file
    finally:
        embedded_cluster(parse_config({"paths": {"state_dir": str(state)}})).stop()
        shutil.rmtree(state, ignore_errors=True)


async def test_dump_and_restore(config_file: Path, clean_cmdb: asyncpg.Pool,
                                fresh_config: Path, tmp_path: Path) -> None:
    mailfc = Mailfc(config_file)
    mailfc.ok("domain", "add", DOMAIN)
    dump = tmp_path / "cmdb.dump"
    mailfc.ok("db", "dump", str(dump))
    assert dump.read_bytes()[:5] == b"PGDMP"
    assert not dump.with_name("cmdb.dump.partial").exists()
    mailfc.fails("db", "dump", str(dump), says="exists")
    mailfc.fails("db", "dump", str(tmp_path / "no" / "such" / "x.dump"),
                 says="not a directory")
    # The session's CMDB holds tables: restoring over it needs --force.
    mailfc.fails("db", "restore", str(dump), says="--force")
    not_a_dump = tmp_path / "notes.txt"
    not_a_dump.write_text("hello")
    mailfc.fails("db", "restore", str(not_a_dump), says="not a dump")
    mailfc.fails("db", "restore", str(tmp_path / "missing.dump"), says="does not exist")

    fresh = Mailfc(fresh_config)
    fresh.ok("db", "restore", str(dump))
    assert DOMAIN in fresh.ok("domain", "list", "--json").out
    # Again, over what is there now: --force drops it and restores.
    fresh.fails("db", "restore", str(dump), says="--force")
    fresh.ok("db", "restore", "--force", str(dump))
    assert DOMAIN in fresh.ok("domain", "list", "--json").out
