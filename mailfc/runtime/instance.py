"""Instance: one live container of a domain as the CMDB records it.

`service` is the service the row is recorded under ('smtp' for Postfix,
'imap' for the Dovecot that serves both lmtp and imap); `socket(service)`
gives the host path of the unix socket where the container takes that
service's sessions (through /proc/<pid>/root: the host's root only).
`address` is its address on the bridge, where nothing listens any more.
`cpu_pinned_until` / `memory_pinned_until`: an admin's `container update`
pinned that setting until then (datetime.max: until `--unpin`); the
controller leaves a pinned setting alone (pinned()).
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import asdict, dataclass
from typing import Any

import asyncpg

from mailfc.runtime.images import container_socket, image_for


@dataclass(frozen=True)
class Instance:
    id: int
    name: str
    domain: str
    domain_id: int
    service: str
    image: str
    host_id: int
    address: ipaddress.IPv4Address
    state: str
    slot: int
    pid: int | None
    created_at: datetime.datetime | None = None
    ready_at: datetime.datetime | None = None
    last_activity_at: datetime.datetime | None = None
    stop_reason: str | None = None
    cpu_pinned_until: datetime.datetime | None = None
    memory_pinned_until: datetime.datetime | None = None

    def pinned(self, setting: str, now: datetime.datetime | None = None) -> bool:
        """Whether the admin pinned `setting` ('cpu' or 'memory') and the pin holds."""
        until = self.cpu_pinned_until if setting == "cpu" else self.memory_pinned_until
        if until is None:
            return False
        if until.tzinfo is None:   # asyncpg gives 'infinity' as a naive datetime.max
            until = until.replace(tzinfo=datetime.UTC)
        return until > (now or datetime.datetime.now(datetime.UTC))

    def pins(self, now: datetime.datetime | None = None) -> str:
        """The pins that hold, for people: "cpu, memory until 14:05:00" or ""."""
        words = []
        for setting in ("cpu", "memory"):
            if self.pinned(setting, now):
                until = getattr(self, f"{setting}_pinned_until")
                words.append(setting if until.year == datetime.MAXYEAR
                             else f"{setting} until {until.astimezone():%Y-%m-%d %H:%M:%S}")
        return ", ".join(words)

    def serves(self, service: str) -> bool:
        return image_for(service).name == self.image

    def socket(self, service: str | None = None) -> str:
        service = service or self.service
        if not self.serves(service):
            raise ValueError(f"{self.name} ({self.image}) does not serve {service}")
        if not self.pid:
            raise ValueError(f"{self.name} has no process")
        return container_socket(self.pid, service)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["address"] = str(self.address)
        return data

    @classmethod
    def from_record(cls, row: asyncpg.Record) -> Instance:
        address = row["address"]
        if isinstance(address, ipaddress.IPv4Interface):
            address = address.ip
        return cls(
            id=row["id"], name=row["name"], domain=row["domain"], domain_id=row["domain_id"],
            service=row["service"], image=image_for(row["service"]).name,
            host_id=row["host_id"], address=ipaddress.IPv4Address(str(address)),
            state=row["state"], slot=row["slot"], pid=row["pid"],
            created_at=row["created_at"], ready_at=row["ready_at"],
            last_activity_at=row["last_activity_at"], stop_reason=row["stop_reason"],
            cpu_pinned_until=row.get("cpu_pinned_until"),
            memory_pinned_until=row.get("memory_pinned_until"))
