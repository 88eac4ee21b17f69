"""`mailfc up`: run the whole platform on this machine until SIGTERM or Ctrl-C.

Without --services, the resident services run as a few supervised processes
(mailfc.controller.supervisor), and the embedded PostgreSQL (no database.dsn) is
supervised with them: started again, with backoff, when its postmaster is gone.
With --services, exactly those run in this one process (how the supervisor starts
its children, and how a second machine runs only a dispatcher or only routers).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal

import click

from mailfc import eventloop, logsetup
from mailfc.cli.common import pass_config
from mailfc.config import Config, load_config, split_hostport
from mailfc.controller.platform import SERVICE_NAMES, Platform
from mailfc.controller.supervisor import DatabaseWatch, Supervisor
from mailfc.db.pool import database_dsn, embedded_cluster
from mailfc.errors import ConfigError
from mailfc.metrics.http import HealthServer, ProcessState, scrape
from mailfc.metrics.readiness import notify_systemd, tell_supervisor


@click.command("up")
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
@click.option("--services", default=None,
              help="Comma-separated resident services to run in this one process (" +
                   ", ".join(SERVICE_NAMES) + "); a container host runs at least the"
                   " dispatcher.  Default: all of them, as supervised processes.")
@pass_config
@click.pass_context
def group(ctx: click.Context, config: Config, verbose: bool, services: str | None) -> None:
    """Run the platform (CMDB and every resident service) in the foreground."""
    logsetup.configure(config.log, verbose=verbose)
    if services is None:
        config_path = ctx.find_root().params.get("config_path")
        eventloop.run(_supervise(config, config_path, verbose))
        return
    wanted = tuple(name.strip() for name in services.split(",") if name.strip())
    unknown = set(wanted) - set(SERVICE_NAMES)
    if unknown or not wanted:
        raise click.BadParameter(
            f"unknown service(s) {', '.join(sorted(unknown)) or '(none given)'}; choose from "
            + ", ".join(SERVICE_NAMES), param_hint="--services")
    if "controller" in wanted and "dispatcher" not in wanted:
        raise click.BadParameter("the controller runs with the dispatcher of its host",
                                 param_hint="--services")
    eventloop.run(_run(config, wanted))


async def _supervise(config: Config, config_path: str | None, verbose: bool) -> None:
    # The embedded PostgreSQL is supervised too (an external one is not ours).
    database = DatabaseWatch(embedded_cluster(config), config.host_name) \
        if config.uses_embedded_database else None
    supervisor = Supervisor(config_path, verbose,
                            resident_lifetime_s=config.controller.resident_lifetime_s,
                            database=database, metrics_dir=config.state_dir / "metrics",
                            dsn=database_dsn(config, start=False), host=config.host_name)
    supervisor.prepare_metrics_dir()
    assert supervisor.metrics_dir is not None
    own = ProcessState(supervisor.process_states, lambda: supervisor.database_up)
    metrics_dir = supervisor.metrics_dir
    host, port = split_hostport(config.metrics.listen)
    health = HealthServer(host, port, metrics=lambda: scrape(metrics_dir, own),
                          ready=supervisor.readiness)
    try:
        await health.start()
    except OSError as error:
        # Mail matters more than its metrics: the platform runs on without them.
        logging.getLogger("mailfc").error(
            "metrics.listen %s: cannot listen: %s; no /metrics, /healthz or /readyz until"
            " a restart: stop what holds the port or change [metrics] listen",
            config.metrics.listen, error.strerror or error)
    stopping = eventloop.stop_requested()
    reloads = asyncio.Queue[None](maxsize=1)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGHUP, lambda: _queue_reload(reloads))
    reloading: asyncio.Task[None] | None = None
    try:
        await supervisor.start()
        logging.getLogger("mailfc").info(
            "mailfc is up (state in %s, %d processes, metrics on http://%s/metrics);"
            " Ctrl-C or SIGTERM stops it", config.state_dir, len(supervisor.children),
            config.metrics.listen)
        notify_systemd("READY=1")
        reloading = asyncio.create_task(
            _reload_on_signal(reloads, supervisor, config, config_path, verbose))
        await supervisor.watch(stopping)
    finally:
        loop.remove_signal_handler(signal.SIGHUP)
        notify_systemd("STOPPING=1")
        logging.getLogger("mailfc").info("stopping")
        if reloading is not None:
            reloading.cancel()
            await asyncio.gather(reloading, return_exceptions=True)
        await supervisor.stop()
        await health.stop()


def _queue_reload(reloads: asyncio.Queue[None]) -> None:
    # Several SIGHUPs during one reload make one more reload, not one each.
    with contextlib.suppress(asyncio.QueueFull):
        reloads.put_nowait(None)


async def _reload_on_signal(reloads: asyncio.Queue[None], supervisor: Supervisor,
                            config: Config, config_path: str | None, verbose: bool) -> None:
    """SIGHUP: re-read the file, take the log settings, cycle the children (RELOAD in
    mailfc.controller.supervisor)."""
    log = logging.getLogger("mailfc.reload")
    while True:
        await reloads.get()
        try:
            new = load_config(config_path)
        except ConfigError as error:
            log.error("reload refused, the running configuration stays: %s", error)
            continue
        notify_systemd("RELOADING=1")
        changed = [name for name in type(new).model_fields
                   if getattr(new, name) != getattr(config, name)]
        logsetup.configure(new.log, verbose=verbose)
        log.info("reload: %s changed; log level now %s",
                 ", ".join(f"[{name}]" for name in changed) or "nothing",
                 logging.getLevelName(logging.getLogger().level))
        log.debug("reload: debug logging is on")
        await supervisor.reload(changed)
        config = new
        notify_systemd("READY=1")


async def _run(config: Config, services: tuple[str, ...]) -> None:
    platform = Platform(config, services)
    stopping = eventloop.stop_requested()
    try:
        await platform.start()
        # Everything made while starting (modules, settings, pools) lives as long as
        # the process.  Out of the collector's sight, a full collection scans only
        # what sessions made since: with it, one takes 25-50 ms here (60,000 objects
        # of modules alone), a pause of every session this process serves.
        gc.collect()
        gc.freeze()
        tell_supervisor()
        logging.getLogger("mailfc").info(
            "mailfc is up (state in %s); Ctrl-C or SIGTERM stops it", config.state_dir)
        await stopping.wait()
    finally:
        logging.getLogger("mailfc").info("stopping")
        await platform.stop()
