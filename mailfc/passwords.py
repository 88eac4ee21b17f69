"""Password hashes for accounts, in Dovecot's `{SCHEME}hash` notation.

New passwords are hashed with Argon2id (argon2-cffi) with OWASP's minimum
parameters (19 MiB, 2 passes, 1 lane: about 20 ms here, so a bulk import of
50,000 plain passwords stays in minutes); the stored string is
`{ARGON2ID}$argon2id$...`, which Dovecot understands too.  Imported hashes
may also be bcrypt (`{BLF-CRYPT}$2y$...`).
A password is never stored plain or unsalted: `check_hash` refuses any other
scheme, naming the ones accepted.
"""

from __future__ import annotations

import secrets

import argon2
import bcrypt

from mailfc.errors import InvalidInput

_hasher = argon2.PasswordHasher(time_cost=2, memory_cost=19456, parallelism=1)
ACCEPTED_SCHEMES = ("ARGON2ID", "ARGON2I", "BLF-CRYPT")
MAX_PASSWORD = 1024


def hash_password(password: str) -> str:
    if not password:
        raise InvalidInput("empty password")
    if len(password) > MAX_PASSWORD:
        raise InvalidInput(f"password longer than {MAX_PASSWORD} characters")
    return "{ARGON2ID}" + _hasher.hash(password)


def _split(stored: str) -> tuple[str, str]:
    if not stored.startswith("{") or "}" not in stored:
        return "", stored
    scheme, _, value = stored[1:].partition("}")
    return scheme.upper(), value


def check_hash(stored: str) -> str:
    """Validate an imported hash; returns it. InvalidInput if unusable."""
    scheme, value = _split(stored)
    if scheme not in ACCEPTED_SCHEMES:
        raise InvalidInput(
            f"unsupported password hash scheme {scheme or 'none'!r}: use one of "
            + ", ".join("{" + s + "}" for s in ACCEPTED_SCHEMES)
        )
    if scheme == "BLF-CRYPT":
        if not value.startswith(("$2a$", "$2b$", "$2y$")) or len(value) != 60:
            raise InvalidInput("malformed {BLF-CRYPT} hash: expected a 60-character $2y$ hash")
    else:
        prefix = "$argon2id$" if scheme == "ARGON2ID" else "$argon2i$"
        if not value.startswith(prefix):
            raise InvalidInput(f"malformed {{{scheme}}} hash: expected {prefix}...")
    return stored


_dummy_hash: str | None = None


def verify_dummy(password: str) -> bool:
    """Spend what checking `password` against a real Argon2id hash costs, and fail.

    For a login naming no account (or a suspended one): answered sooner than a
    wrong password for a real account, it would tell a prober which accounts
    exist.  The hash is made on first use with the same parameters as new ones."""
    global _dummy_hash
    if _dummy_hash is None:
        _dummy_hash = hash_password(secrets.token_urlsafe(24))
    verify_password(_dummy_hash, password)
    return False


def verify_password(stored: str, password: str) -> bool:
    scheme, value = _split(stored)
    try:
        if scheme in ("ARGON2ID", "ARGON2I"):
            return _hasher.verify(value, password)
        if scheme == "BLF-CRYPT":
            # bcrypt only knows $2b$; $2y$ is the same algorithm under PHP's name.
            normalized = value.replace("$2y$", "$2b$", 1).encode()
            return bcrypt.checkpw(password.encode()[:72], normalized)
    except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError,
            ValueError):
        return False
    return False
