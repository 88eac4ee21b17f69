"""Every metric of mailfc, defined once: call sites import them and add one line.

The children of `mailfc up` run with PROMETHEUS_MULTIPROC_DIR set (by the
supervisor, <state_dir>/metrics, emptied at each `mailfc up`), so what each
process counts lands in files the supervisor sums into one scrape
(mailfc.metrics.http).  Counters and histograms of a process that ended (a
cycle, a crash) keep counting in the sum; gauges count only live processes
("livesum").  Outside the supervisor (a test, `--services` by hand) the
metrics are plain in-memory ones nobody scrapes: recording costs the same.

    mailfc_sessions_total{service,verdict}          SMTP sessions closed
    mailfc_messages_total{service,verdict,domain}   messages taken or refused (smtp-in,
                                                    submission); a spool's (service = its
                                                    queue) delivered/bounced per recipient
    mailfc_logins_total{protocol,result,domain}     IMAP / submission logins
    mailfc_limit_decisions_total{rule,verdict}      policy engine decisions
    mailfc_refusals_total{service,reason}           connections (mailfc.anvil) or SMTP-In
                                                    commands refused
    mailfc_spool_messages{queue}                    messages waiting in a spool
    mailfc_spool_oldest_seconds{queue}              age of the oldest of them
    mailfc_delivery_seconds{service}                spool to next hop (histogram)
    mailfc_recorder_pending_rows{process}           rows waiting for the CMDB
    mailfc_recorder_failed_rows_total               rows given up on
    mailfc_container_starts_total{service,result}   container starts
    mailfc_container_cold_start_seconds{service}    their cold start (histogram)
    mailfc_containers_running{service}              containers running now
    mailfc_controller_decisions_total{kind}         event rows (mailfc events)
    mailfc_db_pool_connections{process,state}       PostgreSQL pool: in_use, idle, max
    mailfc_process_up{process}                      supervisor: 1 when ready
    mailfc_process_restarts_total{process}          supervisor: restarts after a crash
    mailfc_database_up                              supervisor: CMDB reachable

DOMAIN LABELS.  A label per domain would grow without bound on a platform of
100,000 domains; domain_label() names at most TOP_DOMAINS domains per process
(those with the most messages so far, recomputed every RECOMPUTE_EVERY calls)
and gives every other one "other".
"""

from __future__ import annotations

import collections
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

PROCESS = os.environ.get("MAILFC_PROCESS", "main")
TOP_DOMAINS = 20
RECOMPUTE_EVERY = 1000
MAX_TRACKED_DOMAINS = 10_000
OTHER = "other"

SESSIONS = Counter("mailfc_sessions", "SMTP sessions closed, by service and verdict",
                   ["service", "verdict"])
MESSAGES = Counter("mailfc_messages", "Messages taken or refused, by service and verdict",
                   ["service", "verdict", "domain"])
LOGINS = Counter("mailfc_logins", "Login attempts at the routers", ["protocol", "result",
                                                                     "domain"])
LIMIT_DECISIONS = Counter("mailfc_limit_decisions", "Policy engine decisions by rule",
                          ["rule", "verdict"])
REFUSALS = Counter("mailfc_refusals", "Connections or commands refused", ["service", "reason"])
SPOOL_MESSAGES = Gauge("mailfc_spool_messages", "Messages waiting in a spool", ["queue"],
                       multiprocess_mode="livesum")
SPOOL_OLDEST = Gauge("mailfc_spool_oldest_seconds", "Age of a spool's oldest message",
                     ["queue"], multiprocess_mode="livemax")
DELIVERY_SECONDS = Histogram("mailfc_delivery_seconds",
                             "From a spool to the next hop's acceptance", ["service"],
                             buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300))
RECORDER_PENDING = Gauge("mailfc_recorder_pending_rows", "Rows waiting for the CMDB",
                         ["process"], multiprocess_mode="livesum")
RECORDER_FAILED = Counter("mailfc_recorder_failed_rows", "Rows the recorder gave up on")
CONTAINER_STARTS = Counter("mailfc_container_starts", "Container starts", ["service",
                                                                           "result"])
COLD_START_SECONDS = Histogram("mailfc_container_cold_start_seconds",
                               "A container's cold start", ["service"],
                               buckets=(0.05, 0.1, 0.2, 0.35, 0.5, 1, 2, 5, 10, 30))
CONTAINERS_RUNNING = Gauge("mailfc_containers_running", "Containers running", ["service"],
                           multiprocess_mode="livesum")
CONTROLLER_DECISIONS = Counter("mailfc_controller_decisions",
                               "Decisions written as event rows, by kind", ["kind"])
DB_POOL = Gauge("mailfc_db_pool_connections", "PostgreSQL pool connections",
                ["process", "state"], multiprocess_mode="livesum")

# Every family above: a scrape declares each (an empty one too: the dashboard's
# queries name them before the first refusal, say).
ALL = (SESSIONS, MESSAGES, LOGINS, LIMIT_DECISIONS, REFUSALS, SPOOL_MESSAGES, SPOOL_OLDEST,
       DELIVERY_SECONDS, RECORDER_PENDING, RECORDER_FAILED, CONTAINER_STARTS,
       COLD_START_SECONDS, CONTAINERS_RUNNING, CONTROLLER_DECISIONS, DB_POOL)

# Made by the supervisor at scrape time (mailfc.metrics.http), listed for the dashboard test.
SUPERVISOR_METRICS = ("mailfc_process_up", "mailfc_process_restarts_total",
                      "mailfc_database_up")

_seen: collections.Counter[str] = collections.Counter()
_top: set[str] = set()
_calls = 0


def domain_label(domain: str | None) -> str:
    """`domain` if it is one of this process's TOP_DOMAINS busiest, else "other"."""
    global _calls, _top
    if not domain:
        return OTHER
    if domain in _seen or len(_seen) < MAX_TRACKED_DOMAINS:
        _seen[domain] += 1
    _calls += 1
    if len(_top) < TOP_DOMAINS and domain not in _top:
        _top.add(domain)
    elif _calls % RECOMPUTE_EVERY == 0:
        _top = {name for name, _ in _seen.most_common(TOP_DOMAINS)}
    return domain if domain in _top else OTHER


def count_decisions(decisions: Sequence[Any]) -> None:
    """The policy engine's decisions (mailfc.policy.engine.Decision): by rule, the
    rule's window and scope kept (bounded: kinds x windows x scopes), "accept" when
    none applied; a shadow rule's verdict is counted as "shadow"."""
    if not decisions:
        LIMIT_DECISIONS.labels("none", "accept").inc()
    for decision in decisions:
        verdict = decision.verdict if decision.mode == "enforce" else "shadow"
        LIMIT_DECISIONS.labels(decision.rule or "none", verdict).inc()


def submitted(code: int | None, domain: str) -> None:
    """A message at the submission router: Postfix's reply to its DATA (None: lost)."""
    verdict = ("aborted" if code is None else "accept" if code < 300
               else "tempfail" if code < 500 else "reject")
    MESSAGES.labels("submission", verdict, domain_label(domain)).inc()


def delivered(queue: str, final: Mapping[str, tuple[int, str]], age_s: float) -> None:
    """A spool's delivery attempt ended for some recipients: the message's time from
    its queueing to the next hop's acceptance, and the outcome by recipient."""
    for code, _ in final.values():
        if code < 300:
            DELIVERY_SECONDS.labels(queue).observe(age_s)
        MESSAGES.labels(queue, "delivered" if code < 300 else "bounced", OTHER).inc()


def spool_state(queue: str, received_at: Sequence[float]) -> None:
    """How many messages a spool holds and how old its oldest is."""
    SPOOL_MESSAGES.labels(queue).set(len(received_at))
    SPOOL_OLDEST.labels(queue).set(time.time() - min(received_at) if received_at else 0.0)


def pool_use(pool: object) -> None:
    """Sample an asyncpg pool's connections into mailfc_db_pool_connections."""
    size = getattr(pool, "get_size", lambda: 0)()
    idle = getattr(pool, "get_idle_size", lambda: 0)()
    DB_POOL.labels(PROCESS, "in_use").set(size - idle)
    DB_POOL.labels(PROCESS, "idle").set(idle)
    DB_POOL.labels(PROCESS, "max").set(getattr(pool, "get_max_size", lambda: 0)())
