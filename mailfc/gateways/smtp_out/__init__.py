"""SMTP-Out: the gateway that delivers outbound mail to the recipients' MX hosts."""
