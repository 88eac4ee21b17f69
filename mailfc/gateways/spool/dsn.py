"""Delivery status notifications (RFC 3464) for messages the spool gives up on.

The report has three parts: a human-readable explanation, the machine-readable
message/delivery-status (one block per failed recipient with its Status and
Diagnostic-Code), and the original message's headers (text/rfc822-headers, not
the whole message: the sender has it, and a bounce should stay small).  The spool
hands in only the first HEAD_LIMIT bytes of the original (head_of), whatever its
size: a header block longer than that is cut at its last complete line.
"""

from __future__ import annotations

import email.utils
import time

from mailfc.gateways.spool.store import Envelope

BOUNDARY_PREFIX = "mailfc-dsn-"
# How much of the original the spool reads for a bounce: its header block, at most.
HEAD_LIMIT = 64 * 1024


def original_headers(head: bytes) -> bytes:
    """The header block of a message from its first bytes, ending with CRLF."""
    head = head[:HEAD_LIMIT]
    end = head.find(b"\r\n\r\n")
    if end >= 0:
        return head[:end + 2]
    line_end = head.rfind(b"\r\n")
    return head[:line_end + 2] if line_end >= 0 else b""


def bounce(hostname: str, envelope: Envelope, failed: dict[str, tuple[int, str]],
           head: bytes) -> bytes:
    """The DSN for `failed` recipients; `head`: the original's first bytes (HEAD_LIMIT)."""
    boundary = f"{BOUNDARY_PREFIX}{envelope.queue_id}"
    headers = original_headers(head)
    lines = "\r\n".join(f"  <{rcpt}>: {code} {text}" for rcpt, (code, text) in failed.items())
    arrival = email.utils.formatdate(envelope.received_at)
    per_recipient = "".join(
        f"Final-Recipient: rfc822; {rcpt}\r\n"
        f"Action: failed\r\n"
        f"Status: {_status(code, text)}\r\n"
        f"Diagnostic-Code: smtp; {code} {text}\r\n\r\n"
        for rcpt, (code, text) in failed.items())
    text = (
        f"From: Mail Delivery System <MAILER-DAEMON@{hostname}>\r\n"
        f"To: <{envelope.sender}>\r\n"
        f"Subject: Undelivered Mail Returned to Sender\r\n"
        f"Date: {email.utils.formatdate(time.time())}\r\n"
        f"Message-ID: <{envelope.queue_id}.dsn@{hostname}>\r\n"
        f"Auto-Submitted: auto-replied\r\n"
        f"MIME-Version: 1.0\r\n"
        f'Content-Type: multipart/report; report-type=delivery-status;'
        f' boundary="{boundary}"\r\n'
        f"\r\n"
        f"--{boundary}\r\n"
        f"Content-Type: text/plain; charset=us-ascii\r\n\r\n"
        f"This is the mail system at {hostname}.\r\n\r\n"
        f"Your message (queue id {envelope.queue_id}) could not be delivered to one or\r\n"
        f"more recipients; it has been returned for these:\r\n\r\n{lines}\r\n\r\n"
        f"--{boundary}\r\n"
        f"Content-Type: message/delivery-status\r\n\r\n"
        f"Reporting-MTA: dns; {hostname}\r\n"
        f"X-Mailfc-Queue-ID: {envelope.queue_id}\r\n"
        f"Arrival-Date: {arrival}\r\n\r\n"
        f"{per_recipient}"
        f"--{boundary}\r\n"
        f"Content-Type: text/rfc822-headers\r\n\r\n"
    ).encode("utf-8", "replace")
    return text + headers + f"\r\n--{boundary}--\r\n".encode()


def _status(code: int, text: str) -> str:
    first = text.split(" ", 1)[0]
    if first.count(".") == 2 and first.replace(".", "").isdigit():
        return first
    return f"{code // 100}.0.0"
