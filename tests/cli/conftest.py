"""Running `mailfc` as a user would: a real process, its exit status and output."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass
class Result:
    code: int
    out: str
    err: str


def run_mailfc(config_file: Path, *args: str, stdin: str | None = None) -> Result:
    env = {**os.environ, "MAILFC_CONFIG": str(config_file), "COLUMNS": "200"}
    env.pop("MAILFC_DEBUG", None)
    process = subprocess.run(
        [sys.executable, "-m", "mailfc", *args], input=stdin, capture_output=True,
        text=True, env=env, timeout=120,
    )
    # A user never sees a Python traceback, whatever they typed.
    assert "Traceback" not in process.stderr, process.stderr
    return Result(process.returncode, process.stdout, process.stderr)


class Mailfc:
    def __init__(self, config_file: Path) -> None:
        self.config_file = config_file

    def __call__(self, *args: str, stdin: str | None = None) -> Result:
        return run_mailfc(self.config_file, *args, stdin=stdin)

    def ok(self, *args: str, stdin: str | None = None) -> Result:
        result = self(*args, stdin=stdin)
        assert result.code == 0, f"mailfc {' '.join(args)} failed: {result.err}"
        return result

    def fails(self, *args: str, stdin: str | None = None, says: str = "") -> Result:
        result = self(*args, stdin=stdin)
        assert result.code != 0, f"mailfc {' '.join(args)} should fail: {result.out}"
        assert says.lower() in result.err.lower(), result.err
        return result


@pytest.fixture
def mailfc(config_file: Path, clean_cmdb: object) -> Mailfc:
    return Mailfc(config_file)
