"""A local user cannot use SMTP-Out's intake as an open relay, nor the LMTP Router.

As `nobody`, against the running sending host's internal hops (mailfc.hops): the
SMTP-Out intake and the LMTP Router sockets and the former loopback ports.  Every
attempt is refused before a greeting; the remote MX and the mailbox get nothing.
"""

from __future__ import annotations

import asyncio
import uuid

from tests.intruder import intrude, kept_out
from tests.sending.conftest import SendingHost
from tests.sending.test_sending import in_mailbox

# Where SMTP-Out and the LMTP Router listened before (defaults and this suite's).
FORMER_PORTS = (10027, 24, 21027, 21024)


async def test_nobody_cannot_relay_through_smtp_out_or_deliver_through_the_router(
        sending_host: SendingHost) -> None:
    config = sending_host.config
    smtp_out = config.hops_dir / config.listen.smtp_out.removeprefix("unix:")
    router = config.hops_dir / config.listen.lmtp_router.removeprefix("unix:")
    assert smtp_out.is_socket() and router.is_socket()
    marker = f"intruder-{uuid.uuid4()}"
    relayed = await asyncio.to_thread(
        intrude, [f"unix:{smtp_out}", *(f"127.0.0.1:{port}" for port in FORMER_PORTS)],
        "ceo@s.example", "friend@remote.example", marker)
    delivered = await asyncio.to_thread(intrude, [f"unix:{router}"], "ceo@s.example",
                                        "sam@s.example", marker)
    outcomes = {**relayed, **delivered}
    assert all(kept_out(outcome) for outcome in outcomes.values()), outcomes
    assert outcomes[f"unix:{smtp_out}"] == "refused: EACCES", outcomes
    # Long enough for SMTP-Out's spool (retry 1 s) to have sent anything it took.
    await asyncio.sleep(3.0)
    assert not any(marker.encode() in data for _, data in sending_host.mx.messages())
    assert in_mailbox(config.mail_root, "sam@s.example", marker) == []
