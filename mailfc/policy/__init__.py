"""Policy: records every session and enforces flow limits and admin blocks.

    milter/      the milter every domain Postfix calls at each SMTP stage
    hooks/       the server the Dovecot hook plugin (plugins/dovecot_hooks) calls
                 for every IMAP command
    engine.py    the limit engine (shared by every host through PostgreSQL)
    kinds.py     the limit kinds, defined once;  replies.py  the policy replies
    blocks.py    admin blocks;  snapshot.py  CMDB facts read a few seconds at a time
    recorder.py  sessions, messages, commands and events, written in batches
    sessions.py  reading the records back (`mailfc sessions`)
    standalone.py  running the milter or the hook server as a process of its own
"""
