"""SMTP-In: the MX of every hosted domain.

LISTENER
    listen.smtp_in (0.0.0.0:25), ESMTP (RFC 5321) with SIZE, PIPELINING, 8BITMIME,
    SMTPUTF8, ENHANCEDSTATUSCODES and STARTTLS (tls.* certificate); no AUTH.

SESSION
    Greeting `220 <host> ESMTP mailfc`.  Recipients must be hosted mailboxes or aliases;
    everything else is refused at RCPT (554 5.7.1 relaying denied: never an open relay,
    550 5.1.1 unknown user).  handler.py lists every stage's checks and replies;
    protocols/smtp_server.py the protocol (pipelining, STARTTLS, limits).

END OF DATA (before-queue checks)
    The message is streamed into a MessageData while it arrives (memory up to 64 KiB,
    then an unlinked file in messages.temporary_dir).  At its end, before SMTP-In
    answers, the [filter_in] chain runs over it (gateways/filter: eicar, headers,
    dnsbl, then each milter, e.g. OpenDKIM verify, rspamd, clamav-milter): a reject
    reaches the client as 550/554 with the reason, a tempfail as 451, so the sender
    hears of it and no bounce is ever made for content (no backscatter).  Only then
    is the message copied into the spool in chunks and fsync'd, and answered
    `250 2.0.0 OK: queued as <id>`; after the 250 only delivery can fail.

NEXT HOP
    The spool (gateways/spool) delivers straight to the LMTP Router (listen.lmtp_router,
    by default the unix socket <state_dir>/private/hops/lmtp-router.sock; mailfc.hops)
    over LMTP, per recipient domain, round-robin, with retries, with XFORWARD naming
    the original client and IDENT=<queue id> (the router's journal answers a retry of
    a delivered recipient without delivering it again).  A bounce to a sender whose
    domain is not hosted goes to SMTP-Out's intake (listen.smtp_out) instead.

SECURITY
    An MX is exposed to everyone: command lines are bounded (1000 octets, 500 5.5.2),
    messages by messages.size_limit (552 5.3.4, enforced while reading: never more
    than a chunk of it in memory), headers by 1 MiB, recipients by
    smtp_in.max_recipients (452 4.5.3); bare LF and undeclared 8-bit data are refused
    (no SMTP smuggling through to the next hop); a broken TLS handshake closes only that
    connection.  Bad input is answered and logged at INFO, never with a traceback.

ABUSE (as Postfix's smtpd and anvil)
    Errors: every 4xx/5xx reply counts (550 5.1.1 unknown user and 554 5.7.1 relaying
    denied included); past smtp_in.soft_error_limit each reply waits error_sleep_s,
    at hard_error_limit `421 4.7.0 <host> Error: too many errors` and close: a
    recipient harvester gets ten answers at full speed, ten more one a second, then
    the door.  Connections: past [smtp_in_connections] max_per_client open at
    once or max_rate_per_client per rate_window_s from one client (an IPv6 client:
    its /64), `421 4.7.0 <host> Error: too many connections from <client>` instead
    of the greeting (mailfc.anvil).

FAIRNESS (limit only when needed; mailfc.fairness)
    One process receives for every domain, so a flood to one must not slow the
    others.  While the host is short of CPU (PSI above smtp_in.pressure_target), a
    domain receiving more recipients than its fair share gets them at a rate of its
    own, at least smtp_in.pressure_min_rate a second; each of its RCPTs waits for a
    turn, at most smtp_in.pressure_max_wait_s, then hears
    `451 4.7.1 <domain> is receiving more mail than its share now, try again later`
    (the sending MTA retries later; rule pressure:recipients).  Other domains'
    recipients, in the same session too, pass at once.  Without pressure nobody waits.

CYCLING
    smtp_in.cycle_after_s > 0: the listener is replaced after that long without refusing
    a connection (gateways/listener.py).  The spool stays with the service.

CONFIGURATION
    [smtp_in] max_recipients (100), require_8bitmime (true), timeout_s (300),
              max_queued_per_domain (20000), cycle_after_s (0), soft_error_limit (10),
              hard_error_limit (20), error_sleep_s (1), junk_command_limit (100),
              postmaster (""), pressure_target (0.15), pressure_min_rate (10),
              pressure_max_wait_s (5)
    [smtp_in_connections] max_per_client (50), max_rate_per_client (100),
              rate_window_s (60), exempt_networks ([]): see mailfc.anvil
    [messages] size_limit (50 MiB), temporary_dir (<state_dir>/tmp/messages)
    [filter_in] checks (["eicar", "headers"]), dnsbl_zones ([]), milters ([]),
              milter_timeout_s (30), milter_default_action ("tempfail"), quarantine_dir
              (<state_dir>/quarantine): the chain at end of data
    [spool]   see gateways/spool
    listen.lmtp_router, listen.smtp_out: the next hops
    [policy], [recorder]: the shared engine and recorder (mailfc.policy)
"""

from mailfc.gateways.smtp_in.service import SmtpInService

__all__ = ["SmtpInService"]
