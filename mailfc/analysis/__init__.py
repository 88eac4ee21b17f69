"""Abuse analysis: questions an abuse desk asks, answered from the session records.

One module per concern; each opens with its own manual.

    timerange   --since / --between as a half-open UTC range, and time buckets
    stats       median, MAD and the robust baseline the anomaly rules compare against
    targets     what an admin typed (account, domain, IP, network) and what it names
    top         subjects ranked by a metric over a range, and their time series
    account     one account's timeline, IPs (new ones marked), limits and counters
    anomalies   ranked suspects with the evidence for each
    explain     every decision taken on one session or message, in plain words
    simulate    a proposed limit replayed against the recorded history
    blocks      admin blocks (read by the limit engine) and the admin event log
    plot        time series to PNG (matplotlib, imported only when asked for)

Every query is bounded by a time range on the tables' partition keys, so PostgreSQL
reads only the day partitions of that range (see 0002_sessions.sql, 0007_analysis.sql).
Library functions take an asyncpg connection and return plain dicts and dataclasses;
mailfc/cli/abuse.py renders them.
"""
