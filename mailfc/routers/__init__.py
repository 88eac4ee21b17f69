"""Resident routers: each finds the domain's host in the CMDB and hands the session
(or each recipient) to that host's dispatcher.

    lmtp.py        LMTP Router: SMTP-In's spool delivers here; each recipient goes
                   to its own domain's Dovecot (LMTP)
    imap.py        IMAP Router (143 STARTTLS, 993): pre-login dialogue, then the
                   session is handed to the domain's Dovecot
    submission.py  SMTP Router (587 STARTTLS, 465): AUTH, then XCLIENT into the
                   user's domain Postfix;  data_relay.py  where relayed DATA ends
    listeners.py   what the login-taking routers share;  throttle.py  login throttling
"""
