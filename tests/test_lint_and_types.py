"""Lint and types are part of the build: `ruff check .` and `mypy` (the files of `[tool.mypy]`) find nothing.

Both run as subprocesses of this interpreter, so the dev extra's pinned versions are the ones that judge.
Run them alone with `ruff check .` and `mypy` from the repository root.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def run_tool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=600, check=False
    )


@pytest.mark.parametrize("tool", ["ruff", "mypy"])
def test_the_pinned_version_is_installed(tool: str) -> None:
    pinned = [pin for pin in PYPROJECT["project"]["optional-dependencies"]["dev"] if pin.startswith(f"{tool}==")]
    assert pinned == [f"{tool}=={version(tool)}"], f"{tool} {version(tool)} is installed; the dev extra pins {pinned}"


def test_mypy_checks_every_package_and_script() -> None:
    """Every top-level folder or file of Python in the repository is in `[tool.mypy] files`."""
    tracked = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True, check=True)
    top_level = {path.split("/")[0] for path in tracked.stdout.split()}
    assert top_level <= set(PYPROJECT["tool"]["mypy"]["files"])


def test_ruff_finds_nothing() -> None:
    result = run_tool("ruff", "check", "--output-format", "concise", "--no-fix", ".")
    if result.returncode != 0:
        pytest.fail(f"ruff check . found:\n{result.stdout}{result.stderr}", pytrace=False)


def test_mypy_finds_nothing() -> None:
    result = run_tool("mypy")
    if result.returncode != 0:
        pytest.fail(f"mypy found:\n{result.stdout}{result.stderr}", pytrace=False)
