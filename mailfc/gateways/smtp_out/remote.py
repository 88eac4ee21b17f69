"""One delivery attempt to a remote domain's MX hosts, with aiosmtplib.

For the recipients of one domain: try each hop in order until one answers;
EHLO, STARTTLS when offered (opportunistic: encrypt if the peer can, never
refuse if it cannot; an MX certificate is not verified, as between MTAs
without DANE/MTA-STS), MAIL FROM, RCPT TO each recipient (a reply each),
DATA.  Every recipient gets a Reply:

    2xx at DATA            delivered
    4xx/5xx at RCPT/DATA   that reply (the spool retries 4xx, bounces 5xx)
    no hop reachable       451 4.4.1 (retried)
    hop hangs              451 4.4.2 after smtp_out.timeout_s (retried)
"""

from __future__ import annotations

import logging
import ssl

import aiosmtplib

from mailfc.errors import PermanentFailure, TemporaryFailure
from mailfc.gateways.smtp_out.routes import Hop, Router
from mailfc.protocols.lmtp import Reply

log = logging.getLogger("mailfc.gateways.smtp_out")


def _opportunistic_tls() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


class RemoteDelivery:
    def __init__(self, router: Router, *, helo: str, timeout: float) -> None:
        self.router = router
        self.helo = helo
        self.timeout = timeout
        self.tls = _opportunistic_tls()

    async def deliver(self, sender: str, recipients: list[str], message: bytes
                      ) -> dict[str, Reply]:
        domain = recipients[0].rpartition("@")[2]
        try:
            hops = await self.router.hops(domain)
        except PermanentFailure as error:
            return dict.fromkeys(recipients, Reply(550, f"5.1.2 {error}"))
        except TemporaryFailure as error:
            return dict.fromkeys(recipients, Reply(451, f"4.4.3 {error}"))
        last = Reply(451, f"4.4.1 no MX host of {domain} reachable")
        for hop in hops:
            try:
                return await self._attempt(hop, sender, recipients, message)
            except (aiosmtplib.SMTPConnectError, aiosmtplib.SMTPServerDisconnected,
                    OSError) as error:
                last = Reply(451, f"4.4.1 {hop.host}:{hop.port}: {error}")
            except aiosmtplib.SMTPTimeoutError:
                last = Reply(451, f"4.4.2 {hop.host}:{hop.port} did not answer within"
                                  f" {self.timeout:g} s")
            log.info("delivery to %s via %s failed: %s", domain, hop.host, last)
        return dict.fromkeys(recipients, last)

    async def _attempt(self, hop: Hop, sender: str, recipients: list[str],
                       message: bytes) -> dict[str, Reply]:
        client = aiosmtplib.SMTP(hostname=hop.host, port=hop.port, timeout=self.timeout,
                                 local_hostname=self.helo, start_tls=False,
                                 tls_context=self.tls)
        await client.connect()
        try:
            await client.ehlo()
            if client.supports_extension("starttls"):
                await client.starttls(tls_context=self.tls)
                await client.ehlo()
            return await self._transaction(client, sender, recipients, message)
        finally:
            try:
                await client.quit()
            except aiosmtplib.SMTPException:
                client.close()

    @staticmethod
    async def _transaction(client: aiosmtplib.SMTP, sender: str, recipients: list[str],
                           message: bytes) -> dict[str, Reply]:
        results: dict[str, Reply] = {}
        try:
            await client.mail(sender)
        except aiosmtplib.SMTPResponseException as error:
            return dict.fromkeys(recipients, Reply(error.code, error.message))
        accepted = []
        for recipient in recipients:
            try:
                await client.rcpt(recipient)
                accepted.append(recipient)
            except aiosmtplib.SMTPResponseException as error:
                results[recipient] = Reply(error.code, error.message)
        if not accepted:
            await client.rset()
            return results
        try:
            response = await client.data(message)
            reply = Reply(response.code, response.message)
        except aiosmtplib.SMTPResponseException as error:
            reply = Reply(error.code, error.message)
        results.update(dict.fromkeys(accepted, reply))
        return results
