"""The supervisor's metrics listener ([metrics] listen, default 127.0.0.1:9810).

    GET /metrics   Prometheus text format: what every child counted (the files
                   of PROMETHEUS_MULTIPROC_DIR, summed) and the supervisor's own
                   mailfc_process_up / mailfc_process_restarts_total /
                   mailfc_database_up
    GET /healthz   200 "ok": the supervisor answers (liveness)
    GET /readyz    200 "ready" when every supervised process said it is ready
                   and the database answers SELECT 1; else 503 with what is not

HTTP/1.0, one request per connection, GET or HEAD only; anything else gets 404
or 405.  A request line and headers must arrive within REQUEST_TIMEOUT_S and
MAX_REQUEST_BYTES.  It listens on loopback by default: the endpoint tells
anyone who reaches it the platform's traffic, so put it on another address
only behind a firewall.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest, multiprocess
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from mailfc.metrics import names

log = logging.getLogger("mailfc.metrics")

REQUEST_TIMEOUT_S = 5.0
MAX_REQUEST_BYTES = 8192
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ProcessState(Collector):
    """The supervisor's view at scrape time: `processes()` gives, per process
    name, (ready, restarts); `database_up()` the last database check."""

    def __init__(self, processes: Callable[[], dict[str, tuple[bool, int]]],
                 database_up: Callable[[], bool]) -> None:
        self.processes = processes
        self.database_up = database_up

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("mailfc_process_up", "1 when the process said it is ready",
                               labels=["process"])
        restarts = CounterMetricFamily("mailfc_process_restarts",
                                       "Restarts after the process died", labels=["process"])
        for name, (ready, count) in self.processes().items():
            up.add_metric([name], 1.0 if ready else 0.0)
            restarts.add_metric([name], float(count))
        yield up
        yield restarts
        yield GaugeMetricFamily("mailfc_database_up", "1 when the CMDB answers",
                                value=1.0 if self.database_up() else 0.0)


class Families(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


def scrape(multiproc_dir: Path, own: Collector) -> bytes:
    """The children's metrics summed, every family of mailfc.metrics.names declared
    (without samples when no process made one yet), and the supervisor's own."""
    children = multiprocess.MultiProcessCollector(  # type: ignore[no-untyped-call]
        None, path=str(multiproc_dir))
    found = list(children.collect())  # type: ignore[no-untyped-call]
    present = {family.name for family in found}
    declared = [family for metric in names.ALL for family in metric.describe()
                if family.name not in present]
    registry = CollectorRegistry()
    registry.register(Families(found + declared))
    registry.register(own)
    return generate_latest(registry)


class HealthServer:
    """`ready()` returns (ready, why not); `metrics()` the scrape's body."""

    def __init__(self, host: str, port: int, *, metrics: Callable[[], bytes],
                 ready: Callable[[], Awaitable[tuple[bool, str]]]) -> None:
        self.host, self.port = host, port
        self.metrics = metrics
        self.ready = ready
        self.server: asyncio.Server | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, self.host, self.port,
                                                 reuse_address=True)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.server.wait_closed(), 2.0)
            self.server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = b""
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                head = await reader.readuntil(b"\r\n\r\n")
            status, body, content_type = await self._answer(head)
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ConnectionError):
            status, body, content_type = "400 Bad Request", b"bad request\n", "text/plain"
        except asyncio.CancelledError:
            raise
        except Exception as error:      # a scrape must never end the supervisor
            log.warning("metrics request failed: %s", error)
            status, body, content_type = ("500 Internal Server Error",
                                          f"{error}\n".encode(), "text/plain")
        try:
            method = head.split(b" ", 1)[0]
            writer.write(f"HTTP/1.0 {status}\r\nContent-Type: {content_type}\r\n"
                         f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                         + (b"" if method == b"HEAD" else body))
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def _answer(self, head: bytes) -> tuple[str, bytes, str]:
        if len(head) > MAX_REQUEST_BYTES:
            return "400 Bad Request", b"request too large\n", "text/plain"
        parts = head.split(b"\r\n", 1)[0].split(b" ")
        if len(parts) != 3:
            return "400 Bad Request", b"bad request line\n", "text/plain"
        method, target = parts[0], parts[1].split(b"?", 1)[0]
        if method not in (b"GET", b"HEAD"):
            return "405 Method Not Allowed", b"GET or HEAD only\n", "text/plain"
        if target == b"/healthz":
            return "200 OK", b"ok\n", "text/plain"
        if target == b"/readyz":
            ready, why = await self.ready()
            return (("200 OK", b"ready\n", "text/plain") if ready
                    else ("503 Service Unavailable", f"not ready: {why}\n".encode(),
                          "text/plain"))
        if target == b"/metrics":
            await self.ready()      # mailfc_process_up and mailfc_database_up of now
            return "200 OK", await asyncio.to_thread(self.metrics), CONTENT_TYPE
        return "404 Not Found", b"try /metrics, /healthz or /readyz\n", "text/plain"
