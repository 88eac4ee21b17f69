"""The runtime's CMDB queries: hosts, specs, and container_instances rows.

An instance row is the claim on an address and a slot: it is inserted in
state 'starting' before anything is created, so two concurrent starts (in one
process or on two hosts) can never get the same address on one host or the
same slot of one domain: the partial unique indexes refuse the second insert
and the loser picks again.  Rows end in state 'stopped' with a stop_reason;
they are history, not deleted.

States: starting -> running -> draining -> stopped.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any, TypeAlias

import asyncpg

from mailfc.runtime.errors import (
    AddressExhausted,
    CapacityExhausted,
    RuntimeUnavailable,
    UnknownDomain,
)

# A connection or a pool: every query here is a single statement.
Conn: TypeAlias = "asyncpg.Connection | asyncpg.Pool"
INSERT_ATTEMPTS = 64
_DOMAIN = re.compile(r"^[a-z0-9](?:[a-z0-9-]*[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)*$")

INSTANCE_COLUMNS = """
    i.id, i.name, i.domain_id, d.name AS domain, i.service, i.host_id, i.address,
    i.state, i.pid, i.slot, i.created_at, i.ready_at, i.last_activity_at,
    i.draining_at, i.stopped_at, i.stop_reason, i.cpu_pinned_until, i.memory_pinned_until
"""


def check_domain_name(domain: str) -> str:
    """The domain as stored (lower case); refuse anything that is not a DNS name."""
    name = domain.strip().lower().rstrip(".")
    if not name or len(name) > 253 or not _DOMAIN.match(name):
        raise UnknownDomain(f"{domain!r} is not a valid domain name")
    return name


async def host(db: Conn, host_id: int | None, host_name: str) -> asyncpg.Record:
    if host_id is not None:
        row = await db.fetchrow("SELECT * FROM hosts WHERE id = $1", host_id)
    else:
        row = await db.fetchrow("SELECT * FROM hosts WHERE name = $1", host_name)
    if row is None:
        which = f"id {host_id}" if host_id is not None else repr(host_name)
        raise RuntimeUnavailable(
            f"host {which} is not in the CMDB: add it with `mailfc host add`")
    return row


async def domain_spec(db: Conn, domain: str, service: str) -> asyncpg.Record:
    """The domain's id and effective container spec (its own row, else the default)."""
    row = await db.fetchrow(
        """
        SELECT d.id AS domain_id, d.name AS domain, d.state AS domain_state,
               s.cpu_quota_us, s.cpu_period_us, s.cpu_quota_max_us, s.memory_bytes,
               s.memory_max_bytes, s.pids_limit, s.lifetime_s, s.idle_timeout_s,
               s.max_instances
          FROM domains d
          JOIN LATERAL (
                SELECT * FROM container_specs cs
                 WHERE cs.service = $2 AND (cs.domain_id = d.id OR cs.domain_id IS NULL)
                 ORDER BY cs.domain_id IS NULL
                 LIMIT 1) s ON true
         WHERE d.name = $1
        """, domain, service)
    if row is None:
        raise UnknownDomain(f"no domain {domain!r} in the CMDB (or no container spec for "
                            f"service {service!r})")
    if row["domain_state"] != "active":
        raise UnknownDomain(f"domain {domain!r} is {row['domain_state']}")
    return row


async def live_instances(db: Conn, domain_id: int, service: str) -> list[asyncpg.Record]:
    """Live instances of (domain, service) on every host, oldest first."""
    return list(await db.fetch(
        f"""SELECT {INSTANCE_COLUMNS} FROM container_instances i
              JOIN domains d ON d.id = i.domain_id
             WHERE i.domain_id = $1 AND i.service = $2 AND i.state <> 'stopped'
             ORDER BY i.id""", domain_id, service))


async def instances_on_host(db: Conn, host_id: int, *, domain: str | None = None,
                            include_stopped: bool = False) -> list[asyncpg.Record]:
    clauses = ["i.host_id = $1"]
    args: list[Any] = [host_id]
    if not include_stopped:
        clauses.append("i.state <> 'stopped'")
    if domain is not None:
        args.append(domain)
        clauses.append(f"d.name = ${len(args)}")
    return list(await db.fetch(
        f"""SELECT {INSTANCE_COLUMNS} FROM container_instances i
              JOIN domains d ON d.id = i.domain_id
             WHERE {' AND '.join(clauses)} ORDER BY d.name, i.service, i.id""", *args))


async def instance_by_name(db: Conn, name: str) -> asyncpg.Record | None:
    return await db.fetchrow(
        f"""SELECT {INSTANCE_COLUMNS} FROM container_instances i
              JOIN domains d ON d.id = i.domain_id WHERE i.name = $1""", name)


def _address(value: object) -> ipaddress.IPv4Address:
    """An inet column as an address (asyncpg gives an interface when a prefix is set)."""
    if isinstance(value, ipaddress.IPv4Interface):
        return value.ip
    return ipaddress.IPv4Address(str(value).split("/")[0])


def _free_address(network: ipaddress.IPv4Network, taken: set[ipaddress.IPv4Address]
                  ) -> ipaddress.IPv4Address | None:
    # The first host address belongs to the bridge; the lowest free one wins so
    # addresses stay small and readable.
    for candidate in network.hosts():
        if candidate not in taken:
            return candidate
    return None


async def insert_instance(
    db: asyncpg.Pool, *, spec: asyncpg.Record, service: str, host_row: asyncpg.Record,
    network: ipaddress.IPv4Network, name: str, reserved: set[ipaddress.IPv4Address],
) -> asyncpg.Record:
    """Claim an address and a slot for a new instance: the row in state 'starting'.

    `reserved` holds the addresses this process is inserting right now, so its
    own concurrent starts pick different ones instead of colliding and retrying.
    """
    host_id = host_row["id"]
    for _attempt in range(INSERT_ATTEMPTS):
        async with db.acquire() as conn:
            live = await conn.fetchval(
                "SELECT count(*) FROM container_instances WHERE host_id = $1"
                " AND state <> 'stopped'", host_id)
            if live >= host_row["capacity"]:
                raise CapacityExhausted(
                    f"host {host_row['name']} runs {live} containers, its capacity")
            siblings = await conn.fetch(
                "SELECT slot FROM container_instances WHERE domain_id = $1 AND service = $2"
                " AND state <> 'stopped'", spec["domain_id"], service)
            if len(siblings) >= spec["max_instances"]:
                raise CapacityExhausted(
                    f"{spec['domain']} {service}: {len(siblings)} instances run already,"
                    f" the spec allows {spec['max_instances']}")
            slots = {r["slot"] for r in siblings}
            slot = next(n for n in range(len(slots) + 1) if n not in slots)
            taken = {_address(r["address"]) for r in await conn.fetch(
                "SELECT address FROM container_instances"
                " WHERE host_id = $1 AND state <> 'stopped' AND address IS NOT NULL",
                host_id)}
            taken.update(reserved)
            taken.add(network.network_address + 1)
            address = _free_address(network, taken)
            if address is None:
                raise AddressExhausted(f"no free address left in {network} on this host")
            reserved.add(address)
            try:
                row = await conn.fetchrow(
                    """INSERT INTO container_instances
                           (domain_id, service, host_id, name, address, slot, state)
                       VALUES ($1, $2, $3, $4, $5, $6, 'starting')
                       RETURNING id, address, slot, created_at""",
                    spec["domain_id"], service, host_id, name, address, slot)
            except asyncpg.UniqueViolationError:
                continue  # a concurrent start took the address or the slot: pick again
            finally:
                reserved.discard(address)
            assert row is not None
            return row
    raise AddressExhausted("could not claim an address and slot after "
                           f"{INSERT_ATTEMPTS} attempts (too many concurrent starts)")


async def mark_running(db: Conn, instance_id: int, pid: int) -> asyncpg.Record:
    row = await db.fetchrow(
        """UPDATE container_instances
              SET state = 'running', pid = $2, ready_at = coalesce(ready_at, now()),
                  last_activity_at = coalesce(last_activity_at, now())
            WHERE id = $1 RETURNING ready_at, last_activity_at""", instance_id, pid)
    assert row is not None
    return row


async def mark_draining(db: Conn, instance_id: int) -> None:
    await db.execute(
        """UPDATE container_instances SET state = 'draining', draining_at = now()
            WHERE id = $1 AND state IN ('starting', 'running')""", instance_id)


async def mark_stopped(db: Conn, instance_id: int, reason: str) -> None:
    await db.execute(
        """UPDATE container_instances SET state = 'stopped', stopped_at = now(),
                  stop_reason = $2
            WHERE id = $1 AND state <> 'stopped'""", instance_id, reason[:500])


async def touch(db: Conn, instance_id: int) -> None:
    await db.execute(
        "UPDATE container_instances SET last_activity_at = now() WHERE id = $1", instance_id)


async def pin(db: Conn, instance_id: int, *, cpu: bool, memory: bool,
              for_s: int | None) -> None:
    """Pin the instance's CPU quota and/or memory limit: the controller leaves them
    alone until now + for_s ('infinity' with None)."""
    await db.execute(
        """UPDATE container_instances
              SET cpu_pinned_until = CASE WHEN $2 THEN coalesce(
                      now() + make_interval(secs => $4::integer), 'infinity')
                      ELSE cpu_pinned_until END,
                  memory_pinned_until = CASE WHEN $3 THEN coalesce(
                      now() + make_interval(secs => $4::integer), 'infinity')
                      ELSE memory_pinned_until END
            WHERE id = $1""", instance_id, cpu, memory, for_s)


async def unpin(db: Conn, instance_id: int) -> None:
    await db.execute(
        """UPDATE container_instances SET cpu_pinned_until = NULL, memory_pinned_until = NULL
            WHERE id = $1""", instance_id)


async def due_for_stop(db: Conn, host_id: int) -> list[asyncpg.Record]:
    """Running instances past their lifetime or idle timeout, with the reason."""
    return list(await db.fetch(
        f"""SELECT {INSTANCE_COLUMNS},
                   CASE WHEN i.created_at + make_interval(secs => s.lifetime_s) <= now()
                        THEN 'lifetime' ELSE 'idle' END AS due_reason
              FROM container_instances i
              JOIN domains d ON d.id = i.domain_id
              JOIN LATERAL (
                    SELECT lifetime_s, idle_timeout_s FROM container_specs cs
                     WHERE cs.service = i.service
                       AND (cs.domain_id = i.domain_id OR cs.domain_id IS NULL)
                     ORDER BY cs.domain_id IS NULL LIMIT 1) s ON true
             WHERE i.host_id = $1 AND i.state = 'running'
               AND (i.created_at + make_interval(secs => s.lifetime_s) <= now()
                    OR coalesce(i.last_activity_at, i.ready_at, i.created_at)
                       + make_interval(secs => s.idle_timeout_s) <= now())
             ORDER BY i.id""", host_id))
