"""A generated session history with planted incidents (bench/abuse_data.py, small shape).

`history` empties the session tables, removes the *.abuse.example domains and
generates 15 days for 3 domains of 20 accounts (about 17,000 rows), anchored at the
moment the fixture runs.  Module-scoped: other test modules may empty the CMDB
(clean_cmdb), so each module of this package generates its own.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from bench.abuse_data import SESSION_TABLES, Shape, generate
from tests.cli.conftest import Result, run_mailfc

SHAPE = Shape(days=15, domains=3, accounts_per_domain=20, submissions=4000, inbound=2000,
              imap=1500)


@dataclass
class History:
    anchor: datetime.datetime
    counts: dict[str, int]
    config_file: Path

    def run(self, *args: str) -> Result:
        return run_mailfc(self.config_file, *args)

    def ok(self, *args: str) -> Result:
        result = self.run(*args)
        assert result.code == 0, f"mailfc {' '.join(args)} failed: {result.err}"
        return result

    def fails(self, *args: str, says: str) -> Result:
        result = self.run(*args)
        assert result.code != 0, f"mailfc {' '.join(args)} should fail: {result.out}"
        assert says.lower() in result.err.lower(), result.err
        return result


async def regenerate(pool: asyncpg.Pool) -> History:
    async with pool.acquire() as db:
        await db.execute(f"TRUNCATE {', '.join(SESSION_TABLES)}")
        await db.execute("DELETE FROM domains WHERE name LIKE '%.abuse.example'")
        await db.execute("DELETE FROM blocks")
        await db.execute("DELETE FROM admin_events")
        anchor = datetime.datetime.now(datetime.UTC)
        counts = await generate(db, SHAPE, anchor)
        await db.execute("ANALYZE")
    return History(anchor, counts, Path("/nonexistent"))


@pytest.fixture(scope="module")
async def history(cmdb: asyncpg.Pool, config_file: Path) -> History:
    generated = await regenerate(cmdb)
    generated.config_file = config_file
    return generated
