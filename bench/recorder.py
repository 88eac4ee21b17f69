"""Benchmark: session recorder rows/s, a clean load against one with 1 % bad rows.

    python -m bench.recorder [--rows 60000] [--rounds 3] [--refused 0.001]
                             [--state-dir DIR] [--keep]

Starts a private embedded PostgreSQL in a temporary state directory (as
bench/abuse_queries.py does), then records the same mix as a busy router and
gateway would (login attempts, SMTP sessions, their events) through one Recorder
(batch_size 2000), rows created and flushed as fast as the database takes them:

    clean       every value storable
    1% bad      1 row in 100 holds a NUL, bytes that are not UTF-8 or a lone
                surrogate (HELO, user name, event detail): stored sanitized
    refused     a share (--refused) of rows PostgreSQL refuses whatever is done
                to the text (a client address that is no address): found by
                halving the batch and set aside in the dead-letter file

Loads alternate over --rounds rounds; the median rows/s of each is printed, with the
bad loads' ratio to the clean one (target for "1% bad": >= 0.9, the same rate within
measurement noise).  Whole run well under a minute at the defaults.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path

import asyncpg

from bench.abuse_data import drop_state, make_state
from mailfc.config import load_config
from mailfc.db import connect
from mailfc.policy.recorder import Recorder, dead_letter_path

TARGET_RATIO = 0.9
BAD_TEXT = ("helo\x00nul", "user\udcff\udcfe", "lone\ud800")


def record(recorder: Recorder, rows: int, bad_every: int, refused_every: int) -> None:
    """`rows` rows: per session one login attempt, the session and one event."""
    for index in range(0, rows, 3):
        bad = bad_every and index // 3 % bad_every == 0
        refused = refused_every and index // 3 % refused_every == 0
        name = BAD_TEXT[index % 3] if bad else f"user{index % 5000}@d{index % 50}.bench"
        recorder.new("auth_attempts", protocol="imap", username=name,
                     domain=f"d{index % 50}.bench",
                     client_ip="no address" if refused else f"198.51.{index % 250}.7",
                     success=index % 7 != 0, reason=None if index % 7 else "bad password")
        session = recorder.new("smtp_sessions", component="bench", host="bench-host",
                               domain=f"d{index % 50}.bench",
                               helo=BAD_TEXT[0] if bad else "mail.example.net",
                               client_ip=f"203.0.113.{index % 250}", verdict="accept")
        recorder.new("smtp_events", session_id=session, stage="rcpt", verdict="tempfail",
                     rule="limit:recipients/1h@account", mode="enforce",
                     detail={"recipient": BAD_TEXT[1] if bad else "ann@d1.bench"})


async def one_load(pool: asyncpg.Pool, state: Path, rows: int, bad_every: int,
                   refused_every: int) -> tuple[float, Recorder]:
    recorder = Recorder(pool, component="bench", flush_interval_s=3600, batch_size=2000,
                        max_pending=rows * 2, holder=f"bench/{bad_every}/{refused_every}",
                        dead_letter=dead_letter_path(state, "bench"))
    started = time.perf_counter()
    # Created in slices and flushed as they fill, as the background writer does.
    for _ in range(0, rows, 20_000):
        record(recorder, 20_000, bad_every, refused_every)
        await recorder.flush()
    elapsed = time.perf_counter() - started
    assert recorder.stats().pending == 0
    return recorder.stats().written / elapsed, recorder


async def run(config: Path, state: Path, rows: int, rounds: int, refused: float) -> None:
    pool = await connect(load_config(str(config)))
    loads = {"clean": (0, 0), "1% bad": (100, 0)}
    if refused > 0:
        loads[f"{refused:.1%} refused"] = (0, max(1, round(1 / refused)))
    rates: dict[str, list[float]] = {name: [] for name in loads}
    extra: dict[str, str] = {}
    try:
        await one_load(pool, state, 6000, 0, 0)      # warm up: pool, plans, partitions
        for _ in range(rounds):
            for name, (bad_every, refused_every) in loads.items():
                # Each load on empty tables: a later one must not pay for bigger indexes.
                async with pool.acquire() as db:
                    await db.execute("TRUNCATE auth_attempts, smtp_sessions, smtp_events")
                    await db.execute("CHECKPOINT")
                rate, recorder = await one_load(pool, state, rows, bad_every, refused_every)
                rates[name].append(rate)
                stats = recorder.stats()
                extra[name] = (f"sanitized {stats.sanitized:,}, dead-lettered"
                               f" {stats.dead_lettered:,}")
    finally:
        await pool.close()
    clean = statistics.median(rates["clean"])
    print(f"\n{'load':<16} {'rows/s':>10} {'ratio':>7}  per round")
    for name, values in rates.items():
        median = statistics.median(values)
        ratio = median / clean
        verdict = ("" if name == "clean" else
                   "  ok" if ratio >= TARGET_RATIO or "refused" in name else "  UNDER")
        print(f"{name:<16} {median:10,.0f} {ratio:7.2f}{verdict}  ({extra[name]})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=60_000, help="rows per load and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--refused", type=float, default=0.001,
                        help="share of rows PostgreSQL refuses in the third load (0: none)")
    parser.add_argument("--state-dir", default=None)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    state, config = make_state(args.state_dir)
    try:
        asyncio.run(run(config, state, args.rows, args.rounds, args.refused))
    finally:
        if args.keep:
            print(f"kept: MAILFC_CONFIG={config}")
        else:
            drop_state(state, config)


if __name__ == "__main__":
    main()
