"""The CMDB on PostgreSQL: connection pool, embedded cluster, migrations, stores.

`connect(config)` is the one way in: it starts the embedded cluster when no DSN
is configured, checks the schema and returns an asyncpg pool.
"""

from mailfc.db.pool import connect, open_pool

__all__ = ["connect", "open_pool"]
