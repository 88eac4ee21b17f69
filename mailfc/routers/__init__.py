"""Resident routers: IMAP, LMTP (and later submission); each finds the domain's
host in the CMDB and hands the session to that host's dispatcher."""
