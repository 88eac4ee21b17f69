"""Bulk import of domains and accounts from CSV (`mailfc domain import FILE`).

The file has a header naming its columns; `domain` is required, the others are
optional:

    domain,localpart,password,password_hash,quota_bytes
    example.org,,,,                        a domain without accounts
    example.org,bob,s3cret,,               plain password, hashed here
    example.net,alice,,"{ARGON2ID}$argon2id$v=19$m=19456,t=2,p=1$...",1073741824

The whole file is checked first (names, addresses, hash schemes, duplicates
within the file); if any row is malformed, every bad row is reported with its
line number and nothing is imported.  Then rows go in batches, one transaction
each (COPY into a temporary table, then set-based inserts).  A batch that
collides with the database (an account that exists already) is rolled back
whole and reported by line number; the other batches still land.  Domains that
exist already are reused.  Plain passwords are hashed in a process pool.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

from mailfc.addresses import normalize_domain, normalize_localpart
from mailfc.errors import InvalidInput, MailfcError
from mailfc.passwords import check_hash, hash_password

COLUMNS = ("domain", "localpart", "password", "password_hash", "quota_bytes")
DEFAULT_BATCH = 2000


@dataclass
class Row:
    line: int
    domain: str
    localpart: str | None
    password: str | None
    password_hash: str | None
    quota_bytes: int | None


@dataclass
class ImportReport:
    domains_added: int = 0
    accounts_added: int = 0
    batches_failed: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.batches_failed


class MalformedFile(InvalidInput):
    def __init__(self, problems: list[str]) -> None:
        shown = problems[:50]
        more = f"\n... and {len(problems) - 50} more" if len(problems) > 50 else ""
        super().__init__(
            "nothing imported; fix these rows and run the import again:\n"
            + "\n".join(shown) + more
        )
        self.problems = problems


def parse(path: Path) -> list[Row]:
    """Every row of the file, validated; MalformedFile lists all problems."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise InvalidInput(f"{path}: no such file") from None
    except UnicodeDecodeError as error:
        raise InvalidInput(f"{path}: not UTF-8 text ({error.reason})") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = reader.fieldnames or []
    unknown = [name for name in header if name not in COLUMNS]
    if "domain" not in header or unknown:
        raise InvalidInput(
            f"{path}: line 1: the header must name the column 'domain' and only these: "
            + ", ".join(COLUMNS)
            + (f" (unknown: {', '.join(unknown)})" if unknown else "")
        )
    rows: list[Row] = []
    problems: list[str] = []
    seen_accounts: dict[tuple[str, str], int] = {}
    try:
        for record in reader:
            line = reader.line_num
            try:
                row = _row(line, record)
            except MailfcError as error:
                problems.append(f"line {line}: {error}")
                continue
            if row.localpart is not None:
                key = (row.domain, row.localpart)
                if key in seen_accounts:
                    problems.append(
                        f"line {line}: {row.localpart}@{row.domain} repeats line "
                        f"{seen_accounts[key]}"
                    )
                    continue
                seen_accounts[key] = line
            rows.append(row)
    except csv.Error as error:
        problems.append(f"line {reader.line_num}: {error}")
    if problems:
        raise MalformedFile(problems)
    return rows


def _row(line: int, record: dict[str | None, str | list[str] | None]) -> Row:
    if None in record:
        raise InvalidInput(
            "more fields than the header names (quote fields that contain commas, "
            "such as Argon2 hashes: \"{ARGON2ID}$argon2id$v=19$m=19456,t=2,p=1$...\")"
        )

    def value(name: str) -> str | None:
        raw = record.get(name)
        text = raw.strip() if isinstance(raw, str) else ""
        return text or None

    domain_text = value("domain")
    if domain_text is None:
        raise InvalidInput("missing domain")
    domain = normalize_domain(domain_text)
    localpart_text = value("localpart")
    password = record.get("password") or None
    password_hash = value("password_hash")
    quota_text = value("quota_bytes")
    if localpart_text is None:
        if password or password_hash or quota_text:
            raise InvalidInput("a password or quota without a localpart")
        return Row(line, domain, None, None, None, None)
    localpart = normalize_localpart(localpart_text)
    if bool(password) == bool(password_hash):
        raise InvalidInput(
            f"{localpart}@{domain}: give exactly one of password and password_hash"
        )
    if password_hash is not None:
        check_hash(password_hash)
    quota: int | None = None
    if quota_text is not None:
        if not quota_text.isdigit():
            raise InvalidInput(f"quota_bytes {quota_text!r} is not a whole number of bytes")
        quota = int(quota_text)
    return Row(line, domain, localpart, password if isinstance(password, str) else None,
               password_hash, quota)


def batches(rows: list[Row], size: int) -> Iterator[list[Row]]:
    for start in range(0, len(rows), size):
        yield rows[start:start + size]


def hash_plain_passwords(rows: list[Row], workers: int | None = None) -> None:
    plain = [row for row in rows if row.password is not None and row.password_hash is None]
    if not plain:
        return
    if len(plain) < 8:
        for row in plain:
            row.password_hash = hash_password(row.password or "")
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        hashes = pool.map(hash_password, [row.password or "" for row in plain], chunksize=64)
        for row, hashed in zip(plain, hashes, strict=True):
            row.password_hash = hashed


async def import_rows(
    db: asyncpg.Connection, rows: list[Row], *, batch_size: int = DEFAULT_BATCH,
    progress: Callable[[int], None] | None = None,
) -> ImportReport:
    report = ImportReport()
    for batch in batches(rows, batch_size):
        try:
            domains, accounts = await _import_batch(db, batch)
        except InvalidInput as error:
            first, last = batch[0].line, batch[-1].line
            report.batches_failed.append(f"lines {first}-{last}: nothing imported: {error}")
        else:
            report.domains_added += domains
            report.accounts_added += accounts
        if progress:
            progress(len(batch))
    return report


async def _import_batch(db: asyncpg.Connection, batch: list[Row]) -> tuple[int, int]:
    async with db.transaction():
        await db.execute(
            "CREATE TEMP TABLE import_rows (line integer, domain text, localpart text,"
            " password_hash text, quota_bytes bigint) ON COMMIT DROP"
        )
        await db.copy_records_to_table(
            "import_rows",
            records=[
                (row.line, row.domain, row.localpart, row.password_hash, row.quota_bytes)
                for row in batch
            ],
        )
        domains_added = await db.fetchval(
            """
            WITH added AS (
                INSERT INTO domains (name)
                SELECT DISTINCT domain FROM import_rows
                ON CONFLICT (name) DO NOTHING RETURNING 1)
            SELECT count(*) FROM added
            """
        )
        clashes = await db.fetch(
            """
            SELECT r.line, r.localpart || '@' || r.domain AS address,
                   (l.id IS NOT NULL) AS is_alias
            FROM import_rows r JOIN domains d ON d.name = r.domain
            LEFT JOIN accounts a ON a.domain_id = d.id AND a.localpart = r.localpart
            LEFT JOIN aliases l ON l.domain_id = d.id AND l.localpart = r.localpart
            WHERE r.localpart IS NOT NULL AND (a.id IS NOT NULL OR l.id IS NOT NULL)
            ORDER BY r.line LIMIT 20
            """
        )
        if clashes:
            described = "; ".join(
                f"line {c['line']}: {c['address']} exists already"
                + (" as an alias" if c["is_alias"] else "")
                for c in clashes
            )
            raise InvalidInput(described)
        accounts_added = await db.fetchval(
            """
            WITH added AS (
                INSERT INTO accounts (domain_id, localpart, password_hash, quota_bytes)
                SELECT d.id, r.localpart, r.password_hash, r.quota_bytes
                FROM import_rows r JOIN domains d ON d.name = r.domain
                WHERE r.localpart IS NOT NULL RETURNING 1)
            SELECT count(*) FROM added
            """
        )
    return int(domains_added), int(accounts_added)
