"""The login_ips rule: an account suddenly used from many addresses it never used before."""

from __future__ import annotations

import datetime
import json

import asyncpg

from tests.analysis.conftest import History

ACCOUNT = "u7@d2.abuse.example"


async def test_many_new_login_addresses_are_flagged(history: History,
                                                    cmdb: asyncpg.Pool) -> None:
    at = history.anchor - datetime.timedelta(minutes=30)
    # Six logins from six addresses never seen for it; written as the router writes them
    # (the user name as typed, mixed case).
    await cmdb.execute(
        "INSERT INTO auth_attempts (at, protocol, username, domain, client_ip, success)"
        " SELECT $1::timestamptz + make_interval(secs => k), 'imap', upper($2),"
        " 'd2.abuse.example', ('192.0.2.' || (100 + k))::inet, true"
        " FROM generate_series(1, 6) k", at, ACCOUNT)
    suspects = json.loads(history.ok("abuse", "anomalies", "--window", "1h", "--json").out)
    found = {s["subject"]: s for s in suspects}
    assert found[ACCOUNT]["rules"] == "login_ips"
    assert "6 of them never seen before: 192.0.2.101" in found[ACCOUNT]["evidence"][0]
    # Five new addresses are still enough (min_ips 5), four are not.
    await cmdb.execute("DELETE FROM auth_attempts WHERE client_ip = '192.0.2.106'")
    suspects = json.loads(history.ok("abuse", "anomalies", "--window", "1h", "--json").out)
    assert ACCOUNT in {s["subject"] for s in suspects}
    await cmdb.execute("DELETE FROM auth_attempts WHERE client_ip = '192.0.2.105'")
    suspects = json.loads(history.ok("abuse", "anomalies", "--window", "1h", "--json").out)
    assert ACCOUNT not in {s["subject"] for s in suspects}
