"""The limit engine against the real CMDB: slots, windows, modes, scopes, blocks, races."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from mailfc.config import Config
from mailfc.db.pool import open_pool
from mailfc.policy.engine import (
    ACCEPT,
    REJECT,
    SHADOW,
    TEMPFAIL,
    LimitEngine,
    PolicyUnavailable,
    Subject,
)
from tests.policy.conftest import set_limit

BOB = Subject.of("m1.example", "bob@m1.example", "192.0.2.7")
CAROL = Subject.of("m1.example", "carol@m1.example", "192.0.2.8")


async def test_concurrency_slots_are_taken_and_given_back(policy_db: asyncpg.Pool) -> None:
    await set_limit(policy_db, "bob@m1.example", "concurrent_sends", 3)
    engine = LimitEngine(policy_db)
    grants = [await engine.check(BOB, acquire=("concurrent_sends",)) for _ in range(3)]
    assert all(g.admitted and len(g.leases) == 1 for g in grants)
    refused = await engine.check(BOB, acquire=("concurrent_sends",))
    assert not refused.admitted and not refused.leases
    decision = refused.decision
    assert decision.verdict == TEMPFAIL and decision.refuses
    assert decision.rule == "limit:concurrent_sends@account"
    assert "account bob@m1.example has 3 messages in transit (limit 3 at once)" in decision.reason
    # Carol has no limit of her own and the domain none: unaffected.
    assert (await engine.check(CAROL, acquire=("concurrent_sends",))).admitted
    await engine.release(grants[0].leases)
    assert (await engine.check(BOB, acquire=("concurrent_sends",))).admitted
    await engine.stop()
    assert not engine.held
    assert await policy_db.fetchval("SELECT count(*) FROM limit_leases WHERE holder = $1",
                                    engine.holder) == 0


async def test_window_counts_at_consume_and_says_when_to_retry(policy_db: asyncpg.Pool) -> None:
    await set_limit(policy_db, "bob@m1.example", "messages", 10, window_s=60)
    engine = LimitEngine(policy_db)
    for _ in range(10):
        assert (await engine.check(BOB, peek={"messages": 1})).admitted
        assert (await engine.check(BOB, consume={"messages": 1})).admitted
    peeked = await engine.check(BOB, peek={"messages": 1})
    eleventh = await engine.check(BOB, consume={"messages": 1})
    for check in (peeked, eleventh):
        assert not check.admitted
        decision = check.decision
        assert decision.rule == "limit:messages/1m@account"
        assert decision.retry_after_s is not None and 55 <= decision.retry_after_s <= 66
        assert "reached its limit of 10 messages per 1m (10 used); try again in" in \
            decision.reason
    # Refused amounts are not counted.
    assert await policy_db.fetchval(
        "SELECT sum(amount) FROM limit_counters WHERE subject = 'account:bob@m1.example'") == 10


async def test_bytes_and_recipients_windows_with_amounts(policy_db: asyncpg.Pool) -> None:
    await set_limit(policy_db, "m1.example", "bytes", 1000, window_s=3600)
    await set_limit(policy_db, "m1.example", "recipients", 5, window_s=3600)
    engine = LimitEngine(policy_db)
    done = await engine.check(BOB, consume={"bytes": 900, "recipients": 4})
    assert done.admitted
    # The domain's limits count every account of it.
    over = await engine.check(CAROL, consume={"bytes": 200, "recipients": 1})
    assert not over.admitted
    assert [d.rule for d in over.decisions] == ["limit:bytes/1h@domain"]
    assert "sent 900 bytes in the last 1h (limit 1000 bytes per 1h)" in over.decision.reason
    # Nothing of a refused call is counted, not even the part within its limit.
    assert (await engine.check(CAROL, consume={"recipients": 1})).admitted
    assert not (await engine.check(CAROL, consume={"recipients": 1})).admitted


async def test_shadow_mode_decides_but_admits(policy_db: asyncpg.Pool) -> None:
    await set_limit(policy_db, "bob@m1.example", "concurrent_sends", 1, mode="shadow")
    engine = LimitEngine(policy_db)
    first = await engine.check(BOB, acquire=("concurrent_sends",))
    second = await engine.check(BOB, acquire=("concurrent_sends",))
    assert first.admitted and not first.decisions
    assert second.admitted and len(second.leases) == 1
    assert second.decision.mode == SHADOW and second.decision.verdict == TEMPFAIL
    assert not second.decision.refuses
    await engine.stop()


async def test_account_default_and_account_override(policy_db: asyncpg.Pool) -> None:
    await set_limit(policy_db, "m1.example", "recipients_per_message", 2, per_account=True)
    await set_limit(policy_db, "carol@m1.example", "recipients_per_message", 5)
    engine = LimitEngine(policy_db)
    bob = await engine.check(BOB)
    carol = await engine.check(CAROL)
    assert [d.rule for d in bob.exceeds({"recipients_per_message": 3})] == [
        "limit:recipients_per_message@account_default"]
    assert bob.exceeds({"recipients_per_message": 2}) == []
    assert carol.exceeds({"recipients_per_message": 5}) == []
    assert len(carol.exceeds({"recipients_per_message": 6})) == 1
    # Another domain's defaults never apply.
    other = await engine.check(Subject.of("m2.example", "bob@m2.example"))
    assert other.exceeds({"recipients_per_message": 100}) == []


async def test_limit_changes_apply_to_the_next_call(policy_db: asyncpg.Pool) -> None:
    engine = LimitEngine(policy_db)
    await set_limit(policy_db, "bob@m1.example", "messages", 0, window_s=60)
    assert not (await engine.check(BOB, peek={"messages": 1})).admitted
    await set_limit(policy_db, "bob@m1.example", "messages", 5, window_s=60)
    assert (await engine.check(BOB, peek={"messages": 1})).admitted
    await set_limit(policy_db, "bob@m1.example", "messages", 0, window_s=60, mode="shadow")
    check = await engine.check(BOB, peek={"messages": 1})
    assert check.admitted and check.decision.mode == SHADOW


@pytest.mark.parametrize("kind,value,subject,sender", [
    ("ip", "192.0.2.0/24", BOB, "bob@m1.example"),
    ("ip", "192.0.2.7", BOB, "bob@m1.example"),
    ("sender", "bob@m1.example", BOB, "Bob@M1.example"),
    ("sender_domain", "spam.example", CAROL, "x@spam.example"),
    ("account", "carol@m1.example", CAROL, "carol@m1.example"),
    ("domain", "m1.example", CAROL, "carol@m1.example"),
])
async def test_admin_blocks_are_permanent(policy_db: asyncpg.Pool, kind: str, value: str,
                                          subject: Subject, sender: str) -> None:
    await policy_db.execute("INSERT INTO blocks (kind, value, reason) VALUES ($1, $2, $3)",
                            kind, value, "abuse report 42")
    engine = LimitEngine(policy_db)
    check = await engine.check(subject, blocks=True, sender=sender,
                               acquire=("concurrent_sends",))
    assert not check.admitted and not check.leases
    assert check.decision.verdict == REJECT and check.decision.rule == f"block:{kind}"
    assert "abuse report 42" in check.decision.reason
    # Expired blocks and blocks of others do not apply.
    other = Subject.of("m2.example", "bob@m2.example", "198.51.100.1")
    assert (await engine.check(other, blocks=True, sender="bob@m2.example")).admitted
    await policy_db.execute("UPDATE blocks SET expires_at = now() - interval '1s'")
    assert (await engine.check(subject, blocks=True, sender=sender)).decision.verdict == ACCEPT


async def test_two_engines_on_two_pools_share_one_limit(policy_db: asyncpg.Pool,
                                                        mailfc_config: Config) -> None:
    await set_limit(policy_db, "bob@m1.example", "concurrent_sends", 3)
    await set_limit(policy_db, "bob@m1.example", "messages", 7, window_s=600)
    other_pool = await open_pool(mailfc_config)
    try:
        engines = [LimitEngine(policy_db), LimitEngine(other_pool)]
        checks = await asyncio.gather(*(
            engines[i % 2].check(BOB, acquire=("concurrent_sends",)) for i in range(40)))
        assert sum(c.admitted for c in checks) == 3
        assert await policy_db.fetchval(
            "SELECT count(*) FROM limit_leases WHERE subject = 'account:bob@m1.example'") == 3
        consumed = await asyncio.gather(*(
            engines[i % 2].check(BOB, consume={"messages": 1}) for i in range(40)))
        assert sum(c.admitted for c in consumed) == 7
        for engine in engines:
            await engine.stop()
    finally:
        await other_pool.close()


async def test_a_crashed_holder_s_slot_returns_after_the_lease(policy_db: asyncpg.Pool) -> None:
    await set_limit(policy_db, "bob@m1.example", "concurrent_sends", 1)
    crashed = LimitEngine(policy_db, lease_s=1.0)
    assert (await crashed.check(BOB, acquire=("concurrent_sends",))).admitted
    # `crashed` never renews nor releases: as after kill -9.
    survivor = LimitEngine(policy_db, lease_s=1.0)
    assert not (await survivor.check(BOB, acquire=("concurrent_sends",))).admitted
    await asyncio.sleep(1.2)
    assert (await survivor.check(BOB, acquire=("concurrent_sends",))).admitted


async def test_a_live_holder_renews_its_leases(policy_db: asyncpg.Pool) -> None:
    await set_limit(policy_db, "bob@m1.example", "concurrent_sends", 1)
    holder = LimitEngine(policy_db, lease_s=0.6)
    await holder.start()
    try:
        assert (await holder.check(BOB, acquire=("concurrent_sends",))).admitted
        await asyncio.sleep(1.5)
        other = LimitEngine(policy_db, lease_s=0.6)
        assert not (await other.check(BOB, acquire=("concurrent_sends",))).admitted
    finally:
        await holder.stop()


async def test_database_unreachable_is_a_temporary_failure(policy_db: asyncpg.Pool) -> None:
    dead = await asyncpg.create_pool("postgresql:///none?host=/nonexistent", min_size=0)
    try:
        with pytest.raises(PolicyUnavailable, match="limit database unavailable"):
            await LimitEngine(dead).check(BOB, acquire=("concurrent_sends",))
    finally:
        await dead.close()
