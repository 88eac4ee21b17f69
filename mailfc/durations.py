"""Durations as admins write them: `90s`, `15m`, `1h`, `7d`, `1h30m`, or plain seconds."""

from __future__ import annotations

import re

from mailfc.errors import InvalidInput

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_PART = re.compile(r"(\d+)([smhdw])")


def parse_duration(text: str) -> int:
    """Seconds in `text`; InvalidInput for anything else or for zero."""
    value = text.strip().lower()
    if value.isdigit():
        seconds = int(value)
    else:
        parts = _PART.findall(value)
        if not parts or "".join(n + u for n, u in parts) != value:
            raise InvalidInput(
                f"invalid duration {text!r}: use e.g. 90s, 15m, 1h, 7d or 1h30m"
            )
        seconds = sum(int(number) * _UNITS[unit] for number, unit in parts)
    if seconds <= 0:
        raise InvalidInput(f"invalid duration {text!r}: must be more than zero")
    return seconds


def format_duration(seconds: int) -> str:
    for unit in ("w", "d", "h", "m"):
        size = _UNITS[unit]
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
