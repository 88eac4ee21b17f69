"""The two container images: what runs, on which ports, with which files and mounts.

An image is a directory under containers/ (Jinja2 templates for /etc) plus the
description below.  Services map to images:

    smtp        -> postfix  (master -i as PID 1)
    lmtp, imap  -> dovecot  (dovecot -F as PID 1; one Dovecot serves both, and
                             the CMDB records it under the service 'imap')

Nothing in a container listens on the network.  The dispatcher reaches each
service through a unix socket inside the container (SOCKETS), on the host
through /proc/<init pid>/root/... (container_socket()), which needs ptrace
rights over the container's init, i.e. the host's root:

    postfix  /var/spool/postfix/private/dispatcher   SMTP (XCLIENT from the dispatcher)
    dovecot  /run/dovecot/lmtp                       LMTP (root only)
             /run/dovecot/imap-master, auth-userdb   IMAP hand-over (mailfc.protocols.dovecot)

Mail leaves a Postfix container by LMTP to Filter-Out's socket in the
mounted socket directory (RuntimeSettings.filter_out_socket).

Paths inside the container are defined here once and used by the templates,
the OCI spec builder and the tests alike.
"""

from __future__ import annotations

import glob
import grp
import os
import pwd
import shutil
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import jinja2

from mailfc.runtime.errors import RuntimeUnavailable
from mailfc.runtime.settings import RuntimeSettings

SERVICES = ("smtp", "lmtp", "imap")

# Inside-container mount points.
MAIL_MOUNT = "/srv/mail"
SOCKET_MOUNT = "/run/mailfc"
POSTFIX_QUEUE = "/var/spool/postfix"
POSTFIX_DATA = "/var/lib/postfix"
DOVECOT_STATE = "/var/lib/dovecot"
DOVECOT_BASE_DIR = "/run/dovecot"
# master.cf's smtpd service for the dispatcher (a socket in the queue's private/).
POSTFIX_DISPATCHER_SERVICE = "dispatcher"

# Where each service takes its sessions, inside the container.
SOCKETS: dict[str, str] = {
    "smtp": f"{POSTFIX_QUEUE}/private/{POSTFIX_DISPATCHER_SERVICE}",
    "lmtp": f"{DOVECOT_BASE_DIR}/lmtp",
    "imap": f"{DOVECOT_BASE_DIR}/imap-master",
}
# Sockets a service needs besides SOCKETS before it is ready: a handed-over IMAP
# login asks Dovecot's auth-userdb, which its auth process binds a moment after
# the master's imap-master.
ALSO_READY: dict[str, tuple[str, ...]] = {"imap": (f"{DOVECOT_BASE_DIR}/auth-userdb",)}
# What Dovecot 2.3 says after login, set in its config rather than left to
# its defaults: the dispatcher answers a handed-over LOGIN with it
# (mailfc.dispatcher), and a client must see the same list both ways.
DOVECOT_IMAP_CAPABILITY = (
    "IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE SORT SORT=DISPLAY THREAD=REFERENCES "
    "THREAD=REFS THREAD=ORDEREDSUBJECT MULTIAPPEND URL-PARTIAL CATENATE UNSELECT CHILDREN "
    "NAMESPACE UIDPLUS LIST-EXTENDED I18NLEVEL=1 CONDSTORE QRESYNC ESEARCH ESORT SEARCHRES "
    "WITHIN CONTEXT=SEARCH LIST-STATUS BINARY MOVE SNIPPET=FUZZY PREVIEW=FUZZY PREVIEW "
    "STATUS=SIZE SAVEDATE LITERAL+ NOTIFY")

SETTLED_MTIME = 946684800  # 2000-01-01: older than any check for fresh config files
DOVECOT_MODULES = Path("/usr/lib/dovecot/modules")
IMAGES_DIR = Path(__file__).resolve().parents[2] / "containers"


@dataclass(frozen=True)
class Image:
    name: str
    services: tuple[str, ...]
    # The service a container of this image is recorded under in the CMDB.
    record_service: str
    args: tuple[str, ...]
    # (binary, Debian package) that must exist on the host.
    needs: tuple[tuple[str, str], ...]
    # Persistent per-instance directories: inside path -> name under the domain dir.
    state_mounts: tuple[tuple[str, str], ...]

    def template_dir(self, images_dir: Path | None = None) -> Path:
        return (images_dir or IMAGES_DIR) / self.name / "etc"


POSTFIX = Image(
    name="postfix",
    services=("smtp",),
    record_service="smtp",
    args=("/usr/lib/postfix/sbin/master", "-i"),
    needs=(("/usr/lib/postfix/sbin/master", "postfix"), ("/usr/sbin/postconf", "postfix")),
    state_mounts=((POSTFIX_QUEUE, "spool"), (POSTFIX_DATA, "data")),
)
DOVECOT = Image(
    name="dovecot",
    services=("lmtp", "imap"),
    record_service="imap",
    args=("/usr/sbin/dovecot", "-F"),
    needs=(("/usr/sbin/dovecot", "dovecot-core"), ("/usr/lib/dovecot/imap", "dovecot-imapd"),
           ("/usr/lib/dovecot/lmtp", "dovecot-lmtpd")),
    state_mounts=((DOVECOT_STATE, "state"),),
)
IMAGES = {"postfix": POSTFIX, "dovecot": DOVECOT}
SERVICE_IMAGE = {"smtp": POSTFIX, "lmtp": DOVECOT, "imap": DOVECOT}


def dovecot_socket(pid: int, name: str) -> str:
    """Host path of a socket in the Dovecot (init `pid`) container's base_dir."""
    return f"/proc/{pid}/root{DOVECOT_BASE_DIR}/{name}"


def container_socket(pid: int, service: str) -> str:
    """Host path of the socket where the container (init `pid`) takes `service`'s
    sessions; only the host's root may follow /proc/<pid>/root."""
    return f"/proc/{pid}/root{SOCKETS[service]}"


def image_for(service: str) -> Image:
    try:
        return SERVICE_IMAGE[service]
    except KeyError:
        raise ValueError(f"unknown service {service!r}: expected one of {', '.join(SERVICES)}") \
            from None


def check_installed(image: Image) -> None:
    """Fail with the Debian package to install when a binary the image runs is missing."""
    for path, package in image.needs:
        if not os.access(path, os.X_OK):
            raise RuntimeUnavailable(f"{path} is missing: apt-get install {package}")


# -- the users inside: the host's uids, so files in persistent mounts and the
# setgid binaries from the read-only /usr keep their meaning --------------------

def _user(name: str, package: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        raise RuntimeUnavailable(f"host user {name!r} is missing: apt-get install {package}") \
            from None


def _group(name: str, package: str) -> grp.struct_group:
    try:
        return grp.getgrnam(name)
    except KeyError:
        raise RuntimeUnavailable(f"host group {name!r} is missing: apt-get install {package}") \
            from None


@cache
def host_users(vmail_uid: int, vmail_gid: int) -> dict[str, Any]:
    postfix, dovecot, dovenull = (_user("postfix", "postfix"), _user("dovecot", "dovecot-core"),
                                  _user("dovenull", "dovecot-core"))
    postdrop = _group("postdrop", "postfix")
    passwd = [
        {"name": "postfix", "uid": postfix.pw_uid, "gid": postfix.pw_gid,
         "home": POSTFIX_QUEUE},
        {"name": "dovecot", "uid": dovecot.pw_uid, "gid": dovecot.pw_gid,
         "home": "/usr/lib/dovecot"},
        {"name": "dovenull", "uid": dovenull.pw_uid, "gid": dovenull.pw_gid,
         "home": "/nonexistent"},
        {"name": "vmail", "uid": vmail_uid, "gid": vmail_gid, "home": MAIL_MOUNT},
    ]
    groups = [
        {"name": "postfix", "gid": postfix.pw_gid},
        {"name": "postdrop", "gid": postdrop.gr_gid},
        {"name": "dovecot", "gid": dovecot.pw_gid},
        {"name": "dovenull", "gid": dovenull.pw_gid},
        {"name": "vmail", "gid": vmail_gid},
    ]
    return {"passwd": passwd, "group": groups, "postfix_uid": postfix.pw_uid,
            "postfix_gid": postfix.pw_gid, "postdrop_gid": postdrop.gr_gid,
            "vmail_uid": vmail_uid, "vmail_gid": vmail_gid}


# -- rendering -------------------------------------------------------------------

@cache
def _environment(root: Path) -> jinja2.Environment:
    # StrictUndefined: a template variable nobody passes is a bug, not an empty string.
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(root)),
        undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)


@cache
def _template_files(root: Path) -> tuple[str, ...]:
    if not root.is_dir():
        raise RuntimeUnavailable(f"image directory {root} is missing (broken installation)")
    return tuple(sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()))


# mailfc.dispatcher.sasl listens here (a name inside the socket directory).
SASL_SOCKET = "auth.sock"


def hook_plugin_installed(name: str) -> bool:
    return bool(glob.glob(str(DOVECOT_MODULES / f"lib*_{name}_plugin.so")))


def template_context(image: Image, domain: str, settings: RuntimeSettings) -> dict[str, Any]:
    hook = settings.dovecot_hook_plugin
    return {
        "domain": domain,
        "hostname": f"mail.{domain}" if len(domain) < 200 else domain,
        # Filter-Out's socket in the socket directory, as Postfix's LMTP client names it.
        "relay": f"unix:{SOCKET_MOUNT}/{settings.filter_out_socket}",
        "dispatcher_service": POSTFIX_DISPATCHER_SERVICE,
        "milter_socket": f"{SOCKET_MOUNT}/{settings.milter_socket}",
        "hook_socket": f"{SOCKET_MOUNT}/{settings.hook_socket}",
        # Postfix exits when SASL is on and nobody answers on the socket, so it is
        # turned on only when the dispatcher's locked SASL server listens.
        "sasl_socket": f"{SOCKET_MOUNT}/{SASL_SOCKET}"
        if (settings.sockets / SASL_SOCKET).exists() else "",
        "hook_plugin": hook if hook and hook_plugin_installed(hook) else "",
        "users": host_users(settings.vmail_uid, settings.vmail_gid),
        "nameservers": settings.nameservers,
        "nfs_safe": settings.nfs_safe,
        "base_dir": DOVECOT_BASE_DIR,
        "imap_capability": DOVECOT_IMAP_CAPABILITY,
        # The one size limit (messages.size_limit), and how soon deferred mail is
        # retried (runtime.postfix_retry_s): see main.cf.
        "message_size_limit": settings.message_size_limit,
        "postfix_retry_s": settings.postfix_retry_s,
    }


def render_etc(image: Image, target: Path, context: dict[str, Any],
               images_dir: Path | None = None) -> None:
    """Write the image's /etc skeleton for one container into `target`."""
    source = image.template_dir(images_dir)
    env = _environment(source)
    for relative in _template_files(source):
        out = target / relative.removesuffix(".j2")
        out.parent.mkdir(parents=True, exist_ok=True)
        if relative.endswith(".j2"):
            out.write_text(env.get_template(relative).render(context))
        else:
            shutil.copyfile(source / relative, out)
        out.chmod(0o644)
        # Postfix's master re-reads a main.cf younger than a few seconds until it
        # settles (about 2 s here): rendered files get an mtime in the past.
        os.utime(out, (SETTLED_MTIME, SETTLED_MTIME))
