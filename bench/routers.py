"""Benchmark: the reactive path through the IMAP and LMTP routers.

    python -m bench.routers [--rounds 15] [--seconds 8] [--clients 4] [--load-rounds 3]

Runs a whole host with `mailfc up` (its supervised processes: the routers in
one, dispatcher and controller in another, the hook server in a third, as in
production) in a temporary state directory on loopback ports of its own, then
prints:

1. cold vs warm login: client connect to the tagged OK of LOGIN through the
   IMAP Router, with the domain's container stopped (cold) and running (warm),
   p50/p95, and the extra cold latency (target: p50 at most 100 ms);
2. IMAP commands/s through router + dispatcher divided by commands/s straight
   to the domain's Dovecot (sessions the bench hands over through imap-master
   itself, as the dispatcher does: Dovecot takes no password login), same
   load, same run (target: at least 0.9).  The direct sessions are loopback
   TCP connections, as a client's is: a routed session is one too once the
   router has handed it over.  A unix socket pair, cheaper per round trip
   than any client's connection, is measured for reference;
3. LMTP messages/s through the LMTP Router divided by direct LMTP to the
   domain's container on its unix socket (target: at least 0.9).
Each ratio is the median of --load-rounds pairs of runs, direct then routed.

The load is bounded in time and stops by itself; everything is removed after.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from bench.imap_load import command_rate
from bench.platform import (
    LOOPBACK_UNCAPPED,
    in_own_process,
    scratch_state,
    start_up,
    whole_machine_cpu,
)
from mailfc import eventloop
from mailfc.config import Config, parse_config
from mailfc.db import accounts, connect, domains
from mailfc.passwords import hash_password
from mailfc.protocols.lmtp import LmtpClient
from mailfc.runtime.images import container_socket

PASSWORD = "bench-password"
DOMAIN = "bench.example"
USER = f"user@{DOMAIN}"
ROUTER_IMAP = 13143
SMTP_IN = 13025     # the last process `mailfc up` starts listens here
MESSAGE = (b"From: a@remote.example\r\nTo: user@bench.example\r\nSubject: bench\r\n\r\n"
           + (b"x" * 76 + b"\r\n") * 26)


def bench_config(state_dir: Path) -> Config:
    return parse_config({
        "paths": {"state_dir": str(state_dir)},
        "host": {"name": "bench-host"},
        "network": {"bridge": "mfcb0", "subnet": "10.83.0.0/24"},
        # The internal hops (LMTP Router, SMTP-Out) on their default unix
        # sockets in <state_dir>/private/hops (mailfc.hops).
        "listen": {"imap_router": f"127.0.0.1:{ROUTER_IMAP}",
                   "imap_router_tls": "127.0.0.1:13993", "smtp_in": f"127.0.0.1:{SMTP_IN}",
                   "submission": "127.0.0.1:13587", "submissions": "127.0.0.1:13465",
                   "milter": "127.0.0.1:13029",
                   "hook_server": "127.0.0.1:13030"},
        "dispatcher": {"address": "127.0.0.1", "lmtp_port": 14024, "imap_port": 14143,
                       "smtp_port": 14587},
        # Plain IMAP on both paths, so the ratio measures routing, not TLS.
        "imap_router": {"allow_plaintext_auth": True},
        "runtime": {"name_prefix": "mfcb"},
        **LOOPBACK_UNCAPPED,
    }, "bench")


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


async def imap_login(host: str, port: int, user: str) -> tuple[asyncio.StreamReader,
                                                               asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(host, port)
    await reader.readuntil(b"\n")
    writer.write(f'a LOGIN "{user}" "{PASSWORD}"\r\n'.encode())
    while True:
        line = await reader.readuntil(b"\n")
        if line.startswith(b"a "):
            if not line.startswith(b"a OK"):
                raise RuntimeError(f"login failed: {line!r}")
            return reader, writer


IMAP_COMMANDS = (b"NOOP", b"STATUS INBOX (MESSAGES UNSEEN)", b"FETCH 1:5 (FLAGS UID)")


async def lmtp_load(host: str, port: int, clients: int, seconds: float,
                    prefix: bytes, path: str = "") -> float:
    """Messages/s delivered at host:port, or at the unix socket `path`; each client
    sends at least one message, however short `seconds`."""
    deadline = time.monotonic() + seconds
    counts = [0] * clients

    async def client(index: int) -> None:
        while not counts[index] or time.monotonic() < deadline:
            reader, writer = await (asyncio.open_unix_connection(path) if path else
                                    asyncio.open_connection(host, port))
            lmtp = LmtpClient(reader, writer, 30)
            await lmtp.hello("bench")
            results = await lmtp.deliver("a@remote.example", [USER], prefix + MESSAGE)
            if not all(reply.ok for reply in results.values()):
                raise RuntimeError(f"delivery failed: {results}")
            await lmtp.quit()
            writer.close()
            counts[index] += 1

    started = time.monotonic()
    await asyncio.gather(*(client(i) for i in range(clients)))
    return sum(counts) / (time.monotonic() - started)


async def compare(direct: Callable[[], Awaitable[float]], routed: Callable[[], Awaitable[float]],
                  label: str, rounds: int,
                  also: tuple[str, Callable[[], Awaitable[float]]] | None = None) -> None:
    """Direct and routed loads alternate, so drift on the machine hits both alike.
    `also`: a further load run in each round, printed against the direct one."""
    pairs: list[tuple[float, float]] = []
    extra: list[float] = []
    for _ in range(rounds):
        if also is not None:
            extra.append(await also[1]())
        pairs.append((await direct(), await routed()))
    ratios = [r / d for d, r in pairs]
    print(f"  direct to Dovecot {statistics.median(d for d, _ in pairs):8.1f}/s   {label} "
          f"{statistics.median(r for _, r in pairs):8.1f}/s")
    print(f"  ratio median {statistics.median(ratios):.2f} (rounds: "
          f"{', '.join(f'{r:.2f}' for r in ratios)}; target >= 0.9)")
    if also is not None:
        against = statistics.median(e / d for e, (d, _) in zip(extra, pairs, strict=True))
        print(f"  {also[0]} {statistics.median(extra):8.1f}/s, {against:.2f} x direct")


async def timed(action: Callable[[], Awaitable[object]]) -> float:
    started = time.perf_counter()
    await action()
    return time.perf_counter() - started


async def stop_containers(config_file: Path) -> None:
    """As an admin would, while `mailfc up` runs."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mailfc", "--config", str(config_file), "container", "stop",
        DOMAIN, "imap", "--drain-timeout", "3", stdout=asyncio.subprocess.DEVNULL)
    if await process.wait() != 0:
        raise RuntimeError("mailfc container stop failed")


async def run(args: argparse.Namespace, state_dir: Path) -> None:
    config = bench_config(state_dir)
    process = await start_up(config, state_dir, SMTP_IN)
    pool = await connect(config)
    try:
        async with pool.acquire() as db:
            await domains.add(db, DOMAIN)
            await accounts.add(db, USER, hash_password(PASSWORD))
            await whole_machine_cpu(db, DOMAIN)

        async def login_via_router() -> None:
            _, writer = await imap_login("127.0.0.1", ROUTER_IMAP, USER)
            writer.write(b"z LOGOUT\r\n")
            writer.close()

        # Warm up once: creates the maildir and the domain's placement.
        await login_via_router()
        warm: list[float] = []
        cold: list[float] = []
        for _ in range(args.rounds):
            warm.append(await timed(login_via_router))
        for _ in range(args.rounds):
            await stop_containers(state_dir / "mailfc.toml")
            cold.append(await timed(login_via_router))
        ms = 1000.0
        print(f"IMAP login through the router, {args.rounds} rounds each")
        print(f"  warm: p50 {percentile(warm, .5) * ms:6.1f} ms  p95 "
              f"{percentile(warm, .95) * ms:6.1f} ms")
        print(f"  cold: p50 {percentile(cold, .5) * ms:6.1f} ms  p95 "
              f"{percentile(cold, .95) * ms:6.1f} ms  max {max(cold) * ms:6.1f} ms")
        print(f"  extra cold latency p50: "
              f"{(statistics.median(cold) - statistics.median(warm)) * ms:6.1f} ms "
              "(target <= 100 ms)")

        await login_via_router()    # the container runs again
        pid = await pool.fetchval(
            "SELECT c.pid FROM container_instances c JOIN domains d"
            " ON d.id = c.domain_id WHERE d.name = $1 AND c.state = 'running'", DOMAIN)
        lmtp_socket = container_socket(pid, "lmtp")
        for n in range(5):
            await lmtp_load("", 0, 1, 0.0, b"X-Seed: %d\r\n" % n, lmtp_socket)

        async def imap_rate(host: str, port: int, dovecot_pid: int = 0,
                            over_tcp: bool = True) -> float:
            return await in_own_process(command_rate, host, port, USER, PASSWORD,
                                        IMAP_COMMANDS, args.clients, args.seconds, dovecot_pid,
                                        over_tcp)

        async def lmtp_rate(host: str, port: int, path: str = "") -> float:
            return await in_own_process(lmtp_load, host, port, args.clients, args.seconds, b"",
                                        path)

        print(f"IMAP commands/s, {args.clients} sessions, {args.seconds:g} s each, "
              f"{args.load_rounds} rounds")
        await compare(lambda: imap_rate("", 0, pid),
                      lambda: imap_rate("127.0.0.1", ROUTER_IMAP),
                      "through router+dispatcher", args.load_rounds,
                      also=("(for reference) handed over on a unix socket pair",
                            lambda: imap_rate("", 0, pid, over_tcp=False)))
        print(f"LMTP messages/s, {args.clients} sessions, one message per session, "
              f"{args.load_rounds} rounds")
        await compare(lambda: lmtp_rate("", 0, lmtp_socket),
                      lambda: lmtp_rate("", 0, str(config.hops_dir / "lmtp-router.sock")),
                      "through LMTP router", args.load_rounds)
    finally:
        await pool.close()
        process.send_signal(signal.SIGTERM)
        await process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--load-rounds", type=int, default=3,
                        help="direct/routed load pairs for each ratio")
    args = parser.parse_args()
    with scratch_state(bench_config, bridge="mfcb0") as state_dir:
        eventloop.run(run(args, state_dir))


if __name__ == "__main__":
    main()
