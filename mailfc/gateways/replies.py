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
TOO_BIG = "552 5.3.4 message size exceeds the limit of {limit} bytes"
NEED_RCPT = "503 5.5.1 need RCPT command first"
NEED_MAIL = "503 5.5.1 need MAIL command first"
BARE_LF = "554 5.5.2 bare <LF> in message data: line ends must be <CR><LF>"
EIGHT_BIT = "554 5.6.0 message contains 8-bit data but MAIL FROM did not say BODY=8BITMIME"
PIPELINING = "554 5.5.0 improper command pipelining after {command}"
LINE_TOO_LONG = "500 5.5.2 line too long"
STORAGE = "452 4.3.1 insufficient system storage, try again later"
QUEUE_BUSY = "451 4.7.1 too much mail waiting for {domain}, try again later"
TLS_FAILED = "421 4.7.0 TLS negotiation failed"
UNAVAILABLE = "451 4.3.0 temporary failure, try again later"
SHUTDOWN = "421 4.3.2 service shutting down, try again later"

FILTER_REJECT = "550 5.7.1 {reason}"
FILTER_TEMPFAIL = "451 4.7.1 {reason}"

# aiosmtpd's own replies carry no enhanced status code: the one added per reply code.
ENHANCED = {
    "220": "", "221": "2.0.0", "250": "2.0.0", "251": "2.1.5", "252": "2.0.0",
    "354": "", "421": "4.3.0", "450": "4.2.0", "451": "4.3.0", "452": "4.3.1",
    "454": "4.7.0", "500": "5.5.2", "501": "5.5.4", "502": "5.5.1", "503": "5.5.1",
    "504": "5.5.4", "530": "5.7.0", "550": "5.0.0", "552": "5.3.4", "553": "5.1.3",
    "554": "5.5.0", "555": "5.5.4",
}


def with_enhanced(line: str) -> str:
    """`500 Error: bad syntax` -> `500 5.5.2 Error: bad syntax`; lines with a code kept."""
    code, sep, rest = line[:3], line[3:4], line[4:]
    status = ENHANCED.get(code)
    if not status or sep not in (" ", "-"):
        return line
    first = rest.split(" ", 1)[0]
    if first.count(".") == 2 and first.replace(".", "").isdigit():
        return line
    return f"{code}{sep}{status} {rest}"
