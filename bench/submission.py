"""Benchmark: authenticated submission, end to end, against a plain host Postfix.

    python -m bench.submission [--seconds 20] [--clients 10]

1. mailfc (`mailfc up`, supervised processes): --clients clients submit over
   STARTTLS + AUTH through the SMTP Router, the sender's own domain Postfix
   (milter recording every stage), Filter-Out and SMTP-Out, to a remote MX
   (bench/platform.py's sink, in a process of its own);
2. reference: a plain host Postfix (own config and queue) taking the same
   messages over STARTTLS and relaying them straight to the same sink;

as messages/s that arrived at the sink, and the ratio mailfc / reference,
same run, same load.  The clients run in a process of their own.  With
--seconds 2 --clients 1 (tests/test_benches.py) it only shows that every hop works.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import subprocess
import time
import uuid
from pathlib import Path

import aiosmtplib

from bench.noisy_neighbor import (
    MX_PORT,
    PASSWORD,
    config,
    message,
    start_platform,
    submit_via_router,
    unverified,
)
from bench.platform import Sink, in_own_process, scratch_state
from bench.smtp_in import postfix_reference
from mailfc.db import accounts, connect, domains
from mailfc.passwords import hash_password
from mailfc.tls import certificate_paths

REFERENCE_PORT = 23025
USERS = 5


async def submit_plain(marker: str) -> bool:
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=REFERENCE_PORT, start_tls=True,
                             tls_context=unverified(), timeout=60)
    try:
        await client.connect()
        await client.sendmail("u0@s.example", ["x@remote.example"],
                              message("u0@s.example", marker))
        return True
    except aiosmtplib.SMTPException:
        return False
    finally:
        client.close()


async def submission_load(target: str, seconds: float, clients: int, prefix: str) -> int:
    """Messages accepted by `clients` submitting to `target` for `seconds`."""
    async def client(index: int, deadline: float) -> int:
        sent = 0
        while time.monotonic() < deadline:
            marker = f"{prefix}-{uuid.uuid4().hex}"
            if target == "mailfc":
                ok = await submit_via_router(f"u{index % USERS}@s.example", marker)
            else:
                ok = await submit_plain(marker)
            sent += ok
        return sent

    deadline = time.monotonic() + seconds
    return sum(await asyncio.gather(*(client(i, deadline) for i in range(clients))))


async def measure(target: str, seconds: float, clients: int, sink: Sink) -> tuple[float, int]:
    """Messages/s that arrived at the sink (the sink stamps wall-clock time) and how
    many the clients got accepted."""
    prefix = f"{target}-{uuid.uuid4().hex[:6]}"
    started = time.time()
    accepted = await in_own_process(submission_load, target, seconds, clients, prefix,
                                    within_s=seconds + 120)

    def arrived() -> list[float]:
        return [entry["at"] for entry in sink.records()
                if entry["mark"].startswith(prefix)]

    deadline = time.monotonic() + 60
    while True:
        times = arrived()
        if len(times) >= accepted or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    elapsed = (max(times) if times else time.time()) - started
    return len(times) / elapsed, accepted


async def run(args: argparse.Namespace, state_dir: Path) -> None:
    sink = Sink(MX_PORT, state_dir / "sink.jsonl")
    await asyncio.to_thread(sink.start)
    settings = config(state_dir)
    process = await start_platform(settings, state_dir)
    reference: list[str] | None = None
    try:
        pool = await connect(settings)
        async with pool.acquire() as db:
            await domains.add(db, "s.example")
            hashed = hash_password(PASSWORD)
            for index in range(USERS):
                await accounts.add(db, f"u{index}@s.example", hashed)
        await pool.close()
        cert, key = certificate_paths(settings)
        reference, _ = postfix_reference(
            state_dir / "reference", port=REFERENCE_PORT,
            routing=f"relayhost = [127.0.0.1]:{MX_PORT}\nsmtpd_tls_security_level = may\n"
                    f"smtpd_tls_cert_file = {cert}\nsmtpd_tls_key_file = {key}")
        await measure("mailfc", 3, 2, sink)          # warm: containers, caches
        await measure("reference", 3, 2, sink)
        ours, ours_accepted = await measure("mailfc", args.seconds, args.clients, sink)
        theirs, theirs_accepted = await measure("reference", args.seconds, args.clients, sink)
        print(f"authenticated submission, {args.clients} clients, {args.seconds:g} s each,"
              " messages/s arrived at the remote MX")
        print(f"  mailfc (STARTTLS, AUTH, router, domain Postfix + milter, Filter-Out,"
              f" SMTP-Out): {ours:6.1f}/s ({ours_accepted} accepted)")
        print(f"  host Postfix relaying straight to the MX (STARTTLS):            "
              f"{theirs:6.1f}/s ({theirs_accepted} accepted)")
        if ours_accepted == 0 or theirs_accepted == 0:
            raise SystemExit("bench.submission: a side accepted no message (see "
                             f"{state_dir / 'up.log'} and the reference's maillog)")
        print(f"  ratio {ours / theirs:.2f}" if theirs else "  ratio: nothing arrived "
              "from the reference")
    finally:
        if reference is not None:
            await asyncio.to_thread(subprocess.run, [*reference, "stop"],
                                    capture_output=True, check=False)
        process.send_signal(signal.SIGTERM)
        await process.wait()
        sink.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--clients", type=int, default=10)
    args = parser.parse_args()
    with scratch_state(config, bridge="mfcn0") as state_dir:
        asyncio.run(run(args, state_dir))


if __name__ == "__main__":
    main()
