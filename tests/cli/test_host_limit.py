"""Hosts and limits through the real `mailfc` command."""

from __future__ import annotations

import asyncio
import json
import ssl
import stat
from pathlib import Path

import asyncpg
import pytest
from cryptography import x509

from mailfc.config import load_config
from tests.cli.conftest import Mailfc


def test_hosts(mailfc: Mailfc) -> None:
    mailfc.ok("host", "add", "mx2", "--dispatcher", "10.1.0.2", "--subnet", "10.78.0.0/16",
              "--capacity", "50")
    hosts = {h["name"]: h for h in json.loads(mailfc.ok("host", "list", "--json").out)}
    assert hosts["mx2"]["dispatcher_address"] == "10.1.0.2"
    assert hosts["mx2"]["container_subnet"] == "10.78.0.0/16"
    # Never heard from: pending, and nothing is placed on it.
    assert hosts["mx2"]["capacity"] == 50 and hosts["mx2"]["state"] == "pending"
    mailfc.fails("host", "activate", "mx2", says="first heartbeat")
    mailfc.ok("host", "drain", "mx2")
    hosts = {h["name"]: h for h in json.loads(mailfc.ok("host", "list", "--json").out)}
    assert hosts["mx2"]["state"] == "draining"
    mailfc.fails("host", "add", "mx2", "--dispatcher", "10.1.0.3", "--subnet", "10.79.0.0/16",
                 says="exists already")
    mailfc.fails("host", "add", "mx3", "--dispatcher", "not-an-ip", "--subnet", "10.79.0.0/16",
                 says="invalid dispatcher address")
    mailfc.fails("host", "add", "mx3", "--dispatcher", "10.1.0.3", "--subnet", "10.79.0.1/16",
                 says="invalid container subnet")
    mailfc.fails("host", "drain", "nowhere", says="unknown host")


def test_host_add_issues_cluster_credentials(mailfc: Mailfc, tmp_path: Path) -> None:
    """`host add` writes the new host's credentials: the cluster CA certificate and
    a certificate for it that the CA signed and that a dispatcher of this
    cluster accepts, its key readable by root only; and it says where they go."""
    target = tmp_path / "mx5-credentials"
    result = mailfc.ok("host", "add", "mx5", "--dispatcher", "10.1.0.5", "--subnet",
                       "10.80.0.0/16", "--credentials", str(target))
    ca, cert, key = target / "ca.pem", target / "cert.pem", target / "key.pem"
    assert stat.S_IMODE(target.stat().st_mode) == 0o700
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    for path in (ca, cert, key):
        assert str(path) in result.out, result.out
    for key_name in ("[cluster]", "ca_file", "cert_file", "key_file"):
        assert key_name in result.out

    issued = x509.load_pem_x509_certificate(cert.read_bytes())
    authority = x509.load_pem_x509_certificate(ca.read_bytes())
    issued.verify_directly_issued_by(authority)
    names = issued.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(a) for a in names.get_values_for_type(x509.IPAddress)] == ["10.1.0.5"]
    assert names.get_values_for_type(x509.DNSName) == ["mx5"]
    # The CA is this (the first) host's: the one its own dispatcher trusts.
    state = Path(load_config(mailfc.config_file).paths.state_dir)
    assert ca.read_bytes() == (state / "cluster" / "ca.pem").read_bytes()
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    context.load_cert_chain(cert, key)

    as_json = json.loads(mailfc.ok("host", "add", "mx6", "--dispatcher", "10.1.0.6",
                                   "--subnet", "10.81.0.0/16", "--json").out)
    default = state / "cluster" / "hosts" / "mx6"
    assert as_json["credentials"]["cert_file"] == str(default / "cert.pem")
    assert (default / "key.pem").exists()


def test_host_add_into_an_unwritable_directory_fails_cleanly(mailfc: Mailfc,
                                                             tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory\n")
    mailfc.fails("host", "add", "mx7", "--dispatcher", "10.1.0.7", "--subnet",
                 "10.82.0.0/16", "--credentials", str(blocker / "mx7"),
                 says="cannot write the credentials for mx7")
    # No host without its credentials.
    hosts = {h["name"] for h in json.loads(mailfc.ok("host", "list", "--json").out)}
    assert "mx7" not in hosts


def test_limits(mailfc: Mailfc) -> None:
    mailfc.ok("domain", "add", "example.org")
    mailfc.ok("account", "add", "bob@example.org", "--password-stdin", stdin="x\n")
    mailfc.ok("limit", "set", "example.org", "--per-account", "concurrent_sends", "3")
    mailfc.ok("limit", "set", "bob@example.org", "messages", "100", "--window", "1h",
              "--mode", "shadow")
    mailfc.ok("limit", "set", "example.org", "recipients", "5000", "--window", "1d")
    rows = json.loads(mailfc.ok("limit", "list", "--json").out)
    found = {(r["scope"], r["target"], r["kind"]): r for r in rows}
    assert found[("account_default", "example.org", "concurrent_sends")]["value"] == 3
    bob = found[("account", "bob@example.org", "messages")]
    assert (bob["value"], bob["window_s"], bob["mode"]) == (100, 3600, "shadow")
    assert found[("domain", "example.org", "recipients")]["window_s"] == 86400

    # Setting again replaces, never duplicates.
    mailfc.ok("limit", "set", "bob@example.org", "messages", "50", "--window", "30m")
    bob_rows = json.loads(mailfc.ok("limit", "list", "bob@example.org", "--json").out)
    assert [(r["value"], r["window_s"], r["mode"]) for r in bob_rows] == [(50, 1800, "enforce")]
    assert "1h" not in mailfc.ok("limit", "list", "bob@example.org").out

    mailfc.ok("limit", "unset", "bob@example.org", "messages")
    mailfc.ok("limit", "unset", "example.org", "concurrent_sends", "--per-account")
    rows = json.loads(mailfc.ok("limit", "list", "--json").out)
    assert [(r["scope"], r["kind"]) for r in rows] == [("domain", "recipients")]


def test_limit_bad_input(mailfc: Mailfc) -> None:
    mailfc.ok("domain", "add", "example.org")
    mailfc.fails("limit", "set", "example.org", "speed", "3", says="unknown limit kind")
    mailfc.fails("limit", "set", "example.org", "messages", "3", says="--window")
    mailfc.fails("limit", "set", "example.org", "concurrent_sends", "3", "--window", "1h",
                 says="takes no --window")
    mailfc.fails("limit", "set", "example.org", "messages", "3", "--window", "soon",
                 says="invalid duration")
    mailfc.fails("limit", "set", "example.org", "messages", "-3", "--window", "1h",
                 says="-3")
    mailfc.fails("limit", "set", "example.org", "messages", "3", "--window", "1h",
                 "--mode", "maybe", says="maybe")
    mailfc.fails("limit", "set", "nowhere.example", "concurrent_sends", "3",
                 says="unknown domain")
    mailfc.fails("limit", "set", "carol@example.org", "concurrent_sends", "3",
                 says="unknown account")
    mailfc.fails("limit", "unset", "example.org", "concurrent_sends", says="no concurrent_sends")


def test_adaptive_limit_range(mailfc: Mailfc) -> None:
    mailfc.ok("domain", "add", "example.org")
    out = mailfc.ok("limit", "set", "example.org", "messages", "100", "--window", "1h",
                    "--range", "50:500").out
    assert "adaptive 50..500" in out
    row = json.loads(mailfc.ok("limit", "list", "example.org", "--json").out)[0]
    assert (row["value"], row["min_value"], row["max_value"]) == (100, 50, 500)
    mailfc.fails("limit", "set", "example.org", "messages", "10", "--window", "1h",
                 "--range", "50:500", says="within the range")
    mailfc.fails("limit", "set", "example.org", "messages", "10", "--window", "1h",
                 "--range", "lots", says="invalid range")
    # Set again without a range: fixed again.
    mailfc.ok("limit", "set", "example.org", "messages", "100", "--window", "1h")
    row = json.loads(mailfc.ok("limit", "list", "example.org", "--json").out)[0]
    assert row["min_value"] is None and row["max_value"] is None


def test_events_listing(mailfc: Mailfc) -> None:
    result = mailfc.ok("events", "--json", "--since", "1h")
    assert isinstance(json.loads(result.out), list)
    mailfc.fails("events", "--since", "soon", says="invalid duration")


async def test_a_pending_host_gets_no_domain_until_it_reports(mailfc: Mailfc,
                                                             cmdb: asyncpg.Pool) -> None:
    """`host add` makes a pending host: placement passes it by though it is empty, and
    its first heartbeat makes it active."""
    from mailfc.db import hosts, placement

    await asyncio.to_thread(mailfc.ok, "host", "add", "mx7", "--dispatcher", "10.1.0.7",
                            "--subnet", "10.81.0.0/16", "--capacity", "5000")
    await asyncio.to_thread(mailfc.ok, "domain", "add", "pending.example")
    await cmdb.execute("UPDATE hosts SET state = 'down' WHERE name <> 'mx7'")
    try:
        with pytest.raises(placement.NoHost):
            await placement.place(cmdb, "pending.example")
        await hosts.heartbeat(cmdb, "mx7")
        assert (await placement.place(cmdb, "pending.example")).host == "mx7"
    finally:
        await cmdb.execute("UPDATE hosts SET state = 'active' WHERE name <> 'mx7'")
