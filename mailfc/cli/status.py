"""`mailfc status`: the whole platform of this machine on one screen, problems first.

    mailfc status [--json] [--max-queue-age MINUTES] [--events N]

SECTIONS
    problems     anything unhealthy, first: a supervised process missing, `mailfc up`
                 not running, the database unreachable, a spool whose oldest message
                 waits longer than --max-queue-age (default 30 minutes), a recording
                 process that dropped or dead-lettered rows or reports an error
    processes    `mailfc up` (the supervisor) and its children (the groups of
                 mailfc.controller.supervisor), with pid, uptime and restarts
    database     reachable, size, and for the embedded cluster its postmaster
    queues       SMTP-In's and SMTP-Out's spools: messages, the oldest one's age,
                 quarantined messages (as `mailfc queue list` reads them)
    recorder     each recording process's pending rows and failures, and how long
                 since it last reported (`mailfc sessions stats`)
    containers   running containers by service and state (container_instances)
    events       the last controller decisions (`mailfc events`)

FINDING THE PROCESSES.  The supervisor is the `python -m mailfc ... up` process with
no --services, its children the `up --services ...` processes it started (their
environment names the group: MAILFC_PROCESS).  They are found under /proc by their
command line; a process belongs to this platform when the configuration it was
started with (--config, else its MAILFC_CONFIG) has this configuration's state
directory.  Start times come from /proc/<pid>/stat.  Restarts are the "restart"
events the supervisor records since it started, by process.

EXIT STATUS.  0 when nothing is unhealthy, 1 otherwise (also with --json), so a
monitoring check can run `mailfc status --json`.  status never starts the embedded
PostgreSQL: a stopped cluster is a problem to report, not to hide.
"""

from __future__ import annotations

import datetime
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import click
from rich.table import Table

from mailfc import eventloop
from mailfc.cli.common import console, emit, json_option, pass_config, print_json
from mailfc.config import CONFIG_ENV, Config, load_config
from mailfc.controller.supervisor import GROUPS
from mailfc.db.pool import database_dsn, embedded_cluster
from mailfc.errors import MailfcError
from mailfc.gateways.spool import SpoolFiles, admin, spool_directory

SPOOLS = (("in", "smtp-in"), ("out", "smtp-out"))
RECORDER_STALE_S = 60.0  # recorders report every 10 s: older rows are of gone processes
DB_TIMEOUT_S = 5.0


# -- processes, from /proc -------------------------------------------------------------


@dataclass(frozen=True)
class Process:
    pid: int
    ppid: int
    name: str                  # "supervisor", a group name, or the --services list
    services: tuple[str, ...]
    started_at: float          # seconds since the epoch


def _boot_time() -> float:
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("btime "):
            return float(line.split()[1])
    return 0.0


def _stat(pid: int) -> tuple[int, float]:
    """(ppid, start time in seconds since the epoch) of `pid` (proc(5) stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return int(fields[1]), _boot_time() + int(fields[19]) / ticks


def _mailfc_args(argv: list[str]) -> list[str] | None:
    """The arguments after `python -m mailfc` (or the `mailfc` script); None for
    another program."""
    for index, arg in enumerate(argv[:-1]):
        if arg == "-m" and argv[index + 1] == "mailfc":
            return argv[index + 2:]
    if argv and Path(argv[0]).name == "mailfc":
        return argv[1:]
    if len(argv) > 1 and Path(argv[1]).name == "mailfc":  # python /usr/bin/mailfc
        return argv[2:]
    return None


def _command(args: list[str]) -> str | None:
    """The mailfc command in `args` (past the global options)."""
    index = 0
    while index < len(args):
        arg = args[index]
        if arg == "--config":
            index += 2
        elif arg.startswith("-"):
            index += 1
        else:
            return arg
    return None


def _option(args: list[str], name: str) -> str | None:
    for index, arg in enumerate(args):
        if arg == name and index + 1 < len(args):
            return args[index + 1]
        if arg.startswith(name + "="):
            return arg.partition("=")[2]
    return None


def _environ(pid: int) -> dict[str, str]:
    items = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode("utf-8", "replace").partition("=")[::2]
                for item in items if b"=" in item)


def _state_dir_of(pid: int, args: list[str], cache: dict[str, Path | None]) -> Path | None:
    """The state directory of the configuration process `pid` was started with."""
    config_path = _option(args[:args.index("up")], "--config")  # a global option
    if config_path is None:
        config_path = _environ(pid).get(CONFIG_ENV) or ""
    if config_path and not config_path.startswith("/"):
        config_path = os.path.join(os.readlink(f"/proc/{pid}/cwd"), config_path)
    if config_path not in cache:
        try:
            loaded = load_config(config_path) if config_path else Config()
            cache[config_path] = loaded.state_dir.resolve()
        except (MailfcError, OSError):
            cache[config_path] = None
    return cache[config_path]


def platform_processes(config: Config) -> list[Process]:
    """Every `mailfc up` process of this configuration's state directory."""
    mine = config.state_dir.resolve()
    cache: dict[str, Path | None] = {}
    found: list[Process] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            argv = [a.decode("utf-8", "replace")
                    for a in (entry / "cmdline").read_bytes().split(b"\0") if a]
            args = _mailfc_args(argv)
            if args is None or _command(args) != "up":
                continue
            if _state_dir_of(pid, args, cache) != mine:
                continue
            ppid, started_at = _stat(pid)
            services_arg = _option(args, "--services")
            services: tuple[str, ...]
            if services_arg is None:
                name, services = "supervisor", ()
            else:
                services = tuple(s for s in services_arg.split(",") if s)
                name = _environ(pid).get("MAILFC_PROCESS") or services_arg
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile, or not ours to read
        found.append(Process(pid, ppid, name, services, started_at))
    return sorted(found, key=lambda p: p.started_at)


def running_platform(config: Config) -> Process | None:
    """The supervisor of this configuration's `mailfc up`, if one runs."""
    return next((p for p in platform_processes(config) if p.name == "supervisor"), None)


# -- the sections ------------------------------------------------------------------------


def _queues(config: Config, max_age_s: float, now: float) -> tuple[list[dict[str, Any]],
                                                                  list[str]]:
    rows: list[dict[str, Any]] = []
    problems: list[str] = []
    for key, name in SPOOLS:
        files = SpoolFiles(spool_directory(config.state_dir, config.spool.directory, name))
        try:
            queued = admin.list_queue(files)
            quarantined = (len(admin.list_quarantine(files))
                           if files.quarantine_dir.exists() else 0)
        except OSError as error:
            problems.append(f"spool {name} ({files.directory}) cannot be read: {error}")
            continue
        stamps = [row["received_at"].timestamp() for row in queued if row["received_at"]]
        oldest = round(now - min(stamps), 1) if stamps else None
        rows.append({"spool": key, "service": name, "messages": len(queued),
                     "oldest_age_s": oldest, "quarantined": quarantined,
                     "directory": str(files.directory)})
        if oldest is not None and oldest > max_age_s:
            problems.append(f"spool {name}: the oldest of {len(queued)} message(s) waits for"
                            f" {oldest / 60:.0f} min (more than {max_age_s / 60:g}):"
                            " see mailfc queue list")
        if quarantined:
            problems.append(f"spool {name}: {quarantined} quarantined message(s):"
                            " see mailfc queue quarantine")
    return rows, problems


async def _from_database(config: Config, since: float | None,
                         events_limit: int) -> dict[str, Any]:
    """The database's sections; {"database": {"reachable": False, ...}} if it is not."""
    dsn = database_dsn(config, start=False)
    try:
        connection = await asyncpg.connect(dsn, timeout=DB_TIMEOUT_S)
    except (OSError, TimeoutError, asyncpg.PostgresError) as error:
        return {"database": {"reachable": False, "error": str(error) or type(error).__name__}}
    try:
        size = await connection.fetchval("SELECT pg_database_size(current_database())")
        tables = {row["name"] for row in await connection.fetch(
            "SELECT tablename AS name FROM pg_tables WHERE schemaname = 'public'")}
        result: dict[str, Any] = {"database": {"reachable": True, "size_bytes": size}}
        if "recorder_stats" in tables:
            result["recorder"] = [dict(row) for row in await connection.fetch(
                "SELECT holder, component, updated_at, pending, written, failed_flushes,"
                " dropped, dead_lettered, last_error,"
                " extract(epoch FROM now() - updated_at)::float8 AS since_report_s"
                " FROM recorder_stats ORDER BY component, holder")]
        if "container_instances" in tables:
            result["containers"] = [dict(row) for row in await connection.fetch(
                "SELECT service, state, count(*)::int AS containers,"
                " count(DISTINCT domain_id)::int AS domains FROM container_instances"
                " WHERE state <> 'stopped' GROUP BY service, state ORDER BY service, state")]
        if "events" in tables:
            result["events"] = [dict(row) for row in reversed(await connection.fetch(
                "SELECT id, at, kind, domain, service, reason FROM events"
                " ORDER BY id DESC LIMIT $1", events_limit))]
            if since is not None:
                # The supervisor's "restart" events (mailfc.controller.supervisor), by
                # process, since this `mailfc up` started.
                result["restarts"] = {row["process"]: row["restarts"] for row in
                                      await connection.fetch(
                    "SELECT coalesce(detail->>'process', detail->>'group', service, '?')"
                    " AS process, count(*)::int AS restarts FROM events"
                    " WHERE kind = 'restart' AND at >= to_timestamp($1)"
                    " GROUP BY 1", since)}
        return result
    finally:
        await connection.close()


def collect(config: Config, max_age_s: float, events_limit: int) -> dict[str, Any]:
    """Everything `mailfc status` shows, with "problems" (unhealthy first) and
    "healthy"."""
    now = time.time()
    problems: list[str] = []
    processes = platform_processes(config)
    supervisor = next((p for p in processes if p.name == "supervisor"), None)
    if supervisor is None:
        problems.append(f"mailfc up is not running for {config.state_dir}"
                        " (start it: mailfc up, or systemctl start mailfc)")
    else:
        present = {p.name for p in processes if p.ppid == supervisor.pid}
        for name, services in GROUPS:
            if name not in present:
                problems.append(f"process {name} ({', '.join(services)}) is missing:"
                                " the supervisor starts it again; see its log")
    database = eventloop.run(_from_database(
        config, supervisor.started_at if supervisor else None, events_limit))
    db = database["database"]
    if config.uses_embedded_database:
        db["embedded"] = embedded_cluster(config).postmaster_state()
    if not db["reachable"]:
        if db.get("embedded") in ("none", "gone", "zombie"):
            problems.append(f"the embedded PostgreSQL is not running (postmaster:"
                            f" {db['embedded']}): mailfc up starts and watches it")
        else:
            problems.append(f"the database is unreachable: {db.get('error')}")
    restarts: dict[str, int] = database.get("restarts", {})
    process_rows = [{
        "name": p.name, "pid": p.pid, "services": ",".join(p.services),
        "started_at": datetime.datetime.fromtimestamp(p.started_at, datetime.UTC),
        "uptime_s": round(now - p.started_at, 1),
        "restarts": restarts.get(p.name, 0),
    } for p in processes]
    queues, queue_problems = _queues(config, max_age_s, now)
    problems += queue_problems
    recorder = database.get("recorder", [])
    for row in recorder:
        live = row["since_report_s"] is not None and row["since_report_s"] <= RECORDER_STALE_S
        row["live"] = live
        if live and (row["dropped"] or row["dead_lettered"] or row["last_error"]):
            problems.append(
                f"recorder {row['holder']} ({row['component']}): {row['dropped']} dropped,"
                f" {row['dead_lettered']} dead-lettered, last error:"
                f" {row['last_error'] or '-'}: see mailfc sessions stats")
    return {
        "healthy": not problems, "problems": problems, "processes": process_rows,
        "database": db, "queues": queues, "recorder": recorder,
        "containers": database.get("containers", []), "events": database.get("events", []),
    }


# -- the command ------------------------------------------------------------------------


def _show(status: dict[str, Any]) -> None:
    if status["problems"]:
        table = Table(title="problems", title_style="bold red", show_header=False)
        table.add_column(style="red")
        for problem in status["problems"]:
            table.add_row(problem)
        console.print(table)
    else:
        console.print("[bold green]healthy[/]: every process runs, the database answers,"
                      " no queue waits too long")
    emit(status["processes"], as_json=False, title="processes",
         columns=("name", "pid", "services", "uptime_s", "restarts"),
         empty="no mailfc up process of this configuration runs")
    emit(status["database"], as_json=False, title="database")
    emit(status["queues"], as_json=False, title="queues",
         columns=("spool", "messages", "oldest_age_s", "quarantined"))
    emit(status["recorder"], as_json=False, title="recorder",
         columns=("holder", "component", "live", "since_report_s", "pending",
                  "failed_flushes", "dropped", "dead_lettered"),
         empty="recorder: no recording process has reported")
    emit(status["containers"], as_json=False, title="containers",
         columns=("service", "state", "containers", "domains"),
         empty="containers: none running")
    emit(status["events"], as_json=False, title="last decisions",
         columns=("at", "kind", "domain", "service", "reason"), empty="events: none")


@click.command("status")
@json_option
@click.option("--max-queue-age", "max_age_min", type=click.FloatRange(min=0, min_open=True),
              default=30.0, show_default=True,
              help="Minutes a queued message may wait before its spool counts as unhealthy.")
@click.option("--events", "events_limit", type=click.IntRange(0, 1000), default=10,
              show_default=True, help="How many of the last controller decisions to show.")
@pass_config
def group(config: Config, as_json: bool, max_age_min: float, events_limit: int) -> None:
    """Processes, database, queues, recorder, containers and decisions; problems first.

    Exit status 1 when something is unhealthy."""
    status = collect(config, max_age_min * 60, events_limit)
    if as_json:
        print_json(status)
    else:
        _show(status)
    sys.stdout.flush()
    if not status["healthy"]:
        raise click.exceptions.Exit(1)
