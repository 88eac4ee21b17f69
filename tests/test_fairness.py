"""mailfc.fairness: admission under CPU pressure and per-key caps; pure logic, with a
PSI file of the test's own."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from mailfc.fairness import Admission, PerKeyLimit, read_stall_us


def psi_file(tmp_path: Path, total_us: int) -> Path:
    path = tmp_path / "cpu"
    path.write_text(f"some avg10=1.00 avg60=1.00 avg300=1.00 total={total_us}\n"
                    "full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n")
    return path


@pytest.fixture
def psi(tmp_path: Path) -> Path:
    return psi_file(tmp_path, 1000)


async def watching(admission: Admission) -> Admission:
    """Started (it counts requests only while it watches the pressure); its own
    steps never come during a test: the test calls adjust() itself."""
    admission.interval_s = 3600.0
    await admission.start()
    return admission


async def test_without_pressure_information_everyone_passes_uncounted(tmp_path: Path) -> None:
    admission = Admission(target=0.0, psi=tmp_path / "absent")
    await admission.start()
    for _ in range(100):
        assert await admission.admit("flood.example")
    assert admission.opened == {}


def test_the_stall_counter_is_read_and_a_missing_file_is_none(tmp_path: Path) -> None:
    assert read_stall_us(psi_file(tmp_path, 123456)) == 123456
    assert read_stall_us(tmp_path / "absent") is None
    assert read_stall_us(Path("/proc/pressure/cpu")) is not None, "this kernel has no PSI"


async def test_a_domain_alone_is_never_spaced_out(psi: Path) -> None:
    """The flood's spacing protects other domains; with nobody else asking there is
    nobody to protect."""
    admission = await watching(Admission(target=0.2, psi=psi))
    for _ in range(50):
        await admission.admit("only.example")
    admission.adjust(pressure=0.9, interval_s=1.0)
    assert admission.buckets == {}


async def test_only_the_domain_over_its_share_is_spaced_out_and_freed_again(psi: Path) -> None:
    admission = await watching(Admission(target=0.2, min_rate=1.0, increase=10.0,
                                         max_wait_s=5.0, psi=psi))
    for _ in range(40):
        assert await admission.admit("flood.example")
    for _ in range(2):
        assert await admission.admit("quiet.example")
    admission.adjust(pressure=0.6, interval_s=1.0)
    assert set(admission.buckets) == {"flood.example"}
    # 0.6 against a target of 0.2: cut to a third.
    assert admission.buckets["flood.example"].rate == pytest.approx(40 / 3)
    # Still under pressure: cut again, never below min_rate.
    for _ in range(10):
        admission.opened.update({"flood.example": 40, "quiet.example": 2})
        admission.adjust(pressure=0.6, interval_s=1.0)
    assert set(admission.buckets) == {"flood.example"}
    assert admission.buckets["flood.example"].rate == 1.0
    # The quiet domain is never held; the flood waits for its tokens.
    started = time.monotonic()
    assert await admission.admit("quiet.example")
    assert time.monotonic() - started < 0.05
    admission.buckets["flood.example"].tokens = 0.0
    admission.buckets["flood.example"].rate = 5.0
    started = time.monotonic()
    assert await admission.admit("flood.example")
    assert 0.15 < time.monotonic() - started < 1.0
    # The pressure goes away: the rate grows by `increase` per interval until it is
    # more than twice what the domain asks for (4/s), then the domain is free again.
    admission.buckets["flood.example"].rate = 1.0
    admission.increase = 2.0
    steps = 0
    while admission.buckets:
        admission.opened.update({"flood.example": 4})
        admission.adjust(pressure=0.01, interval_s=1.0)
        steps += 1
    assert steps == 4


async def spaced_out_flood(rate: float, max_wait_s: float, psi: Path) -> Admission:
    """An admission where flood.example was spaced out to `rate`, its bucket empty."""
    admission = await watching(Admission(target=0.2, min_rate=rate, max_wait_s=max_wait_s,
                                         psi=psi))
    for _ in range(30):
        await admission.admit("flood.example")
    await admission.admit("quiet.example")
    admission.adjust(pressure=0.9, interval_s=1.0)
    bucket = admission.buckets["flood.example"]
    bucket.rate, bucket.tokens = rate, 0.0
    return admission


async def test_a_session_that_cannot_get_a_turn_in_time_is_refused(psi: Path) -> None:
    admission = await spaced_out_flood(0.5, max_wait_s=0.3, psi=psi)
    started = time.monotonic()
    assert not await admission.admit("flood.example")
    assert time.monotonic() - started < 0.5
    assert admission.waiting == {}


async def test_waiting_sessions_keep_the_flood_share_large(psi: Path) -> None:
    """A flood already spaced out asks for few new sessions per interval but has many
    waiting: it stays the one over its share, not the quiet domain."""
    admission = await spaced_out_flood(1.0, max_wait_s=5.0, psi=psi)
    waiters = [asyncio.create_task(admission.admit("flood.example")) for _ in range(10)]
    await asyncio.sleep(0.05)
    for _ in range(3):
        await admission.admit("quiet.example")
    admission.adjust(pressure=0.9, interval_s=1.0)
    assert set(admission.buckets) == {"flood.example"}
    for waiter in waiters:
        waiter.cancel()
    await asyncio.gather(*waiters, return_exceptions=True)


async def test_per_key_limit_caps_one_key_and_forgets_idle_ones() -> None:
    limit = PerKeyLimit(2)
    inside: list[str] = []
    release = asyncio.Event()

    async def hold(key: str) -> None:
        async with limit.slot(key):
            inside.append(key)
            await release.wait()

    tasks = [asyncio.create_task(hold("a")) for _ in range(5)]
    tasks.append(asyncio.create_task(hold("b")))
    await asyncio.sleep(0.05)
    assert sorted(inside) == ["a", "a", "b"]
    assert limit.in_use("a") == 5 and limit.in_use("b") == 1
    release.set()
    await asyncio.gather(*tasks)
    assert len(inside) == 6
    assert limit.in_use("a") == 0 and limit._keys == {}


async def test_a_key_may_have_a_cap_of_its_own() -> None:
    limit = PerKeyLimit(1)
    inside: list[str] = []
    release = asyncio.Event()

    async def hold(key: str, cap: int | None) -> None:
        async with limit.slot(key, cap):
            inside.append(key)
            await release.wait()

    tasks = [asyncio.create_task(hold("a", 3)) for _ in range(5)]
    tasks += [asyncio.create_task(hold("b", None)) for _ in range(2)]
    await asyncio.sleep(0.05)
    assert sorted(inside) == ["a", "a", "a", "b"]
    release.set()
    await asyncio.gather(*tasks)
    assert limit._keys == {}
