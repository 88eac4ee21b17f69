"""`mailfc sessions list|show|stats`: who did what, from the session records.

    mailfc sessions list --domain example.org --since 1h --verdict tempfail
    mailfc sessions list --account bob@example.org --ip 192.0.2.0/24 --json
    mailfc sessions show 1234            # the session, its messages and decisions
    mailfc sessions list --protocol imap # IMAP sessions (recorded by the hook server)
    mailfc sessions stats                # rows written / dropped / set aside per recording process

--since/--until take a duration back from now (90s, 15m, 1h, 7d) or an ISO time
(2024-05-01T12:00, taken as UTC without a zone).
"""

from __future__ import annotations

import datetime

import click

from mailfc.cli.common import emit, json_option, pass_config, print_json, run_db
from mailfc.config import Config
from mailfc.durations import parse_duration
from mailfc.errors import InvalidInput
from mailfc.policy import sessions
from mailfc.policy.sessions import PROTOCOLS, SessionFilter

SMTP_COLUMNS = ("id", "started_at", "ended_at", "domain", "account", "client_ip", "helo",
                "messages", "recipients", "bytes", "verdict", "reason")
IMAP_COLUMNS = ("id", "started_at", "ended_at", "domain", "account", "client_ip", "commands",
                "bytes_in", "bytes_out", "verdict", "reason")


def parse_time(text: str | None, option: str) -> datetime.datetime | None:
    if text is None:
        return None
    try:
        moment = datetime.datetime.fromisoformat(text)
    except ValueError:
        try:
            return datetime.datetime.now(datetime.UTC) - datetime.timedelta(
                seconds=parse_duration(text))
        except InvalidInput:
            raise InvalidInput(f"{option} {text!r}: give a duration back from now (e.g. 1h)"
                               " or an ISO time (e.g. 2024-05-01T12:00)") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=datetime.UTC)


protocol_option = click.option("--protocol", type=click.Choice(PROTOCOLS), default="smtp",
                               show_default=True)


@click.group("sessions")
def group() -> None:
    """Recorded SMTP and IMAP sessions."""


@group.command("list")
@protocol_option
@click.option("--domain", default=None)
@click.option("--account", default=None, help="user@domain")
@click.option("--ip", "client_ip", default=None, help="Client address or network.")
@click.option("--verdict", type=click.Choice(["accept", "tempfail", "reject", "discard"]),
              default=None)
@click.option("--since", default=None, help="e.g. 1h, or 2024-05-01T12:00")
@click.option("--until", default=None)
@click.option("--limit", type=click.IntRange(1, 100_000), default=50, show_default=True)
@json_option
@pass_config
def list_cmd(config: Config, protocol: str, domain: str | None, account: str | None,
             client_ip: str | None, verdict: str | None, since: str | None,
             until: str | None, limit: int, as_json: bool) -> None:
    """List sessions, newest first."""
    where = SessionFilter(domain, account, client_ip, verdict, parse_time(since, "--since"),
                          parse_time(until, "--until"), limit)
    where.where()      # bad filters fail before the database is started
    rows = run_db(config, lambda db: sessions.list_sessions(db, protocol, where))
    emit(rows, as_json=as_json, columns=SMTP_COLUMNS if protocol == "smtp" else IMAP_COLUMNS,
         empty="no sessions match")


@group.command("show")
@click.argument("session_id", type=int)
@protocol_option
@json_option
@pass_config
def show(config: Config, session_id: int, protocol: str, as_json: bool) -> None:
    """One session with its messages and decisions (or IMAP commands)."""
    row = run_db(config, lambda db: sessions.show_session(db, protocol, session_id))
    if as_json:
        print_json(row)
        return
    details = {k: row.pop(k) for k in ("messages_detail", "events", "commands_detail")
               if k in row}
    emit(row, as_json=False, title=f"{protocol} session {session_id}")
    if "messages_detail" in details:
        emit(details["messages_detail"], as_json=False, title="messages", columns=(
            "id", "started_at", "ended_at", "queue_id", "sender", "recipient_count", "size",
            "message_id", "verdict", "reason"), empty="no messages")
        emit(details["events"], as_json=False, title="decisions", columns=(
            "at", "stage", "message_id", "verdict", "mode", "rule", "reason"),
            empty="no decisions other than accept")
    if "commands_detail" in details:
        emit(details["commands_detail"], as_json=False, title="commands", columns=(
            "started_at", "tag", "name", "duration_ms", "result", "verdict", "reason"),
            empty="no commands")


@group.command("stats")
@json_option
@pass_config
def stats(config: Config, as_json: bool) -> None:
    """What each recording process wrote, and what it could not write.

    sanitized: rows stored with values made storable (NUL, text that is not UTF-8);
    dead_lettered: rows PostgreSQL refused, set aside in the dead_letter file."""
    rows = run_db(config, sessions.recorder_stats)
    emit(rows, as_json=as_json, columns=("holder", "component", "updated_at", "written",
                                         "pending", "failed_flushes", "dropped", "sanitized",
                                         "dead_lettered", "dead_letter", "last_error"),
         empty="no recording process has reported yet")
