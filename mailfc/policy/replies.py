"""SMTP replies for policy decisions, defined once (milter, SMTP-In, submission).

    over a limit            451 4.7.1 <reason: which limit, when to retry>
    blocked by an admin     550 5.7.1 <reason>
    policy unavailable      451 4.3.0 <reason>   (failure policy "tempfail")
"""

from __future__ import annotations

from mailfc.policy.engine import REJECT, Decision

LIMIT = (451, "4.7.1")
BLOCKED = (550, "5.7.1")
UNAVAILABLE = (451, "4.3.0")

RULE_UNAVAILABLE = "policy:unavailable"


def smtp_reply(decision: Decision) -> tuple[int, str, str]:
    """(code, enhanced status, text) for a refusing decision."""
    if decision.rule == RULE_UNAVAILABLE:
        code, status = UNAVAILABLE
    elif decision.verdict == REJECT:
        code, status = BLOCKED
    else:
        code, status = LIMIT
    return code, status, decision.reason
