"""Kill the managing process; the next one adopts what is alive and removes the rest."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg
import pytest

from mailfc.runtime import Runtime, RuntimeSettings, cgroups
from mailfc.runtime.readiness import read_banner

pytestmark = pytest.mark.integration

NewDomain = Callable[..., Awaitable[str]]
ROOT = Path(__file__).resolve().parents[2]

# The managing process: opens a runtime (with its netns pool), starts two
# containers, reports them and waits to be killed.
MANAGER = """
import asyncio, json, sys
from pathlib import Path
from mailfc.config import load_config
from mailfc.db import connect
from mailfc.runtime import Runtime, RuntimeSettings

async def main() -> None:
    args = json.loads(sys.argv[1])
    settings = RuntimeSettings(
        state_dir=Path(args["state_dir"]), mail_root=Path(args["mail_root"]),
        bridge=args["bridge"], subnet=args["subnet"], host_id=args["host_id"],
        name_prefix=args["prefix"], netns_pool_size=2)
    pool = await connect(load_config())
    runtime = Runtime(settings, pool)
    await runtime.open()
    keep = await runtime.ensure(args["keep"], "imap")
    orphan = await runtime.ensure(args["orphan"], "smtp")
    print(json.dumps({"keep": keep.name, "orphan": orphan.name,
                      "pool": runtime.network.pooled()}), flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


async def test_orphans_are_adopted_or_removed_after_a_crash(
        runtime: Runtime, settings: RuntimeSettings, cmdb: asyncpg.Pool,
        new_domain: NewDomain) -> None:
    keep_domain, orphan_domain, ghost_domain = (await new_domain(), await new_domain(),
                                                await new_domain())
    args = {"state_dir": str(settings.state_dir), "mail_root": str(settings.mail_dir),
            "bridge": settings.bridge, "subnet": settings.subnet, "host_id": settings.host_id,
            "prefix": settings.name_prefix, "keep": keep_domain, "orphan": orphan_domain}
    manager = await asyncio.create_subprocess_exec(
        sys.executable, "-c", MANAGER, json.dumps(args), cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    try:
        assert manager.stdout is not None
        async with asyncio.timeout(30):
            line = await manager.stdout.readline()
        assert line, "the managing process died before reporting"
        made = json.loads(line)
    finally:
        manager.send_signal(signal.SIGKILL)
        await manager.wait()

    # A crash leaves: its pool's netns, a container whose row is gone, and a row
    # whose container is gone.
    assert set(made["pool"]) <= set(runtime.network.list_netns())
    await cmdb.execute("UPDATE container_instances SET state = 'stopped' WHERE name = $1",
                       made["orphan"])
    ghost_id = await cmdb.fetchval("SELECT id FROM domains WHERE name = $1", ghost_domain)
    await cmdb.execute(
        "INSERT INTO container_instances (domain_id, service, host_id, name, address, state)"
        " VALUES ($1, 'imap', $2, $3, '10.78.0.250', 'running')",
        ghost_id, runtime.host_id, f"{settings.name_prefix}-0badf00d")

    report = await runtime.recover()

    assert report.adopted == [made["keep"]]
    kept = (await runtime.instances(keep_domain))[0]
    assert kept.name == made["keep"] and kept.state == "running"
    assert (await read_banner(kept.socket("lmtp"))).startswith(b"220 ")
    again = await runtime.ensure(keep_domain, "lmtp")
    assert again.name == kept.name, "the adopted container serves; no second start"

    orphan = made["orphan"]
    assert await runtime.backend.state(orphan) is None
    assert orphan not in runtime.network.list_netns()
    assert not cgroups.exists(runtime.cgroup_path(orphan))
    assert not (settings.bundles_dir / orphan).exists()
    for name in made["pool"]:
        assert name not in runtime.network.list_netns()
    assert set(runtime.network.pooled()) <= set(runtime.network.list_netns())
    ghost = await cmdb.fetchrow("SELECT state, stop_reason FROM container_instances"
                                " WHERE name = $1", f"{settings.name_prefix}-0badf00d")
    assert ghost is not None and ghost["state"] == "stopped"
    assert "lost" in ghost["stop_reason"]
