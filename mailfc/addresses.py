"""Domain names and mail addresses: the one place that says what is valid.

Domains are stored in their ASCII form (IDNA, lower case), so `bücher.example`
and `xn--bcher-kva.example` are the same domain.  IDNA is IDNA 2008 with the
UTS #46 non-transitional mapping (the `idna` package), as browsers and registries
use it: `faß.de` is `xn--fa-hia.de`, a domain of its own, not `fass.de` (Python's
built-in "idna" codec is IDNA 2003 and would map one onto the other).  A name
already in ASCII is kept as it is, but an `xn--` label in it must decode.

Local parts are the dot-atom form of RFC 5322 (quoted local parts are refused for
hosted accounts: real mailboxes never need them) and stored lower case.
"""

from __future__ import annotations

import re

import idna

from mailfc.errors import InvalidInput

_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_ATEXT = r"[a-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LOCALPART = re.compile(rf"^{_ATEXT}(\.{_ATEXT})*$")
MAX_DOMAIN = 253
MAX_LOCALPART = 64


def normalize_domain(name: str) -> str:
    """The stored form of a domain name; InvalidInput names what is wrong."""
    text = name.strip().rstrip(".").lower()
    if not text:
        raise InvalidInput("empty domain name")
    ascii_name = to_ascii(text, name)
    labels = ascii_name.split(".")
    if len(ascii_name) > MAX_DOMAIN:
        raise InvalidInput(f"invalid domain name {name!r}: longer than {MAX_DOMAIN} characters")
    if len(labels) < 2:
        raise InvalidInput(f"invalid domain name {name!r}: needs at least two labels")
    for label in labels:
        if not _LABEL.match(label):
            raise InvalidInput(
                f"invalid domain name {name!r}: label {label!r} must be 1-63 letters, "
                "digits or hyphens, not starting or ending with a hyphen"
            )
    if labels[-1].isdigit():
        raise InvalidInput(f"invalid domain name {name!r}: the last label is numeric")
    return ascii_name


def to_ascii(text: str, given: str) -> str:
    """`text` (stripped, lower case) in its ASCII form, IDNA 2008; `given` is what the
    user wrote, for the message."""
    try:
        if text.isascii():
            for label in text.split("."):
                if label.startswith("xn--"):
                    idna.decode(label)
            return text
        return idna.encode(text, uts46=True, transitional=False).decode("ascii")
    except (idna.IDNAError, UnicodeError) as error:
        raise InvalidInput(
            f"invalid domain name {given!r}: not a valid IDNA 2008 name ({error})") from None


def normalize_localpart(localpart: str) -> str:
    text = localpart.strip().lower()
    if not text:
        raise InvalidInput("empty local part")
    if len(text) > MAX_LOCALPART:
        raise InvalidInput(f"invalid local part {localpart!r}: longer than {MAX_LOCALPART}")
    if not _LOCALPART.match(text):
        raise InvalidInput(
            f"invalid local part {localpart!r}: use letters, digits and !#$%&'*+/=?^_`{{|}}~-, "
            "with single dots between them"
        )
    return text


def split_address(address: str) -> tuple[str, str]:
    """`"Bob@Example.ORG"` -> ("bob", "example.org"), validated."""
    text = address.strip()
    localpart, at, domain = text.rpartition("@")
    if not at or not localpart:
        raise InvalidInput(f"invalid address {address!r}: expected localpart@domain")
    return normalize_localpart(localpart), normalize_domain(domain)


def normalize_address(address: str) -> str:
    localpart, domain = split_address(address)
    return f"{localpart}@{domain}"
