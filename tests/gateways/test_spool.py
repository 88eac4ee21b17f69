"""The spool alone, with a next hop played by the test: fairness, retries, restarts, bounces,
streaming, the quarantine, and scans racing puts.

Real files and fsync under a temporary directory; only the next hop is a function here,
so its timing and replies can be chosen.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import json
import logging
import os
import random
import threading
import time
import tracemalloc
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from pydantic import ValidationError

from mailfc.config import SpoolSection
from mailfc.gateways.spool import Envelope, Spool, admin, dsn
from mailfc.gateways.spool.store import Progress
from mailfc.messages import BytesSource, FileSlice, MessageData, Source, read_all
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

    async def hop(envelope: Envelope, rcpts: list[str], message: Source) -> dict[str, Reply]:
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

    async def hop(envelope: Envelope, rcpts: list[str], message: Source) -> dict[str, Reply]:
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

    async def hop(envelope: Envelope, rcpts: list[str], message: Source) -> dict[str, Reply]:
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

    async def hop(envelope: Envelope, rcpts: list[str], message: Source) -> dict[str, Reply]:
        if envelope.is_bounce:
            bounces.append(read_all(message))
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

    async def hop(envelope: Envelope, rcpts: list[str], message: Source) -> dict[str, Reply]:
        delivered.append(envelope.queue_id)
        return dict.fromkeys(rcpts, OK)

    spool = Spool(tmp_path, hop, settings(), hostname="test")
    renamed: list[str] = []
    synced_after: list[set[str]] = []
    commit, sync_queue = spool.files.commit, spool.files.sync_queue

    def counting_commit(envelope: Envelope, message: Source, keep: int = 0) -> bytes | None:
        kept = commit(envelope, message, keep)
        renamed.append(envelope.queue_id)
        return kept

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


def _digest_of(message: Source) -> tuple[str, int]:
    digest, biggest = hashlib.sha256(), 0
    for chunk in message.chunks():
        digest.update(chunk)
        biggest = max(biggest, len(chunk))
    return digest.hexdigest(), biggest


async def test_a_large_message_streams_through_the_spool_in_chunks(tmp_path: Path) -> None:
    """20 MB in (a MessageData on disk) and out (a FileSlice of the spool file): the
    spool and the hop together never allocate more than a few chunks."""
    seen: dict[str, object] = {}

    async def hop(envelope: Envelope, rcpts: list[str], message: Source) -> dict[str, Reply]:
        seen["kind"] = type(message)
        seen["size"] = message.size
        seen["digest"], seen["biggest"] = await asyncio.to_thread(_digest_of, message)
        return dict.fromkeys(rcpts, OK)

    expected = hashlib.sha256()
    data = MessageData(tmp_path / "incoming")
    header = b"Subject: big\r\nFrom: ann@remote.example\r\n\r\n"
    data.write(header)
    expected.update(header)
    block = os.urandom(64 * 1024)
    for _ in range(320):
        data.write(block)
        expected.update(block)
    spool = Spool(tmp_path / "spool", hop, settings(), hostname="test")
    await spool.start()
    tracemalloc.start()
    try:
        await spool.put("ann@remote.example", ["bob@a.example"], data)
        data.close()
        assert await spool.wait_idle(within=30)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        await spool.stop(1.0)
    assert seen["kind"] is FileSlice and seen["size"] == len(header) + 320 * len(block)
    assert seen["digest"] == expected.hexdigest()
    assert isinstance(seen["biggest"], int) and seen["biggest"] <= 64 * 1024
    assert peak < 2 << 20, f"peak {peak} bytes allocated for a 20 MB message"


async def test_only_small_messages_are_cached_and_at_most_8_mib_of_them(tmp_path: Path) -> None:
    kinds: dict[int, type] = {}
    hop_open = asyncio.Event()

    async def hop(envelope: Envelope, rcpts: list[str], message: Source) -> dict[str, Reply]:
        await hop_open.wait()
        kinds[envelope.size] = type(message)
        assert read_all(message)[:8] == b"Subject:"
        return dict.fromkeys(rcpts, OK)

    spool = Spool(tmp_path, hop, settings(max_deliveries=1, per_domain_concurrency=1),
                  hostname="test")
    await spool.start()
    try:
        small = b"Subject: s\r\n\r\n" + b"x" * (60 * 1024)
        for n in range(200):           # 12 MB of small messages, all waiting
            await spool.put("ann@remote.example", [f"u{n}@a.example"], small)
            assert spool._cached <= 8 << 20
        assert spool._cached > 7 << 20   # the cache is used, up to its cap
        big = b"Subject: b\r\n\r\n" + b"y" * (64 * 1024)   # one byte over 64 KiB
        await spool.put("ann@remote.example", ["v@b.example"], big)
        hop_open.set()
        assert await spool.wait_idle(within=30)
        assert spool._cached == 0
    finally:
        await spool.stop(1.0)
    assert kinds[len(big)] is FileSlice
    assert kinds[len(small)] in (BytesSource, FileSlice)


async def test_a_bounce_carries_only_the_header_of_a_large_message(tmp_path: Path) -> None:
    bounces: list[bytes] = []

    async def hop(envelope: Envelope, rcpts: list[str], message: Source) -> dict[str, Reply]:
        if envelope.is_bounce:
            bounces.append(read_all(message))
            return dict.fromkeys(rcpts, OK)
        return dict.fromkeys(rcpts, Reply(552, "5.3.4 message too big for the mailbox"))

    spool = Spool(tmp_path, hop, settings(), hostname="mx.test")
    await spool.start()
    try:
        body = b"Subject: large\r\nFrom: bob@a.example\r\n\r\n" + b"body line\r\n" * 300_000
        await spool.put("bob@a.example", ["dave@b.example"], body)
        assert await spool.wait_idle(within=10)
    finally:
        await spool.stop(1.0)
    assert len(bounces) == 1 and len(bounces[0]) < 8 * 1024
    assert b"Subject: large" in bounces[0] and b"body line" not in bounces[0]


def test_a_dsn_takes_at_most_64_kib_of_a_header_cut_at_a_line() -> None:
    head = b"".join(b"X-Long-%d: %s\r\n" % (n, b"v" * 100) for n in range(2000))
    kept = dsn.original_headers(head)
    assert len(kept) <= dsn.HEAD_LIMIT and kept.endswith(b"\r\n")
    assert kept.startswith(b"X-Long-0: ") and b"X-Long-1999" not in kept
    assert dsn.original_headers(b"Subject: a\r\n\r\nbody") == b"Subject: a\r\n"


# -- bounces nobody takes -------------------------------------------------------------------


async def test_a_refused_bounce_goes_to_the_quarantine_and_can_be_released(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    sent: list[tuple[str, list[str], bytes]] = []
    bounce_sent = asyncio.Event()
    bounces_refused = True

    async def hop(envelope: Envelope, rcpts: list[str], message: Source) -> dict[str, Reply]:
        if not envelope.is_bounce:
            return dict.fromkeys(rcpts, Reply(550, "5.1.1 no such user"))
        if bounces_refused:
            return dict.fromkeys(rcpts, Reply(550, "5.1.1 sender unknown here"))
        sent.append((envelope.queue_id, rcpts, read_all(message)))
        bounce_sent.set()
        return dict.fromkeys(rcpts, OK)

    spool = Spool(tmp_path, hop, settings(), hostname="mx.test")
    await spool.start()
    try:
        with caplog.at_level(logging.WARNING, "mailfc.gateways.spool"):
            await spool.put("forged@b.example", ["nobody@a.example"], MESSAGE)
            assert await spool.wait_idle(within=10)
        assert list((tmp_path / "queue").iterdir()) == []
        rows = admin.list_quarantine(spool.files)
        assert len(rows) == 1 and rows[0]["sender"] == "<>"
        assert rows[0]["recipients"] == "forged@b.example"
        assert "550 5.1.1 sender unknown here" in rows[0]["reason"]
        bounce_id = rows[0]["queue_id"]
        reason = json.loads((tmp_path / "quarantine" / f"{bounce_id}.reason").read_text())
        assert reason["failed"] == {"forged@b.example": [550, "5.1.1 sender unknown here"]}
        assert any(bounce_id in r.message and "quarantine" in r.message
                   for r in caplog.records if r.levelno == logging.WARNING)
        # The admin fixed the cause: released, the running spool delivers it (same id).
        bounces_refused = False
        assert "released" in admin.release(spool.files, bounce_id)
        assert admin.list_quarantine(spool.files) == []
        await asyncio.wait_for(bounce_sent.wait(), 10)     # found by its next scan
        assert await spool.wait_idle(within=10)
    finally:
        await spool.stop(1.0)
    assert [(q, r) for q, r, _ in sent] == [(bounce_id, ["forged@b.example"])]
    assert b"Final-Recipient: rfc822; nobody@a.example" in sent[0][2]
    assert list((tmp_path / "quarantine").iterdir()) == []


async def test_an_expired_bounce_and_a_refused_null_sender_message_are_quarantined(
        tmp_path: Path) -> None:
    async def hop(envelope: Envelope, rcpts: list[str], message: Source) -> dict[str, Reply]:
        if envelope.is_bounce:
            return dict.fromkeys(rcpts, Reply(451, "4.4.1 remote host down"))
        return dict.fromkeys(rcpts, Reply(550, "5.7.1 refused"))

    spool = Spool(tmp_path, hop, settings(max_lifetime_s=0.5), hostname="mx.test")
    await spool.start()
    try:
        bounce = await spool.put("", ["ann@b.example"], MESSAGE, is_bounce=True)
        foreign = await spool.put("", ["carl@c.example"], MESSAGE)    # another MTA's DSN
        assert await spool.wait_idle(within=10)
    finally:
        await spool.stop(1.0)
    rows = {row["queue_id"]: row for row in admin.list_quarantine(spool.files)}
    assert set(rows) == {bounce, foreign}
    assert "5.4.7 delivery time expired" in rows[bounce]["reason"]
    assert "550 5.7.1 refused" in rows[foreign]["reason"]
    # Moved as they were: envelope line and message.
    envelope, message, _ = spool.files.read_quarantined(foreign)
    assert envelope.recipients == ("carl@c.example",) and read_all(message) == MESSAGE


async def test_an_undeliverable_bounce_goes_to_the_postmaster_once(tmp_path: Path) -> None:
    to_postmaster: list[bytes] = []
    postmaster_up = True

    async def hop(envelope: Envelope, rcpts: list[str], message: Source) -> dict[str, Reply]:
        if rcpts == ["postmaster@ops.example"]:
            assert envelope.is_bounce and envelope.sender == ""
            to_postmaster.append(read_all(message))
            return dict.fromkeys(rcpts, OK if postmaster_up else Reply(550, "5.2.1 disabled"))
        if envelope.is_bounce:
            return dict.fromkeys(rcpts, Reply(550, "5.1.1 sender unknown"))
        return dict.fromkeys(rcpts, Reply(550, "5.1.1 no such user"))

    config = settings(undeliverable_bounces="postmaster@ops.example")
    spool = Spool(tmp_path, hop, config, hostname="mx.test")
    await spool.start()
    try:
        await spool.put("forged@b.example", ["nobody@a.example"], MESSAGE)
        assert await spool.wait_idle(within=10)
        assert len(to_postmaster) == 1 and admin.list_quarantine(spool.files) == []
        first = to_postmaster[0]
        assert first.startswith(b"X-Mailfc-Undeliverable: queue id ")
        assert b"<forged@b.example>: 550 5.1.1 sender unknown" in first.split(b"\r\n")[0]
        assert b"Final-Recipient: rfc822; nobody@a.example" in first
        # The postmaster refuses too: the copy is quarantined, not sent again.
        postmaster_up = False
        await spool.put("forged@b.example", ["nobody@a.example"], MESSAGE)
        assert await spool.wait_idle(within=10)
    finally:
        await spool.stop(1.0)
    assert len(to_postmaster) == 2
    rows = admin.list_quarantine(spool.files)
    assert len(rows) == 1 and rows[0]["recipients"] == "postmaster@ops.example"
    assert "5.2.1 disabled" in rows[0]["reason"]
    assert list((tmp_path / "queue").iterdir()) == []


def test_undeliverable_bounces_takes_quarantine_or_an_address() -> None:
    assert settings().undeliverable_bounces == "quarantine"
    assert settings(undeliverable_bounces="postmaster@ops.example").undeliverable_bounces \
        == "postmaster@ops.example"
    for wrong in ("drop", "postmaster", "<postmaster@ops.example>", "a b@ops.example"):
        with pytest.raises(ValidationError, match="quarantine"):
            settings(undeliverable_bounces=wrong)


# -- scans racing puts (issue: duplicates without any crash) --------------------------------


async def test_a_scan_skips_a_message_its_put_renamed_but_has_not_queued(tmp_path: Path) -> None:
    """The put starts after the scan looked at what it knows, renames its file before the
    scan lists queue/, and waits for the queue/ fsync while the scan reads the file."""
    delivered: Counter[str] = Counter()

    async def hop(envelope: Envelope, rcpts: list[str], message: Source) -> dict[str, Reply]:
        delivered[envelope.queue_id] += 1
        return dict.fromkeys(rcpts, OK)

    spool = Spool(tmp_path, hop, settings(scan_interval_s=3600), hostname="test")
    await spool.start()
    loop = asyncio.get_running_loop()
    sync_may_run = threading.Event()
    sync_queue, queue_ids = spool.files.sync_queue, spool.files.queue_ids
    put: list[concurrent.futures.Future[str]] = []

    def held_sync() -> None:
        sync_may_run.wait(10)
        sync_queue()

    def listing_after_a_put() -> list[str]:
        put.append(asyncio.run_coroutine_threadsafe(
            spool.put("ann@remote.example", ["x@a.example"], MESSAGE, queue_id="RACE1"), loop))
        _wait_until(lambda: (tmp_path / "queue" / "RACE1").exists())
        return queue_ids()

    spool.files.sync_queue = held_sync  # type: ignore[method-assign]
    spool.files.queue_ids = listing_after_a_put  # type: ignore[method-assign]
    try:
        assert await spool._scan() == 0      # RACE1 is its put's to queue
        spool.files.queue_ids = queue_ids  # type: ignore[method-assign]
        sync_may_run.set()
        assert await asyncio.wrap_future(put[0]) == "RACE1"
        assert await spool.wait_idle(within=10)
        await spool._scan()
        await asyncio.sleep(0.1)
    finally:
        sync_may_run.set()
        await spool.stop(1.0)
    assert delivered == {"RACE1": 1}


async def test_a_scan_skips_a_message_delivered_while_it_read(tmp_path: Path) -> None:
    """The scan reads a file; before it is back in the loop the message is delivered and
    removed: it must not be queued again (its file is gone)."""
    delivered: Counter[str] = Counter()
    scan_has_read = asyncio.Event()

    async def hop(envelope: Envelope, rcpts: list[str], message: Source) -> dict[str, Reply]:
        await scan_has_read.wait()
        delivered[envelope.queue_id] += 1
        return dict.fromkeys(rcpts, OK)

    spool = Spool(tmp_path, hop, settings(scan_interval_s=3600), hostname="test")
    await spool.start()
    loop = asyncio.get_running_loop()
    queue_ids, read_progress = spool.files.queue_ids, spool.files.read_progress
    put: list[concurrent.futures.Future[str]] = []

    def listing_after_a_put() -> list[str]:
        put.append(asyncio.run_coroutine_threadsafe(
            spool.put("ann@remote.example", ["x@a.example"], MESSAGE, queue_id="RACE2"), loop))
        _wait_until(lambda: (tmp_path / "queue" / "RACE2").exists())
        return queue_ids()

    def read_then_wait_for_delivery(queue_id: str) -> Progress:
        progress = read_progress(queue_id)
        loop.call_soon_threadsafe(scan_has_read.set)
        _wait_until(lambda: not (tmp_path / "queue" / queue_id).exists())
        time.sleep(0.05)       # the loop forgets it right after the unlink
        return progress

    spool.files.queue_ids = listing_after_a_put  # type: ignore[method-assign]
    spool.files.read_progress = read_then_wait_for_delivery  # type: ignore[method-assign]
    try:
        assert await spool._scan() == 0
        spool.files.queue_ids = queue_ids  # type: ignore[method-assign]
        assert await asyncio.wrap_future(put[0]) == "RACE2"
        assert await spool.wait_idle(within=5)
    finally:
        await spool.stop(1.0)
    assert delivered == {"RACE2": 1}


def _wait_until(condition: Callable[[], bool], within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "the race was not set up in time"
        time.sleep(0.001)


async def test_scans_racing_a_flood_of_puts_deliver_every_message_once(tmp_path: Path) -> None:
    """The same races unforced: a scan every millisecond while 1,500 puts arrive on a disk
    whose fsync takes milliseconds (the disk threads busy, a scan's listing waits)."""
    delivered: Counter[str] = Counter()

    async def hop(envelope: Envelope, rcpts: list[str], message: Source) -> dict[str, Reply]:
        delivered[envelope.queue_id] += 1
        await asyncio.sleep(0)
        return dict.fromkeys(rcpts, OK)

    spool = Spool(tmp_path, hop, settings(scan_interval_s=0.001, max_deliveries=64,
                                          per_domain_concurrency=16), hostname="test")
    commit = spool.files.commit

    def slow_commit(envelope: Envelope, message: Source, keep: int = 0) -> bytes | None:
        kept = commit(envelope, message, keep)
        time.sleep(random.uniform(0.002, 0.02))
        return kept

    spool.files.commit = slow_commit  # type: ignore[method-assign]
    await spool.start()
    try:
        async def put(n: int) -> str:
            await asyncio.sleep(random.uniform(0, 1.0))
            return await spool.put("ann@remote.example", [f"u{n}@a.example"], MESSAGE)

        queue_ids = await asyncio.gather(*(put(n) for n in range(1500)))
        assert await spool.wait_idle(within=30)
        await asyncio.sleep(0.2)     # a few more scans: nothing may come back
    finally:
        await spool.stop(1.0)
    assert sorted(delivered) == sorted(queue_ids)
    assert set(delivered.values()) == {1}, {q: n for q, n in delivered.items() if n > 1}
