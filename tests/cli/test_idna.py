"""IDNA 2008 in the CMDB: `faß.de` and `fass.de` are two domains (IDNA 2003 would
map the first onto the second)."""

from __future__ import annotations

import json

from tests.cli.conftest import Mailfc


def test_sharp_s_domain_stays_distinct(mailfc: Mailfc) -> None:
    mailfc.ok("domain", "add", "fass.de")
    mailfc.ok("domain", "add", "faß.de")
    names = [d["name"] for d in json.loads(mailfc.ok("domain", "list", "--json").out)]
    assert sorted(names) == ["fass.de", "xn--fa-hia.de"]
    # The same domain in either spelling is the one already there.
    mailfc.fails("domain", "add", "FAß.de", says="exists already")
    mailfc.fails("domain", "add", "xn--fa-hia.de", says="exists already")
    mailfc.ok("account", "add", "bob@faß.de", "--password-stdin", stdin="s3cret\n")
    listed = mailfc.ok("account", "list", "fass.de").out
    assert "bob@" not in listed
    assert "bob@xn--fa-hia.de" in mailfc.ok("account", "list", "xn--fa-hia.de").out


def test_invalid_idna_is_refused(mailfc: Mailfc) -> None:
    mailfc.fails("domain", "add", "xn--zz.de", says="IDNA 2008")
    mailfc.fails("domain", "add", "a\u200d.de", says="IDNA 2008")
