"""The filter chain, and Filter-Out, the gateway that runs it for outbound mail.

WHERE THE CHAIN RUNS
    Inbound: inside SMTP-In at end of data, before its reply ([filter_in];
    gateways/smtp_in/handler.py): a refusal reaches the sending client, nothing is
    queued, no bounce is made.  There is no Filter-In process any more.
    Outbound: Filter-Out ([filter_out]), between the domains' Postfix and SMTP-Out's
    intake.

CHAIN ([filter_in], [filter_out]; chain.py)
    checks (["eicar", "headers"]; "dnsbl" with dnsbl_zones), then each of milters
    (["inet:127.0.0.1:8891", "unix:/path"]), in order, until one gives a final verdict:
    accept (next check), reject, tempfail, discard, quarantine; milters may also add,
    insert, change or delete header fields and replace the body, which later checks and
    the next hop see.  checks.py and milter_client.py are the manuals of each.
    A message is never whole in memory: its header (at most 1 MiB) is parsed, its body
    stays in its MessageData and is read in chunks by the EICAR scan (scan.py) and the
    milters; message.py says how.

FILTER-OUT
    LISTENER  listen.filter_out ("unix:filter-out.sock" in <state_dir>/private/sockets,
              which the domains' Postfix containers mount), LMTP (RFC 2033) with
              XFORWARD (NAME ADDR PROTO HELO IDENT); peers: a domain's container or
              root on the host (mailfc.peers), the domain kept with the connection.
    NEXT HOP  filter_out.next_hop (empty: SMTP-Out's intake, listen.smtp_out) over
              LMTP, sessions kept (gateways/lmtp_hop.py), the message streamed from
              where it lies, with XFORWARD IDENT=<domain>:<Postfix queue id> so the
              intake recognises a retry; each recipient gets the next hop's own reply
              (server.py lists the others).

CONFIGURATION
    [filter_in], [filter_out] checks, dnsbl_zones ([]), milters ([]), milter_timeout_s
                (30), milter_default_action ("tempfail"), quarantine_dir
                (<state_dir>/quarantine); [filter_out] next_hop ("")
    [messages]  size_limit (50 MiB), temporary_dir: see mailfc.messages
"""

from mailfc.gateways.filter.service import FilterService

__all__ = ["FilterService"]
