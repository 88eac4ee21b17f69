"""Benchmark: inbound mail through SMTP-In (checks before the 250), its spool and the LMTP Router.

    python -m bench.smtp_in [--messages 2000] [--sessions 10]

Runs a whole inbound host (embedded PostgreSQL, runtime, dispatcher, LMTP Router,
SMTP-In with the built-in checks of [filter_in]) in a temporary state directory on ports,
bridge (mfcgb0, 10.89.1.0/24) and container prefix (mfcgb) of its own, then loads it
with Postfix's smtp-source (10 sessions) and prints:

1. mailfc: messages/s accepted (smtp-source finished) and delivered (all of them in
   the maildir), end to end;
2. reference: a plain host Postfix (own config directory, own queue) relaying the same
   message set by LMTP into the same domain's Dovecot (its unix socket, through
   /proc/<pid>/root: the reference's lmtp client runs as root), same measures;
3. the ratio of the end-to-end rates (target: at least 0.9, checks included).

Every process it starts is stopped by PID; the state directory and bridge are removed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from bench.platform import LOOPBACK_UNCAPPED, start_up, whole_machine_cpu
from mailfc.config import Config, parse_config
from mailfc.db import accounts, connect, domains
from mailfc.db.pool import embedded_cluster
from mailfc.passwords import hash_password
from mailfc.runtime.images import container_socket

DOMAIN = "bench.example"
USER = f"user@{DOMAIN}"
SMTP_IN = 18925
POSTFIX = 18926
SMTP_SOURCE = "/usr/sbin/smtp-source"


def config_data(state_dir: Path) -> dict[str, dict[str, object]]:
    return {
        "paths": {"state_dir": str(state_dir)},
        "host": {"name": "bench-gw-host"},
        "network": {"bridge": "mfcgb0", "subnet": "10.89.1.0/24"},
        "runtime": {"name_prefix": "mfcgb"},
        # The internal hops (LMTP Router, SMTP-Out) on their default unix
        # sockets in <state_dir>/private/hops (mailfc.hops).
        "listen": {"smtp_in": f"127.0.0.1:{SMTP_IN}", "imap_router": "127.0.0.1:18932",
                   "imap_router_tls": "127.0.0.1:18933", "submission": "127.0.0.1:18934",
                   "submissions": "127.0.0.1:18935",
                   "milter": "127.0.0.1:18938",
                   "hook_server": "127.0.0.1:18939"},
        "dispatcher": {"address": "127.0.0.1", "lmtp_port": 18929, "imap_port": 18930,
                       "smtp_port": 18931},
        # The same concurrency towards the domain's Dovecot as the reference Postfix
        # (lmtp_destination_concurrency_limit = 8 below).
        "spool": {"per_domain_concurrency": 8},
        **LOOPBACK_UNCAPPED,
    }


def maildir_count(mail_root: Path) -> int:
    new = mail_root / DOMAIN / "user" / "Maildir" / "new"
    return len(os.listdir(new)) if new.exists() else 0


async def load(port: int, messages: int, sessions: int, mail_root: Path,
               within: float = 600.0) -> tuple[float, float]:
    """(accepted/s, delivered/s) for `messages` through the server on `port`."""
    before = maildir_count(mail_root)
    started = time.monotonic()
    result = await asyncio.to_thread(
        subprocess.run, [SMTP_SOURCE, "-s", str(sessions), "-m", str(messages), "-l", "2048",
                         "-f", "ann@remote.example", "-t", USER, f"127.0.0.1:{port}"],
        capture_output=True, text=True, timeout=within)
    accepted = time.monotonic() - started
    if result.returncode != 0:
        raise RuntimeError(f"smtp-source failed: {result.stderr.strip()}")
    deadline = started + within
    while maildir_count(mail_root) - before < messages:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {maildir_count(mail_root) - before} of {messages} "
                               "messages arrived")
        await asyncio.sleep(0.02)
    delivered = time.monotonic() - started
    return messages / accepted, messages / delivered


def postfix_reference(directory: Path, dovecot_pid: int = 0, *, port: int = POSTFIX,
                      routing: str | None = None) -> tuple[list[str], Path]:
    """A host Postfix of our own: config and queue under `directory`, LMTP to the Dovecot
    container whose init is `dovecot_pid` (or whatever `routing` main.cf lines say),
    listening on 127.0.0.1:`port`."""
    config = directory / "etc"
    queue = directory / "queue"
    data = directory / "data"
    for path in (config, queue, data):
        path.mkdir(parents=True)
    shutil.chown(data, "postfix")
    routing_lines = routing if routing is not None else (
        f"relay_domains = {DOMAIN}\n"
        f"relay_transport = lmtp:unix:{container_socket(dovecot_pid, 'lmtp')}")
    (config / "main.cf").write_text(f"""
compatibility_level = 3.6
queue_directory = {queue}
data_directory = {data}
mail_owner = postfix
setgid_group = postdrop
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
myhostname = reference.bench
mydestination =
{routing_lines}
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
mynetworks = 127.0.0.0/8
maillog_file = {directory}/maillog
maillog_file_prefixes = {directory}
smtputf8_enable = no
lmtp_destination_concurrency_limit = 8
""")
    shutil.copy("/etc/postfix/master.cf", config / "master.cf")
    master = (config / "master.cf").read_text().replace(
        "smtp      inet  n       -       y       -       -       smtpd",
        f"127.0.0.1:{port} inet  n       -       n       -       -       smtpd")
    # No chroot: the queue is not under the default chroot.
    master = "\n".join(line.replace("  y  ", "  n  ") if not line.startswith("#") else line
                       for line in master.splitlines())
    # The container's LMTP socket is root's alone (/proc/<pid>/root, mode 0600).
    master = master.replace("\nlmtp      unix  -       -", "\nlmtp      unix  -       n")
    (config / "master.cf").write_text(master + "\npostlog   unix-dgram n  -       n       -"
                                      "       1       postlogd\n")
    command = ["postfix", "-c", str(config)]
    subprocess.run([*command, "set-permissions"], capture_output=True, check=False)
    subprocess.run([*command, "start"], check=True, capture_output=True)
    return command, config


def make_state_dir() -> Path:
    state_dir = Path(tempfile.mkdtemp(prefix="mailfc-bench-gw-", dir="/tmp"))
    state_dir.chmod(0o711)     # the embedded PostgreSQL's user must get through
    return state_dir


async def run(messages: int, sessions: int, rounds: int) -> None:
    state_dir = make_state_dir()
    data = config_data(state_dir)
    config = parse_config(data, "bench")
    postfix: list[str] | None = None
    # The real `mailfc up`: its services in their supervised processes.
    process = await start_up(config, state_dir, SMTP_IN)
    pool = await connect(config)
    try:
        async with pool.acquire() as db:
            await db.execute("UPDATE hosts SET state = 'draining' WHERE name <> $1",
                             "bench-gw-host")
            if not await db.fetchval("SELECT 1 FROM domains WHERE name = $1", DOMAIN):
                await domains.add(db, DOMAIN)
                await accounts.add(db, USER, hash_password("bench"))
                await whole_machine_cpu(db, DOMAIN)
        mail_root = config.mail_root
        await load(SMTP_IN, 20, 2, mail_root)        # warm: the container is running
        dovecot_pid = await pool.fetchval(
            "SELECT c.pid FROM container_instances c JOIN domains d"
            " ON d.id = c.domain_id WHERE d.name = $1 AND c.state = 'running'", DOMAIN)
        postfix, _ = await asyncio.to_thread(postfix_reference, state_dir / "postfix",
                                             dovecot_pid)
        await load(POSTFIX, 20, 2, mail_root)        # warm the reference too
        # Alternating rounds: drift on the machine hits both alike.
        pairs = [(await load(SMTP_IN, messages, sessions, mail_root),
                  await load(POSTFIX, messages, sessions, mail_root)) for _ in range(rounds)]
        ratios = [ours[1] / theirs[1] for ours, theirs in pairs]

        def median(values: list[float]) -> float:
            return statistics.median(values)

        print(f"{messages} messages, {sessions} smtp-source sessions, 2 kB each, "
              f"{rounds} rounds (medians)")
        print(f"mailfc  SMTP-In (checks) -> spool -> LMTP Router -> Dovecot:      "
              f"accepted {median([o[0] for o, _ in pairs]):.0f}/s, "
              f"delivered {median([o[1] for o, _ in pairs]):.0f}/s")
        print(f"Postfix (host) -> LMTP -> the same Dovecot:                      "
              f"accepted {median([t[0] for _, t in pairs]):.0f}/s, "
              f"delivered {median([t[1] for _, t in pairs]):.0f}/s")
        print(f"ratio (end to end): median {median(ratios):.2f} (rounds: "
              f"{', '.join(f'{r:.2f}' for r in ratios)}; target >= 0.9)")
    finally:
        if postfix is not None:
            await asyncio.to_thread(subprocess.run, [*postfix, "stop"], capture_output=True,
                                    check=False)
        await pool.close()
        process.send_signal(signal.SIGTERM)
        await process.wait()
        await asyncio.to_thread(cleanup, config, state_dir)


def cleanup(config: Config, state_dir: Path) -> None:
    subprocess.run(["ip", "link", "del", "mfcgb0"], capture_output=True, check=False)
    embedded_cluster(config).stop()
    shutil.rmtree(state_dir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.smtp_in")
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--sessions", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(run(args.messages, args.sessions, args.rounds))


if __name__ == "__main__":
    main()
