"""A local user cannot use the LMTP Router to skip SMTP-In's checks.

As `nobody`, against the running gateways' internal hop (mailfc.hops): its unix
socket, the loopback ports it and the former Filter-In had before and the former
defaults.  Every attempt is refused before a greeting, and nothing reaches the mailbox.
"""

from __future__ import annotations

import asyncio
import uuid

from tests.gateways.conftest import FORMER_HOP_PORTS, Gateways, delivered
from tests.intruder import intrude, kept_out

# The defaults before the hops moved to unix sockets: Filter-In, SMTP-Out, LMTP Router.
FORMER_DEFAULT_PORTS = (10025, 10027, 24)


async def test_nobody_cannot_hand_mail_to_the_lmtp_router(gateways: Gateways) -> None:
    config = gateways.config
    sockets = [config.hops_dir / config.listen.lmtp_router.removeprefix("unix:")]
    assert all(path.is_socket() for path in sockets), sockets
    # Filter-In is gone: nothing is left of its socket.
    assert not (config.hops_dir / "mfcg-filter-in.sock").exists()
    targets = [f"unix:{path}" for path in sockets] + [
        f"127.0.0.1:{port}" for port in (*FORMER_HOP_PORTS, *FORMER_DEFAULT_PORTS)]
    marker = f"intruder-{uuid.uuid4()}"
    outcomes = await asyncio.to_thread(intrude, targets, "root@g2.example",
                                       "bob@g1.example", marker)
    assert all(kept_out(outcome) for outcome in outcomes.values()), outcomes
    # The sockets themselves: the hops' directory lets nobody in.
    assert all(outcomes[f"unix:{path}"] == "refused: EACCES" for path in sockets), outcomes
    await asyncio.sleep(1.0)
    assert delivered(config.mail_root, "bob@g1.example", marker) == []
