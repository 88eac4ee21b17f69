"""The embedded CMDB: a private PostgreSQL cluster under the state directory.

With no `database.dsn` configured, mailfc runs its own cluster from the
system's PostgreSQL binaries (Debian package `postgresql`):

    <state_dir>/postgres/data     the cluster, owned by `database.embedded_user`
    <state_dir>/postgres/run      its unix socket (the only way in: no TCP)
    <state_dir>/postgres/log      the server log

It is created and started on demand by any command that needs the database
(`ensure_running`), and stopped by `mailfc db stop`.  A lock file serializes
concurrent starters, so two commands started at once share one cluster.
While `mailfc up` runs, its supervisor looks at the postmaster every second
(`postmaster_alive`: the pid in postmaster.pid, read from /proc, no subprocess)
and starts the cluster again when it is gone (mailfc.controller.supervisor):
stop `mailfc up` before `mailfc db stop`, or the cluster comes back.  A killed
postmaster left a zombie (a machine whose init reaps late) counts as gone: its
stale lock files are removed once no old server process holds its shared memory.

SECURITY: PostgreSQL refuses to run as root, so the cluster runs as an
unprivileged user.  Authentication is `trust` on the unix socket only; the
socket directory is mode 0700 and owned by that user, so only root and that
user can connect.
"""

from __future__ import annotations

import fcntl
import os
import pwd
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from mailfc.errors import DatabaseError

DATABASE_NAME = "mailfc"
SUPERUSER = "postgres"
PG_PORT = 5432  # only names the socket file .s.PGSQL.5432; TCP is off

_SETTINGS = {
    "listen_addresses": "''",
    "max_connections": "200",
    "shared_buffers": "128MB",
    "logging_collector": "off",
    # Session tables take many small inserts; commits stay durable (fsync on)
    # but may share one WAL flush.
    "commit_delay": "100",
    "synchronous_commit": "on",
}


@dataclass(frozen=True)
class EmbeddedCluster:
    root: Path
    user: str = "postgres"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        return self.root / "run"

    @property
    def log_file(self) -> Path:
        return self.root / "log" / "postgresql.log"

    @property
    def dsn(self) -> str:
        return f"postgresql://{SUPERUSER}@/{DATABASE_NAME}?host={self.socket_dir}&port={PG_PORT}"

    @property
    def admin_dsn(self) -> str:
        return f"postgresql://{SUPERUSER}@/postgres?host={self.socket_dir}&port={PG_PORT}"

    def is_initialized(self) -> bool:
        return (self.data_dir / "PG_VERSION").exists()

    def is_running(self) -> bool:
        if not self.is_initialized():
            return False
        result = self._run(["pg_ctl", "status", "-D", str(self.data_dir)], check=False)
        return result.returncode == 0

    def postmaster_pid(self) -> int | None:
        """The pid postmaster.pid names (also after a crash); None without the file."""
        try:
            first = (self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0]
        except OSError:
            return None
        return int(first) if first.strip().isdigit() else None

    def postmaster_state(self) -> str:
        """"running", "zombie" (killed, not yet reaped by its parent), "gone" (the
        pid file names no process) or "none" (no pid file: stopped)."""
        pid = self.postmaster_pid()
        if pid is None:
            return "none"
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return "gone"
        state = stat.rpartition(") ")[2][:1]
        return "zombie" if state in ("Z", "X") else "running"

    def postmaster_alive(self) -> bool:
        """True while the postmaster runs (cheap: /proc, no pg_ctl)."""
        return self.postmaster_state() == "running"

    def ensure_running(self) -> bool:
        """Create the cluster if it does not exist and start it if it is down;
        True when this call started it."""
        self.root.mkdir(parents=True, exist_ok=True)
        lock_path = self.root / "cluster.lock"
        with lock_path.open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not self.is_initialized():
                self._initdb()
            if self.is_running():
                if self.postmaster_state() != "zombie":
                    return False
                self._clear_zombie_locks()
            self._start()
            return True

    def _clear_zombie_locks(self) -> None:
        """A killed postmaster whose parent has not reaped it (a machine whose init
        reaps late) still "runs" for pg_ctl and for a new postmaster's lock file
        check, which would refuse to start: its lock files go, once no process of
        the old server holds its shared memory any more (what PostgreSQL's own
        check protects)."""
        pid_file = self.data_dir / "postmaster.pid"
        try:
            lines = pid_file.read_text().splitlines()
        except OSError:
            return
        shm_id = lines[6].split()[-1] if len(lines) > 6 and lines[6].split() else ""
        if shm_id.isdigit() and _shm_attached(int(shm_id)):
            raise DatabaseError("the killed PostgreSQL's processes still hold its shared "
                                "memory; it starts once they have exited")
        socket_lock = self.socket_dir / f".s.PGSQL.{PG_PORT}.lock"
        try:
            same = socket_lock.read_text().split("\n", 1)[0].strip() == lines[0].strip()
        except OSError:
            same = False
        if same:
            socket_lock.unlink(missing_ok=True)
        pid_file.unlink(missing_ok=True)

    def stop(self) -> bool:
        """Stop the cluster; False if it was not running."""
        if not self.is_running():
            return False
        result = self._run(
            ["pg_ctl", "stop", "-D", str(self.data_dir), "-m", "fast", "-w", "-t", "60"],
            check=False,
        )
        if result.returncode != 0:
            raise DatabaseError(
                f"embedded PostgreSQL did not stop: {result.stderr.strip()} "
                f"(see {self.log_file})"
            )
        return True

    def _owner(self) -> pwd.struct_passwd:
        try:
            return pwd.getpwnam(self.user)
        except KeyError:
            raise DatabaseError(
                f"user {self.user!r} for the embedded PostgreSQL does not exist: "
                "apt-get install postgresql (it creates 'postgres'), or set "
                "database.embedded_user"
            ) from None

    def _prepare_dirs(self) -> None:
        owner = self._owner()
        # The server user must be able to reach its directories through the state dir.
        for parent in [self.root, *self.root.parents]:
            mode = parent.stat().st_mode
            if not mode & 0o001:
                if parent == self.root or parent == self.root.parent:
                    parent.chmod(mode | 0o001)
                else:
                    raise DatabaseError(
                        f"{parent} is not searchable by user {self.user!r}, so the embedded "
                        f"PostgreSQL cannot reach {self.root}: chmod o+x {parent} or choose "
                        "another paths.state_dir"
                    )
        for directory, mode in (
            (self.data_dir, 0o700),
            (self.socket_dir, 0o700),
            (self.log_file.parent, 0o700),
        ):
            directory.mkdir(parents=True, exist_ok=True)
            os.chown(directory, owner.pw_uid, owner.pw_gid)
            directory.chmod(mode)

    def _initdb(self) -> None:
        self._prepare_dirs()
        if any(self.data_dir.iterdir()):
            raise DatabaseError(
                f"{self.data_dir} is not empty but holds no PostgreSQL cluster: "
                "move it away or choose another paths.state_dir"
            )
        result = self._run(
            [
                "initdb", "-D", str(self.data_dir), "-U", SUPERUSER, "--auth=trust",
                "--encoding=UTF8", "--locale=C.UTF-8",
            ],
            check=False,
        )
        if result.returncode != 0:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            raise DatabaseError(f"initdb failed: {result.stderr.strip()}")
        conf = self.data_dir / "postgresql.conf"
        extra = [f"{key} = {value}" for key, value in _SETTINGS.items()]
        extra.append(f"unix_socket_directories = '{self.socket_dir}'")
        with conf.open("a") as handle:
            handle.write("\n# mailfc embedded cluster\n" + "\n".join(extra) + "\n")

    def _start(self) -> None:
        self._prepare_dirs()
        result = self._run(
            [
                "pg_ctl", "start", "-D", str(self.data_dir), "-l", str(self.log_file),
                "-w", "-t", "60",
            ],
            check=False,
        )
        if result.returncode != 0:
            tail = _tail(self.log_file)
            raise DatabaseError(
                f"embedded PostgreSQL did not start: {result.stderr.strip() or tail}"
            )
        self._create_database()

    def _create_database(self) -> None:
        exists = self._run(
            [
                "psql", "-h", str(self.socket_dir), "-U", SUPERUSER, "-d", "postgres",
                "-Atc", f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE_NAME}'",
            ],
            check=False,
        )
        if exists.stdout.strip() == "1":
            return
        created = self._run(
            ["createdb", "-h", str(self.socket_dir), "-U", SUPERUSER, DATABASE_NAME],
            check=False,
        )
        if created.returncode != 0 and "already exists" not in created.stderr:
            raise DatabaseError(f"createdb failed: {created.stderr.strip()}")

    def _run(self, argv: list[str], *, check: bool) -> subprocess.CompletedProcess[str]:
        binary = find_pg_binary(argv[0])
        command = [binary, *argv[1:]]
        if os.geteuid() == 0:
            command = ["runuser", "-u", self.user, "--", *command]
        return subprocess.run(
            command, capture_output=True, text=True, check=check, cwd="/",
            stdin=subprocess.DEVNULL,
        )


def find_pg_binary(name: str) -> str:
    """The newest installed PostgreSQL's `name` (Debian keeps them off PATH)."""
    versions = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda path: int(path.parent.name) if path.parent.name.isdigit() else 0,
        reverse=True,
    )
    for bin_dir in versions:
        if (bin_dir / name).exists():
            return str(bin_dir / name)
    found = shutil.which(name)
    if found:
        return found
    raise DatabaseError(f"{name} not found: apt-get install postgresql")


def _shm_attached(shm_id: int) -> bool:
    """True while some process is attached to System V shared memory `shm_id`."""
    try:
        with open("/proc/sysvipc/shm") as table:
            header = next(table).split()
            for line in table:
                fields = dict(zip(header, line.split(), strict=False))
                if fields.get("shmid") == str(shm_id):
                    return int(fields.get("nattch", "0")) > 0
    except (OSError, StopIteration, ValueError):
        return False
    return False


def _tail(path: Path, lines: int = 5) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"no log at {path}"
