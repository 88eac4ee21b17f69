"""The session recorder: every SMTP and IMAP session, message, command and event, batched.

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

FAILURES
    A flush that fails (database down, slower than flush_timeout_s) leaves every row in
    memory, counts a failed flush, logs the first failure of an outage and the recovery,
    and is retried with a growing delay (up to 5 s).  Rows wait in memory up to
    max_pending; beyond that the oldest are dropped: each is counted in `dropped` and
    logged (at most once every 10 s, with the count).  The counts are written to the
    `recorder_stats` table (one row per process, `mailfc sessions stats`) every 10 s.

CONFIGURATION ([recorder])
    flush_interval_s (0.2), batch_size (2000), max_pending (200000), flush_timeout_s (10).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import asyncpg

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


def _table(name: str, time_column: str, columns: str, **defaults: Any) -> Table:
    return Table(name, f"{name}_id_seq", time_column, defaults,
                 tuple(c.strip() for c in columns.split(",")))


TABLES: dict[str, Table] = {t.name: t for t in (
    _table("smtp_sessions", "started_at",
           "started_at, ended_at, component, host, domain, account, client_ip, client_name,"
           " helo, tls, messages, recipients, bytes, verdict, reason",
           component="unknown", messages=0, recipients=0, bytes=0),
    _table("smtp_messages", "started_at",
           "session_id, started_at, ended_at, domain, account, client_ip, queue_id,"
           " message_id, subject_digest, sender, recipients, recipient_count, size, verdict,"
           " reason", recipients=[], recipient_count=0),
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

    __slots__ = ("id", "table", "values", "version")

    def __init__(self, table: Table, values: dict[str, Any]) -> None:
        self.table = table
        self.values = values
        self.id: int | None = None
        self.version = 0

    def __repr__(self) -> str:
        return f"<Row {self.table.name} id={self.id} v{self.version}>"


@dataclass(frozen=True)
class RecorderStats:
    written: int
    pending: int
    failed_flushes: int
    dropped: int
    last_error: str | None


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
                   flush_timeout_s=settings.flush_timeout_s, holder=holder)

    def __init__(self, pool: asyncpg.Pool, *, component: str = "mailfc",
                 flush_interval_s: float = 0.2, batch_size: int = 2000,
                 max_pending: int = 200_000, flush_timeout_s: float = 10.0,
                 holder: str | None = None) -> None:
        self.pool = pool
        self.component = component
        self.flush_interval_s = flush_interval_s
        self.batch_size = batch_size
        self.max_pending = max_pending
        self.flush_timeout_s = flush_timeout_s
        self.holder = holder or default_holder()
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
                             self.dropped, self.last_error)

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
                        await self._write([row for row, _ in batch])
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
                total += len(batch)
                self.written += len(batch)
                if self._failing:
                    log.warning("recording works again after %d failed flushes",
                                self.failed_flushes)
                    self._failing = False
            return total

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
                await db.execute(_upsert_sql(TABLES[name]), await _json_rows(group))

    async def _stats_loop(self) -> None:
        while True:
            await asyncio.sleep(10.0)
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5.0):
                    await self._write_stats()

    async def _write_stats(self) -> None:
        await self.pool.execute(
            "INSERT INTO recorder_stats (holder, component, started_at, updated_at, written,"
            " failed_flushes, dropped, pending, last_error)"
            " VALUES ($1, $2, $3, now(), $4, $5, $6, $7, $8)"
            " ON CONFLICT (holder) DO UPDATE SET updated_at = now(),"
            " written = EXCLUDED.written, failed_flushes = EXCLUDED.failed_flushes,"
            " dropped = EXCLUDED.dropped, pending = EXCLUDED.pending,"
            " last_error = EXCLUDED.last_error",
            self.holder, self.component, self._started_at, self.written,
            self.failed_flushes, self.dropped, len(self._dirty), self.last_error)


# Rows serialised between two turns of the event loop: a batch of thousands at once
# would hold up every other task of the process (a hook server's answers to Dovecot)
# for tens of milliseconds.
ROWS_PER_TURN = 200


async def _json_rows(rows: list[Row]) -> str:
    """The rows as one JSON array, yielding to the event loop every ROWS_PER_TURN."""
    parts = []
    for start in range(0, len(rows), ROWS_PER_TURN):
        if start:
            await asyncio.sleep(0)
        parts.append(json.dumps(
            [{"id": row.id, **{k: _jsonable(v) for k, v in row.values.items()}}
             for row in rows[start:start + ROWS_PER_TURN]])[1:-1])
    return "[" + ",".join(parts) + "]"


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
