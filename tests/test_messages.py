"""MessageData and the other Sources: bounded memory, exact bytes back."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from mailfc.messages import (
    MEMORY_LIMIT,
    BytesSource,
    FileSlice,
    MessageData,
    Prefixed,
    head_of,
    read_all,
)


def test_small_message_stays_in_memory(tmp_path: Path) -> None:
    with MessageData(tmp_path) as data:
        data.write(b"Subject: x\r\n\r\nbody\r\n")
        assert data.in_memory and data.size == len(b"Subject: x\r\n\r\nbody\r\n")
        assert data.head(9) == b"Subject: " and read_all(data) == data.getvalue()
    assert list(tmp_path.iterdir()) == []


def test_big_message_goes_to_an_unlinked_file(tmp_path: Path) -> None:
    pieces = [os.urandom(n) for n in (1000, MEMORY_LIMIT, 3 * MEMORY_LIMIT + 17, 5)]
    with MessageData(tmp_path) as data:
        for piece in pieces:
            data.write(piece)
        assert not data.in_memory
        # No name in the directory: nothing to clean after a crash.
        assert list(tmp_path.iterdir()) == []
        whole = b"".join(pieces)
        assert data.size == len(whole)
        assert hashlib.sha256(b"".join(data.chunks(4096))).digest() \
            == hashlib.sha256(whole).digest()
        assert b"".join(data.chunks(start=2000)) == whole[2000:]
        assert data.read(MEMORY_LIMIT - 3, 10) == whole[MEMORY_LIMIT - 3:MEMORY_LIMIT + 7]
        assert all(len(chunk) <= 4096 for chunk in data.chunks(4096))


def test_prefixed_and_file_slices(tmp_path: Path) -> None:
    path = tmp_path / "spooled"
    path.write_bytes(b'{"envelope": 1}\n' + b"Subject: s\r\n\r\nhello\r\n")
    spooled = FileSlice(path, 16, path.stat().st_size - 16)
    assert read_all(spooled) == b"Subject: s\r\n\r\nhello\r\n"
    received = Prefixed(b"Received: x\r\n", spooled)
    assert received.size == len(read_all(received))
    assert read_all(received).startswith(b"Received: x\r\nSubject: s")
    new_headers = Prefixed(b"X-New: 1\r\n\r\n", BytesSource(b"Old: 2\r\n\r\nbody"), start=10)
    assert read_all(new_headers) == b"X-New: 1\r\n\r\nbody"
    assert [len(c) for c in Prefixed(b"", BytesSource(b"abcdef"), 1).chunks(2)] == [1, 2, 2]
    assert head_of(received, 9) == b"Received:"
