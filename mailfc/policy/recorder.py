r"""The session recorder: every SMTP and IMAP session, message, command and event, batched.

Writes must never slow mail, and nothing may be dropped silently.  So callers never
wait for the database: they create and update Rows in memory, and one background task
writes whatever changed, every flush_interval_s or as soon as batch_size rows are
waiting, one upsert per table per flush.

    recorder = Recorder(pool, component="milter")
    await recorder.start()
    session = recorder.new("smtp_sessions", started_at=now, component="postfix", ...)
    message = recorder.new("smtp_messages", session_id=session, started_at=now, ...)
    recorder.update(message, ended_at=later, verdict="accept")   # written again
    recorder.stats()                         # written, pending, failed flushes, dropped
    await recorder.stop(drain_timeout=5)     # last flush

ROWS
    A Row belongs to one of TABLES and holds every column of it (missing ones are NULL
    or the table's default value below).  A column value may be another Row (e.g. an
    event's session_id): it is written as that row's id.  Ids come from the tables'
    sequences when a row is first flushed, so no database is needed to start a session.
    A row is written again (upsert on its primary key) each time it changed; the time
    column it was created with is its partition key and never changes.

WHAT POSTGRESQL CANNOT STORE
    Recorded strings come from clients (a HELO, a user name, an IMAP argument), so
    they hold whatever a client sent.  Before a batch is sent, values PostgreSQL would
    refuse are made storable: a NUL becomes the four characters `\x00`, a byte that was
    not UTF-8 (kept by the surrogateescape error handler) `\xNN`, any other lone
    surrogate `\uDXXX`, a number that is not finite or out of bigint range NULL, and a
    value of an indexed text column (domain, account, queue_id, message_id, username)
    is cut to INDEXED_TEXT_BYTES.  Such a row is counted once in `sanitized`, and an
    smtp_events row gets "sanitized": true in its detail.  Clean batches pay one
    regular-expression scan of their JSON for this.

    A batch PostgreSQL still refuses for what is in it (SQLSTATE class 22 data
    exception, 23 constraint violation, 54 program limit) is split in halves until the
    refused rows stand alone; the others are written, and each refused row is set
    aside as one JSON line ({"at", "holder", "component", "table", "error", "row"}) in
    the dead-letter file, <state_dir>/dead-letter/recorder-<component>.jsonl, and
    counted in `dead_lettered` (a recorder without a file logs the line instead).  So
    one hostile byte costs one row at most, never the process's recording.

FAILURES
    A flush that fails otherwise (database down, slower than flush_timeout_s) leaves
    every row in memory, counts a failed flush, logs the first failure of an outage and
    the recovery, and is retried with a growing delay (up to 5 s).  Rows wait in memory
    up to max_pending; beyond that the oldest are dropped: each is counted in `dropped`
    and logged (at most once every 10 s, with the count).  The counts are written to
    the `recorder_stats` table (one row per process, `mailfc sessions stats`) every 10 s.

CONFIGURATION ([recorder])
    flush_interval_s (0.2), batch_size (2000), max_pending (200000), flush_timeout_s (10).
    The dead-letter directory is <state_dir>/dead-letter ([paths] state_dir).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg

from mailfc.metrics import names as metrics
from mailfc.policy.engine import default_holder

if TYPE_CHECKING:
    from mailfc.config import Config

log = logging.getLogger("mailfc.policy.recorder")


@dataclass(frozen=True)
class Table:
    name: str
    sequence: str
    time_column: str
    # column -> default when a row does not give it (NOT NULL columns).
    defaults: Mapping[str, Any]
    columns: tuple[str, ...]
    # Text columns with a btree index: PostgreSQL refuses an index entry over ~2.7 kB.
    indexed_text: tuple[str, ...] = ()


def _table(name: str, time_column: str, columns: str, **defaults: Any) -> Table:
    columns_ = tuple(c.strip() for c in columns.split(","))
    return Table(name, f"{name}_id_seq", time_column, defaults, columns_,
                 tuple(c for c in columns_ if c in _INDEXED_TEXT))


# Text columns indexed in 0002_sessions.sql / 0009_analysis_indexes.sql.
_INDEXED_TEXT = frozenset(("domain", "account", "queue_id", "message_id", "username"))
INDEXED_TEXT_BYTES = 1000


TABLES: dict[str, Table] = {t.name: t for t in (
    _table("smtp_sessions", "started_at",
           "started_at, ended_at, component, host, domain, account, client_ip, client_name,"
           " helo, tls, messages, recipients, bytes, verdict, reason",
           component="unknown", messages=0, recipients=0, bytes=0),
    _table("smtp_messages", "started_at",
           "session_id, started_at, ended_at, domain, account, client_ip, queue_id,"
           " message_id, subject_digest, sender, recipients, recipient_count, size, verdict,"
           " reason, hop", recipients=[], recipient_count=0),
    _table("smtp_events", "at",
           "session_id, message_id, at, stage, verdict, reason, rule, mode, detail",
           verdict="accept"),
    _table("imap_sessions", "started_at",
           "started_at, ended_at, host, domain, account, client_ip, bytes_in, bytes_out,"
           " commands, verdict, reason", bytes_in=0, bytes_out=0, commands=0),
    _table("imap_commands", "started_at",
           "session_id, started_at, duration_ms, domain, account, name, tag, arguments,"
           " result, verdict, reason"),
    _table("auth_attempts", "at",
           "at, protocol, username, domain, client_ip, success, reason", success=False),
)}


class Row:
    """One row of a session table, in memory until written (and while it may change)."""

    __slots__ = ("id", "sanitized", "table", "values", "version")

    def __init__(self, table: Table, values: dict[str, Any]) -> None:
        self.table = table
        self.values = values
        self.id: int | None = None
        self.version = 0
        # Counted in Recorder.sanitized already (a row is written again on each change).
        self.sanitized = False

    def __repr__(self) -> str:
        return f"<Row {self.table.name} id={self.id} v{self.version}>"


@dataclass(frozen=True)
class RecorderStats:
    written: int
    pending: int
    failed_flushes: int
    dropped: int
    last_error: str | None
    sanitized: int = 0
    dead_lettered: int = 0


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime.datetime):
        return value.isoformat()
    if isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address):
        return str(value)
    if isinstance(value, Row):
        return value.id
    return value


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class Recorder:
    @classmethod
    def from_config(cls, pool: asyncpg.Pool, config: Config, component: str,
                    holder: str | None = None) -> Recorder:
        settings = config.recorder
        return cls(pool, component=component, flush_interval_s=settings.flush_interval_s,
                   batch_size=settings.batch_size, max_pending=settings.max_pending,
                   flush_timeout_s=settings.flush_timeout_s, holder=holder,
                   dead_letter=dead_letter_path(config.state_dir, component))

    def __init__(self, pool: asyncpg.Pool, *, component: str = "mailfc",
                 flush_interval_s: float = 0.2, batch_size: int = 2000,
                 max_pending: int = 200_000, flush_timeout_s: float = 10.0,
                 holder: str | None = None, dead_letter: Path | None = None) -> None:
        self.pool = pool
        self.component = component
        self.flush_interval_s = flush_interval_s
        self.batch_size = batch_size
        self.max_pending = max_pending
        self.flush_timeout_s = flush_timeout_s
        self.holder = holder or default_holder()
        self.dead_letter = dead_letter
        # Insertion-ordered: the oldest change first (flushed first, dropped first).
        self._dirty: dict[Row, None] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stats_task: asyncio.Task[None] | None = None
        self._flush_lock = asyncio.Lock()
        self._started_at = now()
        self.written = 0
        self.failed_flushes = 0
        self.dropped = 0
        self.last_error: str | None = None
        self.sanitized = 0
        self.dead_lettered = 0
        self._sanitized_logged_at = 0.0
        self._set_aside_logged_at = 0.0
        self._failing = False
        self._dropped_logged = 0
        self._drop_logged_at = 0.0

    # -- the callers' side: never waits ------------------------------------------------

    def new(self, table: str, **values: Any) -> Row:
        spec = TABLES[table]
        unknown = set(values) - set(spec.columns)
        if unknown:
            raise ValueError(f"{table} has no column(s) {', '.join(sorted(unknown))}")
        if values.get(spec.time_column) is None:
            values[spec.time_column] = now()
        row = Row(spec, {**spec.defaults, **values})
        self._mark(row)
        return row

    def update(self, row: Row, **values: Any) -> None:
        if row.table.time_column in values and row.id is not None:
            raise ValueError("the time column is the partition key and never changes")
        row.values.update(values)
        self._mark(row)

    def _mark(self, row: Row) -> None:
        row.version += 1
        self._dirty.pop(row, None)
        self._dirty[row] = None
        if len(self._dirty) >= self.batch_size:
            self._wake.set()
        if len(self._dirty) > self.max_pending:
            self._drop(len(self._dirty) - self.max_pending)

    def _drop(self, count: int) -> None:
        for row in list(self._dirty)[:count]:
            del self._dirty[row]
        self.dropped += count
        metrics.RECORDER_FAILED.inc(count)
        self._report_drops()

    def _report_drops(self, force: bool = False) -> None:
        """Log drops not yet logged: at most every 10 s while dropping, and at each flush."""
        moment = time.monotonic()
        if self.dropped == self._dropped_logged or (
                not force and moment - self._drop_logged_at < 10.0):
            return
        log.error("recording: %d rows dropped so far (%d since the last message): the "
                  "database has not taken writes for too long (max_pending %d); last error: %s",
                  self.dropped, self.dropped - self._dropped_logged, self.max_pending,
                  self.last_error)
        self._drop_logged_at = moment
        self._dropped_logged = self.dropped

    def stats(self) -> RecorderStats:
        return RecorderStats(self.written, len(self._dirty), self.failed_flushes,
                             self.dropped, self.last_error, self.sanitized,
                             self.dead_lettered)

    # -- the writer ---------------------------------------------------------------------

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run())
        self._stats_task = asyncio.create_task(self._stats_loop())

    async def stop(self, drain_timeout: float = 5.0) -> None:
        for task in (self._task, self._stats_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._task = self._stats_task = None
        deadline = time.monotonic() + drain_timeout
        while self._dirty and time.monotonic() < deadline:
            try:
                await asyncio.wait_for(self.flush(), max(0.1, deadline - time.monotonic()))
            except asyncio.CancelledError:
                raise
            except Exception:
                await asyncio.sleep(0.1)
        if self._dirty:
            self.dropped += len(self._dirty)
            metrics.RECORDER_FAILED.inc(len(self._dirty))
            log.error("recording: %d rows could not be written before shutdown (%s)",
                      len(self._dirty), self.last_error)
            self._dirty.clear()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._write_stats(), 2.0)

    async def _run(self) -> None:
        delay = self.flush_interval_s
        task = asyncio.current_task()
        assert task is not None
        while True:
            # asyncio.timeout, not wait_for: stop() cancels this task while it waits,
            # and 3.11's wait_for can swallow a cancellation that meets the end of
            # what it waits for, leaving stop() waiting for ever (seen on uvloop in
            # CI, twice).  A cancellation swallowed anywhere below still ends the loop.
            if task.cancelling():
                raise asyncio.CancelledError
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()
            self._wake.clear()
            if not self._dirty:
                continue
            try:
                await self.flush()
                delay = self.flush_interval_s
            except asyncio.CancelledError:
                raise
            except Exception:
                delay = min(5.0, max(delay * 2, 0.5))

    async def flush(self) -> int:
        """Write what is pending now (in batches); returns the rows written."""
        async with self._flush_lock:
            total = 0
            while self._dirty:
                batch = [(row, row.version) for row in list(self._dirty)[:self.batch_size]]
                try:
                    async with asyncio.timeout(self.flush_timeout_s):
                        refused = await self._write_isolating([row for row, _ in batch])
                except asyncio.CancelledError:
                    raise
                except Exception as error:
                    self.failed_flushes += 1
                    self.last_error = f"{type(error).__name__}: {error}"
                    if not self._failing:
                        log.warning("recording: cannot write %d rows, keeping them and "
                                    "retrying: %s", len(self._dirty), self.last_error)
                    self._failing = True
                    self._report_drops(force=True)
                    raise
                for row, version in batch:
                    # A row changed during the write stays dirty for the next one.
                    if row.version == version:
                        self._dirty.pop(row, None)
                total += len(batch) - refused
                self.written += len(batch) - refused
                if self._failing:
                    log.warning("recording works again after %d failed flushes",
                                self.failed_flushes)
                    self._failing = False
            metrics.RECORDER_PENDING.labels(metrics.PROCESS).set(len(self._dirty))
            return total

    async def _write_isolating(self, rows: list[Row]) -> int:
        """Write `rows`; those PostgreSQL refuses for their content go to the dead-letter
        file, found by halving (WHAT POSTGRESQL CANNOT STORE).  Returns how many."""
        try:
            await self._write(rows)
            return 0
        except asyncpg.PostgresError as error:
            if not _refused_for_content(error):
                raise
            if len(rows) == 1:
                self._set_aside(rows[0], error)
                return 1
        middle = len(rows) // 2
        return (await self._write_isolating(rows[:middle])
                + await self._write_isolating(rows[middle:]))

    def _set_aside(self, row: Row, error: Exception) -> None:
        entry = json.dumps({
            "at": now().isoformat(), "holder": self.holder, "component": self.component,
            "table": row.table.name, "error": f"{type(error).__name__}: {error}",
            "row": {"id": row.id, **{k: _jsonable(v) for k, v in row.values.items()}},
        }, default=str)
        self.dead_lettered += 1
        if self.dead_letter is None:
            log.error("recording: PostgreSQL refused a row of %s, set aside here: %s",
                      row.table.name, entry)
            return
        try:
            self.dead_letter.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            # One write of one line in append mode: lines of several processes never mix.
            descriptor = os.open(self.dead_letter, os.O_WRONLY | os.O_APPEND | os.O_CREAT,
                                 0o600)
            try:
                os.write(descriptor, (entry + "\n").encode("utf-8"))
            finally:
                os.close(descriptor)
        except OSError as failure:
            self.dead_lettered -= 1
            self.dropped += 1
            metrics.RECORDER_FAILED.inc()
            log.error("recording: PostgreSQL refused a row of %s (%s) and the dead-letter"
                      " file cannot take it (%s): row lost: %s", row.table.name, error,
                      failure, entry)
            return
        moment = time.monotonic()
        if moment - self._set_aside_logged_at >= 10.0:
            self._set_aside_logged_at = moment
            log.warning("recording: PostgreSQL refused a row of %s (%s); set aside in %s"
                        " (%d rows so far)", row.table.name, error, self.dead_letter,
                        self.dead_lettered)

    def _count_sanitized(self, row: Row) -> None:
        if row.sanitized:
            return
        row.sanitized = True
        self.sanitized += 1
        moment = time.monotonic()
        if moment - self._sanitized_logged_at >= 10.0:
            self._sanitized_logged_at = moment
            log.warning("recording: a row of %s held values PostgreSQL cannot store (NUL, text"
                        " that is not UTF-8, an over-long key): stored escaped or cut; %d"
                        " such rows so far", row.table.name, self.sanitized)

    async def _write(self, rows: list[Row]) -> None:
        # Every row written and every row it refers to needs an id first.
        needing: dict[Row, None] = {row: None for row in rows if row.id is None}
        for row in rows:
            for value in row.values.values():
                if isinstance(value, Row) and value.id is None and value not in needing:
                    # Referred to but not in this batch (a later one, or dropped):
                    # its id is fixed now and it is written in its turn.
                    needing[value] = None
                    if value not in self._dirty:
                        self._mark(value)
        by_table: dict[str, list[Row]] = {}
        for row in needing:
            by_table.setdefault(row.table.sequence, []).append(row)
        async with self.pool.acquire() as db, db.transaction():
            for sequence, waiting in by_table.items():
                ids = await db.fetchval(
                    "SELECT array_agg(nextval($1::regclass)) FROM generate_series(1, $2)",
                    sequence, len(waiting))
                for row, identifier in zip(waiting, ids, strict=True):
                    row.id = identifier
            grouped: dict[str, list[Row]] = {}
            for row in rows:
                grouped.setdefault(row.table.name, []).append(row)
            for name, group in grouped.items():
                await db.execute(_upsert_sql(TABLES[name]),
                                 await _json_rows(group, self._count_sanitized))

    async def _stats_loop(self) -> None:
        while True:
            await asyncio.sleep(10.0)
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5.0):
                    await self._write_stats()

    async def _write_stats(self) -> None:
        await self.pool.execute(
            "INSERT INTO recorder_stats (holder, component, started_at, updated_at, written,"
            " failed_flushes, dropped, pending, last_error, sanitized, dead_lettered,"
            " dead_letter)"
            " VALUES ($1, $2, $3, now(), $4, $5, $6, $7, $8, $9, $10, $11)"
            " ON CONFLICT (holder) DO UPDATE SET updated_at = now(),"
            " written = EXCLUDED.written, failed_flushes = EXCLUDED.failed_flushes,"
            " dropped = EXCLUDED.dropped, pending = EXCLUDED.pending,"
            " last_error = EXCLUDED.last_error, sanitized = EXCLUDED.sanitized,"
            " dead_lettered = EXCLUDED.dead_lettered, dead_letter = EXCLUDED.dead_letter",
            self.holder, self.component, self._started_at, self.written,
            self.failed_flushes, self.dropped, len(self._dirty), self.last_error,
            self.sanitized, self.dead_lettered,
            str(self.dead_letter) if self.dead_letter is not None else None)


def dead_letter_path(state_dir: Path, component: str) -> Path:
    """Where a component's recorder sets aside the rows PostgreSQL refuses."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", component) or "recorder"
    return state_dir / "dead-letter" / f"recorder-{name}.jsonl"


def _refused_for_content(error: asyncpg.PostgresError) -> bool:
    """PostgreSQL refused what the rows hold (not the connection, not the schema)."""
    state = getattr(error, "sqlstate", None) or ""
    return state[:2] in ("22", "23", "54")


# Rows serialised between two turns of the event loop: a batch of thousands at once
# would hold up every other task of the process (a hook server's answers to Dovecot)
# for tens of milliseconds.
ROWS_PER_TURN = 200


# In JSON (ensure_ascii) what PostgreSQL refuses shows as an escape: NUL as \u0000, a
# lone surrogate as \udXXX, a float that is not finite as a bare NaN or Infinity.  A
# match may be innocent (a subject "NaN", an escaped backslash): the slow path decides.
_SUSPECT = re.compile(r"\\u0000|\\ud[89a-fA-F]|NaN|Infinity")


async def _json_rows(rows: list[Row], sanitized: Callable[[Row], None] | None = None
                     ) -> str:
    """The rows as one JSON array, yielding to the event loop every ROWS_PER_TURN.

    `sanitized(row)` is called for each row whose values had to be made storable."""
    parts = []
    for start in range(0, len(rows), ROWS_PER_TURN):
        if start:
            await asyncio.sleep(0)
        chunk = rows[start:start + ROWS_PER_TURN]
        # Datetimes, addresses and Rows go through _json_default: no Python call per
        # plain value.
        records = [{"id": row.id, **row.values} for row in chunk]
        parts.append(_storable_json(chunk, records, sanitized))
    return "[" + ",".join(parts) + "]"


def _storable_json(rows: list[Row], records: list[dict[str, Any]],
                   sanitized: Callable[[Row], None] | None) -> str:
    """The records as JSON array items, each made storable where it has to be.

    Each record is encoded once on its own (by the C encoder, called directly: the
    json module's encode() builds an encoder per call), so a bad row is found without
    encoding its neighbours again and costs about its own sanitizing only."""
    pieces = ["".join(_encode(record, False)) for record in records]
    text = ",".join(pieces)
    if not _SUSPECT.search(text) and not any(_long_key(row) for row in rows):
        return text
    for index, row in enumerate(rows):
        if _SUSPECT.search(pieces[index]) or _long_key(row):
            pieces[index] = json.dumps(_storable(row, sanitized))
    return ",".join(pieces)


def _json_default(value: Any) -> Any:
    converted = _jsonable(value)
    if converted is value:
        raise TypeError(f"a recorded value of type {type(value).__name__} has no JSON form")
    return converted


# What json.dumps(default=_json_default) does per call, made once (json.encoder's
# c_make_encoder, falling back to the Python one where the C one is missing).
_C_MAKE_ENCODER = getattr(json.encoder, "c_make_encoder", None)
_encode: Callable[[Any, bool], Any] = (
    _C_MAKE_ENCODER(None, _json_default, json.encoder.encode_basestring_ascii,
                    None, ": ", ", ", False, False, True)
    if _C_MAKE_ENCODER is not None
    else json.JSONEncoder(default=_json_default).iterencode)


def _long_key(row: Row) -> bool:
    for column in row.table.indexed_text:
        value = row.values.get(column)
        # A character is at most 4 bytes in UTF-8: shorter strings always fit.
        if isinstance(value, str) and len(value) * 4 > INDEXED_TEXT_BYTES and len(
                value.encode("utf-8", "surrogatepass")) > INDEXED_TEXT_BYTES:
            return True
    return False


def _storable(row: Row, sanitized: Callable[[Row], None] | None) -> dict[str, Any]:
    """The row's values as PostgreSQL can store them (WHAT POSTGRESQL CANNOT STORE)."""
    changed = False
    values: dict[str, Any] = {"id": row.id}
    for column, raw in row.values.items():
        value, fixed = _clean(_jsonable(raw))
        if column in row.table.indexed_text and isinstance(value, str):
            encoded = value.encode("utf-8")
            if len(encoded) > INDEXED_TEXT_BYTES:
                value = encoded[:INDEXED_TEXT_BYTES].decode("utf-8", "ignore")
                fixed = True
        values[column] = value
        changed = changed or fixed
    if changed:
        if isinstance(values.get("detail"), dict):
            values["detail"] = {**values["detail"], "sanitized": True}
        elif row.table.name == "smtp_events" and values.get("detail") is None:
            values["detail"] = {"sanitized": True}
        if sanitized is not None:
            sanitized(row)
    return values


_BIGINT = 1 << 63


def _clean(value: Any) -> tuple[Any, bool]:
    """`value` (JSON-able) made storable, and whether anything had to change."""
    if isinstance(value, str):
        return _clean_text(value)
    if isinstance(value, bool) or value is None:
        return value, False
    if isinstance(value, float):
        return (value, False) if math.isfinite(value) else (None, True)
    if isinstance(value, int):
        return (value, False) if -_BIGINT <= value < _BIGINT else (None, True)
    if isinstance(value, list | tuple):
        items = [_clean(item) for item in value]
        return [item for item, _ in items], any(fixed for _, fixed in items)
    if isinstance(value, dict):
        pairs = [(_clean_text(str(key)), _clean(item)) for key, item in value.items()]
        return ({key: item for (key, _), (item, _) in pairs},
                any(k_fixed or v_fixed for (_, k_fixed), (_, v_fixed) in pairs))
    return value, False


def storable_text(text: str) -> str:
    """`text` as PostgreSQL can store it: NUL and bytes that were not UTF-8 (kept by
    the surrogateescape error handler) written as escapes."""
    return _clean_text(text)[0]


def _clean_text(text: str) -> tuple[str, bool]:
    if "\x00" not in text and (text.isascii() or _is_utf8(text)):
        return text, False
    out = []
    for char in text:
        code = ord(char)
        if code == 0:
            out.append("\\x00")
        elif 0xDC80 <= code <= 0xDCFF:
            # A byte that was not UTF-8, kept by the surrogateescape error handler.
            out.append(f"\\x{code - 0xDC00:02x}")
        elif 0xD800 <= code <= 0xDFFF:
            out.append(f"\\u{code:04x}")
        else:
            out.append(char)
    return "".join(out), True


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


_SQL_CACHE: dict[str, str] = {}


def _upsert_sql(table: Table) -> str:
    sql = _SQL_CACHE.get(table.name)
    if sql is None:
        columns = ("id", *table.columns)
        names = ", ".join(columns)
        updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in table.columns
                            if c != table.time_column)
        sql = (f"INSERT INTO {table.name} ({names})"
               f" SELECT {names} FROM jsonb_populate_recordset(NULL::{table.name}, $1::jsonb)"
               f" ON CONFLICT (id, {table.time_column}) DO UPDATE SET {updates}")
        _SQL_CACHE[table.name] = sql
    return sql
