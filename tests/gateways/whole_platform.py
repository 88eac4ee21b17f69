"""A whole platform for the integrity and big-message tests, as an admin runs it.

`mailfc up` (supervised processes) in a state directory of its own with its own embedded
PostgreSQL, bridge <prefix>0, subnet, container prefix, host row and ports (base + the
usual last digits), so a test can kill -9 any of its processes without touching another
suite.  Every outside domain is routed (smtp_out.routes "*") to a remote MX of the test,
bench.platform.Sink, which keeps a digest and the X-Mark header of each message.

Used by test_integrity.py (prefix mfci, ports 25xxx) and test_big_messages.py (mfcl,
26xxx); each module starts one and stops it by its pid.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from email.utils import formatdate
from pathlib import Path

import asyncpg

from bench.platform import LOOPBACK_UNCAPPED, Sink, Up, maildir_marks
from mailfc.config import Config, parse_config
from mailfc.db import accounts, connect, domains
from mailfc.db.pool import embedded_cluster
from mailfc.passwords import hash_password
from tests.conftest import require_binary, require_root

PASSWORD = "whole-platform-password"


def settings_for(state_dir: Path, prefix: str, subnet: str, base: int) -> Config:
    data: dict[str, dict[str, object]] = {
        "paths": {"state_dir": str(state_dir)},
        "host": {"name": f"{prefix}-host"},
        "network": {"bridge": f"{prefix}0", "subnet": subnet},
        "runtime": {"name_prefix": prefix},
        "listen": {"smtp_in": f"127.0.0.1:{base + 25}",
                   "imap_router": f"127.0.0.1:{base + 143}",
                   "imap_router_tls": f"127.0.0.1:{base + 993}",
                   "submission": f"127.0.0.1:{base + 587}",
                   "submissions": f"127.0.0.1:{base + 465}",
                   "milter": f"127.0.0.1:{base + 30}",
                   "hook_server": f"127.0.0.1:{base + 31}"},
        "dispatcher": {"lmtp_port": base + 124, "imap_port": base + 243,
                       "smtp_port": base + 687},
        "submission": {"auth_failure_delay_s": 0.1},
        "metrics": {"listen": f"127.0.0.1:{base + 810}"},
        "smtp_out": {"routes": [f"*=127.0.0.1:{base + 525}"], "timeout_s": 60.0},
        # Retries within a test's patience: a message whose hop was killed is tried
        # again within seconds, not the production minute.
        "spool": {"retry_base_s": 0.5, "retry_max_s": 2.0, "scan_interval_s": 0.2},
        "controller": {"deferred_retry_s": 5.0},
        # Throughput from loopback, not the per-client connection caps (mailfc.anvil).
        **LOOPBACK_UNCAPPED,
    }
    return parse_config(data, f"{prefix} tests")


@dataclass
class WholePlatform:
    up: Up
    sink: Sink
    pool: asyncpg.Pool
    settings: Config
    domain: str

    @property
    def smtp_in(self) -> int:
        return int(self.settings.listen.smtp_in.rpartition(":")[2])

    @property
    def submission(self) -> int:
        return int(self.settings.listen.submission.rpartition(":")[2])

    @property
    def mail_root(self) -> Path:
        return self.settings.mail_root

    def marks(self, address: str) -> collections.Counter[str]:
        return maildir_marks(self.mail_root, address)

    def explain(self) -> str:
        """What to read when an assertion fails: the end of up.log."""
        return "\n--- up.log (end) ---\n" + self.up.log_tail(4000)


@contextlib.asynccontextmanager
async def whole_platform(state_dir: Path, prefix: str, subnet: str, base: int,
                         domain: str, users: tuple[str, ...]) -> AsyncIterator[WholePlatform]:
    require_root()
    require_binary("runc", "runc")
    require_binary("dovecot", "dovecot-lmtpd")
    require_binary("postfix", "postfix")
    own = state_dir / prefix
    own.mkdir(exist_ok=True)
    own.chmod(0o711)           # the embedded PostgreSQL's user must get through
    settings = settings_for(own, prefix, subnet, base)
    sink = Sink(base + 525, own / "sink.jsonl")
    await asyncio.to_thread(sink.start)
    up = Up(settings, own, base + 25)
    pool: asyncpg.Pool | None = None
    try:
        await up.start()
        pool = await connect(settings)
        async with pool.acquire() as db:
            if not await db.fetchval("SELECT 1 FROM domains WHERE name = $1", domain):
                await domains.add(db, domain)
                hashed = hash_password(PASSWORD)
                for user in users:
                    await accounts.add(db, f"{user}@{domain}", hashed)
        yield WholePlatform(up, sink, pool, settings, domain)
    finally:
        if pool is not None:
            await pool.close()
        await up.stop()
        await asyncio.to_thread(sink.stop)
        await asyncio.to_thread(embedded_cluster(settings).stop)
        await asyncio.to_thread(subprocess.run, ["ip", "link", "del", f"{prefix}0"],
                                capture_output=True, check=False)


def message(mark: str, sender: str, recipient: str, body: bytes = b"") -> bytes:
    """A well-formed message (the header checks pass it) carrying X-Mark: `mark`."""
    return (f"From: <{sender}>\r\nTo: <{recipient}>\r\nSubject: integrity {mark}\r\n"
            f"Date: {formatdate()}\r\nMessage-ID: <{uuid.uuid4().hex}@test.example>\r\n"
            f"X-Mark: {mark}\r\n\r\n").encode() + (body or b"hello\r\n" * 200)


async def until(condition: Callable[[], bool], within_s: float,
                interval_s: float = 0.25) -> bool:
    """Poll `condition` (run in a thread: it reads maildirs) until it holds or
    `within_s` passed; whether it held."""
    deadline = time.monotonic() + within_s
    while True:
        if await asyncio.to_thread(condition):
            return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(interval_s)
