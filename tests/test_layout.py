"""The layout's one rule: imports only run down (fedland <- stack <- server, client, launch, reports)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT = ("fedland", "stack", "server", "client", "launch", "reports")
ALLOWED = {
    "fedland": {"fedland"},
    "stack": {"stack", "fedland"},
    "server": {"server", "stack", "fedland"},
    "client": {"client", "stack", "fedland"},
    "launch": {"launch", "stack", "fedland"},
    "reports": {"reports", "stack", "fedland"},
}


def project_imports(path: Path) -> set[tuple[str, int]]:
    """(top-level project package, line) of every import in `path`, function-level ones included."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            names = [path.relative_to(ROOT).parts[0]]  # relative: inside its own package
        found |= {(name.split(".")[0], node.lineno) for name in names if name.split(".")[0] in PROJECT}
    return found


@pytest.mark.parametrize("package", PROJECT)
def test_imports_only_run_down(package: str) -> None:
    upward = [
        f"{path.relative_to(ROOT)}:{line} imports {imported}"
        for path in sorted((ROOT / package).rglob("*.py"))
        for imported, line in sorted(project_imports(path))
        if imported not in ALLOWED[package]
    ]
    assert upward == []


def test_the_rule_sees_function_level_imports(tmp_path: Path) -> None:
    # the check itself must catch what it is for
    probe = tmp_path / "probe.py"
    probe.write_text("import numpy\n\n\ndef f():\n    from server.store import Store\n    import client.work\n")
    assert project_imports(probe) == {("server", 5), ("client", 6)}
