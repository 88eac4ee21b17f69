"""Start events: what woke a domain's container, and how long its cold start took.

Every start the runtime makes (ensure() finding nothing running, start()
scaling out) writes one event row of kind "start" (mailfc.db.events,
read with `mailfc events --kind start`):

    reason   "imap session from 192.0.2.7:51234: cold start 112 ms"
             "started by admin (container start): cold start 98 ms"
             "did not start: <why>"               (a failed start)
    detail   {"trigger": {"by": "session", "protocol": "imap",
                          "peer": "192.0.2.7:51234"},
              "cold_start_ms": 112.4, "instance_id": 17, "container": "mailfc-1a2b3c4d",
              "pid": 4242, "slot": 0, "failed": false}

Trigger.by is "session" (the dispatcher, for a routed session: protocol and
peer), "admin" (the CLI: which command) or "controller" (scale out, retrying
a queue: why).  A start with no trigger given is recorded as by "unknown".

The row is written after the container is ready, in the background: the
session that woke the container does not wait for it, and a CMDB hiccup
costs the event (logged), never the start.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

import asyncpg

from mailfc.db import events
from mailfc.metrics import names as metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Trigger:
    by: str = "unknown"            # session | admin | controller | unknown
    protocol: str | None = None    # lmtp | imap | smtp, for a session
    peer: str | None = None        # the client "address:port", when known
    why: str | None = None         # the admin's command or the controller's reason

    def as_dict(self) -> dict[str, str]:
        return {key: value for key, value in asdict(self).items() if value is not None}

    def describe(self) -> str:
        if self.by == "session":
            text = f"{self.protocol or 'a'} session"
            return text + (f" from {self.peer}" if self.peer else "")
        if self.by in ("admin", "controller"):
            return f"started by {self.by}" + (f" ({self.why})" if self.why else "")
        return "started" + (f" ({self.why})" if self.why else "")


UNKNOWN = Trigger()


async def record(db: asyncpg.Pool, *, host: str, domain: str, service: str,
                 trigger: Trigger, cold_start_s: float, instance_id: int | None = None,
                 container: str | None = None, pid: int | None = None,
                 slot: int | None = None, failure: str | None = None) -> None:
    """Write the start event; never raises (a lost event is logged)."""
    milliseconds = round(cold_start_s * 1000.0, 1)
    metrics.CONTAINER_STARTS.labels(service, "failed" if failure else "ok").inc()
    if failure is None:
        metrics.COLD_START_SECONDS.labels(service).observe(cold_start_s)
    if failure is None:
        reason = f"{trigger.describe()}: cold start {milliseconds:g} ms"
    else:
        reason = f"{trigger.describe()}: did not start after {milliseconds:g} ms: {failure}"
    detail: dict[str, Any] = {
        "trigger": trigger.as_dict(), "cold_start_ms": milliseconds,
        "instance_id": instance_id, "container": container, "pid": pid, "slot": slot,
        "failed": failure is not None}
    try:
        await events.record(db, "start", reason[:1000], host=host, domain=domain,
                            service=service, instance=container, detail=detail)
    except Exception as error:   # the CMDB: the start itself succeeded or failed already
        log.warning("could not record the start event of %s %s: %s", domain, service, error)
