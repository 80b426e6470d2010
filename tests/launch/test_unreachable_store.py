"""A store URI nothing answers on is one line on stderr naming it (no password), exit 2, within seconds.

`python main.py` (run, report, export, upgrade-store) as a real process (`python -m server`: tests/server/test_main.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stack.embedded import free_port, redacted

ROOT = Path(__file__).resolve().parents[2]
LIMIT_S = 5.0


def closed_uri() -> str:
    return f"mongodb://alice:s3cret-pw@127.0.0.1:{free_port()}/"  # free a moment ago: nothing listens


def run(command: list[str], **variables: str) -> tuple[subprocess.CompletedProcess[str], float]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("FEDLAND_")}
    started = time.monotonic()
    result = subprocess.run(command, cwd=ROOT, env=env | variables, capture_output=True, text=True, timeout=120)
    return result, time.monotonic() - started


def startup_s() -> float:
    """How long `main.py` takes to start here and now (its imports: torch), with nothing else to do."""
    _, duration_s = run([sys.executable, "-c", "import main, cli"])
    return duration_s


def assert_one_line_naming(result: subprocess.CompletedProcess[str], uri: str, duration_s: float) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert redacted(uri) in lines[0] and "Connection refused" in lines[0], lines[0]
    assert "s3cret-pw" not in result.stderr + result.stdout
    # 5 s on a quiet machine (about 2 s here); on a busy one the imports alone may take longer, so the
    # limit is what starting takes at this moment plus the 3 s the check itself may use
    limit_s = max(LIMIT_S, startup_s() + LIMIT_S - 2.0)
    assert duration_s < limit_s, f"took {duration_s:.1f} s (limit {limit_s:.1f} s)"


@pytest.mark.parametrize("command", [[], ["report"], ["export"], ["upgrade-store"]])
def test_main_with_an_unreachable_store_uri_says_so_in_one_line(command: list[str]) -> None:
    uri = closed_uri()
    result, duration_s = run([sys.executable, "main.py", *command, "--store-uri", uri])
    assert_one_line_naming(result, uri, duration_s)


def test_main_with_an_unreachable_fedland_mongo_uri_says_so_in_one_line() -> None:
    uri = closed_uri()
    result, duration_s = run([sys.executable, "main.py", "--rounds", "1"], FEDLAND_MONGO_URI=uri)
    assert_one_line_naming(result, uri, duration_s)


def test_redacted_hides_passwords_only() -> None:
    assert redacted("mongodb://u:p%40ss@h:1,h:2/db?authSource=admin") == "mongodb://u:***@h:1,h:2/db?authSource=admin"
    assert redacted("mongodb+srv://u:p@cluster.example/") == "mongodb+srv://u:***@cluster.example/"
    assert redacted("mongodb://u@h/?tlsCertificateKeyFilePassword=x&w=1") == (
        "mongodb://u@h/?tlsCertificateKeyFilePassword=***&w=1"
    )
    assert redacted("mongodb://127.0.0.1:27017/") == "mongodb://127.0.0.1:27017/"
