"""`mailfc service install`: run the platform as a systemd service.

    mailfc service install [--unit-dir /etc/systemd/system] [--no-enable] [--print]

Writes mailfc.service (contrib/systemd/mailfc.service, with the ExecStart of
this mailfc and its configuration file) to the unit directory, then runs
`systemctl daemon-reload` and `systemctl enable mailfc` when systemd runs on
this machine.  Without systemd the file is written and the command says how to
start the platform instead.  --print writes the unit to standard output only.

The unit is Type=notify: `systemctl start mailfc` returns once every process
of `mailfc up` is ready; `systemctl reload mailfc` sends SIGHUP (re-read the
configuration); Restart=on-failure.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import click

from mailfc.cli.common import say
from mailfc.config import CONFIG_ENV

UNIT_NAME = "mailfc.service"
UNIT_DIR = Path("/etc/systemd/system")
TEMPLATE_EXEC = "ExecStart=/usr/local/bin/mailfc --config /etc/mailfc/mailfc.toml up"

# The unit's text; contrib/systemd/mailfc.service is the same file in the repository
# (a test keeps them equal).
UNIT = """\
# mailfc: the whole platform of this host (`mailfc up`), supervised by systemd.
# `mailfc service install` writes this file to /etc/systemd/system with the
# ExecStart of the installed mailfc and its configuration file, then enables it.
#
#   systemctl start mailfc       returns once every process is ready (Type=notify)
#   systemctl reload mailfc      SIGHUP: re-read the file, cycle the processes
#   journalctl -u mailfc         the log of every process, prefixed with its group
[Unit]
Description=mailfc multi-tenant mail platform
Documentation=file:///usr/share/doc/mailfc/operations.md
After=network-online.target
Wants=network-online.target

[Service]
Type=notify
NotifyAccess=main
ExecStart=/usr/local/bin/mailfc --config /etc/mailfc/mailfc.toml up
ExecReload=/bin/kill -HUP $MAINPID
Restart=on-failure
RestartSec=5s
# The processes drain their sessions and the containers stop before the end.
TimeoutStartSec=300
TimeoutStopSec=180
KillMode=mixed
LimitNOFILE=1048576

[Install]
WantedBy=multi-user.target
"""


def render_unit(config_path: str | None) -> str:
    """The unit with the ExecStart of this interpreter's mailfc and `config_path`."""
    command = [sys.executable, "-m", "mailfc"]
    if config_path:
        command += ["--config", str(Path(config_path).resolve())]
    command.append("up")
    return UNIT.replace(TEMPLATE_EXEC, "ExecStart=" + shlex.join(command))


def systemd_running() -> bool:
    return Path("/run/systemd/system").is_dir() and shutil.which("systemctl") is not None


@click.group("service")
def group() -> None:
    """Run the platform as a system service (systemd)."""


@group.command("install")
@click.option("--unit-dir", type=click.Path(file_okay=False, path_type=Path),
              default=UNIT_DIR, show_default=True, help="Where to write mailfc.service.")
@click.option("--no-enable", is_flag=True, help="Write the unit, do not enable it.")
@click.option("--print", "print_only", is_flag=True, help="Print the unit, write nothing.")
@click.pass_context
def install(ctx: click.Context, unit_dir: Path, no_enable: bool, print_only: bool) -> None:
    """Write mailfc.service and enable it (systemctl daemon-reload, enable)."""
    config_path = ctx.find_root().params.get("config_path") or os.environ.get(CONFIG_ENV)
    unit = render_unit(config_path)
    if print_only:
        click.echo(unit, nl=False)
        return
    target = unit_dir / UNIT_NAME
    try:
        unit_dir.mkdir(parents=True, exist_ok=True)
        target.write_text(unit)
    except OSError as error:
        raise click.ClickException(
            f"cannot write {target}: {error.strerror or error}; run it as root or give"
            " --unit-dir") from None
    say(f"wrote {target}")
    if not config_path:
        say("no --config given: the service runs with the built-in defaults")
    if no_enable:
        return
    if not systemd_running():
        say("systemd does not run on this machine: nothing enabled; start the platform"
            " with `mailfc up` (or your init system's equivalent)")
        return
    for command in (["systemctl", "daemon-reload"], ["systemctl", "enable", UNIT_NAME]):
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise click.ClickException(
                f"{' '.join(command)} failed: {done.stderr.strip() or done.returncode}")
    say("enabled mailfc.service: `systemctl start mailfc` starts the platform,"
        " `systemctl reload mailfc` re-reads the configuration")
