"""Host directories a container mounts: maildir root, per-instance state, logs, bundle.

    <mail_root>/<domain>/                       -> /srv/mail (vmail, 0770)
    <state_dir>/runtime/domains/<domain>/postfix-<slot>/spool -> /var/spool/postfix
    <state_dir>/runtime/domains/<domain>/postfix-<slot>/data  -> /var/lib/postfix
    <state_dir>/runtime/domains/<domain>/dovecot-<slot>/state -> /var/lib/dovecot
    <state_dir>/runtime/domains/<domain>/<image>-<slot>.log      stdout/stderr
    <state_dir>/runtime/bundles/<name>/                          the OCI bundle

The state directories are persistent (a Postfix queue outlives its container
and is picked up by the next instance of the same slot); they are made on
first use with the owners and modes Postfix's own postfix-files prescribes,
since `master -i` does not run the `postfix start` checks that would.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from mailfc.runtime.images import POSTFIX, Image, host_users
from mailfc.runtime.settings import RuntimeSettings

# (subdirectory, owner, group, mode) per postfix-files; "postfix"/"postdrop"/"root".
POSTFIX_QUEUE_LAYOUT = (
    ("active", "postfix", "root", 0o700), ("bounce", "postfix", "root", 0o700),
    ("corrupt", "postfix", "root", 0o700), ("defer", "postfix", "root", 0o700),
    ("deferred", "postfix", "root", 0o700), ("flush", "postfix", "root", 0o700),
    ("hold", "postfix", "root", 0o700), ("incoming", "postfix", "root", 0o700),
    ("private", "postfix", "root", 0o700), ("saved", "postfix", "root", 0o700),
    ("trace", "postfix", "root", 0o700), ("maildrop", "postfix", "postdrop", 0o730),
    ("public", "postfix", "postdrop", 0o710), ("pid", "root", "root", 0o755),
)


def domain_dir(settings: RuntimeSettings, domain: str) -> Path:
    return settings.domains_dir / domain


def instance_dir(settings: RuntimeSettings, image: Image, domain: str, slot: int) -> Path:
    return domain_dir(settings, domain) / f"{image.name}-{slot}"


def log_path(settings: RuntimeSettings, image: Image, domain: str, slot: int) -> Path:
    return domain_dir(settings, domain) / f"{image.name}-{slot}.log"


def bundle_dir(settings: RuntimeSettings, name: str) -> Path:
    return settings.bundles_dir / name


def prepare_mail_root(settings: RuntimeSettings) -> None:
    root = settings.mail_dir
    root.mkdir(parents=True, exist_ok=True)
    settings.sockets.mkdir(parents=True, exist_ok=True)


def prepare_domain(settings: RuntimeSettings, image: Image, domain: str, slot: int
                   ) -> dict[str, Path]:
    """Make the domain's maildir root and the instance's state dirs; inside path -> host path."""
    users = host_users(settings.vmail_uid, settings.vmail_gid)
    mail = settings.mail_dir / domain
    if not mail.is_dir():
        mail.mkdir(parents=True, exist_ok=True)
        os.chown(mail, settings.vmail_uid, settings.vmail_gid)
        mail.chmod(0o770)
    base = instance_dir(settings, image, domain, slot)
    mounts = {inside: base / sub for inside, sub in image.state_mounts}
    marker = base / ".prepared"
    if marker.exists():
        return mounts
    base.mkdir(parents=True, exist_ok=True, mode=0o755)
    for path in mounts.values():
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(0o755)
    if image is POSTFIX:
        ids = {"postfix": users["postfix_uid"], "root": 0}
        gids = {"postdrop": users["postdrop_gid"], "root": 0}
        spool, data = base / "spool", base / "data"
        for sub, owner, group, mode in POSTFIX_QUEUE_LAYOUT:
            path = spool / sub
            path.mkdir(exist_ok=True)
            os.chown(path, ids[owner], gids[group])
            path.chmod(mode)
        os.chown(data, users["postfix_uid"], 0)
        data.chmod(0o700)
    marker.touch()
    return mounts


def make_bundle(settings: RuntimeSettings, name: str) -> Path:
    bundle = bundle_dir(settings, name)
    if bundle.exists():
        shutil.rmtree(bundle)
    (bundle / "etc").mkdir(parents=True)
    return bundle


def remove_bundle(settings: RuntimeSettings, name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(bundle_dir(settings, name))


def list_bundles(settings: RuntimeSettings) -> list[str]:
    prefix = settings.name_prefix + "-"
    try:
        return sorted(n for n in os.listdir(settings.bundles_dir) if n.startswith(prefix))
    except FileNotFoundError:
        return []


def log_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def log_tail(path: Path, since: int = 0, limit: int = 600) -> str:
    """What a container logged since offset `since` (its last `limit` bytes)."""
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(since, size - limit))
            return handle.read().decode(errors="replace").strip()
    except OSError:
        return ""
