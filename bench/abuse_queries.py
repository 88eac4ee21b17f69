"""Benchmark: each abuse command on 10 million session rows, median seconds (target <= 2 s).

    python -m bench.abuse_queries [--rows 10000000] [--repeat 5] [--state-dir DIR] [--keep]

Generates the history once (bench/abuse_data.py: realistic mix plus planted incidents)
in a temporary state directory with its own embedded PostgreSQL, then times every
command two ways: the query alone (the library call on an open connection) and the
whole `mailfc ...` process as an admin runs it (Python start-up, connecting, rendering).
The state directory and its cluster are removed afterwards unless --keep; an existing
--state-dir with data is reused without generating again.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg

from bench.abuse_data import PLANTS, Shape, drop_state, fill, make_state
from mailfc.analysis import account, anomalies, blocks, explain, simulate, timerange, top
from mailfc.config import load_config
from mailfc.db import connect

TARGET_S = 2.0
BIG_DOMAIN = "d0.abuse.example"    # the busiest accounts live there (skewed activity)

Query = Callable[[asyncpg.Connection], Awaitable[Any]]


def _span(text: str) -> timerange.TimeRange:
    return timerange.resolve(text, None)


async def _block_unblock(db: asyncpg.Connection) -> None:
    await blocks.block(db, PLANTS["hijacked"], reason="bench", actor="bench")
    await blocks.unblock(db, PLANTS["hijacked"], actor="bench")


CASES: list[tuple[str, tuple[str, ...], Query]] = [
    ("top accounts by messages, 1h", ("abuse", "top", "--since", "1h"),
     lambda db: top.top(db, by="account", metric="messages", span=_span("1h"))),
    ("top accounts by messages, 1d", ("abuse", "top", "--since", "1d"),
     lambda db: top.top(db, by="account", metric="messages", span=_span("1d"))),
    ("top IPs by auth failures, 1d",
     ("abuse", "top", "--by", "ip", "--metric", "auth_failures", "--since", "1d"),
     lambda db: top.top(db, by="ip", metric="auth_failures", span=_span("1d"))),
    ("top senders by deferrals, 7d",
     ("abuse", "top", "--by", "sender", "--metric", "deferrals", "--since", "7d"),
     lambda db: top.top(db, by="sender", metric="deferrals", span=_span("7d"))),
    ("top domains by messages, 30d",
     ("abuse", "top", "--by", "domain", "--since", "30d"),
     lambda db: top.top(db, by="domain", metric="messages", span=_span("30d"))),
    ("account timeline, 7d", ("abuse", "account", PLANTS["hijacked"], "--since", "7d"),
     lambda db: account.account_report(db, PLANTS["hijacked"], _span("7d"))),
    ("account timeline of a busy account, 30d",
     ("abuse", "account", f"u0@{BIG_DOMAIN}", "--since", "30d"),
     lambda db: account.account_report(db, f"u0@{BIG_DOMAIN}", _span("30d"))),
    ("anomalies, 1d window, 14d baseline", ("abuse", "anomalies"),
     lambda db: anomalies.anomalies(db, anomalies.Options())),
    ("anomalies, 1h window, 14d baseline", ("abuse", "anomalies", "--window", "1h"),
     lambda db: anomalies.anomalies(db, anomalies.Options(window_s=3600))),
    ("why (queue id)", ("abuse", "why", "HIJ0002"), lambda db: explain.why(db, "HIJ0002")),
    ("why (Message-ID)", ("abuse", "why", "<hij2@d0.abuse.example>"),
     lambda db: explain.why(db, "<hij2@d0.abuse.example>")),
    ("limit simulate, busiest domain per account, 7d",
     ("limit", "simulate", BIG_DOMAIN, "messages", "100", "--window", "1h", "--per-account",
      "--since", "7d"),
     lambda db: simulate.simulate(db, BIG_DOMAIN, "messages", 100, window_s=3600,
                                  span=_span("7d"), per_account=True)),
    ("block + unblock", ("abuse", "block", PLANTS["hijacked"]), _block_unblock),
]


async def time_queries(config: Path, repeat: int) -> dict[str, tuple[float, float]]:
    pool = await connect(load_config(str(config)))
    results = {}
    try:
        async with pool.acquire() as db:
            for name, _, query in CASES:
                times = []
                for _ in range(repeat):
                    started = time.perf_counter()
                    await query(db)
                    times.append(time.perf_counter() - started)
                results[name] = (statistics.median(times), max(times))
    finally:
        await pool.close()
    return results


def time_cli(config: Path, args: tuple[str, ...], repeat: int) -> float:
    env = {**os.environ, "MAILFC_CONFIG": str(config), "COLUMNS": "200"}
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "mailfc", *args], env=env, check=True,
                       stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - started)
        if args[:2] == ("abuse", "block"):
            subprocess.run([sys.executable, "-m", "mailfc", "abuse", "unblock", args[2]],
                           env=env, check=True, stdout=subprocess.DEVNULL)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--state-dir", default=None)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    reuse = args.state_dir is not None and (Path(args.state_dir) / "mailfc.toml").exists()
    state, config = make_state(args.state_dir)
    try:
        if not reuse:
            started = time.perf_counter()
            counts = asyncio.run(fill(config, Shape.for_rows(args.rows, args.days)))
            print(f"generated {sum(counts.values()):,} rows in"
                  f" {time.perf_counter() - started:.0f} s: "
                  + ", ".join(f"{k} {v:,}" for k, v in counts.items()), flush=True)
        queries = asyncio.run(time_queries(config, args.repeat))
        print(f"\n{'command':<50} {'query s':>8} {'max s':>7} {'CLI s':>7}  target {TARGET_S} s")
        for name, cli_args, _ in CASES:
            median, worst = queries[name]
            whole = time_cli(config, cli_args, args.repeat)
            verdict = "ok" if whole <= TARGET_S else "OVER"
            print(f"{name:<50} {median:8.3f} {worst:7.3f} {whole:7.3f}  {verdict}", flush=True)
    finally:
        if args.keep:
            print(f"kept: MAILFC_CONFIG={config}")
        else:
            drop_state(state, config)


if __name__ == "__main__":
    main()
