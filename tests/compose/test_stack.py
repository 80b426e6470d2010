"""The stack on a real Docker engine: scripts/compose-test.py, once with Compose, once on Swarm.

Marker `compose` (select with `-m compose`, leave out with `-m "not compose"`).
Skipped, saying why, when no engine answers. Knobs (environment), set by
.ci/run on a machine with the container kit:
  FEDLAND_COMPOSE_WHEELHOUSE=1      build offline: fill wheelhouse/, docker build --network none
  FEDLAND_COMPOSE_OVERRIDE=FILE     a second compose file, e.g. the kit's credential-free
                                    URIs for its MongoDB stand-in (no authentication)
  FEDLAND_DATA_DIR                  when it holds mnist/, the data volumes are pre-filled
                                    from it (README's offline step); otherwise data-init downloads
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.compose, pytest.mark.slow]


def engine_missing() -> str | None:
    """Why no Docker engine can be used here, or None."""
    if shutil.which("docker") is None:
        return "no docker CLI on PATH"
    result = subprocess.run(
        ["docker", "version", "--format", "{{.Server.Version}}"], capture_output=True, text=True, timeout=60
    )
    if result.returncode != 0:
        where = os.environ.get("DOCKER_HOST", "the default socket")
        last = (result.stderr.strip().splitlines() or ["no answer"])[-1]
        return f"no Docker engine answers at {where} ({last})"
    return None


def script_args() -> list[str]:
    args = []
    if os.environ.get("FEDLAND_COMPOSE_WHEELHOUSE") == "1":
        args.append("--wheelhouse")
    if os.environ.get("FEDLAND_COMPOSE_OVERRIDE"):
        args += ["--override", os.environ["FEDLAND_COMPOSE_OVERRIDE"]]
    data = os.environ.get("FEDLAND_DATA_DIR", "").strip()
    if data and (Path(data) / "mnist").is_dir():
        args += ["--mnist", str(Path(data).resolve())]
    return args


@pytest.mark.parametrize("mode", ["compose", "swarm"])
def test_the_stack_runs_scales_survives_a_kill_and_a_restart_and_leaves_nothing(
    mode: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reason = engine_missing()
    if reason is not None:
        pytest.skip(f"compose test skipped: {reason}; .ci/run starts one with ../shared/containers where present")
    command = [sys.executable, str(REPO / "scripts" / "compose-test.py"), *script_args()]
    if mode == "swarm":
        command.append("--swarm")
    log = tmp_path / "compose-test.log"
    with log.open("w") as out:
        result = subprocess.run(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, timeout=1800)
    text = log.read_text()
    with capsys.disabled():  # the script's own lines (build, image size, durations) go to the CI log
        sys.stderr.write("\n" + "".join(line + "\n" for line in text.splitlines() if line.startswith("compose-test:")))
    assert result.returncode == 0, text[-6000:]
    assert "compose-test: OK in" in text
