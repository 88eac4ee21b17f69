"""Benchmark: `mailfc domain import` of 10,000 domains with 50,000 accounts.

    python -m bench.import_domains [--domains 10000] [--accounts-per-domain 5]
                                   [--plain 500]

Generates a CSV in a temporary state directory with its own embedded
PostgreSQL, imports it with the real `mailfc` command and prints seconds and
rows/s.  Accounts carry pre-hashed passwords (the migration case: an ISP moves
its existing hashes); `--plain` more accounts carry plain passwords, hashed
during the import, so the hashing rate is measured too.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mailfc.passwords import hash_password


def generate(path: Path, domains: int, per_domain: int, plain: int) -> int:
    hashed = hash_password("bench-password")
    rows = 0
    with path.open("w") as handle:
        handle.write("domain,localpart,password,password_hash,quota_bytes\n")
        for d in range(domains):
            domain = f"d{d:05d}.bench.example"
            for a in range(per_domain):
                handle.write(f'{domain},user{a},,"{hashed}",1073741824\n')
                rows += 1
        for p in range(plain):
            handle.write(f"plain.bench.example,user{p},pw-{p},,\n")
            rows += 1
    return rows


def mailfc(config: Path, *args: str) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "mailfc", *args], check=True,
                   env={**os.environ, "MAILFC_CONFIG": str(config)}, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domains", type=int, default=10_000)
    parser.add_argument("--accounts-per-domain", type=int, default=5)
    parser.add_argument("--plain", type=int, default=500)
    args = parser.parse_args()

    state = Path(tempfile.mkdtemp(prefix="mailfc-bench-", dir="/tmp"))
    state.chmod(0o711)
    config = state / "mailfc.toml"
    config.write_text(f'[paths]\nstate_dir = "{state}"\n')
    try:
        mailfc(config, "db", "migrate")
        csv_hashed = state / "hashed.csv"
        rows = generate(csv_hashed, args.domains, args.accounts_per_domain, 0)
        seconds = mailfc(config, "domain", "import", str(csv_hashed), "--json")
        print(f"import {args.domains} domains + {rows} accounts (pre-hashed): "
              f"{seconds:.1f} s, {rows / seconds:,.0f} rows/s")
        if args.plain:
            csv_plain = state / "plain.csv"
            generate(csv_plain, 0, 0, args.plain)
            seconds = mailfc(config, "domain", "import", str(csv_plain), "--json")
            print(f"import {args.plain} accounts with plain passwords (Argon2id hashing, "
                  f"{os.cpu_count()} cores): {seconds:.1f} s, {args.plain / seconds:,.0f} rows/s")
    finally:
        subprocess.run([sys.executable, "-m", "mailfc", "db", "stop"],
                       env={**os.environ, "MAILFC_CONFIG": str(config)},
                       stdout=subprocess.DEVNULL, check=False)
        shutil.rmtree(state, ignore_errors=True)


if __name__ == "__main__":
    main()
