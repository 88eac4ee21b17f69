"""The pure parts: robust statistics, time ranges, targets, identifiers, replay rules."""

from __future__ import annotations

import datetime

import pytest

from mailfc.analysis import explain, simulate, stats, targets, timerange
from mailfc.errors import InvalidInput

UTC = datetime.UTC


def test_median_and_mad_ignore_the_spike() -> None:
    values = [3.0, 4.0, 5.0, 4.0, 3.0, 500.0, 4.0]
    assert stats.median(values) == 4.0
    assert stats.mad(values) == 1.0
    base = stats.Baseline.of(values)
    assert base.peak == 500.0
    # A history that never varies must not make every change infinitely surprising.
    flat = stats.Baseline.of([0.0] * 14)
    assert flat.sigma == 1.0 and flat.z(20) == 20.0
    assert stats.Baseline.of([100.0] * 14).sigma == 10.0      # Poisson floor: sqrt(median)
    assert stats.severity(40, 20) == 1.0
    assert stats.zero_filled({1: 3, 3: 2}, 4) == [3.0, 0.0, 2.0, 0.0]


def test_time_ranges() -> None:
    at = datetime.datetime(2024, 5, 2, 12, 0, tzinfo=UTC)
    span = timerange.resolve("1h", None, at=at)
    assert (span.start, span.end) == (at - datetime.timedelta(hours=1), at)
    span = timerange.resolve(None, ("2024-05-01", "2024-05-01T06:00"), at=at)
    assert span.seconds == 6 * 3600 and span.start.tzinfo is not None
    assert timerange.resolve(None, None, default="7d", at=at).seconds == 7 * 86400
    for since, between, says in (("1x", None, "--since '1x'"),
                                 ("1h", ("2024-05-01", "2024-05-02"), "either"),
                                 (None, ("2024-05-02", "2024-05-01"), "must come after"),
                                 ("2030-01-01", None, "future")):
        with pytest.raises(InvalidInput, match=says):
            timerange.resolve(since, between, at=at)
    assert timerange.bucket_seconds(timerange.resolve("1h", None, at=at)) == 60
    assert timerange.bucket_seconds(timerange.resolve("7d", None, at=at)) == 6 * 3600


def test_targets() -> None:
    assert targets.classify("Bob@Example.ORG") == targets.Target("account", "bob@example.org")
    assert targets.classify("example.org") == targets.Target("domain", "example.org")
    assert targets.classify("192.0.2.7") == targets.Target("ip", "192.0.2.7")
    assert targets.classify("192.0.2.9/24") == targets.Target("ip", "192.0.2.0/24")
    assert targets.classify("2001:db8::1/128") == targets.Target("ip", "2001:db8::1")
    for bad in ("bob@", "300.1.2.3", "-x.example", "", "nodot"):
        with pytest.raises(InvalidInput):
            targets.classify(bad)


def test_identifiers() -> None:
    assert explain.identify("1234") == explain.Lookup("session", 1234)
    assert explain.identify("imap:77") == explain.Lookup("imap_session", 77)
    assert explain.identify("<a.b@example.org>") == explain.Lookup("message id", "a.b@example.org")
    assert explain.identify("4XyZ1abcD") == explain.Lookup("queue id", "4XyZ1abcD")
    with pytest.raises(InvalidInput, match="not a session id"):
        explain.identify("no such thing!")


BASE = datetime.datetime(2024, 5, 1, tzinfo=UTC)


def _seconds(deferred: list[tuple[simulate.Transaction, int]]) -> list[int]:
    return [int((t.started_at - BASE).total_seconds()) for t, _ in deferred]


def _txn(second: float, recipients: int = 1, length: float = 1.0) -> simulate.Transaction:
    start = BASE + datetime.timedelta(seconds=second)
    return simulate.Transaction("s", start, start + datetime.timedelta(seconds=length),
                                recipients, 100)


def test_window_replay_follows_the_engine_buckets() -> None:
    # 3 per 60 s, buckets of 5 s: an amount counts for 60 to 65 s.
    txns = [_txn(t) for t in (0, 1, 2, 3, 62, 66, 70)]
    deferred = simulate.replay_window("messages", 3, 60, txns)
    # 3: the fourth in the window.  62: the bucket of 0-2 still counts.  66: it left.
    assert _seconds(deferred) == [3, 62]
    result = simulate.replay("recipients_per_message", 2, None, [_txn(0, 5), _txn(1, 2)])
    assert (result["affected"], result["refused_amount"]) == (1, 3)


def test_concurrency_replay() -> None:
    txns = [_txn(0, length=10), _txn(1, length=10), _txn(2, length=1), _txn(11, length=1)]
    assert _seconds(simulate.replay_concurrency(2, txns)) == [2]
