"""`mailfc container ...` against the real runtime."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

import pytest
from click.testing import CliRunner

from mailfc.cli.container import group, parse_size
from mailfc.errors import InvalidInput
from mailfc.runtime import RuntimeSettings
from tests.runtime.conftest import cgroup_file

pytestmark = pytest.mark.integration


def test_parse_size() -> None:
    assert parse_size("268435456") == 256 << 20
    assert parse_size("256M") == parse_size("256MiB") == 256 << 20
    assert parse_size("1g") == 1 << 30
    with pytest.raises(InvalidInput):
        parse_size("lots")


def _run(env: dict[str, str], *args: str) -> str:
    result = CliRunner().invoke(group, list(args), env=env, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


async def test_container_start_list_update_stop(cli_env: dict[str, str],
                                                settings: RuntimeSettings,
                                                new_domain: Callable[..., Awaitable[str]]
                                                ) -> None:
    domain = await new_domain()

    def cli() -> None:
        started = json.loads(_run(cli_env, "start", domain, "imap", "--json"))
        assert started["image"] == "dovecot" and started["state"] == "running"
        again = json.loads(_run(cli_env, "start", domain, "lmtp", "--json"))
        assert again["name"] == started["name"]

        listed = json.loads(_run(cli_env, "list", domain, "--json"))
        assert [row["name"] for row in listed] == [started["name"]]
        assert listed[0]["memory_mib"] > 0

        updated = json.loads(_run(cli_env, "update", domain, "imap", "--cpu-quota", "120000",
                                  "--memory", "300M", "--json"))
        assert updated[0]["cpu_quota_us"] == 120000
        assert cgroup_file("memory", settings, started["name"],
                           "memory.limit_in_bytes") == str(300 << 20)
        stats = json.loads(_run(cli_env, "stats", domain, "imap", "--json"))
        assert stats[0]["cpu_quota_us"] == 120000 and stats[0]["cpu_usage_us"] > 0

        assert f"{started['name']} stopped" in _run(cli_env, "stop", domain, "imap",
                                                    "--drain-timeout", "2")
        assert json.loads(_run(cli_env, "list", domain, "--json")) == []
        history = json.loads(_run(cli_env, "list", domain, "--all", "--json"))
        assert history[0]["stop_reason"] == "stopped by admin"

    # The CLI runs its own event loop, as it does from a shell.
    await asyncio.to_thread(cli)
