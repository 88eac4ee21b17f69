"""Login abuse at the IMAP and submission routers, as an attacker would try it.

Each test starts its own pair of routers (its own login settings, ports of its
own) beside the session's router host, whose dispatcher and containers they
use.  Clients come from distinct loopback addresses (127.0.0.x), each one a
different attacker or owner.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import imaplib
import json
import smtplib
import socket
import statistics
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mailfc.db.directory import Directory
from mailfc.routers.imap import ImapRouter
from mailfc.routers.submission import SubmissionRouter
from mailfc.tls import server_context
from tests.cli.conftest import run_mailfc
from tests.routers.conftest import PASSWORD, RouterHost, client_tls, router_config

IMAP_PORT = 11144
SUBMISSION_PORT = 11588
BOB = "bob@a.example"
# Quick answers, small delays: the rules, not the defaults, are under test.
BASE = {"auth_failure_delay_s": 0.01, "account_delay_after": 3, "account_delay_s": 0.3,
        "account_delay_max_s": 1.0, "max_failures_per_pair": 5, "max_failures_per_ip": 40,
        "spray_accounts": 4, "spray_ban_s": 600, "ban_refresh_s": 0.3}


@contextlib.asynccontextmanager
async def routers(router_host: RouterHost, **login: object
                  ) -> AsyncIterator[tuple[ImapRouter, SubmissionRouter]]:
    settings = {**BASE, **login}
    config = router_config(
        router_host.config.state_dir, runtime={"name_prefix": "mfcr"},
        listen={"imap_router": f"127.0.0.1:{IMAP_PORT}", "imap_router_tls": "127.0.0.1:11994",
                "submission": f"127.0.0.1:{SUBMISSION_PORT}",
                "submissions": "127.0.0.1:11466"},
        imap_router={**settings, "allow_plaintext_auth": True}, submission=settings)
    directory = Directory(router_host.pool)
    imap = ImapRouter(config, directory, server_context(config))
    submission = SubmissionRouter(config, directory, server_context(config))
    await imap.start()
    await submission.start()
    try:
        yield imap, submission
    finally:
        await submission.stop(2.0)
        await imap.stop(2.0)


class SourcedImap(imaplib.IMAP4):
    """An IMAP client whose connection comes from `source` (a loopback address)."""

    def __init__(self, source: str) -> None:
        self.source = source
        super().__init__("127.0.0.1", IMAP_PORT, timeout=30)

    def _create_socket(self, timeout: float | None) -> socket.socket:
        return socket.create_connection((self.host, self.port), timeout,
                                        source_address=(self.source, 0))


def imap_login(source: str, user: str, password: str, plain: bool = True
               ) -> tuple[bool, float]:
    """(logged in, seconds the login took); over AUTHENTICATE PLAIN (`plain`) any
    name (a tab, a full-width letter) goes through as typed, LOGIN is one round trip."""
    client = SourcedImap(source)
    try:
        started = time.monotonic()
        try:
            if plain:
                client.authenticate("PLAIN", lambda _: f"\0{user}\0{password}".encode())
            else:
                client.login(user, password)
        except imaplib.IMAP4.error:
            return False, time.monotonic() - started
        return True, time.monotonic() - started
    finally:
        with contextlib.suppress(OSError):
            client.shutdown()


def smtp_login(source: str, user: str, password: str) -> tuple[bool, float]:
    with smtplib.SMTP("127.0.0.1", SUBMISSION_PORT, timeout=30,
                      source_address=(source, 0)) as client:
        client.starttls(context=client_tls())
        client.ehlo()
        response = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
        started = time.monotonic()
        code, _ = client.docmd("AUTH", f"PLAIN {response}")
        return code == 235, time.monotonic() - started


LOGINS = {"imap": imap_login, "submission": smtp_login}


async def login(protocol: str, source: str, user: str, password: str) -> tuple[bool, float]:
    return await asyncio.to_thread(LOGINS[protocol], source, user, password)


async def drop_bans(router_host: RouterHost, *networks: str) -> None:
    await router_host.pool.execute("DELETE FROM bans WHERE network = ANY($1::cidr[])",
                                   list(networks))


@pytest.mark.parametrize("protocol", ["imap", "submission"])
async def test_guessing_from_one_address_never_locks_out_the_owner(
        router_host: RouterHost, protocol: str) -> None:
    attacker, owner = ("127.0.0.11", "127.0.0.12") if protocol == "imap" else \
        ("127.0.0.13", "127.0.0.14")
    async with routers(router_host):
        # The domain's server runs and the right password is known (as for an
        # owner whose client logs in every few minutes).
        assert (await login(protocol, owner, BOB, PASSWORD))[0]
        for _ in range(20):
            ok, _ = await login(protocol, attacker, BOB, "guess")
            assert not ok
        # The attacker's address is refused even with the right password ...
        assert not (await login(protocol, attacker, BOB, PASSWORD))[0]
        # ... the owner's logs in at once, although the account's delay is at its cap.
        ok, took = await login(protocol, owner, BOB, PASSWORD)
        assert ok
        assert took < 0.3, f"the owner waited {took:.3f} s"
        # A wrong password, from anywhere, waits the account's delay.
        ok, took = await login(protocol, "127.0.0.15", BOB, "guess")
        assert not ok and took >= 1.0


async def test_spraying_address_is_banned_until_removed(
        router_host: RouterHost, config_file: Path) -> None:
    sprayer = "127.0.0.21"
    await drop_bans(router_host, sprayer)
    try:
        async with routers(router_host) as (imap, _):
            for user in ("bob@a.example", "carol@a.example", "dave@b.example",
                         "nobody@a.example"):
                assert not (await login("imap", sprayer, user, "Winter2024!"))[0]
            row = await router_host.pool.fetchrow(
                "SELECT reason, set_by, expires_at > now() + interval '500 s' AS long"
                " FROM bans WHERE network = $1::cidr", sprayer)
            assert row is not None and row["set_by"] == "auto" and row["long"]
            assert "password spraying" in row["reason"]
            # Banned: the right password is refused, there and on the submission router.
            assert not (await login("imap", sprayer, BOB, PASSWORD))[0]
            assert not (await login("submission", sprayer, BOB, PASSWORD))[0]

            listed = await asyncio.to_thread(run_mailfc, config_file, "ban", "list", "--json")
            assert listed.code == 0, listed.err
            found = [b for b in json.loads(listed.out) if b["network"] == sprayer]
            assert found and found[0]["set_by"] == "auto"
            shown = await asyncio.to_thread(run_mailfc, config_file, "abuse", "bans")
            assert shown.code == 0 and sprayer in shown.out, shown.err

            removed = await asyncio.to_thread(run_mailfc, config_file, "ban", "remove",
                                              sprayer, "--reason", "test")
            assert removed.code == 0, removed.err
            await asyncio.sleep(imap.settings.ban_refresh_s + 0.2)
            assert (await login("imap", sprayer, BOB, PASSWORD))[0]
            history = await router_host.pool.fetch(
                "SELECT kind, detail->>'set_by' AS set_by FROM events"
                " WHERE detail->>'network' = $1 ORDER BY id", sprayer)
            assert [(r["kind"], r["set_by"] == "auto") for r in history][-2:] == [
                ("ban", True), ("unban", False)]
    finally:
        await drop_bans(router_host, sprayer)


async def test_admin_ban_of_a_network(router_host: RouterHost, config_file: Path) -> None:
    network, inside, outside = "127.0.0.32/30", "127.0.0.33", "127.0.0.36"
    await drop_bans(router_host, network)
    try:
        async with routers(router_host) as (imap, _):
            assert (await login("imap", inside, BOB, PASSWORD))[0]
            added = await asyncio.to_thread(run_mailfc, config_file, "ban", "add", network,
                                            "--reason", "botnet range", "--expires", "1h")
            assert added.code == 0, added.err
            await asyncio.sleep(imap.settings.ban_refresh_s + 0.2)
            assert not (await login("imap", inside, BOB, PASSWORD))[0]
            assert not (await login("submission", inside, BOB, PASSWORD))[0]
            assert (await login("imap", outside, BOB, PASSWORD))[0]
            listed = json.loads((await asyncio.to_thread(
                run_mailfc, config_file, "ban", "list", "--json")).out)
            entry = next(b for b in listed if b["network"] == network)
            assert entry["reason"] == "botnet range" and entry["set_by"] != "auto"
            assert entry["expires_at"] is not None
        wrong = await asyncio.to_thread(run_mailfc, config_file, "ban", "add", "127.0.0.33/30")
        assert wrong.code != 0 and "invalid address or network" in wrong.err
        missing = await asyncio.to_thread(run_mailfc, config_file, "ban", "remove",
                                          "192.0.2.99")
        assert missing.code != 0 and "no ban on 192.0.2.99" in missing.err
    finally:
        await drop_bans(router_host, network)


async def test_name_variants_count_against_the_same_account(router_host: RouterHost) -> None:
    guesser = "127.0.0.41"
    variants = ("bob@a.example.", "BOB@A.EXAMPLE", "bob@\uff41.example", "bob\t@a.example",
                " Bob@a.Example. ")
    async with routers(router_host, spray_accounts=3) as (imap, _):
        for name in variants:
            assert not (await login("imap", guesser, name, "guess"))[0]
        # Five failures for one (address, account): its right password is refused
        # too, under any spelling; the address is no sprayer (one account).
        for name in (BOB, *variants):
            assert not (await login("imap", guesser, name, PASSWORD))[0]
        assert imap.throttle.account_delay(BOB) > 0
        assert await router_host.pool.fetchval(
            "SELECT count(*) FROM bans WHERE network = $1::cidr", guesser) == 0
        # Every spelling names the account: from another address each logs in.
        for name in variants:
            assert (await login("imap", "127.0.0.42", name, PASSWORD))[0], name


async def test_unknown_account_takes_as_long_as_a_wrong_password(
        router_host: RouterHost) -> None:
    source = "127.0.0.51"
    no_throttle = {"max_failures_per_ip": 1000, "max_failures_per_pair": 1000,
                   "account_delay_after": 1000, "spray_accounts": 1000}
    async with routers(router_host, **no_throttle):
        assert (await login("imap", source, BOB, PASSWORD))[0]     # the server runs
        known: list[float] = []
        unknown: list[float] = []
        for _ in range(20):
            ok, took = await asyncio.to_thread(imap_login, source, BOB, "wrong", False)
            assert not ok
            known.append(took)
            ok, took = await asyncio.to_thread(imap_login, source, "nobody@a.example",
                                               "wrong", False)
            assert not ok
            unknown.append(took)
    difference = statistics.median(known) - statistics.median(unknown)
    assert abs(difference) < 0.005, (
        f"median wrong password {statistics.median(known) * 1000:.1f} ms, unknown account"
        f" {statistics.median(unknown) * 1000:.1f} ms")
