"""Errors of the container runtime, split like every mailfc error.

    RuntimeUnavailable  permanent: the host lacks runc, Postfix, Dovecot, root or
                        a kernel feature; the message names the Debian package
    UnknownDomain       permanent: no such (active) domain in the CMDB
    AddressExhausted    temporary: every address of the host's subnet is taken
    CapacityExhausted   temporary: the domain runs max_instances already
    StartFailed         temporary: runc failed, or the server never listened
                        within start_timeout; nothing is left behind
    NotRunning          the instance named is not a live container here
"""

from __future__ import annotations

from mailfc.errors import MailfcError, NotFound, PermanentFailure, TemporaryFailure


class RuntimeUnavailable(PermanentFailure):
    """This host cannot run containers until something is installed or fixed."""


class UnknownDomain(NotFound):
    """The domain does not exist or is suspended."""


class AddressExhausted(TemporaryFailure):
    """No free address is left in the host's container subnet."""


class CapacityExhausted(TemporaryFailure):
    """The domain already runs as many instances as its spec allows."""


class StartFailed(TemporaryFailure):
    """A container did not start or did not listen in time; it was cleaned up."""


class NotRunning(MailfcError):
    """The instance is not a live container on this host."""
