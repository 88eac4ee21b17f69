"""What every `mailfc` command shares: config, database, output, errors.

- `pass_config`: the effective Config (from `--config`, $MAILFC_CONFIG or defaults).
- `run_db(config, action)`: runs `action(connection)` on the CMDB (starting the
  embedded cluster when needed) and closes the pool afterwards.
- `json_option` / `emit`: human tables by default (rich), `--json` for scripts.
- `MailfcGroup`: turns a MailfcError into `error: <message>` on stderr and exit
  status 1; anything unexpected becomes a one-line internal error (set
  MAILFC_DEBUG=1 for the traceback), never a traceback by default.  A reader that
  goes away (`mailfc events | head`) ends the command quietly, as it does `cat`.
- Numbers: floats print rounded (5.4, not 5.4019999504089355, the float32 of a
  `real` column), in tables and in JSON alike.
"""

from __future__ import annotations

import contextlib
import datetime
import decimal
import ipaddress
import json
import os
import signal
import sys
import traceback
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NoReturn, TypeVar

import asyncpg
import click
from rich.console import Console
from rich.table import Table

from mailfc import eventloop
from mailfc.config import Config, load_config
from mailfc.db import connect
from mailfc.errors import DatabaseError, MailfcError

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

# Piped into a file or grep, tables keep whole words rather than 80 columns.
console = Console(width=None if sys.stdout.isatty() else 200)
error_console = Console(stderr=True)


class MailfcGroup(click.Group):
    def main(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().main(*args, **kwargs)
        except BrokenPipeError:
            _reader_gone()

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except BrokenPipeError:
            _reader_gone()
        except MailfcError as error:
            raise click.ClickException(str(error)) from None
        except asyncpg.PostgresError as error:
            raise click.ClickException(f"database error: {error}") from None
        except KeyboardInterrupt:
            raise click.exceptions.Exit(130) from None
        except Exception as error:
            if os.environ.get("MAILFC_DEBUG"):
                traceback.print_exc()
            raise click.ClickException(
                f"internal error: {type(error).__name__}: {error} "
                "(run again with MAILFC_DEBUG=1 for details and report it)"
            ) from None


def _reader_gone() -> NoReturn:
    """stdout's reader closed the pipe (`| head`): stop quietly, exit 141 as a shell's
    command killed by SIGPIPE would.  stdout is pointed at /dev/null first, so the
    flush at exit does not fail a second time."""
    with contextlib.suppress(OSError):
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, sys.stdout.fileno())
    sys.exit(128 + signal.SIGPIPE)


def get_config(ctx: click.Context) -> Config:
    root = ctx.find_root()
    if root.obj is None:
        root.obj = load_config(root.params.get("config_path"))
    assert isinstance(root.obj, Config)
    return root.obj


def pass_config(function: F) -> F:
    """Decorator: call the command with the effective Config as first argument."""

    @click.pass_context
    def wrapper(ctx: click.Context, *args: Any, **kwargs: Any) -> Any:
        return ctx.invoke(function, get_config(ctx), *args, **kwargs)

    wrapper.__name__ = function.__name__
    wrapper.__doc__ = function.__doc__
    return wrapper  # type: ignore[return-value]


ADMIN_WORK_MEM = "64MB"


def run_db(config: Config, action: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
    async def main() -> T:
        pool = await connect(config)
        try:
            async with pool.acquire() as connection:
                # An admin's analysis groups hundreds of thousands of rows (mailfc abuse
                # top --since 7d): with PostgreSQL's default 4 MB its hash spills to disk
                # in some twenty batches.  One admin command at a time can afford more.
                await connection.execute(f"SET work_mem = '{ADMIN_WORK_MEM}'")
                return await action(connection)
        finally:
            await pool.close()

    try:
        return eventloop.run(main())
    except (OSError, asyncpg.InterfaceError) as error:
        raise DatabaseError(f"database connection failed: {error}") from None


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime.datetime | datetime.date):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return float(value)
    if isinstance(value, float):
        return rounded(value)
    if isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address
                  | ipaddress.IPv4Network | ipaddress.IPv6Network):
        return str(value)
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(item) for item in value]
    return value


def print_json(data: Any) -> None:
    click.echo(json.dumps(_jsonable(data), indent=2, sort_keys=False))


def rounded(value: float) -> float:
    """Six significant digits: what a measured duration or rate can claim."""
    return float(f"{value:.6g}") if value == value else value


def number_text(value: float) -> str:
    """A float for people: 5.4, 1234.5, 0.0123 (at most two decimals past 1)."""
    if abs(value) >= 1 or value == 0:
        return f"{value:.2f}".rstrip("0").rstrip(".")
    return f"{value:.3g}"


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return number_text(value)
    if isinstance(value, datetime.datetime):
        return value.astimezone().strftime("%Y-%m-%d %H:%M:%S")
    return str(value)


def emit(
    data: dict[str, Any] | Sequence[dict[str, Any]], *, as_json: bool,
    columns: Sequence[str] | None = None, title: str | None = None, empty: str = "(none)",
) -> None:
    """A list of rows as a table, one record as key/value lines, or JSON."""
    if as_json:
        print_json(data)
        return
    if isinstance(data, dict):
        table = Table(show_header=False, box=None, title=title)
        table.add_column(style="bold")
        table.add_column()
        for key in columns or list(data):
            table.add_row(key, _cell(data.get(key)))
        console.print(table)
        return
    if not data:
        console.print(empty)
        return
    names = list(columns or list(data[0]))
    table = Table(title=title)
    for name in names:
        table.add_column(name)
    for row in data:
        table.add_row(*(_cell(row.get(name)) for name in names))
    console.print(table)


def say(message: str) -> None:
    """A one-line confirmation for humans (suppressed with --json by the caller)."""
    console.print(message, highlight=False)


def fail(message: str, code: int = 1) -> None:
    error_console.print(f"error: {message}", highlight=False)
    sys.exit(code)
