"""Limit rows: per domain, per account, and the per-account default of a domain.

A target with an `@` is an account, otherwise a domain; `per_account` on a
domain sets the default each of its accounts gets unless it has its own row.
Setting a limit that exists replaces its value, window and mode.
"""

from __future__ import annotations

from typing import Any

import asyncpg

from mailfc.addresses import split_address
from mailfc.db import accounts
from mailfc.db.domains import domain_id
from mailfc.errors import InvalidInput, NotFound
from mailfc.policy.kinds import KINDS, MODES

_SELECT = """
SELECT l.id, l.scope,
       CASE WHEN l.scope = 'account' THEN a.localpart || '@' || d.name ELSE d.name END
           AS target,
       l.kind, l.value, l.window_s, l.mode, l.min_value, l.max_value, l.updated_at
FROM limits l JOIN domains d ON d.id = l.domain_id
LEFT JOIN accounts a ON a.id = l.account_id
"""


async def _resolve(
    db: asyncpg.Connection, target: str, per_account: bool
) -> tuple[str, int, int | None]:
    if "@" in target:
        if per_account:
            raise InvalidInput("--per-account applies to a domain, not to an account")
        split_address(target)
        row = await accounts.get_record(db, target)
        identifier = await domain_id(db, row["domain"])
        return "account", identifier, int(row["id"])
    identifier = await domain_id(db, target)
    return ("account_default" if per_account else "domain"), identifier, None


def check_kind(kind: str, window_s: int | None, mode: str) -> None:
    spec = KINDS.get(kind)
    if spec is None:
        raise InvalidInput(f"unknown limit kind {kind!r}: one of {', '.join(KINDS)}")
    if spec.windowed and window_s is None:
        raise InvalidInput(f"limit {kind} counts per window: give --window, e.g. --window 1h")
    if not spec.windowed and window_s is not None:
        raise InvalidInput(f"limit {kind} is an instant cap and takes no --window")
    if mode not in MODES:
        raise InvalidInput(f"unknown mode {mode!r}: one of {', '.join(MODES)}")


async def set_limit(
    db: asyncpg.Connection, target: str, kind: str, value: int, *,
    window_s: int | None = None, mode: str = "enforce", per_account: bool = False,
    value_range: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """`value_range` (floor, ceiling) makes the limit adaptive: the controller
    moves `value` within it; without a range the limit is fixed."""
    check_kind(kind, window_s, mode)
    if value < 0:
        raise InvalidInput("a limit value must not be negative")
    floor, ceiling = value_range if value_range is not None else (None, None)
    if value_range is not None and not 0 <= value_range[0] <= value <= value_range[1]:
        raise InvalidInput(f"value {value} must lie within the range "
                           f"{value_range[0]}:{value_range[1]} (floor <= value <= ceiling)")
    async with db.transaction():
        scope, identifier, account = await _resolve(db, target, per_account)
        row_id = await db.fetchval(
            """
            INSERT INTO limits (scope, domain_id, account_id, kind, value, window_s, mode,
                                min_value, max_value)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
            ON CONFLICT (scope, domain_id, coalesce(account_id, 0), kind) DO UPDATE SET
                value = EXCLUDED.value, window_s = EXCLUDED.window_s, mode = EXCLUDED.mode,
                min_value = EXCLUDED.min_value, max_value = EXCLUDED.max_value,
                updated_at = now()
            RETURNING id
            """,
            scope, identifier, account, kind, value, window_s, mode, floor, ceiling,
        )
    return dict(await db.fetchrow(_SELECT + " WHERE l.id = $1", row_id))


async def list_limits(db: asyncpg.Connection, target: str | None = None) -> list[dict[str, Any]]:
    if target is None:
        rows = await db.fetch(_SELECT + " ORDER BY d.name, l.scope, target, l.kind")
    elif "@" in target:
        row = await accounts.get_record(db, target)
        rows = await db.fetch(
            _SELECT + " WHERE l.account_id = $1 ORDER BY l.kind", row["id"]
        )
    else:
        identifier = await domain_id(db, target)
        rows = await db.fetch(
            _SELECT + " WHERE l.domain_id = $1 ORDER BY l.scope, target, l.kind", identifier
        )
    return [dict(row) for row in rows]


async def unset_limit(
    db: asyncpg.Connection, target: str, kind: str, *, per_account: bool = False
) -> None:
    if kind not in KINDS:
        raise InvalidInput(f"unknown limit kind {kind!r}: one of {', '.join(KINDS)}")
    scope, identifier, account = await _resolve(db, target, per_account)
    result = await db.execute(
        "DELETE FROM limits WHERE scope = $1 AND domain_id = $2"
        " AND coalesce(account_id, 0) = coalesce($3::bigint, 0) AND kind = $4",
        scope, identifier, account, kind,
    )
    if result.endswith(" 0"):
        which = "per-account default " if per_account else ""
        raise NotFound(f"no {which}{kind} limit on {target}: see mailfc limit list {target}")
