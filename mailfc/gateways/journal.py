"""The delivered journal: what a hop has already delivered, so that a retry of the same
message after a lost reply is answered instead of delivered a second time.

WHY
    A hop answers its sender (a spool, a domain's Postfix) only once the next hop has
    taken the message.  When that answer is lost (the hop killed after Dovecot's 250, a
    connection broken, a drain cut short), the sender retries the same message, and
    without a memory of what went through, the recipient gets it twice.  The LMTP Router
    (before each domain's Dovecot) and SMTP-Out's intake (before its spool) record every
    success under the sender's queue id (XFORWARD IDENT) and the recipient, and answer a
    retry with the recorded reply.

USE
    journal = DeliveredJournal.of(config, "lmtp-router")
    await asyncio.to_thread(journal.open)      # what earlier processes recorded
    answered, todo = await journal.claim(ident, recipients)
    ...                                        # deliver to todo only
    journal.record(ident, recipient, reply)    # after the next hop's 2xx, each
    journal.release(ident, todo)               # in a finally
    journal.close()
    get(ident, recipient) is claim()'s lookup alone (the recorded Reply or None).
    Callers record successes only: a refusal or a deferral is safe to repeat.  A journal
    that cannot be read or written logs why and answers "not delivered": mail is then
    delivered as without a journal, never refused because of it.

FILES
    <state_dir>/journal/<service>.<generation>, text, one line per record, each written
    by a single write() on an O_APPEND descriptor:

        # mailfc delivered journal <service> generation <n> started <unix time>
        <crc32, 8 hex> <unix time> <ident> <recipient> <reply code> <reply text>

    ident and recipient xtext-encoded (no spaces), the crc over everything after it.
    A line is in the page cache once write() returns, so it survives kill -9 of the
    process.  There is no fsync per record: a power loss may lose the last records
    (their retries are then delivered again, as without a journal); that is out of
    scope.  A torn or damaged line (a machine crash mid-write, a full disk) fails its
    crc and is ignored; a file found ending without a newline gets one at open, so
    the next record starts a line of its own.

GENERATIONS
    Records go to the newest file.  It is replaced by the next generation once it is
    older than keep_s, or holds max_entries / 2 records; the generation before it is
    then deleted.  An entry is thus answered for at least keep_s (unless the cap
    forces an earlier rotation, which is logged) and at most about twice keep_s, and
    memory holds at most about max_entries entries.  Two days by default: a retry
    after a lost reply comes one backoff later (spool.retry_base_s .. retry_max_s, an
    hour at most; Postfix's maximal_backoff_time likewise) once the hop is back, so
    the journal covers a hop that stays down for up to two days.

PROCESSES
    Processes of one service share its journal (a listener handed over to a new process
    while the old one drains its sessions): each appends to the same files, and before
    every lookup reads what the others appended since (an fstat per file) and follows a
    rotation another one made (a stat of the next generation's name).  claim() waits
    for a delivery in flight in its own process only: the same message reaching two
    processes at the same moment is not expected (a sender retries a backoff after its
    attempt ended).

MEMORY
    Per entry a hash of (ident, recipient) and the record's offset in its file, about
    120 bytes; a hit reads its line back and checks crc, ident and recipient, so a hash
    collision can at worst cost a duplicate, never a lost message.

ATTEMPTS
    A hop killed after the next hop took the whole message but before its reply came
    back leaves a delivery nobody heard the outcome of: the next hop (Dovecot) saves
    the message anyway.  So the LMTP Router records an attempt (reply code 0, the
    time) before each delivery; a success replaces it.  A retry that finds an attempt
    without a success looks into the recipient's mailbox for the message (see
    routers/lmtp.py) before delivering it again.

CONFIGURATION ([journal])
    keep_s (172800: 2 days), max_entries (500000)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
import zlib
from collections.abc import Callable
from pathlib import Path

from mailfc.config import Config
from mailfc.protocols.lmtp import Reply, xtext, xtext_decode

log = logging.getLogger("mailfc.gateways.journal")

HEADER = "# mailfc delivered journal {service} generation {seq} started {started:.0f}\n"
READ_CHUNK = 1 << 20
# A record longer than this is not one of ours: reply texts are cut to fit, and an
# IDENT or a recipient arrives on a command line (at most 4096 octets in LMTP).
MAX_LINE = 16384
MAX_REPLY_TEXT = 512
LINE_END = re.compile(r"[\r\n]+")
WARN_INTERVAL_S = 600.0
SPECIAL = re.compile(r"[ +=]")
# The reply code of an attempt record: a delivery began, its outcome is not known.
ATTEMPTED = 0


def _encode(value: str) -> str:
    """xtext, without its per-character loop for the usual printable ASCII value."""
    if value.isascii() and value.isprintable() and not SPECIAL.search(value):
        return value
    return xtext(value)


class _Generation:
    """One journal file: its descriptor, how far it has been read, its index."""

    def __init__(self, seq: int, path: Path, fd: int) -> None:
        self.seq = seq
        self.path = path
        self.fd = fd
        self.started: float | None = None
        self.read_to = 0
        # hash((ident, recipient)) -> offset of the record's line.
        self.index: dict[int, int] = {}

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


class DeliveredJournal:
    @staticmethod
    def of(config: Config, service: str) -> DeliveredJournal:
        """`service`'s journal as [journal] configures it, under Config.journal_dir."""
        return DeliveredJournal(config.journal_dir, service, keep_s=config.journal.keep_s,
                                max_entries=config.journal.max_entries)

    def __init__(self, directory: Path, service: str, *, keep_s: float, max_entries: int,
                 clock: Callable[[], float] = time.time) -> None:
        self.directory = Path(directory)
        self.service = service
        self.keep_s = keep_s
        self.max_entries = max_entries
        self.clock = clock
        self.current: _Generation | None = None
        self.previous: _Generation | None = None
        self.hits = 0
        # (ident, recipient) being delivered now (claim, release), in the event loop.
        self._inflight: dict[tuple[str, str], asyncio.Future[None]] = {}
        self._warned_at = -WARN_INTERVAL_S

    # -- lifecycle ---------------------------------------------------------------------

    def open(self) -> None:
        """Load the journal (blocking: call it in a thread at start)."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._load()

    def close(self) -> None:
        for generation in (self.previous, self.current):
            if generation is not None:
                generation.close()
        self.current = self.previous = None

    def __len__(self) -> int:
        return sum(len(g.index) for g in (self.previous, self.current) if g is not None)

    # -- the two operations -------------------------------------------------------------

    def get(self, ident: str, recipient: str) -> Reply | None:
        """The reply recorded for this (ident, recipient), or None."""
        try:
            self._refresh()
            key = hash((ident, recipient))
            for generation in (self.current, self.previous):
                if generation is None:
                    continue
                offset = generation.index.get(key)
                if offset is not None:
                    reply = self._read(generation, offset, ident, recipient)
                    if reply is not None:
                        self.hits += 1
                        return reply
        except OSError as error:
            log.warning("journal %s unreadable (%s): delivering without it", self.service,
                        error)
        return None

    def record(self, ident: str, recipient: str, reply: Reply) -> None:
        """Remember a success; never raises (the delivery has happened either way)."""
        text = LINE_END.sub(" ", reply.text)[:MAX_REPLY_TEXT]
        payload = (f"{self.clock():.0f} {_encode(ident)} {_encode(recipient)} {reply.code}"
                   f" {text}".encode("utf-8", "replace"))
        line = f"{zlib.crc32(payload):08x} ".encode() + payload + b"\n"
        try:
            generation = self._writable()
            written = os.write(generation.fd, line)
            end = os.lseek(generation.fd, 0, os.SEEK_CUR)
            if written != len(line):
                # A full disk: end the piece so the next record starts a line.
                os.write(generation.fd, b"\n")
                raise OSError(f"short write ({written} of {len(line)} bytes)")
            generation.index[hash((ident, recipient))] = end - len(line)
        except OSError as error:
            log.warning("journal %s: could not record %s for %s (%s): a retry of it would be"
                        " delivered again", self.service, ident, recipient, error)

    def attempt(self, ident: str, recipient: str) -> None:
        """Note that a delivery under (ident, recipient) is about to start: if the
        process dies before it knows the outcome, the next try can ask `attempted()`
        and look whether the first one arrived (see ATTEMPTS)."""
        self.record(ident, recipient, Reply(ATTEMPTED, f"{self.clock():.3f}"))

    def attempted(self, ident: str, recipient: str) -> float | None:
        """When a delivery whose outcome nobody heard began; None: no such attempt."""
        recorded = self.get(ident, recipient)
        if recorded is None or recorded.code != ATTEMPTED:
            return None
        try:
            return float(recorded.text)
        except ValueError:
            return None

    async def claim(self, ident: str, recipients: list[str]
                    ) -> tuple[dict[str, Reply], list[str]]:
        """Before delivering: (the replies recorded for recipients already delivered
        under ident, the recipients to deliver now).  The same (ident, recipient)
        claimed by another delivery still in flight (a sender that sent the message
        twice at once) is waited for and then looked up again.  Every claimed
        recipient must be given back with release(), delivered or not."""
        answered: dict[str, Reply] = {}
        while True:
            waiting: list[asyncio.Future[None]] = []
            for recipient in recipients:
                if recipient in answered:
                    continue
                recorded = self.get(ident, recipient)
                if recorded is not None and recorded.code != ATTEMPTED:
                    log.info("%s for %s: delivered before, answered from the journal",
                             ident, recipient)
                    answered[recipient] = recorded
                elif (ident, recipient) in self._inflight:
                    waiting.append(self._inflight[(ident, recipient)])
            if not waiting:
                break
            await asyncio.wait(waiting)
        claimed = list(dict.fromkeys(r for r in recipients if r not in answered))
        loop = asyncio.get_running_loop()
        for recipient in claimed:
            self._inflight[(ident, recipient)] = loop.create_future()
        return answered, claimed

    def release(self, ident: str, claimed: list[str]) -> None:
        for recipient in claimed:
            done = self._inflight.pop((ident, recipient), None)
            if done is not None and not done.done():
                done.set_result(None)

    # -- files ------------------------------------------------------------------------

    def _path(self, seq: int) -> Path:
        return self.directory / f"{self.service}.{seq}"

    def _existing(self) -> list[int]:
        prefix = self.service + "."
        found = []
        for entry in os.scandir(self.directory):
            suffix = entry.name[len(prefix):]
            if entry.name.startswith(prefix) and suffix.isdigit():
                found.append(int(suffix))
        return sorted(found)

    def _load(self) -> None:
        self.close()
        seqs = self._existing()
        for seq in seqs[:-2]:
            with contextlib.suppress(FileNotFoundError):
                self._path(seq).unlink()
        if not seqs:
            self.current = self._create(1)
            return
        newest = seqs[-1]
        if len(seqs) > 1 and seqs[-2] == newest - 1:
            self.previous = self._attach(newest - 1)
        self.current = self._attach(newest)
        self._end_torn_line(self.current)
        self._refresh()

    def _attach(self, seq: int) -> _Generation:
        path = self._path(seq)
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)
        generation = _Generation(seq, path, fd)
        self._catch_up(generation)
        if generation.started is None:
            # Created by another process that has not written its header yet.
            generation.started = os.fstat(fd).st_mtime
        return generation

    def _create(self, seq: int) -> _Generation:
        path = self._path(seq)
        try:
            fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                         0o600)
        except FileExistsError:
            # Another process of this service rotated at the same moment.
            return self._attach(seq)
        started = self.clock()
        header = HEADER.format(service=self.service, seq=seq, started=started).encode()
        os.write(fd, header)
        generation = _Generation(seq, path, fd)
        generation.started = started
        generation.read_to = len(header)
        return generation

    @staticmethod
    def _end_torn_line(generation: _Generation) -> None:
        size = os.fstat(generation.fd).st_size
        if size and os.pread(generation.fd, 1, size - 1) != b"\n":
            os.write(generation.fd, b"\n")

    def _catch_up(self, generation: _Generation) -> None:
        """Index what was appended since the last look (by this process or another)."""
        size = os.fstat(generation.fd).st_size
        while generation.read_to < size:
            data = os.pread(generation.fd, min(READ_CHUNK, size - generation.read_to),
                            generation.read_to)
            if not data:
                return
            end = data.rfind(b"\n")
            if end < 0:
                if len(data) < READ_CHUNK:
                    return      # a line still being written, or torn: next time
                end = len(data) - 1     # no line is this long: skip the garbage
            self._index(generation, data[:end + 1], generation.read_to)
            generation.read_to += end + 1

    def _index(self, generation: _Generation, data: bytes, base: int) -> None:
        offset = base
        index = generation.index
        for line in data.split(b"\n")[:-1]:
            if line.startswith(b"#"):
                if generation.started is None:
                    with contextlib.suppress(ValueError):
                        generation.started = float(line.rsplit(b" ", 1)[-1])
            else:
                # The crc is checked on a hit, not here: a damaged line indexes a key
                # nobody asks for, or one whose check then fails.
                fields = line.split(b" ", 4)
                if len(fields) == 5:
                    ident = xtext_decode(fields[2].decode("utf-8", "replace"))
                    recipient = xtext_decode(fields[3].decode("utf-8", "replace"))
                    index[hash((ident, recipient))] = offset
            offset += len(line) + 1

    def _read(self, generation: _Generation, offset: int, ident: str,
              recipient: str) -> Reply | None:
        data = os.pread(generation.fd, MAX_LINE, offset)
        end = data.find(b"\n")
        if end < 9:
            return None
        line = data[:end]
        payload = line[9:]
        try:
            if int(line[:8], 16) != zlib.crc32(payload):
                return None
            _, raw_ident, raw_recipient, code, text = payload.decode("utf-8").split(" ", 4)
            if xtext_decode(raw_ident) != ident or xtext_decode(raw_recipient) != recipient:
                return None
            return Reply(int(code), text)
        except ValueError:
            return None

    # -- generations --------------------------------------------------------------------

    def _refresh(self) -> None:
        if self.current is None:
            raise OSError("journal not open")
        # A rotation by another process of this service.
        while self._path(self.current.seq + 1).exists():
            try:
                self._advance(self._attach(self.current.seq + 1))
            except FileNotFoundError:
                self._load()        # rotated twice meanwhile: start over
                return
        for generation in (self.previous, self.current):
            if generation is not None:
                self._catch_up(generation)
        if self.clock() - (self.current.started or 0.0) >= self.keep_s:
            self._advance(self._create(self.current.seq + 1))

    def _writable(self) -> _Generation:
        """The generation a record goes to, rotated first when it is full."""
        self._refresh()
        assert self.current is not None
        if len(self.current.index) >= self.max_entries // 2:
            self._rotate_early(self.current)
        assert self.current is not None
        return self.current

    def _rotate_early(self, full: _Generation) -> None:
        """The cap reached before keep_s: rotate anyway, and say so now and then."""
        now = self.clock()
        if now - self._warned_at >= WARN_INTERVAL_S:
            self._warned_at = now
            oldest = self.previous if self.previous is not None else full
            kept = now - (oldest.started or now)
            log.warning("journal %s: %d entries within %.0f s: entries are kept only about"
                        " %.0f s instead of journal.keep_s (%.0f s); raise"
                        " journal.max_entries", self.service, len(full.index),
                        now - (full.started or now), kept, self.keep_s)
        self._advance(self._create(full.seq + 1))

    def _advance(self, newest: _Generation) -> None:
        """newest becomes current; the current one previous; the previous one goes."""
        gone, self.previous, self.current = self.previous, self.current, newest
        if gone is not None:
            gone.close()
            with contextlib.suppress(FileNotFoundError):
                gone.path.unlink()
