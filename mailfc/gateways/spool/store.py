"""The spool's files: how a message is made durable, how its progress is kept.

LAYOUT (under spool.directory)
    tmp/<id>          a message being written; never delivered, removed at start-up
    queue/<id>        a committed message: one JSON line (the envelope), then the message;
                      the message is read from the file at the end of that line (FileSlice),
                      never loaded whole
    queue/<id>.log    its progress, JSON lines appended and fsync'd:
                        {"rcpt": "bob@a.example", "code": 250, "text": "2.0.0 OK"}   final
                        {"domain": "a.example", "attempts": 2, "next": 1700000000.0,
                         "error": "451 4.3.0 ..."}                                  deferred
    quarantine/<id>   a bounce nobody could take (queue.py UNDELIVERABLE BOUNCES): the
                      queue file moved here as it was, envelope line and message
    quarantine/<id>.reason   why, one JSON object: {"queue_id", "quarantined_at",
                      "reason", "failed": {"rcpt": [code, "text"]}}
    control/<id>.<retry|delete>   requests of `mailfc queue` for the running spool
    lock              flock(2) held by the one process that delivers from this spool

COMMIT
    write tmp/<id> (the envelope line, then the message copied in chunks of 64 KiB from
    wherever it is: memory, the receiving hop's temporary file, another spool file),
    fsync it, rename it to queue/<id>, fsync queue/.  Only then is the
    message accepted (SMTP-In answers 250).  A crash before the rename leaves a tmp file
    that start-up removes: the client got no 250 and sends again.  One fsync of queue/
    makes every rename before it durable, so the commits of concurrent sessions share
    one (queue.py, group commit): a busy MX pays one directory fsync per batch, not
    one per message.

EXACTLY ONCE
    A recipient's final reply is appended to the log (fsync'd) as soon as the next hop
    gives it, while the message still has recipients to go (another domain, a deferred
    one, a failure to bounce); after a restart the log says who is done, so nobody gets
    it twice.  When every recipient is final the message and its log are unlinked
    (message first) without a log record first: the unlink follows the last reply as
    closely as an append would, so a killed process leaves the same state either way.
    That unlink runs in the event loop, not a disk thread, right as the reply is read
    (queue.py _finish): nothing else stands between the next hop's 250 and it.
    The unlinks are not fsync'd: after a power loss a message may come back and be
    delivered again (at least once), never lost; Postfix makes the same trade.

DISK FULL
    Any OSError while writing (ENOSPC, EDQUOT, EIO) removes the partial tmp file and
    raises SpoolFull: SMTP-In answers 452 4.3.1 and nothing half-written stays.

QUARANTINE
    quarantine() writes the reason (fsync'd), renames queue/<id> into quarantine/ and
    fsyncs it, then drops the log: a crash in between leaves the message in the queue
    (it fails again and is quarantined again), never nowhere.  release() commits a new
    queue/<id> (same id, fresh arrival time, only the recipients that failed) like any
    commit, then removes the quarantined copy; the running spool finds it at its next
    scan, like a message another process accepted.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mailfc.errors import TemporaryFailure
from mailfc.messages import CHUNK, FileSlice, Source

CONTROL_ACTIONS = ("retry", "delete")


class SpoolFull(TemporaryFailure):
    """The spool cannot store the message now (disk full, I/O error)."""


@dataclass(frozen=True)
class Envelope:
    """What the spool keeps about a message besides its bytes."""

    queue_id: str
    sender: str
    recipients: tuple[str, ...]
    received_at: float
    mail_options: tuple[str, ...] = ()
    client_ip: str | None = None
    client_name: str | None = None
    helo: str | None = None
    size: int = 0
    # A DSN made by this spool: it never gets a bounce of its own.
    is_bounce: bool = False
    # A bounce nobody could take, re-sent to spool.undeliverable_bounces: if this
    # fails too it goes to the quarantine, not to the postmaster again.
    for_postmaster: bool = False
    # The sender's own id of this message (XFORWARD IDENT): after a crash between the
    # commit and the sender's reply, the resumed spool tells the intake's journal that
    # this message is taken (smtp_out/service.py), so the sender's retry is answered.
    ident: str | None = None

    def to_json(self) -> bytes:
        values = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}
        # Files stay readable by an older mailfc.
        if not self.for_postmaster:
            del values["for_postmaster"]
        if self.ident is None:
            del values["ident"]
        return json.dumps(values, separators=(",", ":")).encode() + b"\n"

    @staticmethod
    def from_json(line: bytes) -> Envelope:
        values: dict[str, Any] = json.loads(line)
        values["recipients"] = tuple(values["recipients"])
        values["mail_options"] = tuple(values.get("mail_options", ()))
        return Envelope(**values)


@dataclass
class Progress:
    """The log of one message replayed: final replies and per-domain deferrals."""

    final: dict[str, tuple[int, str]] = field(default_factory=dict)
    attempts: dict[str, int] = field(default_factory=dict)
    next_try: dict[str, float] = field(default_factory=dict)
    last_error: dict[str, str] = field(default_factory=dict)


# Not secret, only distinct: a generator seeded once per process from os.urandom
# (a getrandom call per message is a syscall for nothing).
_ids = random.Random()


def new_queue_id() -> str:
    # Time first, so a listing sorted by id is in arrival order; the random part
    # keeps two processes' ids of the same microsecond apart.
    return f"{time.time_ns() // 1000:X}{_ids.getrandbits(24):06X}"


def domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower()


class SpoolFiles:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.tmp = directory / "tmp"
        self.queue = directory / "queue"
        self.control = directory / "control"
        self.quarantine_dir = directory / "quarantine"
        self.lock_path = directory / "lock"

    def prepare(self) -> None:
        for path in (self.directory, self.tmp, self.queue, self.control, self.quarantine_dir):
            path.mkdir(parents=True, exist_ok=True)
        self.directory.chmod(0o700)

    # -- writing (blocking: callers run these in a thread) ---------------------------

    def commit(self, envelope: Envelope, message: Source, keep: int = 0) -> bytes | None:
        """Write, fsync and rename the message into the queue; SpoolFull on any failure.
        Durable once sync_queue() has run after it.  Returns the message's bytes when it
        has at most `keep` of them (the caller caches small messages), else None."""
        tmp = self.tmp / envelope.queue_id
        try:
            kept = self._write(tmp, envelope, message, keep)
            os.rename(tmp, self.queue / envelope.queue_id)
        except OSError as error:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise SpoolFull(f"cannot store message: {error.strerror or error}") from None
        return kept

    def _write(self, path: Path, envelope: Envelope, message: Source,
               keep: int) -> bytes | None:
        kept: bytearray | None = bytearray() if envelope.size <= keep else None
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            # The envelope line goes out with the first chunk: one write for most mail.
            pending = envelope.to_json()
            written = 0
            for data in message.chunks(CHUNK):
                written += len(data)
                if kept is not None:
                    kept += data
                if pending:
                    _write_all(fd, pending + data)
                    pending = b""
                else:
                    _write_all(fd, data)
            if pending:
                _write_all(fd, pending)
            if written != envelope.size:
                raise OSError(f"the message gave {written} of its {envelope.size} bytes")
            os.fsync(fd)
        finally:
            os.close(fd)
        return bytes(kept) if kept is not None else None

    def sync_queue(self) -> None:
        """fsync queue/: every rename into it before this call is durable after it."""
        try:
            _fsync_dir(self.queue)
        except OSError as error:
            raise SpoolFull(f"cannot store message: {error.strerror or error}") from None

    def append_log(self, queue_id: str, records: list[dict[str, Any]]) -> None:
        data = b"".join(json.dumps(r, separators=(",", ":")).encode() + b"\n" for r in records)
        fd = os.open(self.queue / f"{queue_id}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND,
                     0o600)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)

    def remove(self, queue_id: str, *, logged: bool = True) -> None:
        """Forget a finished message: the message first, so a crash leaves at most a log.
        logged=False: the caller knows no log was written (not looked for)."""
        with contextlib.suppress(FileNotFoundError):
            (self.queue / queue_id).unlink()
        if logged:
            with contextlib.suppress(FileNotFoundError):
                (self.queue / f"{queue_id}.log").unlink()

    # -- reading ----------------------------------------------------------------------

    def queue_ids(self) -> list[str]:
        return sorted(name for name in os.listdir(self.queue) if "." not in name)

    def read_envelope(self, queue_id: str) -> Envelope:
        return self.read_head(self.queue / queue_id)[0]

    @staticmethod
    def read_head(path: Path) -> tuple[Envelope, FileSlice]:
        """A spool file's envelope, and its message as a slice of the file (not read)."""
        with path.open("rb") as handle:
            line = handle.readline()
            envelope = Envelope.from_json(line)
            size = os.fstat(handle.fileno()).st_size - len(line)
        return envelope, FileSlice(path, len(line), size)

    def message(self, queue_id: str) -> FileSlice:
        """The message of queue/<id>, read from the file when it is sent."""
        return self.read_head(self.queue / queue_id)[1]

    def read_progress(self, queue_id: str) -> Progress:
        progress = Progress()
        try:
            data = (self.queue / f"{queue_id}.log").read_bytes()
        except FileNotFoundError:
            return progress
        for line in data.splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue    # a torn last line of a crash: the record was never complete
            if "rcpt" in record:
                progress.final[record["rcpt"]] = (int(record["code"]), record["text"])
            elif "domain" in record:
                domain = record["domain"]
                progress.attempts[domain] = int(record["attempts"])
                progress.next_try[domain] = float(record["next"])
                progress.last_error[domain] = record.get("error", "")
        return progress

    def clean_tmp(self) -> int:
        """Remove uncommitted files and logs without a message (start-up, as owner)."""
        removed = 0
        for path in self.tmp.iterdir():
            path.unlink(missing_ok=True)
            removed += 1
        for path in self.queue.glob("*.log"):
            if not (self.queue / path.stem).exists():
                path.unlink(missing_ok=True)
        return removed

    # -- quarantine -------------------------------------------------------------------

    def quarantine(self, queue_id: str, record: dict[str, Any]) -> None:
        """Move queue/<id> into quarantine/ with its reason; OSError leaves it queued."""
        self.quarantine_dir.mkdir(exist_ok=True)
        reason = self.quarantine_dir / f"{queue_id}.reason"
        _write_file(reason, json.dumps(record, separators=(",", ":")).encode() + b"\n")
        os.rename(self.queue / queue_id, self.quarantine_dir / queue_id)
        _fsync_dir(self.quarantine_dir)
        with contextlib.suppress(FileNotFoundError):
            (self.queue / f"{queue_id}.log").unlink()

    def quarantined_ids(self) -> list[str]:
        if not self.quarantine_dir.exists():
            return []
        return sorted(name for name in os.listdir(self.quarantine_dir) if "." not in name)

    def read_quarantined(self, queue_id: str) -> tuple[Envelope, FileSlice, dict[str, Any]]:
        """Envelope, message and reason record of quarantine/<id>; FileNotFoundError."""
        envelope, message = self.read_head(self.quarantine_dir / queue_id)
        try:
            reason: dict[str, Any] = json.loads(
                (self.quarantine_dir / f"{queue_id}.reason").read_bytes())
        except (FileNotFoundError, ValueError):
            reason = {}     # a crash before the reason was complete: the message counts
        return envelope, message, reason

    def release(self, queue_id: str) -> Envelope:
        """Queue a quarantined message again (same id, arrival now, only the recipients
        that failed) and remove it from the quarantine.  FileExistsError: it is queued."""
        if (self.queue / queue_id).exists():
            raise FileExistsError(queue_id)
        old, message, reason = self.read_quarantined(queue_id)
        failed = tuple(r for r in old.recipients if r in reason.get("failed", {}))
        fields = {**old.__dict__, "recipients": failed or old.recipients,
                  "received_at": time.time(), "size": message.size}
        envelope = Envelope(**fields)
        self.commit(envelope, message)
        self.sync_queue()
        self.remove_quarantined(queue_id)
        return envelope

    def remove_quarantined(self, queue_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.quarantine_dir / queue_id).unlink()
        with contextlib.suppress(FileNotFoundError):
            (self.quarantine_dir / f"{queue_id}.reason").unlink()

    # -- control requests -------------------------------------------------------------

    def request(self, queue_id: str, action: str) -> Path:
        path = self.control / f"{queue_id}.{action}"
        path.touch()
        return path

    def take_requests(self) -> list[tuple[str, str]]:
        found = []
        for path in self.control.iterdir():
            queue_id, _, action = path.name.rpartition(".")
            path.unlink(missing_ok=True)
            if action in CONTROL_ACTIONS:
                found.append((queue_id, action))
        return found


def _write_file(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
