"""Errors a user of mailfc sees.

Every error that reaches the CLI or a log names the cause and the fix.  The
split between temporary and permanent failures runs from the next hop all the
way to the reply the client sees (a 4xx or a 5xx, `NO` or `BAD`).
"""


class MailfcError(Exception):
    """An error with a message meant for a human: cause, then fix."""


class ConfigError(MailfcError):
    """The configuration file is missing, unreadable or invalid."""


class DatabaseError(MailfcError):
    """The CMDB cannot be reached, started or migrated."""


class NotFound(MailfcError):
    """A named domain, account, alias, host or limit does not exist."""


class AlreadyExists(MailfcError):
    """A domain, account, alias or host with that name exists already."""


class InvalidInput(MailfcError):
    """A name, address, value or file the user gave is malformed."""


class Conflict(MailfcError):
    """The request contradicts the current state (e.g. removing a domain with accounts)."""


class TemporaryFailure(MailfcError):
    """Worth retrying later: a 4xx reply, a deferred delivery."""


class PermanentFailure(MailfcError):
    """Retrying will not help: a 5xx reply, a bounce."""
