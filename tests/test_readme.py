"""The README's library example runs as written and prints what it promises."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]


def ten_line_example() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("### In ten lines") :]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match is not None, "README has no python block under 'In ten lines'"
    return match.group(1)


def test_readme_example_runs_as_written(tmp_path: Path) -> None:
    if not os.environ.get("FEDLAND_DATA_DIR"):
        pytest.skip("FEDLAND_DATA_DIR is not set: the example needs MNIST")
    script = tmp_path / "example.py"
    script.write_text(ten_line_example(), encoding="utf-8")
    result = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr
    # "[l1 l2 l3] True trace +- stderr centre_loss"
    numbers = [float(x) for x in re.findall(r"-?\d+\.\d+(?:e-?\d+)?", result.stdout)]
    assert "True" in result.stdout, result.stdout
    top, second, third = numbers[:3]
    assert top >= second >= third > 0
    trace, std_error, centre = numbers[3:6]
    assert trace > top and std_error > 0 and centre > 0


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("Install and run the tests:") :]
    match = re.search(r"```bash\n(.*?)```", section, re.S)
    assert match is not None
    readme_lines = [line for line in match.group(1).splitlines() if line.strip()]
    ci_lines = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    start = ci_lines.index(readme_lines[0])
    assert ci_lines[start : start + len(readme_lines)] == readme_lines


def results_snippet() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Results") :]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match is not None, "README has no python block under 'Results'"
    return match.group(1)


def test_results_snippet_runs_as_written(store: Any, mongo_uri: str, mongo_db_name: str, tmp_path: Path) -> None:
    """Against stored experiments (FEDLAND_MONGO_URI as after a run on a MongoDB), it prints labelled numbers."""
    from tests.reports.test_report import two_experiments

    two_experiments(store)
    script = tmp_path / "results.py"
    script.write_text(results_snippet(), encoding="utf-8")
    env = {**os.environ, "FEDLAND_MONGO_URI": mongo_uri, "FEDLAND_DB": mongo_db_name, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False, env=env
    )
    assert result.returncode == 0, result.stderr
    for label in ("test_accuracy", "top_eigenvalue_1", "barrier", "non-IID unbalanced, 2 clients"):
        assert label in result.stdout, result.stdout
    final = store.get_round("exp-landscape", 3)
    assert final is not None
    assert f"{final.test_accuracy:.6f}"[:6] in result.stdout
