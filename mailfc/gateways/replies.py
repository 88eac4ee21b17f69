"""The SMTP/LMTP replies of the gateways, defined once for servers and tests.

Temporary failures are 4xx, permanent ones 5xx, with the enhanced status code
(RFC 3463) every reply carries since EHLO advertises ENHANCEDSTATUSCODES.
"""

from __future__ import annotations

OK = "250 2.0.0 OK"
OK_SENDER = "250 2.1.0 OK"
OK_RCPT = "250 2.1.5 OK"
QUEUED = "250 2.0.0 OK: queued as {queue_id}"
DISCARDED = "250 2.7.0 OK: discarded"
QUARANTINED = "250 2.7.0 OK: held for review"

NO_SUCH_USER = "550 5.1.1 <{address}>: no such mailbox here"
RELAY_DENIED = "554 5.7.1 <{address}>: relaying denied: this server only receives mail for " \
               "the domains it hosts"
BAD_ADDRESS = "501 5.1.3 bad address syntax"
TOO_MANY_RECIPIENTS = "452 4.5.3 too many recipients in one message"
NEED_MAIL = "503 5.5.1 need MAIL command first"
BARE_LF = "554 5.5.2 bare <LF> in message data: line ends must be <CR><LF>"
EIGHT_BIT = "554 5.6.0 message contains 8-bit data but MAIL FROM did not say BODY=8BITMIME"
STORAGE = "452 4.3.1 insufficient system storage, try again later"
QUEUE_BUSY = "451 4.7.1 too much mail waiting for {domain}, try again later"
# A recipient domain that got no turn while the host is short of CPU (mailfc.fairness).
DOMAIN_BUSY = "451 4.7.1 {domain} is receiving more mail than its share now, try again later"

FILTER_REJECT = "550 5.7.1 {reason}"
FILTER_TEMPFAIL = "451 4.7.1 {reason}"
