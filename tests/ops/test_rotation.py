"""Container log rotation (mailfc.runtime.storage.rotate_log): however often a
container starts with a grown log, its logs stay within (keep + 1) x the bound."""

from __future__ import annotations

from pathlib import Path

from mailfc.config import parse_config
from mailfc.runtime.settings import from_config
from mailfc.runtime.storage import rotate_log


def test_rotation_keeps_the_bound(tmp_path: Path) -> None:
    log = tmp_path / "postfix-0.log"
    max_bytes, keep = 4096, 2
    for start in range(6):
        assert rotate_log(log, max_bytes, keep) == (start > 0)
        with log.open("ab") as handle:            # what a container writes while it runs
            handle.write(f"start {start}\n".encode() + b"x" * (max_bytes + 100))
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["postfix-0.log", "postfix-0.log.1", "postfix-0.log.2"]
    assert (tmp_path / "postfix-0.log.1").read_bytes().startswith(b"start 4")
    assert (tmp_path / "postfix-0.log.2").read_bytes().startswith(b"start 3")
    # A small log is left alone; keep 0 truncates instead of keeping old files.
    small = tmp_path / "small.log"
    small.write_bytes(b"x" * 100)
    assert not rotate_log(small, max_bytes, keep)
    big = tmp_path / "big.log"
    big.write_bytes(b"x" * (max_bytes + 1))
    assert rotate_log(big, max_bytes, 0) and big.stat().st_size == 0
    assert not list(tmp_path.glob("big.log.*"))


def test_rotation_settings_from_config() -> None:
    config = parse_config({"log": {"container_log_max_bytes": 65536,
                                   "container_log_keep": 5}})
    settings = from_config(config)
    assert (settings.log_max_bytes, settings.log_keep) == (65536, 5)
