"""`mailfc queue` as an admin runs it (a real process) on real spools of SMTP-In and SMTP-Out.

The spools are filled by Spool objects in the test process (a next hop played by the test
defers or refuses); the command reads and changes their files, or asks the running spool
through control/ when one holds the lock.  No database is needed.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mailfc.config import SpoolSection
from mailfc.gateways.spool import Envelope, Spool
from mailfc.messages import Source
from mailfc.protocols.lmtp import Reply

MESSAGE = b"Subject: queue cli test\r\nFrom: ann@remote.example\r\n\r\nbody\r\n"
DEFER = Reply(451, "4.4.1 next hop down")


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


def mailfc(config_file: Path, *args: str) -> Result:
    env = {**os.environ, "MAILFC_CONFIG": str(config_file), "COLUMNS": "250"}
    env.pop("MAILFC_DEBUG", None)
    process = subprocess.run([sys.executable, "-m", "mailfc", "queue", *args],
                             capture_output=True, text=True, env=env, timeout=60)
    assert "Traceback" not in process.stderr, process.stderr
    return Result(process.returncode, process.stdout, process.stderr)


async def run(config_file: Path, *args: str) -> Result:
    """The command while this test's loop keeps running (a spool owner in it answers)."""
    return await asyncio.to_thread(mailfc, config_file, *args)


def settings(**values: object) -> SpoolSection:
    base: dict[str, object] = {"retry_base_s": 3600, "retry_max_s": 3600,
                               "scan_interval_s": 0.1, "min_free_bytes": 0}
    return SpoolSection.model_validate(base | values)


def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "mailfc.toml"
    path.write_text(f'[paths]\nstate_dir = "{tmp_path}"\n')
    return path


async def hop_defers(envelope: Envelope, rcpts: list[str], message: Source) -> dict[str, Reply]:
    return dict.fromkeys(rcpts, DEFER)


async def hop_refuses_bounces(envelope: Envelope, rcpts: list[str],
                              message: Source) -> dict[str, Reply]:
    if envelope.is_bounce:
        return dict.fromkeys(rcpts, Reply(550, "5.1.1 no such sender"))
    return dict.fromkeys(rcpts, DEFER)


async def fill(directory: Path, hop: Any, *messages: tuple[str, list[str], bool]) -> list[str]:
    """Put messages (sender, recipients, is_bounce) and stop once each was tried."""
    spool = Spool(directory, hop, settings(), hostname="mx.test")
    await spool.start()
    try:
        ids = [await spool.put(sender, rcpts, MESSAGE, is_bounce=bounce)
               for sender, rcpts, bounce in messages]
        await asyncio.sleep(0.3)
    finally:
        await spool.stop(1.0)
    return ids


async def test_list_show_delete_and_the_quarantine_of_both_spools(tmp_path: Path) -> None:
    spool_in, spool_out = tmp_path / "spool" / "smtp-in", tmp_path / "spool" / "smtp-out"
    in_a, in_b = await fill(spool_in, hop_defers,
                            ("ann@remote.example", ["bob@a.example"], False),
                            ("ann@remote.example", ["carol@b.example"], False))
    out_c, bounce = await fill(spool_out, hop_refuses_bounces,
                               ("bob@a.example", ["dave@c.example"], False),
                               ("", ["forged@d.example"], True))
    config = config_file(tmp_path)

    rows = mailfc(config, "list", "--json").json()
    assert {(row["spool"], row["queue_id"]) for row in rows} == {
        ("in", in_a), ("in", in_b), ("out", out_c)}
    assert all(row["attempts"] == 1 and "4.4.1" in row["last_error"] for row in rows)
    assert [row["queue_id"] for row in mailfc(config, "list", "--spool", "out", "--json")
            .json()] == [out_c]
    assert [row["queue_id"] for row in mailfc(config, "list", "--domain", "b.example",
                                              "--json").json()] == [in_b]
    table = mailfc(config, "list")
    assert table.code == 0 and in_a in table.out and out_c in table.out and "│ out" in table.out
    csv = mailfc(config, "list", "--csv").out.splitlines()
    assert csv[0].startswith("spool,queue_id,") and len(csv) == 4

    shown = mailfc(config, "show", out_c, "--json").json()
    assert shown["spool"] == "out" and shown["sender"] == "bob@a.example"
    assert shown["recipient_status"] == [{"recipient": "dave@c.example", "status": "queued"}]
    assert shown["headers"].startswith("Subject: queue cli test")
    assert "dave@c.example: queued" in mailfc(config, "show", out_c).out
    missing = mailfc(config, "show", "5F1A2B3C4D5E6F7A8B")
    assert missing.code == 1 and "no message 5F1A2B3C4D5E6F7A8B" in missing.err
    wrong_spool = mailfc(config, "show", out_c, "--spool", "in")
    assert wrong_spool.code == 1 and "SMTP-In's queue" in wrong_spool.err
    assert mailfc(config, "show", "../etc").code != 0

    # Nobody delivers from these spools: a delete acts on the files, a retry waits.
    deleted = mailfc(config, "delete", in_a)
    assert deleted.code == 0 and "deleted 1" in deleted.out
    assert not (spool_in / "queue" / in_a).exists() and (spool_in / "queue" / in_b).exists()
    assert mailfc(config, "delete", in_a).code == 1
    retry = mailfc(config, "retry", "--all")
    assert retry.code == 0 and "no SMTP-In runs" in retry.out and "no SMTP-Out runs" in retry.out
    assert mailfc(config, "retry").code != 0          # an id or --all

    # The quarantine: the bounce nobody took, in SMTP-Out's spool.
    quarantined = mailfc(config, "quarantine", "--json").json()
    assert [(row["spool"], row["queue_id"]) for row in quarantined] == [("out", bounce)]
    assert "550 5.1.1 no such sender" in quarantined[0]["reason"]
    assert mailfc(config, "quarantine", "list", "--spool", "in", "--json").json() == []
    assert bounce in mailfc(config, "quarantine").out
    detail = mailfc(config, "quarantine", "show", bounce, "--json").json()
    assert detail["recipients"] == "forged@d.example" and detail["headers"].startswith("Subject")
    not_there = mailfc(config, "quarantine", "release", bounce, "--spool", "in")
    assert not_there.code == 1 and "mailfc queue quarantine" in not_there.err
    released = mailfc(config, "quarantine", "release", bounce)
    assert released.code == 0 and "released" in released.out
    assert (spool_out / "queue" / bounce).exists()
    assert not (spool_out / "quarantine" / bounce).exists()
    assert mailfc(config, "quarantine", "release", bounce).code == 1
    assert mailfc(config, "quarantine", "delete", bounce).code == 1
    # Back in the queue, a fresh arrival to the recipient that failed.
    requeued = mailfc(config, "show", bounce, "--json").json()
    assert requeued["sender"] == "<>" and requeued["pending"] == 1 and requeued["attempts"] == 0


async def test_retry_delete_and_release_through_the_running_spool(tmp_path: Path) -> None:
    config = config_file(tmp_path)
    directory = tmp_path / "spool" / "smtp-in"
    (bounce,) = await fill(directory, hop_refuses_bounces, ("", ["x@e.example"], True))
    tries: list[tuple[str, list[str]]] = []
    up = False

    async def hop(envelope: Envelope, rcpts: list[str], message: Source) -> dict[str, Reply]:
        tries.append((envelope.queue_id, rcpts))
        return dict.fromkeys(rcpts, Reply(250, "2.0.0 OK") if up else DEFER)

    spool = Spool(directory, hop, settings(), hostname="mx.test")
    await spool.start()
    try:
        first = await spool.put("ann@remote.example", ["bob@a.example"], MESSAGE)
        second = await spool.put("ann@remote.example", ["carol@b.example"], MESSAGE)
        await asyncio.sleep(0.2)
        assert len(tries) == 2           # both deferred for an hour
        up = True
        retry = await run(config, "retry", first)
        assert retry.code == 0 and "done by the running SMTP-In" in retry.out
        delete = await run(config, "delete", second, "--spool", "in")
        assert delete.code == 0 and "done by the running SMTP-In" in delete.out
        released = await run(config, "quarantine", "release", bounce)
        assert released.code == 0
        assert await spool.wait_idle(within=10)
        # The released bounce is found by the running spool's scan, delivered.
        for _ in range(50):
            if (bounce, ["x@e.example"]) in tries:
                break
            await asyncio.sleep(0.1)
        assert await spool.wait_idle(within=10)
    finally:
        await spool.stop(1.0)
    assert tries.count((first, ["bob@a.example"])) == 2
    assert tries.count((second, ["carol@b.example"])) == 1
    assert tries.count((bounce, ["x@e.example"])) == 1
    assert list((directory / "queue").iterdir()) == []
    assert mailfc(config, "list", "--json").json() == []
    assert mailfc(config, "quarantine", "--json").json() == []
