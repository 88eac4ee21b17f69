"""The mailfc milter: records every SMTP session of the per-domain Postfixes, enforces limits.

    codec.py     the milter wire protocol (version 6) as a pure codec: bytes in, packets out
    session.py   one MTA connection: stages -> recorder rows and limit decisions -> replies
    server.py    the asyncio server on the unix socket (and optionally TCP); the service
    __main__.py  `python -m mailfc.policy.milter`: the milter as a process of its own
"""
