"""SMTP-In: the MX of every hosted domain.

LISTENER
    listen.smtp_in (0.0.0.0:25), ESMTP (RFC 5321) with SIZE, PIPELINING, 8BITMIME,
    SMTPUTF8, ENHANCEDSTATUSCODES and STARTTLS (tls.* certificate); no AUTH.

SESSION
    Greeting `220 <host> ESMTP mailfc`.  Recipients must be hosted mailboxes or aliases;
    everything else is refused at RCPT (554 5.7.1 relaying denied: never an open relay,
    550 5.1.1 unknown user).  handler.py lists every stage's checks and replies;
    protocols/smtp_server.py the protocol (pipelining, STARTTLS, limits).  A message
    is answered `250 2.0.0 OK: queued as <id>` only once it is fsync'd in the spool.

NEXT HOP
    The spool (gateways/spool) delivers to Filter-In (listen.filter_in, by default the
    unix socket <state_dir>/private/hops/filter-in.sock; mailfc.hops) over LMTP with
    XFORWARD naming the original client, per recipient domain, round-robin, with retries.

SECURITY
    An MX is exposed to everyone: command lines are bounded (1000 octets, 500 5.5.2),
    messages by smtp_in.max_message_size (552 5.3.4), recipients by
    smtp_in.max_recipients (452 4.5.3); bare LF and undeclared 8-bit data are refused
    (no SMTP smuggling through to the next hop); a broken TLS handshake closes only that
    connection.  Bad input is answered and logged at INFO, never with a traceback.

CYCLING
    smtp_in.cycle_after_s > 0: the listener is replaced after that long without refusing
    a connection (gateways/listener.py).  The spool stays with the service.

CONFIGURATION
    [smtp_in] max_message_size (50 MiB), max_recipients (100), require_8bitmime (true),
              timeout_s (300), max_queued_per_domain (20000), cycle_after_s (0)
    [spool]   see gateways/spool
    [policy], [recorder]: the shared engine and recorder (mailfc.policy)
"""

from mailfc.gateways.smtp_in.service import SmtpInService

__all__ = ["SmtpInService"]
