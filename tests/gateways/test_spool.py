"""The spool alone, with a next hop played by the test: fairness, retries, restarts, bounces.

Real files and fsync under a temporary directory; only the next hop is a function here,
so its timing and replies can be chosen.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

from mailfc.config import SpoolSection
from mailfc.gateways.spool import Envelope, Spool
from mailfc.protocols.lmtp import Reply

OK = Reply(250, "2.0.0 OK")
MESSAGE = b"Subject: spool test\r\nFrom: ann@remote.example\r\n\r\nbody\r\n"


def settings(**values: object) -> SpoolSection:
    base: dict[str, object] = {"retry_base_s": 0.2, "retry_max_s": 0.5, "scan_interval_s": 0.1,
                               "min_free_bytes": 0, "per_domain_concurrency": 2,
                               "max_deliveries": 4}
    return SpoolSection.model_validate(base | values)


async def test_a_flood_to_one_domain_does_not_delay_another(tmp_path: Path) -> None:
    delivered_at: dict[str, float] = {}

    async def hop(envelope: Envelope, rcpts: list[str], message: bytes) -> dict[str, Reply]:
        # a.example's server is slow (every delivery 50 ms); b.example's is fast.
        await asyncio.sleep(0.05 if rcpts[0].endswith("@a.example") else 0.001)
        delivered_at[envelope.queue_id] = time.monotonic()
        return dict.fromkeys(rcpts, OK)

    spool = Spool(tmp_path, hop, settings(), hostname="test")
    await spool.start()
    try:
        for _ in range(200):
            await spool.put("ann@remote.example", ["x@a.example"], MESSAGE)
        started = time.monotonic()
        other = await spool.put("ann@remote.example", ["y@b.example"], MESSAGE)
        assert await spool.wait_idle(within=60)
    finally:
        await spool.stop(1.0)
    # The flood needs 200 * 50 ms / 2 slots = 5 s; b.example's message waits for at most
    # the deliveries already in flight, not for the flood.
    assert delivered_at[other] - started < 1.0
    assert len(delivered_at) == 201


async def test_partial_failure_keeps_only_the_failed_recipient(tmp_path: Path) -> None:
    calls: Counter[str] = Counter()

    async def hop(envelope: Envelope, rcpts: list[str], message: bytes) -> dict[str, Reply]:
        replies = {}
        for rcpt in rcpts:
            calls[rcpt] += 1
            busy = rcpt == "carol@a.example" and calls[rcpt] < 3
            replies[rcpt] = Reply(451, "4.2.0 busy") if busy else OK
        return replies

    spool = Spool(tmp_path, hop, settings(), hostname="test")
    await spool.start()
    try:
        await spool.put("ann@remote.example", ["bob@a.example", "carol@a.example"], MESSAGE)
        assert await spool.wait_idle(within=10)
    finally:
        await spool.stop(1.0)
    assert calls == {"bob@a.example": 1, "carol@a.example": 3}


async def test_restart_resumes_and_delivers_each_recipient_once(tmp_path: Path) -> None:
    calls: Counter[str] = Counter()
    up = False

    async def hop(envelope: Envelope, rcpts: list[str], message: bytes) -> dict[str, Reply]:
        if not up and rcpts[0].endswith("@b.example"):
            raise ConnectionRefusedError("next hop down")
        calls.update(rcpts)
        return dict.fromkeys(rcpts, OK)

    first = Spool(tmp_path, hop, settings(), hostname="test")
    await first.start()
    for index in range(10):
        await first.put("ann@remote.example", [f"u{index}@a.example", f"u{index}@b.example"],
                        MESSAGE)
    await asyncio.sleep(0.5)
    await first.stop(1.0)
    assert all(calls[f"u{i}@a.example"] == 1 for i in range(10))
    up = True
    second = Spool(tmp_path, hop, settings(), hostname="test")
    await second.start()
    try:
        assert await second.wait_idle(within=10)
    finally:
        await second.stop(1.0)
    assert set(calls.values()) == {1} and len(calls) == 20
    assert list((tmp_path / "queue").iterdir()) == []


async def test_expired_message_bounces_to_its_sender(tmp_path: Path) -> None:
    bounces: list[bytes] = []

    async def hop(envelope: Envelope, rcpts: list[str], message: bytes) -> dict[str, Reply]:
        if envelope.is_bounce:
            bounces.append(message)
            return dict.fromkeys(rcpts, OK)
        return dict.fromkeys(rcpts, Reply(451, "4.3.0 mailbox server unavailable"))

    spool = Spool(tmp_path, hop, settings(max_lifetime_s=0.5), hostname="mx.test")
    await spool.start()
    try:
        await spool.put("bob@a.example", ["dave@b.example"], MESSAGE)
        assert await spool.wait_idle(within=10)
    finally:
        await spool.stop(1.0)
    assert len(bounces) == 1
    report = bounces[0]
    assert b"multipart/report" in report and b"Final-Recipient: rfc822; dave@b.example" in report
    assert b"Status: 5.4.7" in report and b"Subject: spool test" in report


async def test_concurrent_commits_share_the_queue_directory_fsync(tmp_path: Path) -> None:
    """Group commit: every put returns only after a queue/ fsync that began after its
    rename, and concurrent puts share such fsyncs."""
    delivered: list[str] = []

    async def hop(envelope: Envelope, rcpts: list[str], message: bytes) -> dict[str, Reply]:
        delivered.append(envelope.queue_id)
        return dict.fromkeys(rcpts, OK)

    spool = Spool(tmp_path, hop, settings(), hostname="test")
    renamed: list[str] = []
    synced_after: list[set[str]] = []
    commit, sync_queue = spool.files.commit, spool.files.sync_queue

    def counting_commit(envelope: Envelope, message: bytes) -> None:
        commit(envelope, message)
        renamed.append(envelope.queue_id)

    def counting_sync() -> None:
        covered = set(renamed)      # renames done before the fsync starts
        sync_queue()
        synced_after.append(covered)

    spool.files.commit = counting_commit  # type: ignore[method-assign]
    spool.files.sync_queue = counting_sync  # type: ignore[method-assign]
    await spool.start()
    try:
        async def put() -> tuple[str, int]:
            queue_id = await spool.put("ann@remote.example", ["x@a.example"], MESSAGE)
            return queue_id, len(synced_after)

        results = await asyncio.gather(*(put() for _ in range(40)))
        assert await spool.wait_idle(within=30)
    finally:
        await spool.stop(1.0)
    for queue_id, syncs_seen in results:
        # When put() returned, an fsync covering its rename had finished.
        assert any(queue_id in covered for covered in synced_after[:syncs_seen])
    assert len(synced_after) < 40
    assert sorted(delivered) == sorted(queue_id for queue_id, _ in results)
