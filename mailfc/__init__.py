"""mailfc: a reactive multi-tenant mail platform.

Every hosted domain gets its own Postfix and Dovecot in a container that starts
when a session for the domain arrives and stops when idle. Resident gateways and
routers find the domain in a PostgreSQL CMDB and hand its sessions to the
dispatcher on the domain's host.  docs/architecture.md maps the flows to the
packages; docs/security.md the trust boundaries.
"""

__version__ = "0.1.0"
