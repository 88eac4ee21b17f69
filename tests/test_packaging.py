"""mailfc runs without its extras: aiosmtpd and python-libmilter (tests, benchmarks)
and matplotlib (`--plot`) are never imported when a module of mailfc is loaded."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXTRAS_ONLY = {"aiosmtpd": "test", "libmilter": "bench", "matplotlib": "plot"}


def module_level_imports(tree: ast.Module) -> set[str]:
    """Top-level names imported outside any function (a function may import lazily)."""
    found: set[str] = set()
    pending: list[ast.AST] = list(tree.body)
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module.split(".")[0])
        pending.extend(ast.iter_child_nodes(node))
    return found


def test_no_extra_is_imported_at_module_level() -> None:
    offenders = []
    for path in sorted((ROOT / "mailfc").rglob("*.py")):
        imported = module_level_imports(ast.parse(path.read_text(), str(path)))
        offenders += [f"{path.relative_to(ROOT)}: {name} (extra {EXTRAS_ONLY[name]!r})"
                      for name in sorted(imported & set(EXTRAS_ONLY))]
    assert not offenders, offenders


def test_extras_are_not_hard_dependencies() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    hard = " ".join(project["dependencies"])
    for name in ("aiosmtpd", "python-libmilter", "matplotlib"):
        assert name not in hard, name
    extras = project["optional-dependencies"]
    assert any("aiosmtpd" in d for d in extras["test"])
    assert any("python-libmilter" in d for d in extras["bench"])
    assert any("matplotlib" in d for d in extras["plot"])
    assert "idna" in hard and "dnspython" in hard
