"""`mailfc container list|start|stop|update|stats`: this host's domain containers.

    mailfc container list [DOMAIN] [--all] [--json]
    mailfc container start DOMAIN SERVICE [--new] [--json]
    mailfc container stop DOMAIN SERVICE [--name NAME] [--drain-timeout S]
    mailfc container update DOMAIN SERVICE [--cpu-quota US] [--memory SIZE]
                                           [--pin-for DURATION] [--unpin] [--json]
    mailfc container stats DOMAIN SERVICE [--json]

SERVICE is smtp (the domain's Postfix), lmtp or imap (its Dovecot, which
serves both).  The commands act on the host named by host.name (this
machine by default) through mailfc.runtime; they need root, like the
dispatcher that normally starts containers on demand.  `start` returns the
running container if there is one (`--new` starts another, up to the spec's
max_instances); `update` changes CPU quota and memory live, within the spec's
maxima, and pins what it changed: the controller leaves that setting of those
containers alone until `update --unpin` (or, with `--pin-for 1h`, until the
time runs out); `list` shows the pins.  A start is recorded as an event
(kind start, by admin).  One CMDB pool per invocation; no netns pool and no
orphan cleanup (that is the dispatcher's start-up job).
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import click

from mailfc import eventloop
from mailfc.cli.common import emit, json_option, pass_config, print_json, say
from mailfc.config import Config
from mailfc.db import connect
from mailfc.durations import format_duration, parse_duration
from mailfc.errors import InvalidInput, NotFound
from mailfc.runtime import SERVICES, Instance, Runtime, from_config
from mailfc.runtime.starts import Trigger

T = TypeVar("T")
COLUMNS = ("domain", "service", "name", "address", "state", "slot", "pid", "ready_at",
           "last_activity_at", "pinned")
_SIZE = re.compile(r"^(\d+)\s*([kmgt]?)i?b?$", re.IGNORECASE)
service_argument = click.argument("service", type=click.Choice(SERVICES))


def parse_size(text: str) -> int:
    """'268435456', '256M', '1G', '512MiB' -> bytes."""
    match = _SIZE.match(text.strip())
    if not match:
        raise InvalidInput(f"size {text!r}: expected bytes or a number with K, M, G or T")
    return int(match[1]) << {"": 0, "k": 10, "m": 20, "g": 30, "t": 40}[match[2].lower()]


def run_runtime(config: Config, action: Callable[[Runtime], Awaitable[T]]) -> T:
    async def main() -> T:
        pool = await connect(config)
        runtime = Runtime(from_config(config, netns_pool_size=0), pool)
        try:
            await runtime.open(fill_pool=False)
            return await action(runtime)
        finally:
            await runtime.close()
            await pool.close()

    return eventloop.run(main())


async def _pick(runtime: Runtime, domain: str, service: str, name: str | None
                ) -> list[Instance]:
    found = await runtime.instances(domain, service)
    if name is not None:
        found = [i for i in found if i.name == name]
    if not found:
        which = f"{name} of " if name else ""
        raise NotFound(f"no running {which}{service} container of {domain} on this host")
    return found


@click.group("container")
def group() -> None:
    """Per-domain Postfix and Dovecot containers of this host."""


@group.command("list")
@click.argument("domain", required=False)
@click.option("--all", "include_stopped", is_flag=True, help="Include stopped instances.")
@json_option
@pass_config
def list_cmd(config: Config, domain: str | None, include_stopped: bool, as_json: bool) -> None:
    """List this host's containers."""

    async def action(runtime: Runtime) -> list[dict[str, Any]]:
        rows = []
        for instance in await runtime.instances(domain, include_stopped=include_stopped):
            row = instance.as_dict()
            row["pinned"] = instance.pins() if instance.state != "stopped" else ""
            if instance.state != "stopped":
                stats = runtime.stats(instance)
                row.update(cpu_ms=stats.cpu_usage_us // 1000,
                           memory_mib=round(stats.memory_bytes / 2**20, 1),
                           throttled=stats.nr_throttled)
            rows.append(row)
        return rows

    emit(run_runtime(config, action), as_json=as_json,
         columns=(*COLUMNS, "cpu_ms", "memory_mib", "throttled"), empty="no containers")


@group.command("start")
@click.argument("domain")
@service_argument
@click.option("--new", "new_instance", is_flag=True,
              help="Start another instance even if one runs (scale out).")
@json_option
@pass_config
def start(config: Config, domain: str, service: str, new_instance: bool, as_json: bool) -> None:
    """Start the domain's container for SERVICE (or return the running one)."""

    async def action(runtime: Runtime) -> Instance:
        if new_instance:
            return await runtime.start(domain, service,
                                       Trigger("admin", why="container start --new"))
        return await runtime.ensure(domain, service, Trigger("admin", why="container start"))

    instance = run_runtime(config, action)
    if as_json:
        print_json(instance.as_dict())
    else:
        say(f"{instance.name} ({instance.image}) of {instance.domain} runs (pid"
            f" {instance.pid}); {service} at {instance.socket(service)}")


@group.command("stop")
@click.argument("domain")
@service_argument
@click.option("--name", default=None, help="Only this instance (default: every instance).")
@click.option("--drain-timeout", type=click.FloatRange(min=0), default=None,
              help="Seconds between SIGTERM and SIGKILL (default: runtime.stop_timeout_s).")
@pass_config
def stop(config: Config, domain: str, service: str, name: str | None,
         drain_timeout: float | None) -> None:
    """Drain and stop the domain's container(s) for SERVICE."""

    async def action(runtime: Runtime) -> list[str]:
        stopped = []
        for instance in await _pick(runtime, domain, service, name):
            await runtime.stop(instance, drain_timeout, reason="stopped by admin")
            stopped.append(instance.name)
        return stopped

    for stopped_name in run_runtime(config, action):
        say(f"{stopped_name} stopped")


@group.command("update")
@click.argument("domain")
@service_argument
@click.option("--cpu-quota", "cpu_quota_us", type=click.IntRange(min=1000), default=None,
              help="CPU quota in microseconds per period (100000 = one CPU).")
@click.option("--memory", default=None, help="Memory limit, e.g. 512M or 1G.")
@click.option("--pin-for", "pin_for", default=None,
              help="Pin what changed only this long (e.g. 30m, 1h); default: until --unpin.")
@click.option("--unpin", is_flag=True,
              help="Let the controller manage CPU and memory again (alone or with changes).")
@json_option
@pass_config
def update(config: Config, domain: str, service: str, cpu_quota_us: int | None,
           memory: str | None, pin_for: str | None, unpin: bool, as_json: bool) -> None:
    """Change CPU quota and memory of the running container(s) live, pinned.

    The controller leaves a changed setting alone until --unpin (or until
    --pin-for runs out).  With --unpin alone, nothing changes but the pins go."""
    if cpu_quota_us is None and memory is None and not unpin:
        raise click.UsageError("give --cpu-quota and/or --memory (or --unpin)")
    if unpin and pin_for is not None:
        raise click.UsageError("--pin-for and --unpin contradict each other: give one")
    if pin_for is not None and cpu_quota_us is None and memory is None:
        raise click.UsageError("--pin-for pins a change: give --cpu-quota and/or --memory")
    pin_s = parse_duration(pin_for) if pin_for is not None else None
    memory_bytes = parse_size(memory) if memory is not None else None

    async def action(runtime: Runtime) -> list[dict[str, Any]]:
        results = []
        for instance in await _pick(runtime, domain, service, None):
            if unpin:
                await runtime.unpin(instance)
            if cpu_quota_us is not None or memory_bytes is not None:
                limits = await runtime.update(instance, cpu_quota_us=cpu_quota_us,
                                              memory_bytes=memory_bytes)
                if not unpin:
                    await runtime.pin(instance, cpu=cpu_quota_us is not None,
                                      memory=memory_bytes is not None, for_s=pin_s)
            else:
                limits = runtime.limits(instance)
            pinned = (await runtime.get(instance.name)).pins()
            results.append({"name": instance.name, "cpu_quota_us": limits.cpu_quota_us,
                            "cpu_period_us": limits.cpu_period_us,
                            "memory_bytes": limits.memory_bytes, "pinned": pinned})
        return results

    results = run_runtime(config, action)
    if as_json:
        print_json(results)
    else:
        for item in results:
            pinned = (f"pinned: {item['pinned']}" if item["pinned"]
                      else "not pinned: the controller manages it")
            if pin_s is not None and item["pinned"]:
                pinned += f" (for {format_duration(pin_s)})"
            say(f"{item['name']}: cpu quota {item['cpu_quota_us']}/{item['cpu_period_us']} us,"
                f" memory {item['memory_bytes']} bytes; {pinned}")


@group.command("stats")
@click.argument("domain")
@service_argument
@json_option
@pass_config
def stats(config: Config, domain: str, service: str, as_json: bool) -> None:
    """CPU usage, throttling and memory of the domain's container(s)."""

    async def action(runtime: Runtime) -> list[dict[str, Any]]:
        rows = []
        for instance in await _pick(runtime, domain, service, None):
            usage, limits = runtime.stats(instance), runtime.limits(instance)
            rows.append({"name": instance.name, **vars(usage),
                         "cpu_quota_us": limits.cpu_quota_us,
                         "memory_limit_bytes": limits.memory_bytes})
        return rows

    emit(run_runtime(config, action), as_json=as_json, empty="no containers")
