"""Domains, accounts and aliases through the real `mailfc` command."""

from __future__ import annotations

import json

import asyncpg

from mailfc.passwords import verify_password
from tests.cli.conftest import Mailfc


def test_domain_lifecycle(mailfc: Mailfc) -> None:
    assert "example.org added" in mailfc.ok("domain", "add", "Example.ORG.").out
    mailfc.ok("domain", "add", "bücher.example")
    listed = json.loads(mailfc.ok("domain", "list", "--json").out)
    assert [d["name"] for d in listed] == ["example.org", "xn--bcher-kva.example"]
    assert all(d["state"] == "active" and d["accounts"] == 0 for d in listed)

    mailfc.ok("domain", "suspend", "example.org")
    shown = json.loads(mailfc.ok("domain", "show", "example.org", "--json").out)
    assert shown["state"] == "suspended"
    mailfc.ok("domain", "resume", "example.org")
    assert json.loads(mailfc.ok("domain", "show", "example.org", "--json").out)["state"] == "active"
    suspended = json.loads(mailfc.ok("domain", "list", "--state", "suspended", "--json").out)
    assert suspended == []

    table = mailfc.ok("domain", "list").out
    assert "example.org" in table and "xn--bcher-kva.example" in table

    mailfc.ok("domain", "remove", "example.org")
    assert "example.org" not in mailfc.ok("domain", "list").out


def test_domain_bad_input(mailfc: Mailfc) -> None:
    mailfc.fails("domain", "add", "bad..name", says="invalid domain name")
    mailfc.fails("domain", "add", "--", "-lead.example", says="invalid domain name")
    mailfc.fails("domain", "add", "localhost", says="at least two labels")
    mailfc.fails("domain", "add", "a" * 64 + ".example", says="invalid domain name")
    mailfc.ok("domain", "add", "example.org")
    mailfc.fails("domain", "add", "EXAMPLE.org", says="exists already")
    mailfc.fails("domain", "show", "nowhere.example", says="unknown domain")
    mailfc.fails("domain", "suspend", "nowhere.example", says="unknown domain")
    mailfc.fails("domain", "remove", "nowhere.example", says="unknown domain")


async def test_account_password_is_hashed(mailfc: Mailfc, clean_cmdb: asyncpg.Pool) -> None:
    mailfc.ok("domain", "add", "example.org")
    out = mailfc.ok("account", "add", "Bob@Example.org", "--password-stdin",
                    stdin="correct horse\n").out
    assert "bob@example.org added" in out
    stored = await clean_cmdb.fetchval("SELECT password_hash FROM accounts")
    assert stored != "correct horse" and "correct horse" not in stored
    assert stored.startswith("{ARGON2ID}$argon2id$")
    assert verify_password(stored, "correct horse")
    assert not verify_password(stored, "wrong horse")

    mailfc.ok("account", "add", "alice@example.org", "--password-stdin", stdin="correct horse\n")
    hashes = await clean_cmdb.fetch("SELECT password_hash FROM accounts")
    assert len({row["password_hash"] for row in hashes}) == 2, "hashes must be salted"

    mailfc.ok("account", "passwd", "bob@example.org", "--password-stdin", stdin="new secret\n")
    changed = await clean_cmdb.fetchval(
        "SELECT password_hash FROM accounts WHERE localpart = 'bob'")
    assert verify_password(changed, "new secret") and not verify_password(changed, "correct horse")


def test_account_lifecycle_and_json(mailfc: Mailfc) -> None:
    mailfc.ok("domain", "add", "example.org")
    mailfc.ok("account", "add", "bob@example.org", "--password-stdin", "--quota", "1000000",
              stdin="pw1\n")
    shown = json.loads(mailfc.ok("account", "show", "bob@example.org", "--json").out)
    assert shown["address"] == "bob@example.org" and shown["quota_bytes"] == 1000000
    assert "password_hash" not in shown
    listed = json.loads(mailfc.ok("account", "list", "example.org", "--json").out)
    assert [a["address"] for a in listed] == ["bob@example.org"]
    mailfc.ok("account", "suspend", "bob@example.org")
    assert json.loads(mailfc.ok("account", "show", "bob@example.org", "--json").out)[
        "state"] == "suspended"
    mailfc.ok("account", "remove", "bob@example.org")
    assert json.loads(mailfc.ok("account", "list", "--json").out) == []


def test_account_bad_input(mailfc: Mailfc) -> None:
    mailfc.ok("domain", "add", "example.org")
    mailfc.fails("account", "add", "bob@nowhere.example", "--password-stdin", stdin="x\n",
                 says="unknown domain")
    mailfc.fails("account", "add", "not-an-address", "--password-stdin", stdin="x\n",
                 says="invalid address")
    mailfc.fails("account", "add", "b..b@example.org", "--password-stdin", stdin="x\n",
                 says="invalid local part")
    mailfc.fails("account", "add", "bob@example.org", "--password-stdin", stdin="\n",
                 says="no password")
    mailfc.fails("account", "add", "bob@example.org", stdin="", says="--password-stdin")
    mailfc.ok("account", "add", "bob@example.org", "--password-stdin", stdin="x\n")
    mailfc.fails("account", "add", "BOB@example.org", "--password-stdin", stdin="x\n",
                 says="exists already")
    mailfc.fails("account", "show", "carol@example.org", says="unknown account")
    mailfc.fails("account", "passwd", "carol@example.org", "--password-stdin", stdin="x\n",
                 says="unknown account")
    mailfc.fails("account", "remove", "carol@example.org", says="unknown account")


def test_remove_domain_with_accounts_needs_force(mailfc: Mailfc) -> None:
    mailfc.ok("domain", "add", "example.org")
    mailfc.ok("account", "add", "bob@example.org", "--password-stdin", stdin="x\n")
    mailfc.ok("alias", "add", "info@example.org", "bob@example.org")
    mailfc.fails("domain", "remove", "example.org", says="--force")
    # Nothing was removed by the refused attempt.
    assert json.loads(mailfc.ok("account", "list", "--json").out)[0]["address"] == (
        "bob@example.org")
    mailfc.ok("domain", "remove", "example.org", "--force")
    assert json.loads(mailfc.ok("account", "list", "--json").out) == []
    assert json.loads(mailfc.ok("alias", "list", "--json").out) == []


def test_aliases(mailfc: Mailfc) -> None:
    mailfc.ok("domain", "add", "example.org")
    mailfc.ok("account", "add", "bob@example.org", "--password-stdin", stdin="x\n")
    mailfc.ok("alias", "add", "info@example.org", "bob@example.org")
    mailfc.ok("alias", "add", "info@example.org", "someone@elsewhere.example")
    listed = json.loads(mailfc.ok("alias", "list", "example.org", "--json").out)
    assert {(a["alias"], a["destination"]) for a in listed} == {
        ("info@example.org", "bob@example.org"),
        ("info@example.org", "someone@elsewhere.example"),
    }
    mailfc.fails("alias", "add", "info@example.org", "bob@example.org", says="exists already")
    mailfc.fails("alias", "add", "bob@example.org", "x@example.org", says="is an account")
    mailfc.fails("account", "add", "info@example.org", "--password-stdin", stdin="x\n",
                 says="is an alias")
    mailfc.fails("alias", "add", "x@nowhere.example", "bob@example.org", says="unknown domain")
    mailfc.fails("alias", "add", "x@example.org", "not an address", says="invalid")
    mailfc.ok("alias", "remove", "info@example.org", "someone@elsewhere.example")
    assert len(json.loads(mailfc.ok("alias", "list", "--json").out)) == 1
    mailfc.ok("alias", "remove", "info@example.org")
    mailfc.fails("alias", "remove", "info@example.org", says="no alias")


def test_domain_set_idle_timeout_and_lifetime(mailfc: Mailfc) -> None:
    mailfc.ok("domain", "add", "example.org")
    shown = mailfc.ok("domain", "show", "example.org").out
    assert "5m (default)" in shown and "1h (default)" in shown
    said = mailfc.ok("domain", "set", "example.org", "--idle-timeout", "10m",
                     "--lifetime", "2h").out
    assert "idle timeout 10m, lifetime 2h" in said
    shown = json.loads(mailfc.ok("domain", "show", "example.org", "--json").out)
    assert {s: (v["idle_timeout_s"], v["lifetime_s"], v["own"])
            for s, v in shown["timeouts"].items()} == {
        "smtp": (600, 7200, True), "lmtp": (600, 7200, True), "imap": (600, 7200, True)}
    mailfc.ok("domain", "set", "example.org", "--lifetime", "90m")
    table = mailfc.ok("domain", "show", "example.org").out
    assert "10m" in table and "90m" in table and "default" not in table
    mailfc.fails("domain", "set", "example.org", says="--idle-timeout")
    mailfc.fails("domain", "set", "example.org", "--idle-timeout", "soon",
                 says="invalid duration")
    mailfc.fails("domain", "set", "example.org", "--lifetime", "0", says="more than zero")
    mailfc.fails("domain", "set", "nowhere.example", "--lifetime", "1h", says="unknown domain")
