"""What `mailfc queue` does with a spool: list, show, retry, delete.

The files are read directly (no service needed).  Changes go through the process that
delivers from the spool when one runs (it holds the lock): a request file in control/,
which it applies within scan_interval_s; with nobody running, a delete removes the files
at once and a retry is moot (everything is retried when SMTP-In starts).
"""

from __future__ import annotations

import datetime
import fcntl
import os
import time
from typing import Any

from mailfc.errors import InvalidInput, NotFound
from mailfc.gateways.spool.store import CONTROL_ACTIONS, SpoolFiles, domain_of

REQUEST_WAIT_S = 5.0


def _when(stamp: float | None) -> datetime.datetime | None:
    return datetime.datetime.fromtimestamp(stamp, datetime.UTC) if stamp else None


def summary(files: SpoolFiles, queue_id: str) -> dict[str, Any]:
    envelope = files.read_envelope(queue_id)
    progress = files.read_progress(queue_id)
    pending = [r for r in envelope.recipients if r not in progress.final]
    domains = sorted({domain_of(r) for r in pending})
    next_try = [progress.next_try[d] for d in domains if d in progress.next_try]
    errors = [progress.last_error[d] for d in domains if progress.last_error.get(d)]
    return {
        "queue_id": queue_id, "received_at": _when(envelope.received_at),
        "sender": envelope.sender or "<>", "size": envelope.size,
        "recipients": len(envelope.recipients), "pending": len(pending),
        "domains": ",".join(domains),
        "attempts": max((progress.attempts.get(d, 0) for d in domains), default=0),
        "next_try": _when(min(next_try)) if next_try else None,
        "last_error": errors[0] if errors else None,
    }


def list_queue(files: SpoolFiles, domain: str | None = None) -> list[dict[str, Any]]:
    if not files.queue.exists():
        return []
    rows = []
    for queue_id in files.queue_ids():
        try:
            row = summary(files, queue_id)
        except (FileNotFoundError, ValueError):
            continue
        if domain is None or domain.lower() in row["domains"].split(","):
            rows.append(row)
    return rows


def show(files: SpoolFiles, queue_id: str) -> dict[str, Any]:
    _check_id(queue_id)
    try:
        envelope = files.read_envelope(queue_id)
        progress = files.read_progress(queue_id)
        message = files.read_message(queue_id)
    except FileNotFoundError:
        raise NotFound(f"no message {queue_id} in {files.queue}: see mailfc queue list") \
            from None
    end = message.find(b"\r\n\r\n")
    result = summary(files, queue_id)
    result.update(
        client_ip=envelope.client_ip, helo=envelope.helo,
        recipient_status=[
            {"recipient": r, "status": (f"{progress.final[r][0]} {progress.final[r][1]}"
                                        if r in progress.final else "queued")}
            for r in envelope.recipients],
        headers=message[:end if end >= 0 else 4096].decode("utf-8", "replace"))
    return result


def request(files: SpoolFiles, queue_id: str, action: str) -> str:
    """Apply `action` (retry|delete) to one message or "all"; a sentence saying what happened."""
    if action not in CONTROL_ACTIONS:
        raise InvalidInput(f"unknown action {action!r}")
    if queue_id != "all":
        _check_id(queue_id)
        if not (files.queue / queue_id).exists():
            raise NotFound(f"no message {queue_id} in the queue: see mailfc queue list")
    fd = os.open(files.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return _ask_owner(files, queue_id, action)
        # Nobody delivers from this spool now: act on the files ourselves.
        targets = files.queue_ids() if queue_id == "all" else [queue_id]
        if action == "delete":
            for target in targets:
                files.remove(target)
            return f"deleted {len(targets)} message(s)"
        return "no SMTP-In runs on this spool: every message is retried when it starts"
    finally:
        os.close(fd)


def _ask_owner(files: SpoolFiles, queue_id: str, action: str) -> str:
    path = files.request(queue_id, action)
    deadline = time.monotonic() + REQUEST_WAIT_S
    while time.monotonic() < deadline:
        if not path.exists():
            return f"{action} of {queue_id}: done by the running SMTP-In"
        time.sleep(0.1)
    return f"{action} of {queue_id}: requested; the running SMTP-In has not picked it up yet"


def _check_id(queue_id: str) -> None:
    if not queue_id.isalnum() or not queue_id.isascii():
        raise InvalidInput(f"invalid queue id {queue_id!r}: letters and digits only")
