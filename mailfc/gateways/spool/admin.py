"""What `mailfc queue` does with a spool: list, show, retry, delete, and the quarantine.

The files are read directly (no service needed).  Changes to queued messages go through
the process that delivers from the spool when one runs (it holds the lock): a request
file in control/, which it applies within scan_interval_s; with nobody running, a delete
removes the files at once and a retry is moot (everything is retried when the service
starts).  The quarantine needs no running process: a release commits the message into
queue/ as any accepting process does (the owner's next scan takes it), a delete removes
its files.
"""

from __future__ import annotations

import datetime
import fcntl
import os
import time
from typing import Any

from mailfc.errors import InvalidInput, NotFound
from mailfc.gateways.spool.dsn import original_headers
from mailfc.gateways.spool.store import CONTROL_ACTIONS, SpoolFiles, SpoolFull, domain_of

REQUEST_WAIT_S = 5.0
# What `show` prints of a message: its header block, read up to this many bytes.
HEADER_LIMIT = 64 * 1024


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


def has_message(files: SpoolFiles, queue_id: str) -> bool:
    _check_id(queue_id)
    return (files.queue / queue_id).exists()


def show(files: SpoolFiles, queue_id: str) -> dict[str, Any]:
    _check_id(queue_id)
    try:
        envelope = files.read_envelope(queue_id)
        progress = files.read_progress(queue_id)
        head = files.message(queue_id).head(HEADER_LIMIT)
        result = summary(files, queue_id)
    except FileNotFoundError:
        raise NotFound(f"no message {queue_id} in {files.queue}: see mailfc queue list") \
            from None
    result.update(
        client_ip=envelope.client_ip, helo=envelope.helo,
        recipient_status=[
            {"recipient": r, "status": (f"{progress.final[r][0]} {progress.final[r][1]}"
                                        if r in progress.final else "queued")}
            for r in envelope.recipients],
        headers=original_headers(head).decode("utf-8", "replace"))
    return result


def request(files: SpoolFiles, queue_id: str, action: str, service: str = "SMTP-In") -> str:
    """Apply `action` (retry|delete) to one message or "all"; a sentence saying what happened.
    `service` names who delivers from this spool, for that sentence."""
    if action not in CONTROL_ACTIONS:
        raise InvalidInput(f"unknown action {action!r}")
    if queue_id != "all" and not has_message(files, queue_id):
        raise NotFound(f"no message {queue_id} in {files.queue}: see mailfc queue list")
    if not files.directory.exists():
        return f"{service}'s spool {files.directory} does not exist yet: nothing to {action}"
    fd = os.open(files.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return _ask_owner(files, queue_id, action, service)
        # Nobody delivers from this spool now: act on the files ourselves.
        targets = files.queue_ids() if queue_id == "all" else [queue_id]
        if action == "delete":
            for target in targets:
                files.remove(target)
            return f"{service}: deleted {len(targets)} message(s)"
        return f"no {service} runs on this spool: every message is retried when it starts"
    finally:
        os.close(fd)


def _ask_owner(files: SpoolFiles, queue_id: str, action: str, service: str) -> str:
    path = files.request(queue_id, action)
    deadline = time.monotonic() + REQUEST_WAIT_S
    while time.monotonic() < deadline:
        if not path.exists():
            return f"{action} of {queue_id}: done by the running {service}"
        time.sleep(0.1)
    return (f"{action} of {queue_id}: requested; the running {service} has not picked it"
            " up yet")


# -- the quarantine (bounces nobody could take) ---------------------------------------


def quarantine_summary(files: SpoolFiles, queue_id: str) -> dict[str, Any]:
    envelope, message, reason = files.read_quarantined(queue_id)
    failed = reason.get("failed") or {}
    return {
        "queue_id": queue_id, "quarantined_at": _when(reason.get("quarantined_at")),
        "received_at": _when(envelope.received_at), "sender": envelope.sender or "<>",
        "recipients": ",".join(failed or envelope.recipients), "size": message.size,
        "reason": reason.get("reason") or "(no reason recorded)",
    }


def list_quarantine(files: SpoolFiles) -> list[dict[str, Any]]:
    rows = []
    for queue_id in files.quarantined_ids():
        try:
            rows.append(quarantine_summary(files, queue_id))
        except (FileNotFoundError, ValueError):
            continue
    return rows


def is_quarantined(files: SpoolFiles, queue_id: str) -> bool:
    _check_id(queue_id)
    return (files.quarantine_dir / queue_id).exists()


def show_quarantined(files: SpoolFiles, queue_id: str) -> dict[str, Any]:
    _check_id(queue_id)
    try:
        result = quarantine_summary(files, queue_id)
        envelope, message, _ = files.read_quarantined(queue_id)
        head = message.head(HEADER_LIMIT)
    except FileNotFoundError:
        raise _not_quarantined(files, queue_id) from None
    result.update(client_ip=envelope.client_ip, helo=envelope.helo,
                  headers=original_headers(head).decode("utf-8", "replace"))
    return result


def release(files: SpoolFiles, queue_id: str, service: str = "SMTP-In") -> str:
    """Queue a quarantined message again, to the recipients that failed."""
    _check_id(queue_id)
    if not (files.quarantine_dir / queue_id).exists():
        raise _not_quarantined(files, queue_id)
    try:
        envelope = files.release(queue_id)
    except FileExistsError:
        raise InvalidInput(f"{queue_id} is in {files.queue} already (released before?):"
                           f" see mailfc queue show {queue_id}") from None
    except FileNotFoundError:
        raise _not_quarantined(files, queue_id) from None
    except SpoolFull as error:
        raise InvalidInput(f"cannot queue {queue_id} again: {error}; free space in"
                           f" {files.directory} and release it again") from None
    return (f"released {queue_id} to {', '.join(envelope.recipients)}: {service} delivers it"
            " within seconds if it runs, else when it starts")


def delete_quarantined(files: SpoolFiles, queue_id: str) -> str:
    _check_id(queue_id)
    if not (files.quarantine_dir / queue_id).exists():
        raise _not_quarantined(files, queue_id)
    files.remove_quarantined(queue_id)
    return f"deleted {queue_id} from the quarantine"


def _not_quarantined(files: SpoolFiles, queue_id: str) -> NotFound:
    return NotFound(f"no message {queue_id} in {files.quarantine_dir}:"
                    " see mailfc queue quarantine")


def _check_id(queue_id: str) -> None:
    if not queue_id.isalnum() or not queue_id.isascii():
        raise InvalidInput(f"invalid queue id {queue_id!r}: letters and digits only")
