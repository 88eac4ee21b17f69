"""--plot without matplotlib (the `plot` extra) names the extra to install, before
any query, and the command exits non-zero."""

from __future__ import annotations

import datetime
import importlib.util
from pathlib import Path

import pytest

from mailfc.analysis import plot
from mailfc.errors import InvalidInput


@pytest.fixture
def without_matplotlib(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec

    def find_spec(name: str, package: str | None = None) -> object:
        return None if name.split(".")[0] == "matplotlib" else real(name, package)

    monkeypatch.setattr(plot.importlib.util, "find_spec", find_spec)
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)


@pytest.mark.usefixtures("without_matplotlib")
def test_missing_matplotlib_names_the_extra(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match=r"pip install 'mailfc\[plot\]'"):
        plot.check_path(str(tmp_path / "top.png"))
    now = datetime.datetime.now(datetime.UTC)
    with pytest.raises(InvalidInput, match=r"mailfc\[plot\]"):
        plot.draw(tmp_path / "top.png", {}, title="t", ylabel="y", bucket_s=60,
                  start=now, end=now)
