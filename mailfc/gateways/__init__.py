"""The inbound (and later outbound) gateways: SMTP-In, the spool, the filter gateway.

    smtp_in/   the MX of every hosted domain (ESMTP, port 25)
    spool/     durable per-domain queues with fair delivery (SMTP-In now, SMTP-Out later)
    filter/    the filter chain (built-in checks and any standard milter), run by
               SMTP-In at end of data ([filter_in]) and by Filter-Out ([filter_out])
    listener.py  listeners that can be replaced without refusing a connection
    replies.py   the reply lines of the gateways, defined once
"""
