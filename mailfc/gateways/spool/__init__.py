"""The durable spool: messages on disk until the next hop has taken every recipient.

    spool = Spool(directory, deliver, config.spool, hostname=...)
    await spool.start()             # takes the lock (or waits for it), resumes the queue
    queue_id = await spool.put(sender, recipients, message, client_ip=...)  # durable now
    await spool.stop(drain_timeout)

store.py says how a message becomes durable and how progress is kept (files, fsync,
exactly-once); queue.py how deliveries are scheduled (per-domain queues drained
round-robin, retries with backoff, DSN bounces); dsn.py what a bounce looks like.
Used by SMTP-In now and by SMTP-Out later: the spool knows nothing of SMTP, only a
`deliver(envelope, recipients, message) -> {recipient: Reply}` function.

CONFIGURATION ([spool])
    directory (<state_dir>/spool/smtp-in), min_free_bytes (100 MiB), max_deliveries (32),
    per_domain_concurrency (4), retry_base_s (60), retry_max_s (3600),
    max_lifetime_s (5 days), delivery_timeout_s (120), scan_interval_s (1)
"""

from mailfc.gateways.spool.queue import Deliver, Spool, spool_directory
from mailfc.gateways.spool.store import Envelope, SpoolFiles, SpoolFull

__all__ = ["Deliver", "Envelope", "Spool", "SpoolFiles", "SpoolFull", "spool_directory"]
