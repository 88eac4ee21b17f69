"""A session history for abuse analysis: a realistic mix, with planted incidents.

    python -m bench.abuse_data --state-dir /tmp/x [--rows 10000000] [--days 30] [--keep]
    await generate(db, Shape.for_rows(10_000_000))        # from the benchmark and the tests

Everything is generated inside PostgreSQL (generate_series and hashint8extended as a
seeded, repeatable random source), so 10 million rows take minutes, not hours, and
no row crosses the client connection.  The same index drives a session row and its
message row, so both agree without a join.

THE MIX (per row budget, `Shape.for_rows`: about 10 rows in 31 are submission
sessions, as many submitted messages, inbound sessions and messages each; 18 IMAP
sessions; 17 logins and failed logins)
    domains, accounts     CMDB rows: d<N>.abuse.example, u<M>@...; account activity is
                          skewed (a few busy accounts, a long tail)
    submission            an account sends from its own one or two addresses (2% from a
                          roaming address); 1-6 recipients; 1.5% deferred by a limit
                          (with the smtp_events row the milter writes), 0.5% aborted
    inbound               remote senders (a skewed pool) to hosted accounts; 1% bounces
                          (null sender); 2% rejected
    imap, auth            sessions from the account's addresses; a login for most of
                          them; 5% failed logins (typos, from the account's own address)

PLANTED (relative to `anchor`, default now), names in PLANTS
    hijacked   normal for weeks, then a login from a never-seen address two hours ago
               and 400 messages of 25 recipients from it: half deferred by its
               100/h limit (queue ids HIJ000..), bounces coming back
    stuffing   198.51.100.66: 300 failed logins for 150 accounts in the last hour, then
               one success (the victim)
    bulk       4 messages a day, then 90 an hour for the last 8 hours: under its 100/h
               limit, never refused
    newsletter 1500 messages (one recipient each) within one hour every 7 days, the
               latest 3 hours ago: a legitimate spike, the same as every week
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import asyncpg

DOMAIN_SUFFIX = "abuse.example"
PLANTS = {
    "hijacked": "hijacked@d0.abuse.example",
    "hijack_ip": "203.0.113.50",
    "stuffing_ip": "198.51.100.66",
    "victim": "u3@d1.abuse.example",
    "bulk": "bulk@d1.abuse.example",
    "newsletter": "news@d2.abuse.example",
}
PASSWORD_HASH = "$argon2id$v=19$m=65536,t=3,p=4$bench$bench"
SESSION_TABLES = ("smtp_sessions", "smtp_messages", "smtp_events", "imap_sessions",
                  "imap_commands", "auth_attempts")


@dataclass(frozen=True)
class Shape:
    days: int = 30
    domains: int = 2000
    accounts_per_domain: int = 25
    submissions: int = 1_600_000       # sessions, one message each
    inbound: int = 1_600_000           # sessions, one message each
    imap: int = 1_800_000
    failures: float = 0.05             # failed logins per IMAP session
    plants: bool = True

    @staticmethod
    def for_rows(rows: int, days: int = 30) -> Shape:
        """About `rows` rows in all session tables together."""
        unit = rows / 3.1
        return Shape(days=days, domains=max(3, int(unit / 800)), accounts_per_domain=25,
                     submissions=int(unit * 0.5), inbound=int(unit * 0.5),
                     imap=int(unit * 0.55))

    @property
    def accounts(self) -> int:
        return self.domains * self.accounts_per_domain


# r(i, salt): a repeatable uniform number in [0, 1) for row i.
RANDOM = """
CREATE OR REPLACE FUNCTION pg_temp.r(i bigint, salt integer) RETURNS float8
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS
$$ SELECT (hashint8extended(i, salt) & 4294967295)::float8 / 4294967296.0 $$;
CREATE OR REPLACE FUNCTION pg_temp.acct(a bigint, per integer) RETURNS text
LANGUAGE sql IMMUTABLE AS
$$ SELECT 'u' || (a % per) || '@d' || (a / per) || '.abuse.example' $$;
CREATE OR REPLACE FUNCTION pg_temp.home(a bigint, i bigint) RETURNS inet
LANGUAGE sql IMMUTABLE AS
$$ SELECT '10.0.0.0'::inet + (a * 2 + CASE WHEN pg_temp.r(i, 3) < 0.8 THEN 0 ELSE 1 END) $$;
"""


async def _ids(db: asyncpg.Connection, table: str, count: int) -> int:
    """Reserve `count` ids of the table's sequence; returns the first minus one."""
    base = await db.fetchval(f"SELECT nextval('{table}_id_seq')")
    await db.execute(f"SELECT setval('{table}_id_seq', $1)", base + count + 1)
    return int(base)


async def _cmdb(db: asyncpg.Connection, shape: Shape) -> None:
    await db.execute(
        "INSERT INTO domains (name) SELECT 'd' || d || '.abuse.example'"
        " FROM generate_series(0, $1 - 1) d ON CONFLICT (name) DO NOTHING", shape.domains)
    await db.execute(
        "INSERT INTO accounts (domain_id, localpart, password_hash)"
        " SELECT d.id, 'u' || n, $2 FROM domains d, generate_series(0, $1 - 1) n"
        " WHERE d.name LIKE '%.abuse.example' ON CONFLICT DO NOTHING",
        shape.accounts_per_domain, PASSWORD_HASH)
    for address in (PLANTS["hijacked"], PLANTS["bulk"], PLANTS["newsletter"]):
        local, _, domain = address.partition("@")
        await db.execute(
            "INSERT INTO accounts (domain_id, localpart, password_hash)"
            " SELECT id, $1, $3 FROM domains WHERE name = $2 ON CONFLICT DO NOTHING",
            local, domain, PASSWORD_HASH)
    for address in (PLANTS["hijacked"], PLANTS["bulk"]):
        local, _, domain = address.partition("@")
        await db.execute(
            "INSERT INTO limits (scope, domain_id, account_id, kind, value, window_s)"
            " SELECT 'account', d.id, a.id, 'messages', 100, 3600 FROM accounts a"
            " JOIN domains d ON d.id = a.domain_id WHERE a.localpart = $1 AND d.name = $2"
            " ON CONFLICT DO NOTHING", local, domain)


async def _submissions(db: asyncpg.Connection, shape: Shape, anchor: datetime.datetime
                       ) -> None:
    n = shape.submissions
    sessions = await _ids(db, "smtp_sessions", n)
    messages = await _ids(db, "smtp_messages", n)
    # Columns of row i, shared by the session and its message.
    common = f"""
        SELECT i, $2::timestamptz - make_interval(secs => $3 * pg_temp.r(i, 2)) AS at,
          a, pg_temp.acct(a, $4) AS account, 'd' || (a / $4) || '.abuse.example' AS domain,
          CASE WHEN pg_temp.r(i, 4) < 0.02
               THEN '100.64.0.0'::inet + floor(pg_temp.r(i, 5) * 4000000)::bigint
               ELSE pg_temp.home(a, i) END AS ip,
          1 + floor(pg_temp.r(i, 6) ^ 3 * 6)::int AS rcpts,
          1500 + floor(pg_temp.r(i, 7) * 60000)::bigint AS size,
          CASE WHEN pg_temp.r(i, 8) < 0.015 THEN 'tempfail'
               WHEN pg_temp.r(i, 8) < 0.02 THEN 'aborted' ELSE 'accept' END AS verdict
        FROM (SELECT i, floor({shape.accounts} * pg_temp.r(i, 1) ^ 2)::bigint AS a
              FROM generate_series(1, $1::bigint) i) g"""
    args = (n, anchor, shape.days * 86400.0, shape.accounts_per_domain)
    await db.execute(
        "INSERT INTO smtp_sessions (id, started_at, ended_at, component, host, domain,"
        " account, client_ip, helo, tls, messages, recipients, bytes, verdict, reason)"
        f" SELECT {sessions} + i, at, at + interval '2 seconds', 'postfix', 'bench', domain,"
        " account, ip, 'client.example', true, (verdict = 'accept')::int,"
        " CASE WHEN verdict = 'accept' THEN rcpts ELSE 0 END,"
        " CASE WHEN verdict = 'accept' THEN size ELSE 0 END, verdict,"
        " CASE WHEN verdict = 'tempfail' THEN 'messages limit' END"
        f" FROM ({common}) c", *args)
    await db.execute(
        "INSERT INTO smtp_messages (id, session_id, started_at, ended_at, domain, account,"
        " client_ip, queue_id, message_id, sender, recipients, recipient_count, size,"
        " verdict, reason)"
        f" SELECT {messages} + i, {sessions} + i, at + interval '0.2 seconds',"
        " at + interval '1.5 seconds', domain, account, ip,"
        " CASE WHEN verdict = 'accept' THEN upper(to_hex(1000000000 + i)) END,"
        " '<' || i || '.bench@' || domain || '>', account,"
        " ARRAY(SELECT 'r' || k || '@remote' || (i % 997) || '.example'"
        "       FROM generate_series(1, rcpts) k), rcpts, size, verdict,"
        " CASE WHEN verdict = 'tempfail' THEN 'messages limit' END"
        f" FROM ({common}) c", *args)
    await db.execute(
        "INSERT INTO smtp_events (session_id, message_id, at, stage, verdict, reason, rule,"
        " mode, detail)"
        f" SELECT {sessions} + i, {messages} + i, at + interval '0.2 seconds', 'mail',"
        " 'tempfail', 'account ' || account || ' reached its limit of 100 messages per 1h'"
        " || ' (100 used); try again in 12 minutes', 'limit:messages/1h@account', 'enforce',"
        " '{\"size\": null}'::jsonb"
        f" FROM ({common}) c WHERE verdict = 'tempfail'", *args)


async def _inbound(db: asyncpg.Connection, shape: Shape, anchor: datetime.datetime) -> None:
    n = shape.inbound
    sessions = await _ids(db, "smtp_sessions", n)
    messages = await _ids(db, "smtp_messages", n)
    common = """
        SELECT i, $2::timestamptz - make_interval(secs => $3 * pg_temp.r(i, 12)) AS at,
          pg_temp.acct(a, $4) AS account, 'd' || (a / $4) || '.abuse.example' AS domain,
          '198.18.0.0'::inet + floor(pg_temp.r(i, 13) ^ 2 * 60000)::bigint AS ip,
          CASE WHEN pg_temp.r(i, 14) < 0.01 THEN ''
               ELSE 's' || floor(pg_temp.r(i, 15) * 200000) || '@remote'
                    || floor(pg_temp.r(i, 16) * 5000) || '.example' END AS sender,
          2000 + floor(pg_temp.r(i, 17) * 80000)::bigint AS size,
          CASE WHEN pg_temp.r(i, 18) < 0.02 THEN 'reject' ELSE 'accept' END AS verdict
        FROM (SELECT i, floor($5 * pg_temp.r(i, 11))::bigint AS a
              FROM generate_series(1, $1::bigint) i) g"""
    args = (n, anchor, shape.days * 86400.0, shape.accounts_per_domain, shape.accounts)
    await db.execute(
        "INSERT INTO smtp_sessions (id, started_at, ended_at, component, host, domain,"
        " client_ip, helo, tls, messages, recipients, bytes, verdict, reason)"
        f" SELECT {sessions} + i, at, at + interval '1 second', 'smtp-in', 'bench', domain,"
        " ip, 'mx.remote.example', pg_temp.r(i, 19) < 0.7, (verdict = 'accept')::int,"
        " (verdict = 'accept')::int, CASE WHEN verdict = 'accept' THEN size ELSE 0 END,"
        " verdict, CASE WHEN verdict = 'reject' THEN 'unknown user' END"
        f" FROM ({common}) c", *args)
    await db.execute(
        "INSERT INTO smtp_messages (id, session_id, started_at, ended_at, domain, client_ip,"
        " queue_id, message_id, sender, recipients, recipient_count, size, verdict, reason)"
        f" SELECT {messages} + i, {sessions} + i, at + interval '0.1 seconds',"
        " at + interval '0.8 seconds', domain, ip,"
        " CASE WHEN verdict = 'accept' THEN upper(to_hex(3000000000 + i)) END,"
        " '<in' || i || '@remote.example>', sender, ARRAY[account],"
        " (verdict = 'accept')::int, size, verdict,"
        " CASE WHEN verdict = 'reject' THEN 'unknown user' END"
        f" FROM ({common}) c", *args)


async def _imap(db: asyncpg.Connection, shape: Shape, anchor: datetime.datetime) -> None:
    n = shape.imap
    sessions = await _ids(db, "imap_sessions", n)
    common = f"""
        SELECT i, $2::timestamptz - make_interval(secs => $3 * pg_temp.r(i, 22)) AS at,
          pg_temp.acct(a, $4) AS account, 'd' || (a / $4) || '.abuse.example' AS domain,
          pg_temp.home(a, i) AS ip
        FROM (SELECT i, floor({shape.accounts} * pg_temp.r(i, 21) ^ 2)::bigint AS a
              FROM generate_series(1, $1::bigint) i) g"""
    args = (n, anchor, shape.days * 86400.0, shape.accounts_per_domain)
    await db.execute(
        "INSERT INTO imap_sessions (id, started_at, ended_at, host, domain, account,"
        " client_ip, bytes_in, bytes_out, commands, verdict)"
        f" SELECT {sessions} + i, at, at + make_interval(secs => 5 + 600 * pg_temp.r(i, 23)),"
        " 'bench', domain, account, ip, 200 + floor(pg_temp.r(i, 24) * 5000)::bigint,"
        " floor(pg_temp.r(i, 25) * 2000000)::bigint,"
        " 5 + floor(pg_temp.r(i, 26) ^ 3 * 300)::int, 'accept'"
        f" FROM ({common}) c", *args)
    await db.execute(
        "INSERT INTO auth_attempts (at, protocol, username, domain, client_ip, success,"
        " reason)"
        " SELECT at - interval '1 second', 'imap', account, domain, ip, true, NULL"
        f" FROM ({common}) c WHERE pg_temp.r(i, 27) < 0.9", *args)
    failures = int(n * shape.failures)
    await db.execute(
        "INSERT INTO auth_attempts (at, protocol, username, domain, client_ip, success,"
        " reason)"
        " SELECT at, CASE WHEN pg_temp.r(i, 28) < 0.7 THEN 'imap' ELSE 'submission' END,"
        " account, domain, ip, false, 'wrong password'"
        f" FROM ({common}) c WHERE i <= $5", *args, failures)


async def _plants(db: asyncpg.Connection, shape: Shape, anchor: datetime.datetime) -> None:
    hijacked, bulk, news = PLANTS["hijacked"], PLANTS["bulk"], PLANTS["newsletter"]
    # Ordinary weeks of the three planted accounts, from their usual addresses.
    for account, per_day, ip in ((hijacked, 8, "10.200.0.1"), (bulk, 4, "10.200.0.2"),
                                 (news, 2, "10.200.0.3")):
        await _send(db, account, ip, anchor - datetime.timedelta(days=shape.days),
                    anchor - datetime.timedelta(hours=12), shape.days * per_day,
                    recipients=2, prefix=f"plain-{account.partition('@')[0]}")
        await _login(db, account, ip, anchor - datetime.timedelta(days=shape.days),
                     anchor - datetime.timedelta(hours=12), shape.days * 3)
    # The hijack: a login from a never-seen address, then a spam run from it.
    start = anchor - datetime.timedelta(hours=2)
    await _login(db, hijacked, PLANTS["hijack_ip"], start, start, 1, protocol="submission")
    await _send(db, hijacked, PLANTS["hijack_ip"], start + datetime.timedelta(minutes=10),
                anchor - datetime.timedelta(minutes=10), 400, recipients=25,
                prefix="HIJ", defer_every=2)
    await db.execute(
        "INSERT INTO smtp_messages (session_id, started_at, ended_at, domain, client_ip,"
        " sender, recipients, recipient_count, size, verdict, message_id)"
        " SELECT 0, $1::timestamptz + make_interval(secs => 40 * k), NULL, 'd0.abuse.example',"
        " '192.0.2.200', '', ARRAY[$2], 1, 3000, 'accept', '<bounce' || k || '@remote>'"
        " FROM generate_series(1, 60) k", start + datetime.timedelta(minutes=30), hijacked)
    # Credential stuffing: many accounts, one source, the last attempt succeeds.
    await db.execute(
        "INSERT INTO auth_attempts (at, protocol, username, domain, client_ip, success,"
        " reason)"
        " SELECT $1::timestamptz + make_interval(secs => 10 * k),"
        " CASE WHEN k % 3 = 0 THEN 'submission' ELSE 'imap' END,"
        " 'u' || (k % 25) || '@d' || ((k / 25) % $3) || '.abuse.example',"
        " 'd' || ((k / 25) % $3) || '.abuse.example', $2::inet, false, 'wrong password'"
        " FROM generate_series(1, 300) k", anchor - datetime.timedelta(minutes=55),
        PLANTS["stuffing_ip"], max(1, min(shape.domains, 6)))
    await _login(db, PLANTS["victim"], PLANTS["stuffing_ip"],
                 anchor - datetime.timedelta(minutes=3), anchor - datetime.timedelta(minutes=3),
                 1)
    # The bulk sender: 90 an hour for 8 hours, under its 100/h limit.
    await _send(db, bulk, "10.200.0.2", anchor - datetime.timedelta(hours=8),
                anchor - datetime.timedelta(minutes=1), 720, recipients=1, prefix="BULK")
    # The newsletter: the same spike every week.
    week = 0
    while week * 7 <= shape.days:
        spike = anchor - datetime.timedelta(days=7 * week, hours=3)
        size = 1500 + (week * 37) % 90 - 45
        await _send(db, news, "10.200.0.3", spike, spike + datetime.timedelta(hours=1),
                    size, recipients=1, prefix=f"NEWS{week}-")
        week += 1


async def _send(db: asyncpg.Connection, account: str, ip: str, start: datetime.datetime,
                end: datetime.datetime, count: int, *, recipients: int, prefix: str,
                defer_every: int = 0) -> None:
    """`count` submission sessions of one message each, evenly spread over [start, end)."""
    domain = account.partition("@")[2]
    sessions = await _ids(db, "smtp_sessions", count)
    messages = await _ids(db, "smtp_messages", count)
    step = (end - start).total_seconds() / max(count, 1)
    args = (count, start, step, account, domain, ip, recipients, defer_every, prefix)
    verdict = "CASE WHEN $8 > 0 AND k % $8 = 0 THEN 'tempfail' ELSE 'accept' END"
    await db.execute(
        "INSERT INTO smtp_sessions (id, started_at, ended_at, component, host, domain,"
        " account, client_ip, helo, tls, messages, recipients, bytes, verdict)"
        f" SELECT {sessions} + k, $2::timestamptz + make_interval(secs => $3 * k),"
        " $2::timestamptz + make_interval(secs => $3 * k + 1), 'postfix', 'bench', $5, $4,"
        f" $6::inet, 'client.example', true, ({verdict} = 'accept')::int,"
        f" CASE WHEN {verdict} = 'accept' THEN $7 ELSE 0 END,"
        f" CASE WHEN {verdict} = 'accept' THEN 4000 ELSE 0 END, {verdict}"
        " FROM generate_series(1, $1::bigint) k", *args[:8])
    await db.execute(
        "INSERT INTO smtp_messages (id, session_id, started_at, ended_at, domain, account,"
        " client_ip, queue_id, message_id, sender, recipients, recipient_count, size, verdict,"
        " reason)"
        f" SELECT {messages} + k, {sessions} + k,"
        " $2::timestamptz + make_interval(secs => $3 * k + 0.1),"
        " $2::timestamptz + make_interval(secs => $3 * k + 0.5), $5, $4, $6::inet,"
        " upper($9) || lpad(k::text, 4, '0'), '<' || lower($9) || k || '@' || $5 || '>', $4,"
        " ARRAY(SELECT 'x' || j || '-' || k || '@remote.example'"
        "       FROM generate_series(1, $7) j), $7, 4000, "
        f" {verdict}, CASE WHEN {verdict} = 'tempfail' THEN 'limit' END"
        " FROM generate_series(1, $1::bigint) k", *args)
    if defer_every:
        await db.execute(
            "INSERT INTO smtp_events (session_id, message_id, at, stage, verdict, reason,"
            " rule, mode, detail)"
            f" SELECT {sessions} + k, {messages} + k,"
            " $2::timestamptz + make_interval(secs => $3 * k + 0.5), 'eom', 'tempfail',"
            " 'account ' || $4 || ' reached its limit of 100 messages per 1h (100 used);"
            " try again in 9 minutes', 'limit:messages/1h@account', 'enforce',"
            " jsonb_build_object('size', 4000, 'queue_id', upper($5) || lpad(k::text, 4, '0'))"
            " FROM generate_series(1, $1::bigint) k WHERE k % $6 = 0",
            count, start, step, account, prefix, defer_every)


async def _login(db: asyncpg.Connection, account: str, ip: str, start: datetime.datetime,
                 end: datetime.datetime, count: int, *, protocol: str = "imap") -> None:
    domain = account.partition("@")[2]
    step = (end - start).total_seconds() / max(count, 1)
    await db.execute(
        "INSERT INTO auth_attempts (at, protocol, username, domain, client_ip, success)"
        " SELECT $1::timestamptz + make_interval(secs => $2 * k), $6, $3, $4, $5::inet, true"
        " FROM generate_series(0, $7 - 1) k", start, step, account, domain, ip, protocol, count)
    await db.execute(
        "INSERT INTO imap_sessions (started_at, ended_at, host, domain, account, client_ip,"
        " commands, verdict)"
        " SELECT $1::timestamptz + make_interval(secs => $2 * k + 1),"
        " $1::timestamptz + make_interval(secs => $2 * k + 60), 'bench', $4, $3, $5::inet,"
        " 12, 'accept' FROM generate_series(0, $6 - 1) k",
        start, step, account, domain, ip, count)


async def generate(db: asyncpg.Connection, shape: Shape,
                   anchor: datetime.datetime | None = None, *, report: bool = False
                   ) -> dict[str, int]:
    """Fill the CMDB and the session tables; returns the rows per session table."""
    anchor = anchor or datetime.datetime.now(datetime.UTC)
    await db.execute(RANDOM)
    # Day partitions for the whole history, so no row lands in the DEFAULT partition.
    await db.execute("SELECT mailfc_ensure_partitions($1, 1)", shape.days + 1)
    steps = [("cmdb", _cmdb(db, shape)), ("submission", _submissions(db, shape, anchor)),
             ("inbound", _inbound(db, shape, anchor)), ("imap", _imap(db, shape, anchor))]
    if shape.plants:
        steps.append(("plants", _plants(db, shape, anchor)))
    for name, step in steps:
        started = time.perf_counter()
        await step
        if report:
            print(f"  {name}: {time.perf_counter() - started:.1f} s", flush=True)
    counts = {}
    for table in SESSION_TABLES:
        counts[table] = int(await db.fetchval(f"SELECT count(*) FROM {table}"))
    return counts


def _mailfc(config: Path, *args: str) -> None:
    subprocess.run([sys.executable, "-m", "mailfc", *args], check=True,
                   env={**os.environ, "MAILFC_CONFIG": str(config)}, stdout=subprocess.DEVNULL)


def make_state(state_dir: str | None) -> tuple[Path, Path]:
    """A state directory with its own embedded cluster (schema migrated)."""
    state = Path(state_dir or tempfile.mkdtemp(prefix="mailfc-abuse-bench-", dir="/tmp"))
    state.mkdir(parents=True, exist_ok=True)
    state.chmod(0o711)
    config = state / "mailfc.toml"
    config.write_text(f'[paths]\nstate_dir = "{state}"\n\n[database]\ncommand_timeout_s = 3600.0\n')
    _mailfc(config, "db", "migrate")
    return state, config


def drop_state(state: Path, config: Path) -> None:
    subprocess.run([sys.executable, "-m", "mailfc", "db", "stop"],
                   env={**os.environ, "MAILFC_CONFIG": str(config)},
                   stdout=subprocess.DEVNULL, check=False)
    shutil.rmtree(state, ignore_errors=True)


async def fill(config_path: Path, shape: Shape) -> dict[str, int]:
    from mailfc.config import load_config
    from mailfc.db import connect

    pool = await connect(load_config(str(config_path)))
    try:
        async with pool.acquire() as db:
            counts = await generate(db, shape, report=True)
            started = time.perf_counter()
            await db.execute("VACUUM ANALYZE")
            print(f"  vacuum analyze: {time.perf_counter() - started:.1f} s", flush=True)
            return counts
    finally:
        await pool.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--state-dir", default=None)
    parser.add_argument("--keep", action="store_true",
                        help="Keep the state directory and its cluster running.")
    args = parser.parse_args()
    state, config = make_state(args.state_dir)
    try:
        started = time.perf_counter()
        counts = asyncio.run(fill(config, Shape.for_rows(args.rows, args.days)))
        total = sum(counts.values())
        print(f"generated {total:,} rows in {time.perf_counter() - started:.0f} s: "
              + ", ".join(f"{k} {v:,}" for k, v in counts.items()))
        if args.keep:
            print(f"kept: MAILFC_CONFIG={config}")
    finally:
        if not args.keep:
            drop_state(state, config)


if __name__ == "__main__":
    main()
