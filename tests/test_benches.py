"""Every benchmark in bench/ still runs: each at its smallest settings, as a subprocess,
one after another (they start whole platforms, and two at once would measure each
other), and each must print its figures.

The figures at these settings mean nothing; what is checked is that the benchmark
gets through every hop it drives and prints the lines a reader looks for (a rate, a
ratio, a percentile).  A new benchmark must be added to BENCHES (or, if it is a
helper the benchmarks import, to HELPERS), so none rots unseen.

Budget: about seven and a quarter minutes on two cores.  Measured here, one at a time:
import_domains 9 s, recorder 12, abuse_queries 30, cold_start 19, milter_postfix 19,
imap_hooks 17, routers 29, smtp_in 24, submission 36, noisy_neighbor 61 (its
settle and onset pauses are fixed), noisy_inbound 52 (the same), big_messages 45,
chaos 31 (one fault target), fuzz 51.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import require_root

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"

# Modules of bench/ that are not benchmarks: imported by them (or, for
# milter_libmilter, started by milter_postfix with a socket to serve).
HELPERS = {"__init__", "platform", "imap_load", "abuse_data", "milter_libmilter"}

# module -> (smallest arguments, what its output must contain, time limit in s)
BENCHES: dict[str, tuple[list[str], str, float]] = {
    "import_domains": (["--domains", "20", "--accounts-per-domain", "2", "--plain", "4"],
                       r"rows/s", 120),
    "recorder": (["--rows", "2000", "--rounds", "1"], r"rows/s", 180),
    "abuse_queries": (["--rows", "20000", "--days", "2", "--repeat", "1"],
                      r"\d+\.\d{3}\s+\d+\.\d{3}", 300),
    "cold_start": (["--rounds", "2", "--max-containers", "3"], r"to banner", 300),
    "milter_postfix": (["--messages", "60", "--rounds", "1"], r"msg/s", 300),
    "imap_hooks": (["--seconds", "1", "--clients", "1", "--rounds", "1"], r"/s", 300),
    "routers": (["--rounds", "2", "--seconds", "1", "--clients", "1", "--load-rounds", "1"],
                r"p50.*\n(.*\n)*.*ratio", 300),
    "smtp_in": (["--messages", "40", "--sessions", "2", "--rounds", "1"], r"ratio", 300),
    "submission": (["--seconds", "2", "--clients", "1"], r"ratio \d", 300),
    "noisy_neighbor": (["--seconds", "2", "--rounds", "1", "--senders", "6"],
                       r"delivery p50 .* IMAP p50", 400),
    "noisy_inbound": (["--seconds", "2", "--rounds", "1", "--senders", "4", "--mailbox", "10"],
                      r"shared server +delivery p50 .* IMAP p50(.*\n)*  A accepted \(port 25\):"
                      r" mailfc \d+ msgs/s(.*\n)*.*IMAP p99 during the flood / alone: mailfc \d",
                      300),
    "big_messages": (["--seconds", "2", "--clients", "1", "--size-mb", "1", "--drain", "60"],
                     r"MB/s", 400),
    "chaos": (["--targets", "inbound", "--messages", "10", "--outbound", "4",
               "--rate", "10", "--drain-wait", "60", "--give-up", "60"],
              r"inbound\s+\d+\s+\d+", 400),
    "fuzz": (["--minutes", "0.3"], r"result: no crash", 300),
}


def bench_modules() -> set[str]:
    return {path.stem for path in BENCH.glob("*.py")}


def test_every_benchmark_is_run_here() -> None:
    missing = bench_modules() - HELPERS - set(BENCHES)
    assert not missing, (f"bench/{sorted(missing)[0]}.py is not in tests/test_benches.py: "
                         "add its smallest settings to BENCHES (or it to HELPERS)")
    gone = set(BENCHES) - bench_modules()
    assert not gone, f"BENCHES names benchmarks that no longer exist: {sorted(gone)}"


@pytest.mark.parametrize("name", list(BENCHES))
def test_benchmark_prints_its_figures(name: str) -> None:
    require_root()
    args, figures, limit_s = BENCHES[name]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    started = time.monotonic()
    try:
        process = subprocess.run([sys.executable, "-m", f"bench.{name}", *args], cwd=ROOT,
                                 capture_output=True, text=True, env=env, timeout=limit_s)
    except subprocess.TimeoutExpired as expired:
        pytest.fail(f"bench.{name} {' '.join(args)} ran past {limit_s:g} s:\n"
                    f"{expired.stdout or ''}\n{expired.stderr or ''}"[-4000:])
    took = time.monotonic() - started
    output = process.stdout
    assert process.returncode == 0, (
        f"bench.{name} {' '.join(args)} failed ({process.returncode}) after {took:.0f} s:\n"
        f"{output[-2000:]}\n{process.stderr[-4000:]}")
    assert re.search(figures, output), (
        f"bench.{name} printed no figures ({figures!r}):\n{output[-3000:]}")
    assert "Traceback" not in process.stderr, process.stderr[-4000:]
