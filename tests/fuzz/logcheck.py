"""Tracebacks in the log are defects: a handler that collects them for the fuzz tests."""

from __future__ import annotations

import logging


class Tracebacks(logging.Handler):
    """Collects log records that carry an exception: a traceback in the log is a defect."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:
            self.records.append(record)


def no_traceback(handler: Tracebacks) -> None:
    found, handler.records[:] = list(handler.records), []
    assert not found, "\n".join(logging.Formatter().format(r) for r in found)
