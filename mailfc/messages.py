"""A message's bytes without holding them whole in memory.

Every hop that receives a message (SMTP-In, Filter-Out, SMTP-Out's intake, the LMTP
Router) gets it as a MessageData: the first MEMORY_LIMIT bytes stay in memory (most
mail is small, and a small message should cost no file), anything larger goes to an
unlinked temporary file in bounded chunks as it arrives.  Checks read it in chunks or
read a bounded prefix (`head`); hops send it on in chunks (`chunks`).  A 40 MB message
costs a hop at most MEMORY_LIMIT + CHUNK bytes of memory, whatever its size.

SOURCES
    Anything with `size` and `chunks()` can be sent on (Source): a MessageData, a
    message in a spool file (FileSlice: the bytes after its envelope line), or a new
    header block in front of either (Prefixed: a Received: line, a milter's changed
    headers).  `as_source(bytes)` wraps bytes a caller built itself (a DSN).

FILES
    The temporary file is created with O_TMPFILE where the file system has it (no name,
    gone with the last descriptor, even after kill -9), else created and unlinked at
    once.  Reads use pread at an offset, so a spool thread may copy a MessageData while
    nobody else reads it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

CHUNK = 64 * 1024
MEMORY_LIMIT = 64 * 1024


class Source(Protocol):
    """A message that can be read from the start, in chunks of at most `chunk` bytes."""

    @property
    def size(self) -> int: ...

    def chunks(self, chunk: int = CHUNK) -> Iterator[bytes]: ...


class MessageData:
    """A message as it arrives: in memory up to memory_limit bytes, then in a temp file.

    `close()` (or the context manager) lets go of the file at once; the garbage
    collector would, later.
    """

    def __init__(self, directory: str | Path | None = None,
                 memory_limit: int = MEMORY_LIMIT) -> None:
        self.directory = directory
        self.memory_limit = memory_limit
        self._memory = bytearray()
        self._fd: int | None = None
        self._size = 0

    @staticmethod
    def of(data: bytes, directory: str | Path | None = None) -> MessageData:
        message = MessageData(directory)
        message.write(data)
        return message

    @property
    def size(self) -> int:
        return self._size

    @property
    def in_memory(self) -> bool:
        return self._fd is None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        if self._fd is None and self._size + len(data) <= self.memory_limit:
            self._memory += data
        else:
            if self._fd is None:
                self._fd = _temporary_fd(self.directory)
                _pwrite_all(self._fd, self._memory, 0)
                self._memory = bytearray()
            _pwrite_all(self._fd, data, self._size)
        self._size += len(data)

    def chunks(self, chunk: int = CHUNK, start: int = 0) -> Iterator[bytes]:
        """The bytes from `start` to the end, chunk by chunk."""
        if self._fd is None:
            for offset in range(start, self._size, chunk):
                yield bytes(self._memory[offset:offset + chunk])
            return
        offset = start
        while offset < self._size:
            data = os.pread(self._fd, min(chunk, self._size - offset), offset)
            if not data:
                raise OSError(f"message file ended at {offset} of {self._size} bytes")
            offset += len(data)
            yield data

    def head(self, limit: int) -> bytes:
        """The first `limit` bytes (fewer when the message is shorter)."""
        if self._fd is None:
            return bytes(self._memory[:limit])
        return os.pread(self._fd, min(limit, self._size), 0)

    def read(self, start: int, length: int) -> bytes:
        if self._fd is None:
            return bytes(self._memory[start:start + length])
        return os.pread(self._fd, length, start)

    def getvalue(self) -> bytes:
        """The whole message in memory: only for what is known to be small (tests)."""
        return b"".join(self.chunks())

    def close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
        self._memory = bytearray()

    def __enter__(self) -> MessageData:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)


class FileSlice:
    """`size` bytes of a file from `offset`: a spooled message after its envelope line."""

    def __init__(self, path: str | Path, offset: int, size: int) -> None:
        self.path = path
        self.offset = offset
        self._size = size

    @property
    def size(self) -> int:
        return self._size

    def chunks(self, chunk: int = CHUNK) -> Iterator[bytes]:
        fd = os.open(self.path, os.O_RDONLY)
        try:
            position, end = self.offset, self.offset + self._size
            while position < end:
                data = os.pread(fd, min(chunk, end - position), position)
                if not data:
                    raise OSError(f"{self.path} ended before its {self._size} bytes")
                position += len(data)
                yield data
        finally:
            os.close(fd)

    def head(self, limit: int) -> bytes:
        fd = os.open(self.path, os.O_RDONLY)
        try:
            return os.pread(fd, min(limit, self._size), self.offset)
        finally:
            os.close(fd)


class Prefixed:
    """New bytes (a header line, a rebuilt header block) in front of a message, or of
    the part of it from `start` on."""

    def __init__(self, prefix: bytes, rest: Source, start: int = 0) -> None:
        self.prefix = prefix
        self.rest = rest
        self.start = start

    @property
    def size(self) -> int:
        return len(self.prefix) + self.rest.size - self.start

    def chunks(self, chunk: int = CHUNK) -> Iterator[bytes]:
        if self.prefix:
            yield self.prefix
        skip = self.start
        for data in self.rest.chunks(chunk):
            if skip >= len(data):
                skip -= len(data)
                continue
            yield data[skip:] if skip else data
            skip = 0


class BytesSource:
    """Bytes a caller built itself (a DSN, a test message) as a Source."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    @property
    def size(self) -> int:
        return len(self.data)

    def chunks(self, chunk: int = CHUNK) -> Iterator[bytes]:
        for offset in range(0, len(self.data), chunk):
            yield self.data[offset:offset + chunk]

    def head(self, limit: int) -> bytes:
        return self.data[:limit]


def as_source(message: bytes | Source) -> Source:
    if isinstance(message, bytes | bytearray):
        return BytesSource(bytes(message))
    return message


def head_of(message: Source, limit: int) -> bytes:
    """The first `limit` bytes of any Source."""
    head = getattr(message, "head", None)
    if head is not None:
        return bytes(head(limit))
    out = bytearray()
    for data in message.chunks():
        out += data
        if len(out) >= limit:
            break
    return bytes(out[:limit])


def read_all(message: Source) -> bytes:
    """A whole Source in memory: only for what is known to be small (tests, DSNs)."""
    return b"".join(message.chunks())


def _temporary_fd(directory: str | Path | None) -> int:
    where = str(directory) if directory is not None else tempfile.gettempdir()
    os.makedirs(where, mode=0o700, exist_ok=True)
    try:
        return os.open(where, os.O_TMPFILE | os.O_RDWR, 0o600)
    except (OSError, AttributeError):
        fd, name = tempfile.mkstemp(dir=where, prefix="mailfc-message-")
        os.unlink(name)
        return fd


def _pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written
