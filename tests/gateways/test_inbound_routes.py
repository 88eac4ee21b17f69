"""Where SMTP-In's spool sends a message: to the LMTP Router with XFORWARD IDENT=<queue
id>, and a bounce to a sender whose domain is not hosted to SMTP-Out's intake."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg

from mailfc import hops
from mailfc.config import Config, parse_config
from mailfc.gateways.listener import CyclingListener
from mailfc.gateways.smtp_in import SmtpInService
from mailfc.messages import BytesSource
from mailfc.protocols.smtp_server import LmtpServer, ServerConnection
from tests.gateways.conftest import gateway_data, provision
from tests.gateways.test_filter_out import Sink

PORT = 18046


def sink_listener(config: Config, name: str, value: str, sink: Sink,
                  directory: Path) -> CyclingListener:
    server = LmtpServer(sink, hostname=name, message_dir=directory)

    def factory(listener: CyclingListener) -> ServerConnection:
        return server.tracked_by(listener)

    return hops.listener(config, name, value, factory)


async def test_the_spool_delivers_to_the_router_and_outside_bounces_to_smtp_out(
        state_dir: Path, cmdb: asyncpg.Pool) -> None:
    await provision(cmdb)
    data = gateway_data(state_dir, listen={"smtp_in": f"127.0.0.1:{PORT}",
                                           "lmtp_router": "unix:mfcr-router.sock",
                                           "smtp_out": "unix:mfcr-smtp-out.sock"},
                        spool={"directory": str(state_dir / "mfcr-spool")})
    config = parse_config(data, "inbound routes")
    router, smtp_out = Sink(), Sink()
    listeners = [sink_listener(config, "router", config.listen.lmtp_router, router,
                               state_dir / "mfcr-tmp"),
                 sink_listener(config, "smtp-out", config.listen.smtp_out, smtp_out,
                               state_dir / "mfcr-tmp")]
    for listener in listeners:
        await listener.start()
    service = SmtpInService(config, cmdb, None)
    await service.start()
    try:
        report = BytesSource(b"From: MAILER-DAEMON@gateway-host\r\nSubject: bounce\r\n\r\nx\r\n")
        outside = await service.spool.put("", ["ann@remote.example"], report, is_bounce=True)
        hosted = await service.spool.put("", ["bob@g1.example"], report, is_bounce=True)
        mail = await service.spool.put("ann@remote.example", ["carol@g1.example"], report,
                                       client_ip="192.0.2.1", helo="client.example")
        deadline = asyncio.get_running_loop().time() + 20
        while len(router.taken) < 2 or len(smtp_out.taken) < 1:
            assert asyncio.get_running_loop().time() < deadline, (router.taken, smtp_out.taken)
            await asyncio.sleep(0.05)
    finally:
        await service.stop(1.0)
        for listener in listeners:
            await listener.stop(1.0)
    assert [t["xforward"] for t in smtp_out.taken] == [{"IDENT": outside}]
    idents = sorted(t["xforward"]["IDENT"] for t in router.taken)
    assert idents == sorted([hosted, mail])
    full = next(t["xforward"] for t in router.taken
                if t["xforward"]["IDENT"] == mail)
    assert full == {"IDENT": mail, "ADDR": "192.0.2.1", "HELO": "client.example",
                    "PROTO": "ESMTP"}
