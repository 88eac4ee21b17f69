"""`mailfc limit set|list|unset|simulate`.

    mailfc limit set example.org --per-account concurrent_sends 3
    mailfc limit set bob@example.org messages 100 --window 1h --mode shadow
    mailfc limit simulate example.org messages 100 --window 1h --per-account --since 7d
"""

from __future__ import annotations

import click

from mailfc.analysis import simulate as simulate_mod
from mailfc.analysis import timerange
from mailfc.cli.common import emit, json_option, pass_config, print_json, run_db, say
from mailfc.cli.tabular import output_options, render
from mailfc.config import Config
from mailfc.db import limits
from mailfc.durations import format_duration, parse_duration
from mailfc.errors import InvalidInput
from mailfc.policy.kinds import KINDS, MODES


@click.group("limit")
def group() -> None:
    """Flow limits per domain and per account."""


@group.command("set", help="Set a limit on a DOMAIN or an ACCOUNT address.\n\nKIND is one of: "
               + ", ".join(KINDS))
@click.argument("target")
@click.argument("kind", metavar="KIND")
@click.argument("value", type=click.IntRange(min=0))
@click.option("--window", default=None, help="Counting window, e.g. 1m, 1h, 1d.")
@click.option("--mode", type=click.Choice(MODES), default="enforce", show_default=True)
@click.option("--per-account", is_flag=True,
              help="On a domain: the default for each of its accounts.")
@click.option("--range", "value_range", default=None, metavar="FLOOR:CEILING",
              help="Adaptive: the controller moves the value within this range.")
@json_option
@pass_config
def set_cmd(config: Config, target: str, kind: str, value: int, window: str | None,
            mode: str, per_account: bool, value_range: str | None, as_json: bool) -> None:
    window_s = parse_duration(window) if window is not None else None
    bounds = _parse_range(value_range) if value_range is not None else None
    row = run_db(config, lambda db: limits.set_limit(
        db, target, kind, value, window_s=window_s, mode=mode, per_account=per_account,
        value_range=bounds))
    if as_json:
        print_json(row)
    else:
        per = f" per {format_duration(row['window_s'])}" if row["window_s"] else ""
        adaptive = (f", adaptive {row['min_value']}..{row['max_value']}"
                    if row["min_value"] is not None else "")
        say(f"{row['scope']} limit on {row['target']}: {row['kind']} {row['value']}{per} "
            f"({row['mode']}{adaptive})")


def _parse_range(text: str) -> tuple[int, int]:
    floor, sep, ceiling = text.partition(":")
    if not sep or not floor.strip().isdigit() or not ceiling.strip().isdigit():
        raise InvalidInput(f"invalid range {text!r}: expected FLOOR:CEILING, e.g. 50:500")
    return int(floor), int(ceiling)


@group.command("list")
@click.argument("target", required=False)
@json_option
@pass_config
def list_cmd(config: Config, target: str | None, as_json: bool) -> None:
    """List limits, of one domain or account or of all."""
    rows = run_db(config, lambda db: limits.list_limits(db, target))
    if not as_json:
        for row in rows:
            row["window"] = format_duration(row["window_s"]) if row["window_s"] else None
            row["range"] = (f"{row['min_value']}..{row['max_value']}"
                            if row["min_value"] is not None else None)
    emit(rows, as_json=as_json,
         columns=("target", "scope", "kind", "value", "window", "mode", "range", "updated_at"),
         empty="no limits")


@group.command("unset")
@click.argument("target")
@click.argument("kind")
@click.option("--per-account", is_flag=True, help="Remove the domain's per-account default.")
@pass_config
def unset(config: Config, target: str, kind: str, per_account: bool) -> None:
    """Remove a limit."""
    run_db(config, lambda db: limits.unset_limit(db, target, kind, per_account=per_account))
    say(f"limit {kind} on {target} removed")


@group.command("simulate")
@click.argument("target")
@click.argument("kind", metavar="KIND")
@click.argument("value", type=click.IntRange(min=0))
@click.option("--window", default=None, help="Counting window, e.g. 1m, 1h, 1d.")
@click.option("--per-account", is_flag=True,
              help="On a domain: as the default for each of its accounts.")
@click.option("--since", default=None, help="History from: 7d (default), or an ISO time.")
@click.option("--between", nargs=2, default=None, metavar="START END")
@click.option("--limit", type=click.IntRange(1, 100_000), default=50, show_default=True,
              help="Subjects listed, the most affected first.")
@output_options
@pass_config
def simulate_cmd(config: Config, target: str, kind: str, value: int, window: str | None,
                 per_account: bool, since: str | None, between: tuple[str, str] | None,
                 limit: int, fmt: str) -> None:
    """Replay a proposed limit against the recorded history: who it would have deferred.

    Nothing is changed; see mailfc/analysis/simulate.py for the replay rules.
    """
    window_s = timerange.window(window) if window is not None else None
    span = timerange.resolve(since, between, default="7d")
    result = run_db(config, lambda db: simulate_mod.simulate(
        db, target, kind, value, window_s=window_s, span=span, per_account=per_account))
    if fmt == "json":
        print_json(result)
        return
    spec = result["limit"]
    per = f" per {spec['window']}" if spec["window"] else ""
    totals = result["totals"]
    render(result["subjects"][:limit],
           ("subject", "transactions", "affected", "share", "refused_amount", "first_at",
            "last_at"), fmt=fmt,
           title=f"{spec['kind']} {spec['value']}{per} on {spec['target']} ({spec['scope']}),"
                 f" {span.describe()}",
           caption=f"{totals['subjects_affected']} of {totals['subjects']} subjects affected;"
                   f" {totals['affected']} of {totals['transactions']} transactions")
