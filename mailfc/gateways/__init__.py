"""The gateways between the platform and the internet: SMTP-In, Filter-Out, SMTP-Out.

    smtp_in/   the MX of every hosted domain (ESMTP, port 25): [filter_in] chain at
               end of data, then the in spool, delivered to the LMTP Router
    filter/    the filter chain (built-in checks, DNSBL, any standard milter), run by
               SMTP-In at end of data ([filter_in]) and by Filter-Out ([filter_out]),
               the hop every domain Postfix relays its outbound mail to
    smtp_out/  SMTP-Out: intake from Filter-Out, the out spool, MX delivery (or
               smtp_out.routes), retries and DSNs
    spool/     durable per-domain queues with fair delivery (SMTP-In's and SMTP-Out's)
    lmtp_hop.py  the LMTP client of a gateway's next hop, one reply per recipient
    journal.py   what a hop already delivered, so a retry does not deliver twice
    listener.py  listeners that can be replaced without refusing a connection
    replies.py   the reply lines of the gateways, defined once

docs/architecture.md follows a message through them.
"""
