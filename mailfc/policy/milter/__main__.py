"""`python -m mailfc.policy.milter [--config FILE] [--socket PATH]`: the milter on its own.

`mailfc up` runs the milter with the other resident services; this entry point runs
it as a process of its own (several per host share limits through the CMDB).
Stops on SIGTERM or SIGINT after draining open sessions.
"""

from __future__ import annotations

from mailfc.policy import standalone
from mailfc.policy.milter.server import MilterService

if __name__ == "__main__":
    standalone.main(lambda config, pool, socket: MilterService(config, pool, socket=socket),
                    "python -m mailfc.policy.milter", "milter.socket")
