"""The pieces of mailfc.metrics without a platform: the HTTP responder against hostile
clients, bounded domain labels, the restart backoff, sd_notify and the ready pipe."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mailfc.anvil import Anvil
from mailfc.config import ConnectionLimitsSection
from mailfc.controller.supervisor import RESTART_MAX_S, restart_delay
from mailfc.metrics import names, readiness
from mailfc.metrics.http import HealthServer, ProcessState, scrape


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[HealthServer]:
    state = {"ready": False}

    async def ready() -> tuple[bool, str]:
        return state["ready"], "" if state["ready"] else "inbound"

    own = ProcessState(lambda: {"inbound": (state["ready"], 3)}, lambda: True)
    health = HealthServer("127.0.0.1", 0, metrics=lambda: scrape(tmp_path, own), ready=ready)
    await health.start()
    assert health.server is not None
    health.port = health.server.sockets[0].getsockname()[1]
    health.state = state  # type: ignore[attr-defined]
    try:
        yield health
    finally:
        await health.stop()


async def ask(server: HealthServer, raw: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(raw)
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return answer


async def test_paths_and_methods(server: HealthServer) -> None:
    assert (await ask(server, b"GET /healthz HTTP/1.0\r\n\r\n")).startswith(b"HTTP/1.0 200")
    not_ready = await ask(server, b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert not_ready.startswith(b"HTTP/1.0 503") and b"not ready: inbound" in not_ready
    server.state["ready"] = True  # type: ignore[attr-defined]
    assert (await ask(server, b"GET /readyz HTTP/1.0\r\n\r\n")).startswith(b"HTTP/1.0 200")
    metrics = await ask(server, b"GET /metrics HTTP/1.0\r\n\r\n")
    assert b'mailfc_process_up{process="inbound"} 1.0' in metrics
    assert b'mailfc_process_restarts_total{process="inbound"} 3.0' in metrics
    assert b"# TYPE mailfc_refusals_total counter" in metrics     # declared, no sample yet
    head = await ask(server, b"HEAD /healthz HTTP/1.0\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200") and head.endswith(b"\r\n\r\n")
    assert (await ask(server, b"POST /metrics HTTP/1.0\r\n\r\n")).startswith(b"HTTP/1.0 405")
    assert (await ask(server, b"GET /../etc HTTP/1.0\r\n\r\n")).startswith(b"HTTP/1.0 404")


async def test_hostile_clients_get_400_and_the_server_lives_on(server: HealthServer) -> None:
    assert (await ask(server, b"GARBAGE\r\n\r\n")).startswith(b"HTTP/1.0 400")
    assert (await ask(server, b"GET /x" + b"A" * 70000 + b"\r\n\r\n")).startswith(
        b"HTTP/1.0 400")
    # A client that sends half a request and goes away.
    _, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET /heal")
    writer.close()
    assert (await ask(server, b"GET /healthz HTTP/1.0\r\n\r\n")).startswith(b"HTTP/1.0 200")


def test_domain_labels_are_bounded() -> None:
    labels = {names.domain_label(f"d{index}.example") for index in range(5000)}
    assert len(labels) <= names.TOP_DOMAINS + 1
    assert names.OTHER in labels
    assert names.domain_label(None) == names.OTHER
    for _ in range(names.RECOMPUTE_EVERY * 2):
        busy = names.domain_label("busy.example")
    assert busy == "busy.example"     # the busiest domain gets a label of its own


def test_restart_backoff_doubles_up_to_its_cap() -> None:
    delays = [restart_delay(deaths) for deaths in range(10)]
    assert delays[:4] == [1.0, 2.0, 4.0, 8.0]
    assert max(delays) == RESTART_MAX_S and delays == sorted(delays)


def test_notify_systemd_and_ready_pipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                       ) -> None:
    address = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(address)
        monkeypatch.setenv("NOTIFY_SOCKET", address)
        assert readiness.notify_systemd("READY=1")
        assert listener.recv(100) == b"READY=1"
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert not readiness.notify_systemd("READY=1")
    read_end, write_end = os.pipe()
    monkeypatch.setenv(readiness.READY_FD_ENV, str(write_end))
    readiness.tell_supervisor()
    assert os.read(read_end, 100) == readiness.READY_LINE
    assert os.read(read_end, 100) == b""          # written once, then closed
    readiness.tell_supervisor()                    # no pipe any more: nothing
    os.close(read_end)


def test_a_refused_connection_is_counted() -> None:
    limits = ConnectionLimitsSection.model_validate({"max_per_client": 1})
    counts = Anvil("metrics-test", limits, host="mx.test")
    refusals = names.REFUSALS.labels("metrics-test", "connections:count")
    before = refusals._value.get()
    held = counts.connect("192.0.2.7")
    assert counts.connect("192.0.2.7").refusal is not None
    assert refusals._value.get() == before + 1
    held.release()
