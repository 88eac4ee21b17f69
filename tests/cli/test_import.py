"""`mailfc domain import`: CSV of domains and accounts."""

from __future__ import annotations

import json
from pathlib import Path

import asyncpg

from mailfc.passwords import hash_password, verify_password
from tests.cli.conftest import Mailfc

HEADER = "domain,localpart,password,password_hash,quota_bytes\n"


async def test_import_plain_and_hashed(
    mailfc: Mailfc, clean_cmdb: asyncpg.Pool, tmp_path: Path
) -> None:
    hashed = hash_password("prehashed-pw")
    csv_file = tmp_path / "import.csv"
    csv_file.write_text(
        HEADER
        + "example.org,,,,\n"
        + "example.org,bob,plain-pw,,\n"
        + f'example.net,alice,,"{hashed}",1048576\n'
        + "Example.NET,carol,other-pw,,\n"
    )
    result = json.loads(mailfc.ok("domain", "import", str(csv_file), "--json").out)
    assert result["domains_added"] == 2 and result["accounts_added"] == 3
    rows = await clean_cmdb.fetch(
        "SELECT a.localpart || '@' || d.name AS address, a.password_hash, a.quota_bytes"
        " FROM accounts a JOIN domains d ON d.id = a.domain_id ORDER BY 1")
    by_address = {row["address"]: row for row in rows}
    assert set(by_address) == {"alice@example.net", "bob@example.org", "carol@example.net"}
    assert verify_password(by_address["bob@example.org"]["password_hash"], "plain-pw")
    assert by_address["alice@example.net"]["password_hash"] == hashed
    assert by_address["alice@example.net"]["quota_bytes"] == 1048576


async def test_malformed_rows_import_nothing(
    mailfc: Mailfc, clean_cmdb: asyncpg.Pool, tmp_path: Path
) -> None:
    csv_file = tmp_path / "bad.csv"
    csv_file.write_text(
        HEADER
        + "example.org,bob,pw,,\n"          # line 2: fine
        + "bad..domain,x,pw,,\n"            # line 3
        + "example.org,b b,pw,,\n"          # line 4
        + "example.org,carol,,,\n"          # line 5: no password
        + "example.org,dave,,{PLAIN}dave,\n"  # line 6: unsalted scheme
        + "example.org,bob,pw,,\n"          # line 7: repeats line 2
        + "example.org,erin,pw,,lots\n"     # line 8
        + "example.org,frank,pw,,,extra\n"  # line 9
    )
    result = mailfc.fails("domain", "import", str(csv_file), says="nothing imported")
    for line in (3, 4, 5, 6, 7, 8, 9):
        assert f"line {line}:" in result.err, result.err
    assert "line 2:" not in result.err
    assert await clean_cmdb.fetchval("SELECT count(*) FROM domains") == 0
    assert await clean_cmdb.fetchval("SELECT count(*) FROM accounts") == 0


async def test_failed_batch_is_rolled_back_whole(
    mailfc: Mailfc, clean_cmdb: asyncpg.Pool, tmp_path: Path
) -> None:
    mailfc.ok("domain", "add", "taken.example")
    mailfc.ok("account", "add", "bob@taken.example", "--password-stdin", stdin="x\n")
    csv_file = tmp_path / "clash.csv"
    csv_file.write_text(
        HEADER
        + "first.example,a,pw,,\n"       # batch 1 (lines 2-3)
        + "first.example,b,pw,,\n"
        + "second.example,a,pw,,\n"      # batch 2 (lines 4-5): clashes at line 5
        + "taken.example,bob,pw,,\n"
        + "third.example,a,pw,,\n"       # batch 3 (line 6)
    )
    result = mailfc("domain", "import", str(csv_file), "--batch-size", "2")
    assert result.code != 0
    assert "line 5: bob@taken.example exists already" in result.err
    domains = {r["name"] for r in await clean_cmdb.fetch("SELECT name FROM domains")}
    assert domains == {"taken.example", "first.example", "third.example"}
    assert await clean_cmdb.fetchval("SELECT count(*) FROM accounts") == 4


def test_import_bad_files(mailfc: Mailfc, tmp_path: Path) -> None:
    mailfc.fails("domain", "import", str(tmp_path / "missing.csv"), says="no such file")
    wrong_header = tmp_path / "header.csv"
    wrong_header.write_text("name,user\nexample.org,bob\n")
    mailfc.fails("domain", "import", str(wrong_header), says="header")
    binary = tmp_path / "binary.csv"
    binary.write_bytes(b"domain\n\xff\xfe\n")
    mailfc.fails("domain", "import", str(binary), says="not UTF-8")
