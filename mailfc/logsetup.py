"""Logging of every mailfc process: text or JSON lines, and the message hop lines.

    [log]
    format = "text"     # or "json"
    level  = "INFO"     # DEBUG, INFO, WARNING, ERROR; `mailfc up --verbose` is DEBUG

TEXT lines are `2026-12-07 02:10:11,123 mailfc.hop INFO smtp-in: 5F1A...: ...`.
JSON lines are one object each:

    {"time": "2026-12-07T02:10:11.123+00:00", "level": "INFO", "logger": "mailfc.hop",
     "process": "inbound", "message": "smtp-in: 5F1A...: from=<a@x>, ...",
     "queue_id": "5F1A..."}

`process` is the supervised group (MAILFC_PROCESS, set by the supervisor), absent
in a process of its own.  `queue_id` is there on hop lines only.

HOP LINES.  Where a message changes hands, the service logs one line on the
logger "mailfc.hop", in the manner of Postfix's maillog, with the queue id the
message has there (SMTP-In's, SMTP-Out's; the LMTP Router logs the sender's
queue id it was given by XFORWARD IDENT; the SMTP Router the queue id of the
domain's Postfix from its reply), so `grep QUEUEID` follows a message:

    smtp-in: QID: from=<a@x>, size=123, nrcpt=1, client=192.0.2.1
    smtp-in: QID: to=<b@y>, relay=lmtp-router, delay=0.2, attempts=1, status=sent (250 ...)
    lmtp-router: QID: to=<b@y>, relay=y (dispatcher), status=sent (250 ...)
    submission: PFQID: from=<b@y>, sasl_username=b@y, client=..., status=sent (250 ...)
    smtp-out: QID: from=<b@y>, size=456, nrcpt=1, orig_queue_id=y:PFQID
    smtp-out: QID: to=<c@z>, relay=z, delay=0.5, attempts=1, status=sent (250 ...)

`hop(service, queue_id, text)` writes one.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import sys
from typing import Any

from mailfc.config import LogSection

TEXT_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
HOP_LOGGER = "mailfc.hop"
NO_QUEUE = "NOQUEUE"

hop_log = logging.getLogger(HOP_LOGGER)


def hop(service: str, queue_id: str | None, text: str) -> None:
    """One hop line: `service: queue_id: text` (HOP LINES above)."""
    hop_log.info("%s: %s: %s", service, queue_id or NO_QUEUE, text,
                 extra={"queue_id": queue_id or NO_QUEUE})


class JsonFormatter(logging.Formatter):
    """One JSON object per record (see the header)."""

    def __init__(self) -> None:
        super().__init__()
        self.process_name = os.environ.get("MAILFC_PROCESS")

    def format(self, record: logging.LogRecord) -> str:
        item: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC)
            .isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
        }
        if self.process_name:
            item["process"] = self.process_name
        item["message"] = record.getMessage()
        queue_id = getattr(record, "queue_id", None)
        if queue_id is not None:
            item["queue_id"] = queue_id
        if record.exc_info:
            item["exception"] = self.formatException(record.exc_info)
        return json.dumps(item, ensure_ascii=False, default=str)


def configure(settings: LogSection, *, verbose: bool = False) -> None:
    """Send the root logger's records to standard error as `settings` say."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if settings.format == "json"
                         else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else getattr(logging, settings.level))
