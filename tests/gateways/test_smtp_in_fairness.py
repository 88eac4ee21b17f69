"""SMTP-In's share per recipient domain under CPU pressure (handler.py, ADMISSION;
mailfc/fairness.py): a RCPT of a domain receiving more than its share waits for its
domain's turn, and past smtp_in.pressure_max_wait_s hears 451 4.7.1; the other
domains' recipients, in the same session too, pass at once.

SMTP-In runs in the test process (its Admission is the test's to inspect) with a
real PostgreSQL, on a port of its own; its CPU pressure is a PSI file the test
writes instead of /proc/pressure/cpu.  g1.example is the flooded domain, g2.example
the quiet one.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from mailfc.config import Config, ConfigError, parse_config
from mailfc.fairness import Bucket
from mailfc.gateways import replies
from mailfc.gateways.smtp_in import SmtpInService
from mailfc.gateways.smtp_in.handler import RULE_PRESSURE, SessionState
from mailfc.protocols.smtp_server import Envelope, Session
from tests.gateways.conftest import gateway_data, provision

PORT = 18226
FLOODED, QUIET = "g1.example", "g2.example"
BUSY = replies.DOMAIN_BUSY.format(domain=FLOODED)
MAX_WAIT_S = 2.0
MIN_RATE = 2.0
# The share of time the simulated host's runnable tasks wait for a CPU.
PRESSURE = 0.9
# Sessions flooding g1.example at once (the flood had 50).
FLOODING_MTAS = 12


def write_psi(path: Path, stall_us: int) -> None:
    """/proc/pressure/cpu as the kernel writes it, replaced whole (never read half)."""
    partial = path.with_suffix(".new")
    partial.write_text(f"some avg10=90.00 avg60=90.00 avg300=90.00 total={stall_us}\n"
                       "full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n")
    os.replace(partial, path)


@contextlib.asynccontextmanager
async def running_smtp_in(state_dir: Path, cmdb: asyncpg.Pool, psi: Path,
                          interval_s: float) -> AsyncIterator[SmtpInService]:
    """SMTP-In watching `psi` every interval_s.  The error limits are out of the way:
    a flooding MTA is many sessions here, and this is about the turns, not about
    Postfix's error counting (tests/gateways/test_smtp_in_abuse.py)."""
    await provision(cmdb)
    data = gateway_data(
        state_dir,
        listen={"smtp_in": f"127.0.0.1:{PORT}", "lmtp_router": "unix:mfcf-nowhere.sock"},
        spool={"directory": str(state_dir / "mfcf-spool")},
        filter_in={"milters": []},
        smtp_in={"pressure_max_wait_s": MAX_WAIT_S, "pressure_min_rate": MIN_RATE,
                 "soft_error_limit": 1000, "hard_error_limit": 1000},
        smtp_in_connections={"exempt_networks": ["127.0.0.0/8"]})
    service = SmtpInService(parse_config(data, "smtp-in fairness"), cmdb, None)
    service.admission.psi = psi
    service.admission.interval_s = interval_s
    await service.start()
    try:
        yield service
    finally:
        await service.stop(1.0)


# -- configuration ---------------------------------------------------------------------


def test_the_defaults_protect_a_fresh_install_and_bad_values_are_named() -> None:
    settings = Config().smtp_in
    assert (settings.pressure_target, settings.pressure_min_rate,
            settings.pressure_max_wait_s) == (0.15, 10.0, 5.0)
    for key, value in (("pressure_target", 0.0), ("pressure_target", 1.5),
                       ("pressure_min_rate", 0.0), ("pressure_max_wait_s", 0.0),
                       ("pressure_max_wait_s", 600.0)):
        with pytest.raises(ConfigError, match=f"smtp_in.{key}"):
            parse_config({"smtp_in": {key: value}}, "test")


# -- the handler's RCPT hook, called directly ------------------------------------------


async def test_rcpt_waits_for_the_domains_turn_and_only_that_domain_hears_451(
        state_dir: Path, cmdb: asyncpg.Pool, tmp_path: Path) -> None:
    psi = tmp_path / "cpu"
    write_psi(psi, 1000)
    # Watching, but its own steps never come: the test calls adjust() itself.
    async with running_smtp_in(state_dir, cmdb, psi, interval_s=3600.0) as service:
        admission, handler = service.admission, service.handler
        assert handler.admission is admission
        assert (admission.target, admission.min_rate, admission.max_wait_s) \
            == (0.15, MIN_RATE, MAX_WAIT_S)

        async def transaction() -> tuple[Session, Envelope]:
            session, envelope = Session(("192.0.2.9", 4321)), Envelope()
            handler.connected(session)
            assert await handler.handle_MAIL(session, envelope, "ann@remote.example", []) \
                == replies.OK_SENDER
            return session, envelope

        async def rcpt(session: Session, envelope: Envelope, address: str
                       ) -> tuple[str, float]:
            started = time.monotonic()
            reply = await handler.handle_RCPT(session, envelope, address, [])
            return reply, time.monotonic() - started

        # Every RCPT of a hosted recipient asks for its domain's turn; a relay attempt
        # and an unknown mailbox are refused before, costing no turn.
        flooding, flooding_envelope = await transaction()
        for _ in range(30):
            assert (await rcpt(flooding, flooding_envelope, f"bob@{FLOODED}"))[0] \
                == replies.OK_RCPT
        assert (await rcpt(flooding, flooding_envelope, "someone@elsewhere.example"))[0] \
            .startswith("554 5.7.1")
        assert (await rcpt(flooding, flooding_envelope, f"nobody@{QUIET}"))[0] \
            .startswith("550 5.1.1")
        handler.disconnected(flooding)
        session, envelope = await transaction()
        assert (await rcpt(session, envelope, f"dave@{QUIET}"))[0] == replies.OK_RCPT
        assert admission.opened == {FLOODED: 30, QUIET: 1}
        envelope.rcpt_tos.clear()

        # Under pressure the flooded domain is spaced out, the quiet one is not.
        admission.adjust(pressure=PRESSURE, interval_s=1.0)
        assert set(admission.buckets) == {FLOODED}

        # No turn within the wait (a token 1/0.1 = 10 s away): 451 4.7.1 naming the
        # domain, the recipient not taken, the refusal recorded as the session's worst.
        admission.buckets[FLOODED] = Bucket(rate=0.1, tokens=0.0)
        reply, _ = await rcpt(session, envelope, f"carol@{FLOODED}")
        assert reply == BUSY
        assert envelope.rcpt_tos == []
        state = session.state
        assert isinstance(state, SessionState) and state.worst is not None
        assert (state.worst.rule, state.worst.verdict) == (RULE_PRESSURE, "tempfail")
        # The quiet domain, in the same session: at once.
        reply, waited = await rcpt(session, envelope, f"dave@{QUIET}")
        assert reply == replies.OK_RCPT and waited < 0.5
        # A turn within the wait (4 a second): the RCPT waits for it, then 250.
        admission.buckets[FLOODED] = Bucket(rate=4.0, tokens=0.0)
        reply, waited = await rcpt(session, envelope, f"carol@{FLOODED}")
        assert reply == replies.OK_RCPT and 0.15 < waited < MAX_WAIT_S
        assert envelope.rcpt_tos == [f"dave@{QUIET}", f"carol@{FLOODED}"]
        handler.disconnected(session)

    # Stopped with the service: nobody waits any more.
    admission.buckets[FLOODED] = Bucket(rate=0.1, tokens=0.0)
    assert await admission.admit(FLOODED)


async def test_without_pressure_information_every_rcpt_passes(
        state_dir: Path, cmdb: asyncpg.Pool, tmp_path: Path) -> None:
    async with running_smtp_in(state_dir, cmdb, tmp_path / "absent", 1.0) as service:
        session = Session(("192.0.2.9", 4321))
        service.handler.connected(session)
        envelope = Envelope()
        await service.handler.handle_MAIL(session, envelope, "ann@remote.example", [])
        for _ in range(20):
            assert await service.handler.handle_RCPT(session, envelope, f"bob@{FLOODED}",
                                                     []) == replies.OK_RCPT
        assert service.admission.opened == {}
        service.handler.disconnected(session)


# -- a flood over real sockets, the pressure simulated -----------------------------------


class Client:
    """A raw SMTP client (one MTA's connection)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def transaction(cls, helo: str) -> Client:
        """Connected, greeted, EHLO and MAIL done."""
        reader, writer = await asyncio.open_connection("127.0.0.1", PORT)
        client = cls(reader, writer)
        assert (await client.reply()).startswith("220 ")
        assert (await client.command(f"EHLO {helo}")).startswith("250 ")
        assert (await client.command("MAIL FROM:<ann@remote.example>")).startswith("250 ")
        return client

    async def reply(self) -> str:
        """One whole reply (its last line)."""
        while True:
            line = await asyncio.wait_for(self.reader.readline(), 30)
            assert line, "the server closed the connection"
            if line[3:4] != b"-":
                return line.decode().rstrip("\r\n")

    async def command(self, line: str) -> str:
        self.writer.write(line.encode() + b"\r\n")
        await self.writer.drain()
        return await self.reply()

    async def timed(self, line: str) -> tuple[str, float]:
        started = time.monotonic()
        reply = await self.command(line)
        return reply, time.monotonic() - started

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


async def simulate_pressure(psi: Path, share: float) -> None:
    """The stall counter growing by `share` of the time, as on a host short of CPU."""
    started, stall_us = time.monotonic(), 1000
    while True:
        await asyncio.sleep(0.05)
        write_psi(psi, stall_us + int((time.monotonic() - started) * share * 1e6))


async def flood(stop: asyncio.Event) -> None:
    """One flooding MTA: recipients of the flooded domain, back to back."""
    client = await Client.transaction("flood.example")
    try:
        while not stop.is_set():
            for _ in range(50):     # below smtp_in.max_recipients
                reply = await client.command(f"RCPT TO:<bob@{FLOODED}>")
                assert reply in (replies.OK_RCPT, BUSY), reply
                if stop.is_set():
                    break
            await client.command("RSET")
            await client.command("MAIL FROM:<flood@remote.example>")
    finally:
        await client.close()


async def trickle(stop: asyncio.Event) -> None:
    """The quiet domain's ordinary mail: a recipient now and then."""
    client = await Client.transaction("quiet.example")
    try:
        while not stop.is_set():
            assert await client.command(f"RCPT TO:<dave@{QUIET}>") == replies.OK_RCPT
            await client.command("RSET")
            await client.command("MAIL FROM:<ann@remote.example>")
            await asyncio.sleep(0.5)
    finally:
        await client.close()


async def probe_flooded_then_quiet() -> tuple[tuple[str, float], tuple[str, float]]:
    """A new sender's RCPT for the flooded domain, then one for the quiet domain in
    the same session."""
    client = await Client.transaction("probe.example")
    try:
        return (await client.timed(f"RCPT TO:<carol@{FLOODED}>"),
                await client.timed(f"RCPT TO:<dave@{QUIET}>"))
    finally:
        await client.close()


async def probe_quiet() -> tuple[str, float]:
    client = await Client.transaction("probe.example")
    try:
        return await client.timed(f"RCPT TO:<dave@{QUIET}>")
    finally:
        await client.close()


async def test_a_flooded_domain_waits_then_hears_451_while_the_quiet_one_passes(
        state_dir: Path, cmdb: asyncpg.Pool, tmp_path: Path) -> None:
    psi = tmp_path / "cpu"
    write_psi(psi, 1000)
    since = await cmdb.fetchval("SELECT now()")
    async with running_smtp_in(state_dir, cmdb, psi, interval_s=0.5) as service:
        admission = service.admission
        pressure = asyncio.create_task(simulate_pressure(psi, PRESSURE))
        stop = asyncio.Event()
        load = [asyncio.create_task(flood(stop)) for _ in range(FLOODING_MTAS)]
        load.append(asyncio.create_task(trickle(stop)))
        try:
            # The flood is spaced out, more each interval, down to its lowest rate.
            deadline = time.monotonic() + 60
            while (bucket := admission.buckets.get(FLOODED)) is None \
                    or bucket.rate > MIN_RATE:
                assert time.monotonic() < deadline, admission.buckets
                assert not any(task.done() for task in load), [t for t in load if t.done()]
                await asyncio.sleep(0.1)
            assert QUIET not in admission.buckets

            # New senders at the same moment: those of the flooded domain queue behind
            # the flood for its turns, those of the quiet domain pass.
            flooded, quiet = await asyncio.gather(
                asyncio.gather(*(probe_flooded_then_quiet() for _ in range(4))),
                probe_quiet())
        finally:
            stop.set()
            done = await asyncio.gather(*load, return_exceptions=True)
            pressure.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pressure
        assert [d for d in done if d is not None] == []

    assert quiet[0] == replies.OK_RCPT and quiet[1] < 1.0, quiet
    for _, (reply, waited) in flooded:
        assert reply == replies.OK_RCPT and waited < 1.0, flooded
    refused = [waited for (reply, waited), _ in flooded if reply == BUSY]
    assert refused, flooded
    assert all(reply in (replies.OK_RCPT, BUSY) for (reply, _), _ in flooded), flooded
    # A refusal comes only after waiting: at its lowest rate the domain has a turn
    # every 1/MIN_RATE s, so a RCPT gives up only once less than that is left.
    assert min(refused) >= MAX_WAIT_S - 1 / MIN_RATE - 0.1, flooded

    # Recorded as SMTP-In's other refusals: an event of the session, which names the
    # flooded domain and ends with the tempfail as its verdict.
    deadline = time.monotonic() + 10
    while True:
        recorded = await cmdb.fetchval(
            "SELECT count(DISTINCT s.id) FROM smtp_events e"
            " JOIN smtp_sessions s ON s.id = e.session_id"
            " WHERE e.at >= $1 AND s.started_at >= $1 AND s.helo = 'probe.example'"
            " AND e.stage = 'rcpt' AND e.rule = $2 AND e.verdict = 'tempfail'"
            " AND s.domain = $3 AND s.verdict = 'tempfail'",
            since, RULE_PRESSURE, FLOODED)
        if recorded >= len(refused) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    assert recorded == len(refused)

