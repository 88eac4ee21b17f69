"""Rows out as a rich table (default), JSON (--json) or CSV (--csv), for the abuse commands.

    @output_options                      adds --json and --csv (fmt: table | json | csv)
    render(rows, columns, fmt=fmt, title="top accounts")

An empty result is an empty table (its header only) and exit status 0: nothing found
is an answer, not an error.  Lists are one item a line in a table, joined with "; " in CSV.
"""

from __future__ import annotations

import csv
import datetime
import functools
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import click
from rich.table import Table

from mailfc.cli.common import console, print_json
from mailfc.errors import InvalidInput

F = TypeVar("F", bound=Callable[..., Any])


def output_options(function: F) -> F:
    """--json / --csv; the command receives `fmt`."""

    @click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
    @click.option("--csv", "as_csv", is_flag=True, help="Print CSV instead of a table.")
    @functools.wraps(function)
    def wrapper(*args: Any, as_json: bool, as_csv: bool, **kwargs: Any) -> Any:
        if as_json and as_csv:
            raise InvalidInput("give either --json or --csv, not both")
        return function(*args, fmt="json" if as_json else "csv" if as_csv else "table",
                        **kwargs)

    return wrapper  # type: ignore[return-value]


def cell(value: Any, joiner: str = "\n") -> str:
    if value is None:
        return "-"
    if isinstance(value, datetime.datetime):
        return value.astimezone(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list | tuple):
        return joiner.join(cell(v, joiner) for v in value)
    return str(value)


def _csv_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime.datetime):
        return value.astimezone(datetime.UTC).isoformat()
    return cell(value, "; ")


def render(rows: Sequence[dict[str, Any]], columns: Sequence[str], *, fmt: str,
           title: str | None = None, caption: str | None = None) -> None:
    if fmt == "json":
        print_json(list(rows))
    elif fmt == "csv":
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_csv_cell(row.get(c)) for c in columns])
    else:
        table(rows, columns, title=title, caption=caption)


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str], *, title: str | None = None,
          caption: str | None = None) -> None:
    out = Table(title=title, caption=caption if rows else (caption or "nothing found"),
                title_justify="left")
    for name in columns:
        out.add_column(name, overflow="fold")
    for row in rows:
        out.add_row(*(cell(row.get(name)) for name in columns))
    console.print(out)
