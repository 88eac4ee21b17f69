"""`python -m mailfc.policy.hooks [--config FILE] [--socket PATH]`: the hook server alone.

`mailfc up` runs the hook server with the other resident services; this entry point
runs it as a process of its own (e.g. to restart it while Dovecot keeps running: the
plugins reconnect and announce their sessions again).  Prints "ready" once it listens;
stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

from mailfc.policy import standalone
from mailfc.policy.hooks.server import HookService

if __name__ == "__main__":
    standalone.main(lambda config, pool, socket: HookService(config, pool, socket=socket),
                    "python -m mailfc.policy.hooks", "hooks.socket")
