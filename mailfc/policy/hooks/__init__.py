"""The IMAP hook server: records every IMAP session and command, enforces IMAP limits.

Its client is the Dovecot plugin in plugins/dovecot_hooks (one connection per imap
process, over the unix socket every per-domain Dovecot container sees at
/run/mailfc/hooks.sock).

    protocol.py  the line protocol, defined once: words, fields, escaping, the
                 command -> limit kind map, a pure line codec, the C header generator
    session.py   one plugin connection: its IMAP sessions -> records, limit decisions
    server.py    the asyncio unix server, limit-change watcher; the service
    __main__.py  `python -m mailfc.policy.hooks`: the hook server as a process of its own
"""
