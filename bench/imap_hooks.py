"""Benchmark: IMAP commands/s with the mailfc_hooks plugin loaded, divided by without.

    python -m bench.imap_hooks [--seconds 6] [--clients 4] [--rounds 2]

Runs a host (embedded PostgreSQL, runtime, dispatcher, hook server) in a temporary state
directory, with a bridge, subnet, name prefix and ports of its own, and loads one
domain's Dovecot directly (no router: the figure is the plugin's cost alone; sessions
handed over through imap-master as the dispatcher does it) with
`clients` sessions doing SELECT once, then NOOP, STATUS, FETCH and UID SEARCH in turn,
from a process of its own (a load sharing the hook server's event loop would slow it).

The same run alternates the domain's container with the plugin (dovecot.conf loads
mailfc_hooks: every command recorded, limits from the shared engine) and without it
(the runtime's dovecot_hook_plugin set empty), `rounds` times each, and prints
commands/s for each and the ratio of the medians (target: at least 0.9).

Limits in force during the plugin runs (on the account), as a hosting provider would set
them: imap_sessions 100 at once, imap_search 10^6 per minute, imap_append 10^6 per hour.
So every session start takes a lease and every UID SEARCH (a quarter of the commands) is
counted atomically in PostgreSQL; the other commands are recorded without a database
round trip.  --record-only sets only the session limit (commands are recorded, none
is counted); --all-commands adds an imap_commands limit, so every command is counted
in PostgreSQL (the worst case).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
from pathlib import Path

from bench.imap_load import command_rate
from bench.platform import handed_over, in_own_process, scratch_state
from mailfc import eventloop
from mailfc.config import Config, parse_config
from mailfc.controller.platform import Platform
from mailfc.db import accounts, domains, limits
from mailfc.passwords import hash_password
from mailfc.runtime.images import hook_plugin_installed

PASSWORD = "bench-password"
DOMAIN = "hookbench.example"
USER = f"user@{DOMAIN}"
BRIDGE = "mfcj0"
MESSAGE = (b"From: a@remote.example\r\nTo: user@hookbench.example\r\nSubject: bench\r\n\r\n"
           + (b"x" * 76 + b"\r\n") * 26)
COMMANDS = (b"NOOP", b"STATUS INBOX (MESSAGES UNSEEN)", b"FETCH 1:5 (FLAGS UID)",
            b"UID SEARCH ALL")


def bench_config(state_dir: Path) -> Config:
    return parse_config({
        "paths": {"state_dir": str(state_dir)},
        "host": {"name": "hookbench-host"},
        "network": {"bridge": BRIDGE, "subnet": "10.89.0.0/24"},
        "dispatcher": {"address": "127.0.0.1", "lmtp_port": 18024, "imap_port": 18143,
                       "smtp_port": 18587},
        "runtime": {"name_prefix": "mfcj"},
        "hooks": {"timeout_ms": 2000},
    }, "bench")


async def measure(config: Config, plugin: bool, args: argparse.Namespace) -> float:
    services = ("hook-server", "dispatcher") if plugin else ("dispatcher",)
    platform = Platform(config, services,
                        runtime_overrides={} if plugin else {"dovecot_hook_plugin": ""})
    await platform.start()
    try:
        assert platform.pool is not None and platform.runtime is not None
        async with platform.pool.acquire() as db:
            if not await db.fetchval("SELECT 1 FROM domains WHERE name = $1", DOMAIN):
                await domains.add(db, DOMAIN)
                await accounts.add(db, USER, hash_password(PASSWORD))
                await limits.set_limit(db, USER, "imap_sessions", 100)
                if not args.record_only:
                    await limits.set_limit(db, USER, "imap_search", 10**6, window_s=60)
                    await limits.set_limit(db, USER, "imap_append", 10**6, window_s=3600)
                if args.all_commands:
                    await limits.set_limit(db, USER, "imap_commands", 10**7, window_s=60)
        instance = await platform.runtime.ensure(DOMAIN, "imap")
        assert instance.pid is not None
        await seed(instance.pid)
        load = ("", 0, USER, "x", COMMANDS, args.clients)
        await in_own_process(command_rate, *load, 1.0, instance.pid)      # warm caches
        rate = await in_own_process(command_rate, *load, args.seconds, instance.pid)
        if plugin:
            written = await platform.pool.fetchval(
                "SELECT count(*) FROM imap_commands WHERE account = $1", USER)
            print(f"    (imap_commands rows so far: {written})")
        return rate
    finally:
        await platform.stop()


async def seed(dovecot_pid: int) -> None:
    """Five messages in the INBOX, once (APPEND over IMAP)."""
    reader, writer = await asyncio.open_unix_connection(
        sock=await handed_over(dovecot_pid, USER))
    await reader.readuntil(b"\n")
    writer.write(b"b STATUS INBOX (MESSAGES)\r\n")
    status = b""
    while not (line := await reader.readuntil(b"\n")).startswith(b"b "):
        status += line
    count = int(status.split(b"MESSAGES ")[1].split(b")")[0]) if b"MESSAGES " in status else 0
    for n in range(count, 5):
        writer.write(b"p%d APPEND INBOX {%d+}\r\n" % (n, len(MESSAGE)) + MESSAGE + b"\r\n")
        while not (await reader.readuntil(b"\n")).startswith(b"p%d " % n):
            pass
    writer.write(b"z LOGOUT\r\n")
    writer.close()


async def run(args: argparse.Namespace, state_dir: Path) -> None:
    if not hook_plugin_installed("mailfc_hooks"):
        raise SystemExit("the plugin is not installed: make -C plugins/dovecot_hooks install")
    config = bench_config(state_dir)
    with_plugin: list[float] = []
    without: list[float] = []
    for round_ in range(args.rounds):
        for plugin in (True, False) if round_ % 2 == 0 else (False, True):
            rate = await measure(config, plugin, args)
            (with_plugin if plugin else without).append(rate)
            print(f"  round {round_ + 1}: {'with' if plugin else 'without':7s} plugin "
                  f"{rate:8.0f} commands/s")
    ratio = statistics.median(with_plugin) / statistics.median(without)
    what = ("every command counted" if args.all_commands else
            "recorded, none counted" if args.record_only else "UID SEARCH counted")
    print(f"IMAP commands/s, {args.clients} sessions, {args.seconds:g} s, {what}:")
    print(f"  without plugin {statistics.median(without):8.0f}/s   with plugin "
          f"{statistics.median(with_plugin):8.0f}/s   ratio {ratio:.2f} (target >= 0.9)")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--record-only", action="store_true",
                        help="only the session limit: commands are recorded, none counted")
    parser.add_argument("--all-commands", action="store_true",
                        help="also limit imap_commands: every command is counted")
    args = parser.parse_args()
    with scratch_state(bench_config, bridge=BRIDGE) as state_dir:
        eventloop.run(run(args, state_dir))


if __name__ == "__main__":
    main()
