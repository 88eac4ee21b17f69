"""Clients the Postfix tests use: smtplib with XCLIENT (as the SMTP Router will), swaks.

Both talk to the container's Postfix on its dispatcher socket (Instance.socket()),
the only way in.
"""

from __future__ import annotations

import smtplib
import subprocess
import time
from dataclasses import dataclass

from tests.conftest import UnixSMTP, require_binary


@dataclass
class Attempt:
    """One transaction as the client saw it: the reply to MAIL (and to DATA if it got there)."""

    mail: tuple[int, str]
    data: tuple[int, str] | None = None
    started: float = 0.0
    ended: float = 0.0

    @property
    def accepted(self) -> bool:
        return self.data is not None and self.data[0] == 250


def open_session(path: str, account: str, client_ip: str = "192.0.2.7") -> smtplib.SMTP:
    smtp = UnixSMTP(path, timeout=30)
    try:
        smtp.ehlo("client.example")
        code, text = smtp.docmd("XCLIENT",
                                f"LOGIN={account} ADDR={client_ip} NAME=client.example")
        assert code == 220, (code, text)
        smtp.ehlo("client.example")
    except BaseException:
        smtp.close()
        raise
    return smtp


def finish(smtp: smtplib.SMTP) -> None:
    """QUIT, and close the socket even when the server is gone already."""
    try:
        smtp.quit()
    except smtplib.SMTPException:
        pass
    finally:
        smtp.close()


def transaction(smtp: smtplib.SMTP, sender: str, recipients: list[str], *,
                hold_s: float = 0.0, body: bytes = b"hello\r\n", subject: str = "test"
                ) -> Attempt:
    """MAIL, RCPT..., (wait hold_s with the transaction open), DATA."""
    attempt = Attempt(mail=(0, ""), started=time.time())
    code, text = smtp.mail(sender)
    attempt.mail = (code, text.decode())
    if code != 250:
        attempt.ended = time.time()
        smtp.rset()
        return attempt
    accepted = [r for r in recipients if smtp.rcpt(r)[0] == 250]
    if not accepted:
        smtp.rset()
        attempt.ended = time.time()
        return attempt
    time.sleep(hold_s)
    message = (f"Subject: {subject}\r\nMessage-ID: <{time.time_ns()}@test>\r\n\r\n".encode()
               + body)
    code, text = smtp.data(message)
    attempt.data = (code, text.decode())
    attempt.ended = time.time()
    return attempt


def send_one(path: str, account: str, recipients: list[str], **kwargs: object) -> Attempt:
    smtp = open_session(path, account)
    try:
        return transaction(smtp, account, recipients, **kwargs)  # type: ignore[arg-type]
    finally:
        finish(smtp)


def swaks(path: str, *args: str) -> str:
    binary = require_binary("swaks", "swaks")
    result = subprocess.run([binary, "--socket", path, *args],
                            capture_output=True, text=True, timeout=60)
    return result.stdout + result.stderr
