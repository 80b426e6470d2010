"""The published wheel holds only the `fedland` library and needs only torch and numpy."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_holds_only_fedland_and_requires_only_torch_and_numpy(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(tmp_path), str(ROOT)],
        check=True, timeout=300,
    )
    [wheel] = tmp_path.glob("fedland-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        [metadata_name] = [n for n in names if n.endswith(".dist-info/METADATA")]
        metadata = Parser().parsestr(archive.read(metadata_name).decode())
    top_level = {name.split("/")[0] for name in names}
    assert top_level == {"fedland", metadata_name.split("/")[0]}, top_level
    assert "fedland/py.typed" in names
    assert "fedland/hessian.py" in names and "fedland/spec.py" in names
    runtime = sorted(
        re.match(r"[A-Za-z0-9_.-]+", requirement).group(0)  # type: ignore[union-attr]
        for requirement in metadata.get_all("Requires-Dist") or []
        if "extra ==" not in requirement
    )
    assert runtime == ["numpy", "torch"], metadata.get_all("Requires-Dist")
