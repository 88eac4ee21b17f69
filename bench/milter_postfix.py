"""Postfix acceptance rate with no milter, the mailfc milter recording, and recording + limits.

    python -m bench.milter_postfix [--messages 3000] [--rounds 3] [--no-libmilter]

Needs root (runc, network namespaces) and Debian's postfix, runc and postgresql.
Everything lives in a temporary state directory with its own embedded PostgreSQL, bridge
mfcb0 (10.81.0.0/24), container prefix mfcb and host row milter-bench, and is removed at
the end.  Three per-domain Postfix containers run side by side, exactly alike except:

    b0.example   no milter (smtpd_milters emptied in its rendered main.cf, master reloaded)
    b1.example   the mailfc milter, recording only (no limits on the domain)
    b2.example   the mailfc milter, recording + five active limits on the domain
                 (concurrent_sends, messages/1h, recipients/1h, bytes/1d,
                 recipients_per_message), high enough never to refuse

Postfix relays to an LMTP smtp-sink on Filter-Out's socket (the socket directory every
container mounts), so queues stay empty.  The load is Postfix's smtp-source on each
container's dispatcher socket, 10 parallel sessions, one message per SMTP session (its
default), 1 KB each.
Rounds alternate between the three so drift hits all alike; the median round counts.
With --libmilter (default) a bare python-libmilter milter (bench/milter_libmilter.py) then
replaces the mailfc milter on the same socket and b1 runs again, for reference.
The milter runs as its own process (`python -m mailfc.policy.milter`), as in production.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import grp
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pyroute2 import IPRoute

from mailfc.config import parse_config
from mailfc.db import connect, domains, limits
from mailfc.db.pool import embedded_cluster
from mailfc.runtime import cgroups
from mailfc.runtime.instance import Instance
from mailfc.runtime.lifecycle import Runtime
from mailfc.runtime.settings import from_config

HOST = "milter-bench"
SUBNET = "10.81.0.0/24"
SESSIONS = 10
LIMITS = (("concurrent_sends", 1000, None), ("messages", 10**9, 3600),
          ("recipients", 10**9, 3600), ("bytes", 10**12, 86400),
          ("recipients_per_message", 1000, None))


def smtp_source(path: str, domain: str, messages: int) -> float:
    """Messages per second accepted by the Postfix on the unix socket `path`."""
    started = time.monotonic()
    subprocess.run(
        ["smtp-source", "-s", str(SESSIONS), "-m", str(messages), "-l", "1024",
         "-M", "client.example", "-f", f"bench@{domain}", "-t", f"sink@{domain}",
         f"unix:{path}"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        timeout=600)
    return messages / (time.monotonic() - started)


async def start_process(*args: str) -> asyncio.subprocess.Process:
    process = await asyncio.create_subprocess_exec(
        sys.executable, *args, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert process.stdout is not None
    line = await asyncio.wait_for(process.stdout.readline(), 30)
    if line != b"ready\n":
        raise RuntimeError(f"{args}: did not start ({line!r})")
    return process


async def stop_process(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), 15)
        except TimeoutError:
            process.kill()
            await process.wait()


def drop_milter(runtime: Runtime, instance: Instance) -> None:
    """Make one container's Postfix run without a milter: edit its main.cf, reload master."""
    etc = runtime.settings.bundles_dir / instance.name / "etc" / "postfix"
    subprocess.run(["postconf", "-c", str(etc), "-e", "smtpd_milters=",
                    "non_smtpd_milters="], check=True)
    os.utime(etc / "main.cf", (946684800, 946684800))
    assert instance.pid is not None
    os.kill(instance.pid, signal.SIGHUP)
    time.sleep(1.0)


def remove_leftovers() -> None:
    """What the runtime keeps for its next start: our bridge and the empty cgroup parent."""
    cgroups.remove_if_empty("/mfcb")
    with IPRoute() as ipr:
        for index in ipr.link_lookup(ifname="mfcb0"):
            ipr.link("del", index=index)


def make_state_dir() -> Path:
    # Under /tmp and searchable: the embedded cluster runs as the postgres user.
    state = Path(tempfile.mkdtemp(prefix="mailfc-bench-milter-", dir="/tmp"))
    state.chmod(0o711)
    return state


async def run(messages: int, rounds: int, libmilter: bool) -> None:
    if os.geteuid() != 0:
        sys.exit("bench/milter_postfix.py needs root (runc, network namespaces)")
    state = make_state_dir()
    config = parse_config({
        "paths": {"state_dir": str(state)}, "host": {"name": HOST},
        "network": {"bridge": "mfcb0", "subnet": SUBNET},
        "runtime": {"start_timeout_s": 10.0},
    }, "bench")
    config_file = state / "mailfc.toml"
    config_file.write_text(f'[paths]\nstate_dir = "{state}"\n[host]\nname = "{HOST}"\n')
    pool = await connect(config)
    processes: list[asyncio.subprocess.Process] = []
    sink: asyncio.subprocess.Process | None = None
    runtime: Runtime | None = None
    try:
        await pool.execute("INSERT INTO hosts (name, dispatcher_address, container_subnet)"
                           " VALUES ($1, '127.0.0.1', $2)", HOST, SUBNET)
        async with pool.acquire() as db:
            for name in ("b0.example", "b1.example", "b2.example"):
                await domains.add(db, name)
            for kind, value, window in LIMITS:
                await limits.set_limit(db, "b2.example", kind, value, window_s=window)
        runtime = Runtime(from_config(config, name_prefix="mfcb"), pool)
        await runtime.open()
        sink_socket = runtime.settings.sockets / runtime.settings.filter_out_socket
        sink = await asyncio.create_subprocess_exec(
            "smtp-sink", "-L", "-u", "postfix", f"unix:{sink_socket}", "256",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        for _ in range(100):
            if sink_socket.exists():
                break
            await asyncio.sleep(0.05)
        sink_socket.chmod(0o666)    # the containers' postfix user connects
        socket = runtime.settings.sockets / runtime.settings.milter_socket
        milter = await start_process("-m", "mailfc.policy.milter", "--config", str(config_file))
        processes.append(milter)
        boxes = {name: await runtime.ensure(name, "smtp")
                 for name in ("b0.example", "b1.example", "b2.example")}
        drop_milter(runtime, boxes["b0.example"])
        labels = {"b0.example": "no milter", "b1.example": "mailfc milter, recording",
                  "b2.example": "mailfc milter, recording + 5 limits"}
        for name, box in boxes.items():     # warm-up: caches, pools, first partitions
            await asyncio.to_thread(smtp_source, box.socket(), name, 300)
        rates: dict[str, list[float]] = {name: [] for name in boxes}
        for _ in range(rounds):
            for name, box in boxes.items():
                rates[name].append(await asyncio.to_thread(
                    smtp_source, box.socket(), name, messages))
        await asyncio.sleep(1.0)    # the recorder's last flush
        recorded = await pool.fetchval(
            "SELECT count(*) FROM smtp_messages WHERE domain IN ('b1.example', 'b2.example')")

        reference = None
        if libmilter:
            await stop_process(milter)
            processes.append(await start_process("-m", "bench.milter_libmilter", str(socket)))
            for _ in range(100):    # it says ready just before it binds
                if socket.exists():
                    break
                await asyncio.sleep(0.05)
            os.chown(socket, -1, grp.getgrnam("postfix").gr_gid)
            box = boxes["b1.example"]
            await asyncio.to_thread(smtp_source, box.socket(), "b1.example", 300)
            reference = []
            for _ in range(rounds):
                reference.append(await asyncio.to_thread(
                    smtp_source, box.socket(), "b1.example", messages))
                rates["b0.example"].append(await asyncio.to_thread(
                    smtp_source, boxes["b0.example"].socket(), "b0.example", messages))

        base = statistics.median(rates["b0.example"])
        print(f"Postfix acceptance, smtp-source -s {SESSIONS}, {messages} messages of 1 KB"
              f" per round, {rounds} rounds, median (one message per SMTP session)")
        for name, label in labels.items():
            rate = statistics.median(rates[name])
            print(f"  {label:<40} {rate:8.0f} msg/s   {rate / base:5.2f} of no milter"
                  f"   rounds: {', '.join(f'{r:.0f}' for r in rates[name])}")
        if reference:
            rate = statistics.median(reference)
            print(f"  {'bare python-libmilter (ThreadFactory)':<40} {rate:8.0f} msg/s"
                  f"   {rate / base:5.2f} of no milter"
                  f"   rounds: {', '.join(f'{r:.0f}' for r in reference)}")
        print(f"  messages recorded by the mailfc milter: {recorded}"
              f" (sent to b1 and b2 incl. warm-up: {2 * (300 + rounds * messages)})")
    finally:
        # Each step on its own: one failing must not leave the others' things behind.
        for process in processes:
            with contextlib.suppress(Exception):
                await stop_process(process)
        if sink is not None and sink.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                sink.terminate()
            await sink.wait()
        if runtime is not None:
            for instance in await runtime.instances():
                try:
                    await runtime.stop(instance, drain_timeout=2.0)
                except Exception as error:
                    print(f"warning: {instance.name} did not stop: {error}", file=sys.stderr)
            await runtime.close()
            # pyroute2's IPRoute runs its own event loop: not inside ours.
            await asyncio.to_thread(remove_leftovers)
        await pool.close()
        embedded_cluster(config).stop()
        shutil.rmtree(state, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.milter_postfix")
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-libmilter", dest="libmilter", action="store_false")
    args = parser.parse_args()
    asyncio.run(run(args.messages, args.rounds, args.libmilter))


if __name__ == "__main__":
    main()
