"""The delivered journal (mailfc.gateways.journal): files, torn lines, rotation, cap."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from mailfc.gateways.journal import DeliveredJournal
from mailfc.protocols.lmtp import Reply
from mailfc.routers.lmtp import in_mailbox

OK = Reply(250, "2.0.0 <bob@a.example> x1y2 Saved")


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def journal(directory: Path, clock: Clock | None = None, keep_s: float = 100.0,
            max_entries: int = 1000) -> DeliveredJournal:
    opened = DeliveredJournal(directory, "hop", keep_s=keep_s, max_entries=max_entries,
                              clock=clock or Clock())
    opened.open()
    return opened


def test_records_survive_a_new_instance(tmp_path: Path) -> None:
    first = journal(tmp_path)
    assert first.get("Q1", "bob@a.example") is None
    first.record("Q1", "bob@a.example", OK)
    # Awkward values: spaces, '+', '=', non-ASCII, a line break in the reply.
    first.record("g.example:4Zx+=y z", "jöns+tag@a.example", Reply(250, "2.0.0 line\r\nbreak"))
    assert first.get("Q1", "bob@a.example") == OK
    assert first.get("Q1", "carol@a.example") is None
    assert first.get("Q2", "bob@a.example") is None

    second = journal(tmp_path)      # a restart: a new process reads the files
    assert second.get("Q1", "bob@a.example") == OK
    assert second.get("g.example:4Zx+=y z", "jöns+tag@a.example") == Reply(250,
                                                                           "2.0.0 line break")
    assert len(second) == 2
    first.close()
    second.close()


def test_survives_kill_9_of_the_writer(tmp_path: Path) -> None:
    """A record is in the file once record() returns: no close, no flush needed."""
    script = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from mailfc.gateways.journal import DeliveredJournal\n"
        "from mailfc.protocols.lmtp import Reply\n"
        "j = DeliveredJournal(Path(sys.argv[1]), 'hop', keep_s=100, max_entries=1000)\n"
        "j.open()\n"
        "j.record('Q9', 'bob@a.example', Reply(250, '2.0.0 saved'))\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=False,
                          cwd=Path(__file__).parents[2])
    assert done.returncode == -9
    assert journal(tmp_path).get("Q9", "bob@a.example") == Reply(250, "2.0.0 saved")


def test_a_torn_last_line_is_ignored(tmp_path: Path) -> None:
    first = journal(tmp_path)
    first.record("Q1", "bob@a.example", OK)
    first.record("Q2", "bob@a.example", OK)
    path = first.current.path if first.current else None
    assert path is not None
    first.close()
    data = path.read_bytes()
    # Cut the last record in its recipient, as a crash mid-write would: the rest of
    # it still parses but is not a whole record.
    cut = data.rindex(b"bob@a.exa") + len(b"bob@a.exa")
    path.write_bytes(data[:cut])
    second = journal(tmp_path)
    assert second.get("Q1", "bob@a.example") == OK
    assert second.get("Q2", "bob@a.example") is None
    assert second.get("Q2", "bob@a.exa") is None
    # The next record starts a line of its own and is found, now and after a restart.
    second.record("Q3", "bob@a.example", OK)
    assert second.get("Q3", "bob@a.example") == OK
    assert journal(tmp_path).get("Q3", "bob@a.example") == OK
    # A damaged byte inside a record fails its crc.
    data = path.read_bytes()
    at = data.index(b" Q1 ") + 1
    path.write_bytes(data[:at] + b"Q7" + data[at + 2:])
    third = journal(tmp_path)
    assert third.get("Q7", "bob@a.example") is None
    assert third.get("Q1", "bob@a.example") is None
    assert third.get("Q3", "bob@a.example") == OK


def test_rotation_keeps_entries_between_keep_s_and_twice_that(tmp_path: Path) -> None:
    clock = Clock()
    hop = journal(tmp_path, clock, keep_s=100)
    hop.record("old", "bob@a.example", OK)
    clock.now += 99
    assert hop.get("old", "bob@a.example") == OK
    clock.now += 2          # 101 s: the first generation is now the previous one
    hop.record("new", "bob@a.example", OK)
    assert hop.get("old", "bob@a.example") == OK
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hop.1", "hop.2"]
    clock.now += 98         # 199 s after "old": still answered
    assert hop.get("old", "bob@a.example") == OK
    clock.now += 2          # past twice keep_s: gone, and so is its file
    assert hop.get("old", "bob@a.example") is None
    assert hop.get("new", "bob@a.example") == OK
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hop.2", "hop.3"]
    # A restart sees the same.
    again = journal(tmp_path, clock, keep_s=100)
    assert again.get("old", "bob@a.example") is None
    assert again.get("new", "bob@a.example") == OK


def test_the_cap_bounds_entries(tmp_path: Path) -> None:
    hop = journal(tmp_path, max_entries=1000)
    for n in range(5000):
        hop.record(f"Q{n}", "bob@a.example", OK)
        assert len(hop) <= 1000
    # The newest are answered, the oldest forgotten; at most two files remain.
    assert hop.get("Q4999", "bob@a.example") == OK
    assert hop.get("Q4000", "bob@a.example") == OK
    assert hop.get("Q0", "bob@a.example") is None
    assert len(list(tmp_path.iterdir())) == 2
    assert len(journal(tmp_path, max_entries=1000)) <= 1000


def test_processes_sharing_a_journal_see_each_other(tmp_path: Path) -> None:
    """An old process draining and its successor: records and rotations of either one
    are seen by the other."""
    clock = Clock()
    old = journal(tmp_path, clock)
    new = journal(tmp_path, clock)
    old.record("late", "bob@a.example", OK)
    assert new.get("late", "bob@a.example") == OK
    clock.now += 150
    new.record("rotated", "bob@a.example", OK)      # new rotates to hop.2
    assert old.get("rotated", "bob@a.example") == OK
    old.record("after", "bob@a.example", OK)
    assert old.current is not None and old.current.seq == 2
    assert new.get("after", "bob@a.example") == OK
    assert new.get("late", "bob@a.example") == OK


def test_an_unwritable_journal_never_fails_a_delivery(tmp_path: Path) -> None:
    hop = journal(tmp_path)
    assert hop.current is not None
    os.close(hop.current.fd)        # the descriptor gone: every write fails
    hop.record("Q1", "bob@a.example", OK)     # logs, does not raise
    assert hop.get("Q1", "bob@a.example") is None


async def test_an_attempt_is_not_a_delivery(tmp_path: Path) -> None:
    """An attempt record says a delivery began: claim() still hands the recipient out
    (to be looked for, then delivered), and a success replaces the attempt."""
    clock = Clock()
    first = journal(tmp_path, clock)
    first.attempt("Q1", "bob@a.example")
    first.close()
    second = journal(tmp_path, clock)
    assert second.attempted("Q1", "bob@a.example") == clock.now
    answered, claimed = await second.claim("Q1", ["bob@a.example"])
    assert answered == {} and claimed == ["bob@a.example"]
    second.record("Q1", "bob@a.example", Reply(250, "2.0.0 saved"))
    second.release("Q1", claimed)
    assert second.attempted("Q1", "bob@a.example") is None
    answered, claimed = await second.claim("Q1", ["bob@a.example"])
    assert answered == {"bob@a.example": Reply(250, "2.0.0 saved")} and claimed == []


def test_a_message_that_arrived_unheard_is_found_in_the_mailbox(tmp_path: Path) -> None:
    maildir = tmp_path / "a.example" / "bob" / "Maildir"
    for folder in ("new", "cur", "tmp"):
        (maildir / folder).mkdir(parents=True)
    (maildir / "cur" / "1700000000.M1P2.host,S=10:2,S").write_bytes(
        b"Received: from x by mx (mailfc SMTP-In) with ESMTP id OLD1; date\r\n\r\nold\r\n")
    assert not in_mailbox(tmp_path, "Bob@a.example", "NEW2", 1700000100.5)
    (maildir / "new" / "1700000100.M3P4.host,S=10").write_bytes(
        b"Return-Path: <s@x>\r\nReceived: from x by mx (mailfc SMTP-In)\r\n"
        b"\twith ESMTP id NEW2\r\n\tfor <bob@a.example>; date\r\n\r\nnew\r\n")
    assert in_mailbox(tmp_path, "Bob@a.example", "NEW2", 1700000100.5)
    # Only files from the attempt on count; another host's mailbox is not here.
    assert not in_mailbox(tmp_path, "bob@a.example", "OLD1", 1700000100.5)
    assert not in_mailbox(tmp_path, "bob@elsewhere.example", "NEW2", 0)
