"""`python -m stack.fetch_data` (the compose stack's data-init) on real MNIST."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_fetch_data(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FEDLAND_DATA_DIR": str(data_dir), "FEDLAND_LOG_LEVEL": "INFO"}
    return subprocess.run(
        [sys.executable, "-m", "stack.fetch_data", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_fetch_data_verifies_the_data_dir_and_exits_zero(data_dir: Path) -> None:
    result = run_fetch_data(data_dir)
    assert result.returncode == 0, result.stderr
    assert "MNIST ready in" in result.stderr and "60000 train, 10000 test examples" in result.stderr


def test_fetch_data_fails_on_a_corrupted_file(data_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "mnist"
    shutil.copytree(data_dir / "mnist", copy)
    labels = next(copy.glob("t10k-labels-idx1-ubyte*"))
    content = bytearray(labels.read_bytes())
    content[len(content) // 2] ^= 0xFF
    labels.write_bytes(bytes(content))
    result = run_fetch_data(tmp_path, "--no-download")
    assert result.returncode == 1
    assert labels.name in result.stderr and "corrupted" in result.stderr


def test_fetch_data_without_download_names_the_missing_files(tmp_path: Path) -> None:
    result = run_fetch_data(tmp_path, "--no-download")
    assert result.returncode == 1
    assert str(tmp_path / "mnist" / "train-images-idx3-ubyte.gz") in result.stderr


def test_fetch_data_takes_its_datasets_from_the_environment(tmp_path: Path) -> None:
    env = {**os.environ, "FEDLAND_DATA_DIR": str(tmp_path), "FEDLAND_DATASETS": "FashionMNIST, CIFAR10"}
    command = [sys.executable, "-m", "stack.fetch_data", "--no-download"]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1  # absent here: the first of the list is named, not MNIST
    assert str(tmp_path / "fashion-mnist") in result.stderr and f"{tmp_path / 'mnist'}/" not in result.stderr
    bad = subprocess.run(command, cwd=REPO, env={**env, "FEDLAND_DATASETS": "MNIST,SVHN"}, capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 2 and "FEDLAND_DATASETS: unknown dataset 'SVHN'" in bad.stderr
