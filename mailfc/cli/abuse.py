"""`mailfc abuse`: the abuse desk's view of the session records, and its actions.

    mailfc abuse top --by account --metric messages --since 1h [--domain example.org]
    mailfc abuse top --by ip --metric auth_failures --between 2024-05-01 2024-05-02
    mailfc abuse account bob@example.org --since 7d [--plot bob.png]
    mailfc abuse anomalies [--window 1d] [--baseline 14d]
    mailfc abuse why 4XyZ1abcD | "<abc@example.org>" | 1234 | imap:77
    mailfc abuse block bob@example.org --reason "spam run, ticket 4711" [--for 1d]
    mailfc abuse block 192.0.2.0/24 | example.org | --kind sender_domain spam.example
    mailfc abuse unblock bob@example.org
    mailfc abuse blocks
    mailfc abuse bans            (login bans; add and remove them with `mailfc ban`)

Every listing takes --json or --csv; top and account take --plot FILE.png.  The
work is done by mailfc.analysis (one module per command); this file parses options
and renders.  See `mailfc limit simulate` for replaying a proposed limit.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import click

from mailfc.analysis import account as account_mod
from mailfc.analysis import anomalies as anomalies_mod
from mailfc.analysis import blocks as blocks_mod
from mailfc.analysis import explain, plot, timerange
from mailfc.analysis import top as top_mod
from mailfc.analysis.targets import account_address, require_domain
from mailfc.cli.common import pass_config, print_json, run_db, say
from mailfc.cli.tabular import output_options, render, table
from mailfc.config import Config
from mailfc.durations import format_duration

since_option = click.option("--since", default=None,
                            help="Start: a duration back from now (1h, 7d) or an ISO time.")
between_option = click.option("--between", nargs=2, default=None, metavar="START END",
                              help="An explicit range: two ISO times (or durations back).")


@click.group("abuse")
def group() -> None:
    """Who sends what, from where, why it was refused; block and unblock."""


@group.command("top")
@click.option("--by", type=click.Choice(top_mod.SUBJECTS), default="account",
              show_default=True)
@click.option("--metric", type=click.Choice(list(top_mod.METRICS)), default="messages",
              show_default=True)
@since_option
@between_option
@click.option("--domain", default=None, help="Only this domain (default: platform-wide).")
@click.option("--limit", type=click.IntRange(1, 10_000), default=20, show_default=True)
@click.option("--plot", "plot_path", default=None, metavar="FILE.png",
              help="Also draw the top subjects' time series.")
@output_options
@pass_config
def top_cmd(config: Config, by: str, metric: str, since: str | None,
            between: tuple[str, str] | None, domain: str | None, limit: int,
            plot_path: str | None, fmt: str) -> None:
    """Accounts, domains, client IPs or senders ranked by a metric (default: last hour)."""
    top_mod.validate(by, metric)
    span = timerange.resolve(since, between, default="1h")
    target = plot.check_path(plot_path) if plot_path else None
    bucket = timerange.bucket_seconds(span)

    async def action(db: Any) -> tuple[list[dict[str, Any]], Any]:
        name = await require_domain(db, domain) if domain else None
        rows = await top_mod.top(db, by=by, metric=metric, span=span, domain=name,
                                 limit=limit)
        series = None
        if target is not None:
            series = await top_mod.top_series(
                db, by=by, metric=metric, span=span, domain=name, bucket_s=bucket,
                subjects=[r["subject"] for r in rows[:8]])
        return rows, series

    rows, series = run_db(config, action)
    scope = f" in {domain}" if domain else ""
    render(rows, top_mod.columns(metric), fmt=fmt,
           title=f"top {by} by {metric}{scope}, {span.describe()}")
    if target is not None and series is not None:
        plot.draw(target, series, title=f"{metric} per {by}{scope}", ylabel=metric,
                  bucket_s=bucket, start=span.start, end=span.end)
        if fmt == "table":
            say(f"plot written to {target}")


@group.command("account")
@click.argument("address")
@since_option
@between_option
@click.option("--limit", type=click.IntRange(1, 100_000), default=200, show_default=True,
              help="Timeline entries, newest first.")
@click.option("--plot", "plot_path", default=None, metavar="FILE.png",
              help="Also draw the account's time series.")
@output_options
@pass_config
def account_cmd(config: Config, address: str, since: str | None,
                between: tuple[str, str] | None, limit: int, plot_path: str | None,
                fmt: str) -> None:
    """One account's timeline, IPs (new ones marked), limits hit, counters (default: 7d).

    --csv prints the timeline only; --json prints everything.
    """
    account = account_address(address)
    span = timerange.resolve(since, between, default="7d")
    target = plot.check_path(plot_path) if plot_path else None
    bucket = timerange.bucket_seconds(span)

    async def action(db: Any) -> tuple[dict[str, Any], Any]:
        report = await account_mod.account_report(db, account, span, limit)
        series = (await account_mod.account_series(db, account, span, bucket)
                  if target is not None else None)
        return report, series

    report, series = run_db(config, action)
    timeline_columns = ("at", "what", "session", "ip", "detail", "verdict", "reason")
    if fmt == "json":
        print_json(report)
    elif fmt == "csv":
        render(report["timeline"], timeline_columns, fmt="csv")
    else:
        _account_tables(report, span, timeline_columns)
    if target is not None and series is not None:
        plot.draw(target, series, title=f"{account}", ylabel="per bucket",
                  bucket_s=bucket, start=span.start, end=span.end)
        if fmt == "table":
            say(f"plot written to {target}")


def _account_tables(report: dict[str, Any], span: timerange.TimeRange,
                    timeline_columns: tuple[str, ...]) -> None:
    summary = report["summary"]
    table([{"field": k, "value": v} for k, v in
           {"account": report["account"], "state": report["state"], **summary}.items()],
          ("field", "value"), title=f"{report['account']}, {span.describe()}")
    for row in report["ips"]:
        row["new"] = "NEW" if row["new"] else ""
    table(report["ips"], ("ip", "new", "first_seen", "last_seen", "smtp_sessions",
                          "imap_sessions", "logins", "failures"), title="client addresses")
    for row in report["limits"]:
        row["window"] = format_duration(row["window_s"]) if row["window_s"] else None
    table(report["limits"], ("kind", "scope", "value", "window", "mode", "used_now"),
          title="limits that apply now")
    table(report["hits"], ("rule", "mode", "verdict", "times", "first_at", "last_at",
                           "last_reason"), title="limits and blocks hit")
    if report["blocks"]:
        table(report["blocks"], ("kind", "value", "reason", "created_at", "expires_at"),
              title="BLOCKED")
    table(report["timeline"], timeline_columns, title="timeline (newest first)")


@group.command("anomalies")
@click.option("--window", "window", default="1d", show_default=True,
              help="The recent window examined.")
@click.option("--baseline", default="14d", show_default=True,
              help="The history before it that each account is compared with.")
@click.option("--domain", default=None, help="Only this domain's accounts.")
@click.option("--min-messages", type=click.IntRange(1), default=20, show_default=True,
              help="Volume below which nothing is flagged.")
@click.option("--limit", type=click.IntRange(1, 10_000), default=20, show_default=True)
@output_options
@pass_config
def anomalies_cmd(config: Config, window: str, baseline: str, domain: str | None,
                  min_messages: int, limit: int, fmt: str) -> None:
    """Ranked suspects, each with its evidence (robust baselines, not fixed thresholds)."""
    options = anomalies_mod.Options(
        window_s=timerange.window(window), baseline_s=timerange.window(baseline, "--baseline"),
        min_messages=min_messages)
    options.check()

    async def action(db: Any) -> list[dict[str, Any]]:
        name = await require_domain(db, domain) if domain else None
        return await anomalies_mod.anomalies(db, dataclasses.replace(options, domain=name),
                                             limit)

    rows = run_db(config, action)
    if fmt == "json":
        print_json(rows)
        return
    render(rows, ("rank", "score", "kind", "subject", "rules", "evidence"), fmt=fmt,
           title=f"suspects of the last {window} (baseline {baseline})")


@group.command("why")
@click.argument("ident", metavar="SESSION|QUEUE-ID|MESSAGE-ID")
@output_options
@pass_config
def why_cmd(config: Config, ident: str, fmt: str) -> None:
    """Every decision taken on a mail or session, and the rule behind it, in words."""
    explain.identify(ident)
    result = run_db(config, lambda db: explain.why(db, ident))
    if fmt == "json":
        print_json(result)
    elif fmt == "csv":
        decisions = [d for a in result["attempts"] for d in a["decisions"]]
        render(decisions + list(result["session_decisions"]),
               ("at", "stage", "verdict", "mode", "rule", "reason", "now"), fmt="csv")
    else:
        for line in result["story"]:
            click.echo(line)


@group.command("block")
@click.argument("target")
@click.option("--kind", type=click.Choice(blocks_mod.KINDS), default=None,
              help="Default: from TARGET (address: account, IP/network: ip, else domain).")
@click.option("--reason", default="", help="Told to the client and kept in the records.")
@click.option("--for", "duration", default=None, help="Lift automatically after, e.g. 1d.")
@output_options
@pass_config
def block_cmd(config: Config, target: str, kind: str | None, reason: str,
              duration: str | None, fmt: str) -> None:
    """Refuse TARGET (550 5.7.1) from its next transaction on, on every host."""
    expires_s = timerange.window(duration, "--for") if duration else None
    row = run_db(config, lambda db: blocks_mod.block(db, target, kind=kind, reason=reason,
                                                     expires_s=expires_s))
    if fmt != "table":
        render([row], ("kind", "value", "reason", "created_at", "expires_at"), fmt=fmt)
        return
    until = f" until {row['expires_at']:%Y-%m-%d %H:%M UTC}" if row["expires_at"] else ""
    say(f"blocked {row['kind']} {row['value']}{until}")


@group.command("unblock")
@click.argument("target")
@click.option("--kind", type=click.Choice(blocks_mod.KINDS), default=None)
@click.option("--reason", default="", help="Kept in the admin event log.")
@output_options
@pass_config
def unblock_cmd(config: Config, target: str, kind: str | None, reason: str, fmt: str) -> None:
    """Lift a block; the next transaction passes."""
    row = run_db(config, lambda db: blocks_mod.unblock(db, target, kind=kind, reason=reason))
    if fmt != "table":
        render([row], ("kind", "value", "reason", "created_at", "expires_at"), fmt=fmt)
        return
    say(f"unblocked {row['kind']} {row['value']}")


@group.command("blocks")
@output_options
@pass_config
def blocks_cmd(config: Config, fmt: str) -> None:
    """Admin blocks, newest first (expired ones marked inactive)."""
    rows = run_db(config, blocks_mod.list_blocks)
    render(rows, ("kind", "value", "reason", "created_at", "expires_at", "active"), fmt=fmt,
           title="admin blocks")


@group.command("bans")
@output_options
@pass_config
def bans_cmd(config: Config, fmt: str) -> None:
    """Active login bans (IMAP, submission): the routers' own and admins'; see mailfc ban."""
    from mailfc.db import bans as bans_mod  # this command's alone

    rows = run_db(config, bans_mod.list_bans)
    render(rows, ("network", "reason", "set_by", "created_at", "expires_at"), fmt=fmt,
           title="login bans")
