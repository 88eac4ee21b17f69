"""The filter gateway: Filter-In (inbound, before the LMTP Router) and later Filter-Out.

LISTENER
    listen.filter_in ("unix:filter-in.sock": <state_dir>/private/hops/filter-in.sock),
    LMTP (RFC 2033) with XFORWARD (NAME ADDR PROTO HELO IDENT) so the checks see the
    original client.  XFORWARD is believed because only SMTP-In can connect: an internal
    hop (mailfc.hops) lets in root and this service's user only (SO_PEERCRED), or, as
    "host:port", peers with the cluster's certificate (mutual TLS).

CHAIN ([filter_in])
    checks (["eicar", "headers"]; "dnsbl" with dnsbl_zones), then each of milters
    (["inet:127.0.0.1:8891", "unix:/path"]), in order, until one gives a final verdict:
    accept (next check), reject, tempfail, discard, quarantine; milters may also add,
    insert, change or delete header fields and replace the body, which later checks and
    the next hop see.  checks.py and milter_client.py are the manuals of each.

NEXT HOP
    next_hop (empty: listen.lmtp_router) over LMTP, sessions kept (gateways/lmtp_hop.py);
    each recipient gets the next hop's own reply (server.py lists the others).

CONFIGURATION
    [filter_in] checks, dnsbl_zones ([]), milters ([]), milter_timeout_s (30),
                milter_default_action ("tempfail"), next_hop (""), quarantine_dir
                (<state_dir>/quarantine), max_message_size (50 MiB)
"""

from mailfc.gateways.filter.service import FilterService

__all__ = ["FilterService"]
