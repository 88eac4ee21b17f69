"""The durable spool: messages on disk until the next hop has taken every recipient.

    spool = Spool(directory, deliver, config.spool, hostname=...)
    await spool.start()             # takes the lock (or waits for it), resumes the queue
    queue_id = await spool.put(sender, recipients, message, client_ip=...)  # durable now
    await spool.stop(drain_timeout)

`message` is bytes or any Source (mailfc.messages: a MessageData as it arrived, a
FileSlice); put copies it into the spool file in chunks.  The spool calls
`deliver(envelope, recipients of one domain, message: Source) -> {recipient: Reply}`
with the message as a Source to read in chunks (the spool file after the envelope
line, or the cached bytes of a small message): it never holds a large message whole.

store.py says how a message becomes durable and how progress is kept (files, fsync,
exactly-once, the quarantine); queue.py how deliveries are scheduled (per-domain queues
drained round-robin, retries with backoff, DSN bounces, undeliverable bounces); dsn.py
what a bounce looks like; admin.py what `mailfc queue` does with the files.  Used by
SMTP-In (<state_dir>/spool/smtp-in) and SMTP-Out (<state_dir>/spool/smtp-out); the
spool knows nothing of SMTP.

CONFIGURATION ([spool])
    directory (<state_dir>/spool/<service>), min_free_bytes (100 MiB), max_deliveries (32),
    per_domain_concurrency (4), retry_base_s (60), retry_max_s (3600),
    max_lifetime_s (5 days), delivery_timeout_s (120), scan_interval_s (1),
    undeliverable_bounces ("quarantine", or the postmaster's address)
"""

from mailfc.gateways.spool.queue import Deliver, Spool, spool_directory
from mailfc.gateways.spool.store import Envelope, SpoolFiles, SpoolFull

__all__ = ["Deliver", "Envelope", "Spool", "SpoolFiles", "SpoolFull", "spool_directory"]
