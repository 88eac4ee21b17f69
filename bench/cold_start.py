"""Benchmark: cold starts of the per-domain Postfix and Dovecot containers.

    python -m bench.cold_start [--rounds 30] [--max-containers 200]

Runs the runtime alone (embedded PostgreSQL in a temporary state directory,
its own bridge mfccs0, subnet 10.84.0.0/22 and name prefix mfccs) and prints:

1. cold start, per image: from the ensure() call to the first banner byte on
   a fresh connection to the service's unix socket (for IMAP: the greeting of
   a session handed over through imap-master, as the dispatcher does it) (the
   container was not running), p50/p95/max, and the part that is ensure()
   alone (readiness = the service's socket listens); target p50 <= 100 ms;
2. memory of one running domain: cgroup memory usage and the summed PSS of its
   processes (shared library pages split fairly), per image;
3. how many containers run at once here: starts domains (Postfix + Dovecot
   each) in batches of 10 up to --max-containers or the first failure, checks
   every one greets, then reports the count, the time taken, host memory used
   and an estimate of how many would fit in the memory that is left.

Bounded in time and size; everything is stopped and removed afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from pathlib import Path

import asyncpg

from bench.platform import first_bytes, scratch_state
from mailfc.config import Config, parse_config
from mailfc.db import connect
from mailfc.runtime import Instance, Runtime, RuntimeSettings, cgroups

HOST = "bench-cold-host"
SUBNET = "10.84.0.0/22"
BATCH = 10


BRIDGE = "mfccs0"


def bench_config(state_dir: Path) -> Config:
    return parse_config({"paths": {"state_dir": str(state_dir)}}, "bench")


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def summary(label: str, values: list[float]) -> str:
    return (f"{label:<34} p50 {statistics.median(values):6.1f} ms   p95"
            f" {percentile(values, 0.95):6.1f} ms   max {max(values):6.1f} ms   (n={len(values)})")


def pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as handle:
            for line in handle:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def container_memory(runtime: Runtime, instance: Instance) -> tuple[float, float]:
    """(cgroup memory usage MiB, summed PSS MiB) of one container."""
    path = runtime.cgroup_path(instance.name)
    root = cgroups.hierarchies()
    base = (root.v1["memory"] if root.is_v1 else root.unified) or Path("/sys/fs/cgroup")
    procs = (base / path.lstrip("/") / "cgroup.procs").read_text().split()
    pss = sum(pss_kib(int(pid)) for pid in procs)
    return runtime.stats(instance).memory_bytes / 2**20, pss / 1024


def host_available_mib() -> float:
    with open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    return 0.0


async def cold_starts(runtime: Runtime, domain: str, service: str, rounds: int
                      ) -> tuple[list[float], list[float]]:
    to_banner, to_ready = [], []
    for _ in range(rounds):
        started = time.perf_counter()
        instance = await runtime.ensure(domain, service)
        ready = time.perf_counter()
        banner = await first_bytes(instance, service)
        greeted = time.perf_counter()
        if not banner:
            raise RuntimeError(f"{service}: no banner")
        to_ready.append((ready - started) * 1000)
        to_banner.append((greeted - started) * 1000)
        await runtime.stop(instance, drain_timeout=3.0)
    return to_banner, to_ready


async def capacity(runtime: Runtime, pool: asyncpg.Pool, limit: int) -> None:
    before = host_available_mib()
    running: list[Instance] = []
    started = time.perf_counter()
    failure = ""
    try:
        for batch in range(0, limit // 2, BATCH // 2):
            names = [f"cap{n}.bench.example" for n in range(batch, min(batch + BATCH // 2,
                                                                    limit // 2))]
            await pool.executemany("INSERT INTO domains (name) VALUES ($1)",
                                   [(n,) for n in names])
            results = await asyncio.gather(
                *(runtime.ensure(n, s) for n in names for s in ("smtp", "imap")),
                return_exceptions=True)
            for result in results:
                if isinstance(result, BaseException):
                    failure = f"{type(result).__name__}: {result}"
                else:
                    running.append(result)
            if failure:
                break
        elapsed = time.perf_counter() - started
        banners = await asyncio.gather(
            *(first_bytes(i, i.service) for i in running), return_exceptions=True)
        greeting = sum(1 for b in banners if isinstance(b, bytes) and b)
        used = before - host_available_mib()
        print(f"3. containers running at once: {len(running)} (bound {limit}),"
              f" {greeting} greeting, started in {elapsed:.1f} s"
              f" ({elapsed / max(1, len(running)) * 1000:.0f} ms each, batches of {BATCH})")
        if failure:
            print(f"   stopped at the first failure: {failure}")
        per = used / max(1, len(running))
        print(f"   host memory used {used:.0f} MiB = {per:.1f} MiB per container;"
              f" {host_available_mib():.0f} MiB still available"
              f" -> about {int(host_available_mib() / per) if per > 0 else 0} more would fit"
              " by memory (CPU and the pids of each are the next limits)")
    finally:
        for start in range(0, len(running), 20):
            await asyncio.gather(*(runtime.stop(i, drain_timeout=3.0)
                                   for i in running[start:start + 20]),
                                 return_exceptions=True)


async def run(args: argparse.Namespace, state_dir: Path) -> None:
    config = bench_config(state_dir)
    pool = await connect(config)
    host_id = await pool.fetchval(
        "INSERT INTO hosts (name, dispatcher_address, container_subnet, capacity)"
        " VALUES ($1, '127.0.0.1', $2, 5000) RETURNING id", HOST, SUBNET)
    await pool.execute("INSERT INTO domains (name) VALUES ('cold.bench.example')")
    settings = RuntimeSettings(state_dir=state_dir, bridge=BRIDGE, subnet=SUBNET,
                               host_id=host_id, name_prefix="mfccs", netns_pool_size=2)
    runtime = Runtime(settings, pool)
    await runtime.open()
    await runtime.recover()
    try:
        print(f"cold start, {args.rounds} rounds per image (first banner byte on a fresh"
              " connection, container stopped before each round)")
        figures: dict[str, tuple[list[float], list[float]]] = {}
        for service in ("smtp", "imap", "lmtp"):
            # One warm-up start per image: page cache and the first netns.
            await cold_starts(runtime, "cold.bench.example", service, 1)
            figures[service] = await cold_starts(runtime, "cold.bench.example", service,
                                                 args.rounds)
        for service, label in (("smtp", "Postfix (smtp)"), ("imap", "Dovecot (imap)"),
                               ("lmtp", "Dovecot (lmtp)")):
            banner, ready = figures[service]
            print("1. " + summary(f"{label} to banner", banner))
            print("   " + summary(f"{label} ensure() alone", ready))

        for service, label in (("smtp", "Postfix"), ("imap", "Dovecot")):
            instance = await runtime.ensure("cold.bench.example", service)
            await first_bytes(instance, service)
            usage, pss = container_memory(runtime, instance)
            print(f"2. memory of a running {label:<8} cgroup usage {usage:5.1f} MiB,"
                  f" PSS {pss:5.1f} MiB")
            await runtime.stop(instance, drain_timeout=3.0)

        if args.max_containers > 0:
            await capacity(runtime, pool, args.max_containers)
    finally:
        await runtime.recover()
        await runtime.close()
        await pool.close()
        cgroups.remove_if_empty(settings.cgroup_parent)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--max-containers", type=int, default=200,
                        help="bound of the how-many-at-once test (0 skips it)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("the benchmark needs root (runc, namespaces, cgroups)")
    with scratch_state(bench_config, bridge=BRIDGE) as state_dir:
        asyncio.run(run(args, state_dir))


if __name__ == "__main__":
    main()
