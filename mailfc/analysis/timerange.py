"""Time ranges as admins write them, and the buckets of a time series.

    --since 1h                       the last hour, up to now
    --since 2024-05-01T12:00         from that moment (UTC without a zone), up to now
    --between 2024-05-01 2024-05-02  from the first moment up to (excluding) the second

A range is half-open [start, end) in UTC.  `bucket_seconds(range, points)` picks a
round bucket size (1m, 5m, 15m, 1h, 6h, 1d) giving at most about `points` buckets,
for the time series of `top` and `account`.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

from mailfc.durations import format_duration, parse_duration
from mailfc.errors import InvalidInput

UTC = datetime.UTC
ROUND_BUCKETS = (60, 300, 900, 3600, 6 * 3600, 86400, 7 * 86400)


@dataclass(frozen=True)
class TimeRange:
    start: datetime.datetime
    end: datetime.datetime

    @property
    def seconds(self) -> float:
        return (self.end - self.start).total_seconds()

    def describe(self) -> str:
        span = int(self.seconds)
        return (f"{_iso(self.start)} .. {_iso(self.end)}"
                f" ({format_duration(span) if span > 0 else '0s'})")


def _iso(moment: datetime.datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def now() -> datetime.datetime:
    return datetime.datetime.now(UTC)


def parse_moment(text: str, option: str, *, at: datetime.datetime | None = None
                 ) -> datetime.datetime:
    """An ISO time (UTC when it names no zone) or a duration back from `at` (now)."""
    try:
        moment = datetime.datetime.fromisoformat(text.strip())
    except ValueError:
        try:
            seconds = parse_duration(text)
        except InvalidInput:
            raise InvalidInput(f"{option} {text!r}: give a duration back from now (e.g. 1h,"
                               " 7d) or an ISO time (e.g. 2024-05-01T12:00)") from None
        return (at or now()) - datetime.timedelta(seconds=seconds)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def resolve(since: str | None, between: tuple[str, str] | None, *, default: str = "1h",
            at: datetime.datetime | None = None) -> TimeRange:
    """The range the options name; `default` back from now when none is given."""
    end = at or now()
    if since is not None and between is not None:
        raise InvalidInput("give either --since or --between, not both")
    if between is not None:
        start = parse_moment(between[0], "--between", at=end)
        stop = parse_moment(between[1], "--between", at=end)
        if stop <= start:
            raise InvalidInput(f"--between {between[0]} {between[1]}: the second time must"
                               " come after the first")
        return TimeRange(start, stop)
    start = parse_moment(since if since is not None else default, "--since", at=end)
    if start >= end:
        raise InvalidInput(f"--since {since!r} lies in the future")
    return TimeRange(start, end)


def window(text: str, option: str = "--window") -> int:
    """A window length in seconds, naming the option in the error."""
    try:
        return parse_duration(text)
    except InvalidInput as error:
        raise InvalidInput(f"{option}: {error}") from None


def bucket_seconds(span: TimeRange, points: int = 96) -> int:
    for size in ROUND_BUCKETS:
        if span.seconds / size <= points:
            return size
    return ROUND_BUCKETS[-1]
