"""A removed domain's mail: archived under the state directory, or purged.

    <state_dir>/archive/ (root, 0700)
        <YYYYmmddTHHMMSSZ>-<domain>/         one removal (UTC time of removal)
            mail/                            was <mail_root>/<domain>
            state/                           was <state_dir>/runtime/domains/<domain>
                                             (Postfix queues, Dovecot state, logs)

`mailfc domain remove` moves both away (archive()) or deletes them (purge());
either way nothing of the old domain is left where a new domain of the same
name would find it: at an ISP a domain changes hands, and its new owner must
not read the old owner's mail nor have the old queue delivered.  An archive
is never attached again by mailfc; an admin restores from it by hand.

Moves are renames when the archive is on the same file system (instant),
else copy and delete (shutil.move).  Only root may enter the archive.
"""

from __future__ import annotations

import datetime
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from mailfc.runtime import storage
from mailfc.runtime.settings import RuntimeSettings

STAMP = "%Y%m%dT%H%M%SZ"


@dataclass(frozen=True)
class Archive:
    domain: str
    removed_at: datetime.datetime
    path: Path
    bytes: int

    def as_dict(self) -> dict[str, object]:
        return {"domain": self.domain, "removed_at": self.removed_at.isoformat(),
                "path": str(self.path), "bytes": self.bytes}


def archive_root(settings: RuntimeSettings) -> Path:
    return settings.state_dir / "archive"


def _sources(settings: RuntimeSettings, domain: str) -> dict[str, Path]:
    return {"mail": settings.mail_dir / domain, "state": storage.domain_dir(settings, domain)}


def archive(settings: RuntimeSettings, domain: str,
            removed_at: datetime.datetime | None = None) -> Archive | None:
    """Move the domain's mail and state into a new archive; None when it had none."""
    sources = {k: v for k, v in _sources(settings, domain).items() if v.exists()}
    if not sources:
        return None
    when = (removed_at or datetime.datetime.now(datetime.UTC)).astimezone(datetime.UTC)
    root = archive_root(settings)
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chown(root, 0, 0)
    root.chmod(0o700)
    target = root / f"{when.strftime(STAMP)}-{domain}"
    suffix = 1
    while target.exists():   # removed twice within a second
        suffix += 1
        target = root / f"{when.strftime(STAMP)}-{domain}.{suffix}"
    target.mkdir(mode=0o700)
    for name, source in sources.items():
        shutil.move(str(source), str(target / name))
    return Archive(domain, when.replace(microsecond=0), target, _size(target))


def purge(settings: RuntimeSettings, domain: str) -> list[Path]:
    """Delete the domain's mail and state; the paths deleted."""
    deleted = []
    for source in _sources(settings, domain).values():
        if source.exists():
            shutil.rmtree(source)
            deleted.append(source)
    return deleted


def archives(settings: RuntimeSettings, domain: str | None = None) -> list[Archive]:
    """Every archive, oldest first (of one domain with `domain`)."""
    root = archive_root(settings)
    found = []
    try:
        entries = sorted(root.iterdir())
    except FileNotFoundError:
        return []
    for entry in entries:
        stamp, _, rest = entry.name.partition("-")
        name = rest.rsplit(".", 1)[0] if rest.rsplit(".", 1)[-1].isdigit() else rest
        try:
            when = datetime.datetime.strptime(stamp, STAMP).replace(tzinfo=datetime.UTC)
        except ValueError:
            continue    # not one of ours
        if entry.is_dir() and (domain is None or name == domain):
            found.append(Archive(name, when, entry, _size(entry)))
    return found


def _size(top: Path) -> int:
    total = 0
    for directory, _dirs, files in os.walk(top):
        for name in files:
            try:
                total += os.lstat(os.path.join(directory, name)).st_size
            except OSError:
                continue
    return total
