"""Host directories a container mounts: maildir root, per-instance state, logs, bundle.

    <mail_root>/<domain>/                       -> /srv/mail (vmail, 0770)
    <state_dir>/private/ (root, 0700)
        sockets/ (root, 0711)                   -> /run/mailfc, read-only
    <state_dir>/sockets -> private/sockets      for configurations that name the
                                                 directory's former place
    <state_dir>/runtime/domains/ (root, 0700)
    <state_dir>/runtime/domains/<domain>/postfix-<slot>/spool -> /var/spool/postfix
    <state_dir>/runtime/domains/<domain>/postfix-<slot>/data  -> /var/lib/postfix
    <state_dir>/runtime/domains/<domain>/dovecot-<slot>/state -> /var/lib/dovecot
    <state_dir>/runtime/domains/<domain>/<image>-<slot>.log      stdout/stderr
    <state_dir>/runtime/bundles/<name>/                          the OCI bundle

The state directories are persistent (a Postfix queue outlives its container
and is picked up by the next instance of the same slot); they are made on
first use with the owners and modes Postfix's own postfix-files prescribes,
since `master -i` does not run the `postfix start` checks that would.

Owners are the host's ids of the users inside (settings.outside_id: the
container's user namespace maps uid N to id_base + N).  A directory prepared
under another id_base (or none, before user namespaces) is handed over to the
new owners once, file by file, before its container starts.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from mailfc.config import CONTAINER_IDS
from mailfc.runtime.errors import RuntimeUnavailable
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
    prepare_socket_dir(settings)
    settings.domains_dir.mkdir(parents=True, exist_ok=True)
    os.chown(settings.domains_dir, 0, 0)
    settings.domains_dir.chmod(0o700)


ROOT_ONLY = 0o700
SOCKET_DIR_MODE = 0o711
# Where the milter and the hook server put their sockets unless configured.
DEFAULT_LINK = "sockets"


def prepare_socket_dir(settings: RuntimeSettings) -> Path:
    """Make the socket directory under a parent only root may enter; its path.

    The default parent, <state_dir>/private, is made so; a configured socket
    directory whose parent lets anyone else in is refused, naming the fix.
    With the default, <state_dir>/sockets becomes a link to it (a directory
    there from before is emptied into it: a listening socket keeps serving
    under its new name).
    """
    sockets = settings.sockets
    parent = sockets.parent
    default = settings.socket_dir is None
    parent.mkdir(parents=True, exist_ok=True, mode=ROOT_ONLY)
    status = parent.stat()
    if status.st_uid != 0 or status.st_mode & 0o077:
        if not default:
            raise RuntimeUnavailable(
                f"{parent} holds the socket directory {sockets} but is not root's alone "
                f"(mode {status.st_mode & 0o777:o}): chmod 700 {parent} and chown root, or "
                "choose a socket directory under such a directory")
        os.chown(parent, 0, 0)
        parent.chmod(ROOT_ONLY)
    sockets.mkdir(exist_ok=True)
    os.chown(sockets, 0, 0)
    sockets.chmod(SOCKET_DIR_MODE)
    if default:
        _link_default(settings.state_dir / DEFAULT_LINK, sockets)
    return sockets


def _link_default(link: Path, sockets: Path) -> None:
    target = os.path.relpath(sockets, link.parent)
    if link.is_symlink():
        if os.readlink(link) == target:
            return
        link.unlink()
    elif link.is_dir():
        for entry in link.iterdir():
            os.replace(entry, sockets / entry.name)
        link.rmdir()
    with contextlib.suppress(FileExistsError):   # a concurrent start made it
        link.symlink_to(target)


def prepare_domain(settings: RuntimeSettings, image: Image, domain: str, slot: int
                   ) -> dict[str, Path]:
    """Make the domain's maildir root and the instance's state dirs; inside path -> host path."""
    users = host_users(settings.vmail_uid, settings.vmail_gid)
    shift = settings.outside_id
    mail = settings.mail_dir / domain
    vmail = (shift(settings.vmail_uid), shift(settings.vmail_gid))
    if not mail.is_dir():
        mail.mkdir(parents=True, exist_ok=True)
        os.chown(mail, *vmail)
        mail.chmod(0o770)
    elif (mail.stat().st_uid, mail.stat().st_gid) != vmail:
        _hand_over(mail, settings.id_base)
    base = instance_dir(settings, image, domain, slot)
    mounts = {inside: base / sub for inside, sub in image.state_mounts}
    _own_log(log_path(settings, image, domain, slot), shift(0))
    marker = base / ".prepared"
    if marker.exists():
        if _id_base_of(marker) != settings.id_base:
            for path in mounts.values():
                _hand_over(path, settings.id_base)
            marker.write_text(f"{settings.id_base}\n")
        return mounts
    base.mkdir(parents=True, exist_ok=True, mode=0o755)
    for path in mounts.values():
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(0o755)
        os.chown(path, shift(0), shift(0))
    if image is POSTFIX:
        ids = {"postfix": users["postfix_uid"], "root": 0}
        gids = {"postdrop": users["postdrop_gid"], "root": 0}
        spool, data = base / "spool", base / "data"
        for sub, owner, group, mode in POSTFIX_QUEUE_LAYOUT:
            path = spool / sub
            path.mkdir(exist_ok=True)
            os.chown(path, shift(ids[owner]), shift(gids[group]))
            path.chmod(mode)
        os.chown(data, shift(users["postfix_uid"]), shift(0))
        data.chmod(0o700)
    marker.write_text(f"{settings.id_base}\n")
    return mounts


def _own_log(log: Path, root: int) -> None:
    """The container's stdout/stderr file, owned by its root: Postfix's postlogd
    opens /dev/stdout again by name, as the container's root."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        log.touch(mode=0o640, exist_ok=False)
    if log.stat().st_uid != root:
        os.chown(log, root, root)


def _id_base_of(marker: Path) -> int:
    """The id base a state directory was prepared for (an empty marker: before
    user namespaces, the host's own ids)."""
    text = marker.read_text().strip()
    return int(text) if text.isdigit() else 0


def _hand_over(top: Path, new_base: int) -> None:
    """Give every file under `top` the host ids its inside ids have under `new_base`.

    An id's inside id is the id itself below CONTAINER_IDS (no user namespace
    before), else its offset in the range (bases are multiples of it)."""
    for directory, dirs, files in os.walk(top):
        for path in [directory, *(os.path.join(directory, name) for name in dirs + files)]:
            st = os.lstat(path)
            os.lchown(path, new_base + st.st_uid % CONTAINER_IDS,
                      new_base + st.st_gid % CONTAINER_IDS)


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


def rotate_log(path: Path, max_bytes: int, keep: int) -> bool:
    """Rotate a container's log that has grown past `max_bytes`: <log>.<keep-1> ->
    <log>.<keep>, ..., <log> -> <log>.1 (with keep 0 the log is truncated); True when
    rotated.  Called before the container starts, when nobody holds the file open:
    a running container keeps appending to the file it opened."""
    if log_size(path) <= max_bytes:
        return False
    if keep == 0:
        with contextlib.suppress(OSError):
            os.truncate(path, 0)
        return True
    for number in range(keep - 1, 0, -1):
        older = path.with_name(f"{path.name}.{number}")
        if older.exists():
            older.replace(path.with_name(f"{path.name}.{number + 1}"))
    path.replace(path.with_name(f"{path.name}.1"))
    return True


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
