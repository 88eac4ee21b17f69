"""Benchmark: the fuzz suite for longer; inputs tried per parser, crashes, hangs, peak memory.

    python -m bench.fuzz [--minutes 10] [--sockets-share 0.5] [--no-sockets] [--seed N]

The first part runs every property test of tests/fuzz (test_codecs.py and
test_dialogues.py: the PROXY v2 and milter codecs, the hook line protocol, IMAP
arguments, the SMTP/LMTP server core, the IMAP and submission routers before login,
the LMTP client's reply reader) round after round with fresh random inputs, each test
given an equal share of the time.  The second part brings up a whole platform (`mailfc
up` with its own embedded PostgreSQL, bridge mfcg0, subnet 10.122.0.0/24, ports
35xxx, tests/gateways/whole_platform.py) and sends mutated real dialogues to every
endpoint (tests/fuzz/sockets.py) for the rest of the time, then checks that every
server still answers a clean client, no process died or restarted, no traceback
reached the log and no process's peak RSS grew past its bound.

Printed per parser: inputs tried, crashes (a property failed: the minimal input
Hypothesis found is printed once per test), hangs (an example over its 10 s), and the
peak RSS of this process (property part) and of each platform process (socket part).
Exit status 1 when anything crashed, hung or broke a check.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import random
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, settings

# The fuzz modules' settings come from their conftest under pytest; here, per round.
ROUND_SETTINGS: dict[str, Any] = dict(deadline=None, database=None, derandomize=False,
                                      suppress_health_check=list(HealthCheck))


@dataclass
class Parser:
    name: str
    test: Any
    tried: int = 0
    crashes: int = 0
    hangs: int = 0
    first_failure: str = ""
    arguments: dict[str, Any] = field(default_factory=dict)


def property_tests() -> list[Parser]:
    from tests.fuzz import test_codecs, test_dialogues
    from tests.fuzz.logcheck import Tracebacks

    handler = Tracebacks()
    logging.getLogger("mailfc").addHandler(handler)
    found = []
    for module in (test_codecs, test_dialogues):
        for name in sorted(dir(module)):
            test = getattr(module, name)
            if name.startswith("test_") and hasattr(test, "hypothesis"):
                parser = Parser(f"{module.__name__.rpartition('.')[2]}::{name[5:]}", test)
                if "tracebacks" in test.hypothesis.inner_test.__code__.co_varnames:
                    parser.arguments["tracebacks"] = handler
                found.append(parser)
    return found


def _counting(parser: Parser, inner: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(inner)
    def counted(*args: Any, **kwargs: Any) -> Any:
        parser.tried += 1
        return inner(*args, **kwargs)
    return counted


def run_properties(parsers: list[Parser], seconds: float, examples_per_round: int) -> None:
    # Each call of a test is one round of this many fresh examples.
    settings.register_profile("bench-fuzz", max_examples=examples_per_round,
                              **ROUND_SETTINGS)
    settings.load_profile("bench-fuzz")
    share = seconds / max(1, len(parsers))
    for parser in parsers:
        inner = parser.test.hypothesis.inner_test
        parser.test.hypothesis.inner_test = _counting(parser, inner)
        stop = time.monotonic() + share
        try:
            while time.monotonic() < stop:
                try:
                    parser.test(**parser.arguments)
                except TimeoutError:
                    parser.hangs += 1
                except Exception as error:  # a failed property: a crash of the parser
                    parser.crashes += 1
                    if not parser.first_failure:
                        parser.first_failure = f"{type(error).__name__}: {error}"[:2000]
        finally:
            parser.test.hypothesis.inner_test = inner


async def run_sockets(seconds: float, seed: int, state_dir: Path
                      ) -> tuple[list[Any], list[str], dict[str, int]]:
    from tests.fuzz import sockets
    from tests.gateways.whole_platform import PASSWORD, whole_platform

    async with whole_platform(state_dir, "mfcg", "10.122.0.0/24", 35000, "fuzz.example",
                              ("fay",)) as platform:
        targets = sockets.targets(platform.settings, "fuzz.example", "fay", PASSWORD)
        problems = [p for t in targets if (p := await sockets.clean_check(t))]
        health = sockets.Health.before(platform.up.processes(), platform.up.log)
        await sockets.fuzz(targets, seconds, random.Random(seed))
        problems += [p for t in targets if (p := await sockets.clean_check(t))]
        problems += health.problems(platform.up.processes())
        return targets, problems, health.peak_kb


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.fuzz",
                                     description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="the whole run")
    parser.add_argument("--sockets-share", type=float, default=0.5,
                        help="part of the time for the socket fuzz (0-1)")
    parser.add_argument("--no-sockets", action="store_true",
                        help="property tests only (no platform, no root needed)")
    parser.add_argument("--examples", type=int, default=50,
                        help="examples per Hypothesis round (smaller: fairer time shares)")
    parser.add_argument("--seed", type=int, default=None, help="the socket fuzz's seed")
    args = parser.parse_args()
    seconds = max(1.0, args.minutes * 60)
    socket_seconds = 0.0 if args.no_sockets else seconds * min(1.0, max(0.0,
                                                                         args.sockets_share))
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)

    parsers = property_tests()
    began = time.monotonic()
    run_properties(parsers, seconds - socket_seconds, args.examples)
    print(f"property tests ({time.monotonic() - began:.0f} s):")
    print(f"  {'parser':58} {'inputs':>8} {'crashes':>8} {'hangs':>6}")
    for item in parsers:
        print(f"  {item.name:58} {item.tried:8} {item.crashes:8} {item.hangs:6}")
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"  peak RSS of this process: {peak_mb:.0f} MB")
    failed = any(p.crashes or p.hangs for p in parsers)
    for item in parsers:
        if item.first_failure:
            print(f"\n{item.name}: first failure\n{item.first_failure}")

    if socket_seconds:
        began = time.monotonic()
        state_dir = Path(tempfile.mkdtemp(prefix="mailfc-bench-", dir="/tmp"))
        state_dir.chmod(0o711)      # the embedded PostgreSQL's user must get through
        try:
            targets, problems, peak_kb = asyncio.run(run_sockets(socket_seconds, seed,
                                                                 state_dir))
        finally:
            shutil.rmtree(state_dir, ignore_errors=True)
        print(f"\nsocket fuzz ({time.monotonic() - began:.0f} s with the platform's start, "
              f"seed {seed}):")
        print(f"  {'endpoint':18} {'connections':>11} {'refused':>8} {'hangs':>6}")
        for target in targets:
            print(f"  {target.name:18} {target.tried:11} {target.refused:8} {target.hangs:6}")
        print("  peak RSS (MB): " + ", ".join(f"{name} {kb / 1024:.0f}"
                                              for name, kb in sorted(peak_kb.items())))
        for problem in problems:
            print(f"  PROBLEM: {problem}")
        failed = failed or bool(problems) or any(t.hangs for t in targets)
    print("\nresult: " + ("FAILED" if failed else "no crash, no hang, memory within bounds"))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
