"""Domain names in their stored form: IDNA 2008 (UTS #46, non-transitional)."""

from __future__ import annotations

import pytest

from mailfc.addresses import normalize_address, normalize_domain
from mailfc.errors import InvalidInput


@pytest.mark.parametrize(("given", "stored"), [
    ("faß.de", "xn--fa-hia.de"),         # IDNA 2003 would give fass.de
    ("fass.de", "fass.de"),
    ("Bücher.Example.", "xn--bcher-kva.example"),
    ("xn--bcher-kva.example", "xn--bcher-kva.example"),
])
def test_stored_form(given: str, stored: str) -> None:
    assert normalize_domain(given) == stored


def test_addresses_keep_sharp_s_apart() -> None:
    assert normalize_address("Bob@faß.de") != normalize_address("bob@fass.de")


@pytest.mark.parametrize("bad", ["xn--zz.de", "a\u200d.de", "faß..de", "ab\u0000.de"])
def test_invalid_names(bad: str) -> None:
    with pytest.raises(InvalidInput, match="invalid domain name"):
        normalize_domain(bad)
