"""The compact copy and the offline install: uint8 memory maps normalised per batch, verified by content.

Real MNIST and Debian's Fashion-MNIST (FEDLAND_DATA_DIR) where available; the
CIFAR archives as tiny files in the exact binary format (``tests.datasets_tiny``).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fedland.datasets import (
    DATASETS,
    DatasetIntegrityError,
    DatasetMissingError,
    Images,
    _load_cached,
    install_dataset,
    load_dataset,
    verify_dataset,
)
from fedland.datasets._files import read_verified
from fedland.plan import ExperimentPlan
from fedland.spec import ExperimentSpec
from tests.datasets_tiny import write_tiny

REPO = Path(__file__).resolve().parents[2]


def normalised_up_front(images: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """The float32 normalisation of a whole split at once, as every process used to hold it."""
    pixels = torch.from_numpy(images.astype(np.float32)).div_(255.0)
    if len(mean) == 1:
        return pixels.sub_(mean[0]).div_(std[0])
    return pixels.sub_(torch.tensor(mean).reshape(-1, 1, 1)).div_(torch.tensor(std).reshape(-1, 1, 1))


def idx_images(path: Path) -> np.ndarray:
    content = gzip.decompress(path.read_bytes())
    return np.frombuffer(content, dtype=np.uint8, offset=16).reshape(-1, 1, 28, 28)


@pytest.fixture(scope="module")
def installed_mnist(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    target = tmp_path_factory.mktemp("data")
    install_dataset("MNIST", data_dir / "mnist", target)
    return target


def test_mnist_batches_are_bit_identical_to_normalising_up_front(installed_mnist: Path, data_dir: Path) -> None:
    info = DATASETS["MNIST"]
    data = load_dataset("MNIST", installed_mnist, download=False)
    assert isinstance(data.train_x.pixels, np.memmap) and not data.train_x.pixels.flags.writeable
    train = normalised_up_front(idx_images(data_dir / "mnist" / "train-images-idx3-ubyte.gz"), info.mean, info.std)
    test = normalised_up_front(idx_images(data_dir / "mnist" / "t10k-images-idx3-ubyte.gz"), info.mean, info.std)
    assert torch.equal(data.train_x[:], train) and torch.equal(data.test_x[:], test)
    chosen = torch.randperm(60_000, generator=torch.Generator().manual_seed(0))[:512]
    assert torch.equal(data.train_x[chosen], train[chosen])
    assert torch.equal(data.train_x[100:164], train[100:164]) and torch.equal(data.train_x[7], train[7])
    # the read-only shared data dir: verified and held in memory by the process, the same values
    shared = load_dataset("MNIST", data_dir, download=False)
    assert torch.equal(shared.test_x[:], test) and torch.equal(shared.train_y, data.train_y)


def test_a_members_data_is_a_view_of_the_shared_images(installed_mnist: Path) -> None:
    spec = ExperimentSpec(target_balance_ratios=[[0.1] * 10] * 3, subset_fractions=[0.1] * 3, rounds=1, seed=3)
    plan = ExperimentPlan(spec, load_dataset("MNIST", installed_mnist, download=False))
    member = plan.client_data(1)
    part = plan.partitions[1]
    assert member.train_x.pixels is plan.dataset.train_x.pixels  # the same memory map, no copy
    assert member.test_x.pixels is plan.dataset.test_x.pixels
    assert member.train_x.nbytes == 8 * part.num_train  # the member holds its index array only
    assert np.array_equal(member.train_x.indices, part.train_indices)
    assert torch.equal(member.train_x[:], plan.dataset.train_x[torch.from_numpy(part.train_indices)])
    nested = member.train_x.subset([2, 0])
    assert torch.equal(nested[:], plan.dataset.train_x[part.train_indices[[2, 0]].tolist()])


def test_three_channel_images_are_bit_identical_to_normalising_up_front() -> None:
    info = DATASETS["CIFAR10"]
    pixels = np.random.default_rng(0).integers(0, 256, (40, 3, 32, 32), dtype=np.uint8)
    images = Images(pixels, info.mean, info.std)
    expected = normalised_up_front(pixels, info.mean, info.std)
    assert torch.equal(images[:], expected) and torch.equal(images[torch.tensor([39, 0, 5])], expected[[39, 0, 5]])
    assert images.shape == (40, 3, 32, 32) and len(images.subset(np.arange(10, 20))) == 10


def test_the_compact_copy_is_trusted_until_a_file_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    info = write_tiny("FashionMNIST", tmp_path)
    monkeypatch.setitem(DATASETS, "FashionMNIST", info)
    first = load_dataset("FashionMNIST", tmp_path, download=False)
    directory = tmp_path / info.directory
    manifest = json.loads((directory / "compact" / "manifest.json").read_text())
    assert [s["digest"] for s in manifest["sources"]] == [f.md5 for f in info.files]
    assert isinstance(first.train_x.pixels, np.memmap)
    # Overwrite the labels with other bytes of the same size and mtime: loading trusts the copy made from the
    # verified files (no re-hashing in every process); a full verification sees the change.
    labels = directory / info.files[1].served_name
    stat = labels.stat()
    original = labels.read_bytes()
    labels.write_bytes(bytes(len(original)))
    os.utime(labels, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    _load_cached.cache_clear()  # as a fresh process would
    again = load_dataset("FashionMNIST", tmp_path, download=False)
    assert torch.equal(again.train_y, first.train_y)
    with pytest.raises(DatasetIntegrityError, match="corrupted"):
        verify_dataset("FashionMNIST", tmp_path, download=False)
    # a file replaced (another mtime) makes the copy stale: rebuilt from the verified files
    labels.write_bytes(original)
    os.utime(labels, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    rebuilt = load_dataset("FashionMNIST", tmp_path, download=False)
    assert torch.equal(rebuilt.train_y, first.train_y)
    manifest = json.loads((directory / "compact" / "manifest.json").read_text())
    assert manifest["sources"][1]["mtime_ns"] == stat.st_mtime_ns + 10**9


@pytest.mark.parametrize("name", ["FashionMNIST", "CIFAR10", "CIFAR100"])
def test_install_from_a_folder_copies_verifies_and_converts(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    info = write_tiny(name, tmp_path / "staging")
    monkeypatch.setitem(DATASETS, name, info)
    folder = tmp_path / "usb-stick"  # the files loose in a folder, as copied from elsewhere
    (tmp_path / "staging" / info.directory).rename(folder)
    target = install_dataset(name, folder, tmp_path / "data")
    assert target == tmp_path / "data" / info.directory
    assert sorted(p.name for p in target.iterdir() if p.is_file()) == sorted(f.served_name for f in info.files)
    data = load_dataset(name, tmp_path / "data", download=False)
    assert isinstance(data.train_x.pixels, np.memmap)
    k = info.num_classes
    assert torch.bincount(data.train_y, minlength=k).tolist() == [6] * k
    assert data.train_x.shape == (6 * k, *info.input_shape)
    assert np.array_equal(np.load(target / "compact" / "train_images.npy"), data.train_x.pixels)


def test_install_refuses_other_content_and_installs_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    info = write_tiny("FashionMNIST", tmp_path / "folder")
    monkeypatch.setitem(DATASETS, "FashionMNIST", info)
    labels = tmp_path / "folder" / info.directory / info.files[3].served_name
    labels.write_bytes(gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x01\x07"))
    with pytest.raises(DatasetIntegrityError, match="t10k-labels-idx1-ubyte.gz is not the official"):
        install_dataset("FashionMNIST", tmp_path / "folder", tmp_path / "data")
    assert not (tmp_path / "data").exists()
    with pytest.raises(DatasetMissingError, match="not found in"):
        install_dataset("CIFAR10", tmp_path / "folder", tmp_path / "data")


def test_a_recompressed_gzip_is_accepted_by_content_but_not_as_a_download(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    info = write_tiny("FashionMNIST", tmp_path)
    monkeypatch.setitem(DATASETS, "FashionMNIST", info)
    images = tmp_path / info.directory / info.files[0].served_name
    content = gzip.decompress(images.read_bytes())
    images.write_bytes(gzip.compress(content, compresslevel=1, mtime=12345))  # other bytes, same content
    assert hashlib.md5(images.read_bytes()).hexdigest() != info.files[0].archive_md5
    assert read_verified(images, info.files[0]) == content
    assert load_dataset("FashionMNIST", tmp_path, download=False).train_x.shape[0] == 60
    with pytest.raises(DatasetIntegrityError, match="is not the official train-images-idx3-ubyte.gz"):
        read_verified(images, info.files[0], as_served=True)  # a mirror must serve the published file


def test_the_missing_error_names_the_install_command(tmp_path: Path) -> None:
    with pytest.raises(DatasetMissingError, match=r"python -m stack.fetch_data --from DIR --dataset CIFAR10"):
        load_dataset("CIFAR10", tmp_path, download=False)


def test_debians_fashion_mnist_is_accepted_by_its_content(data_dir: Path) -> None:
    if not (data_dir / "fashion-mnist").is_dir():
        pytest.skip(f"{data_dir} has no fashion-mnist/")
    info = DATASETS["FashionMNIST"]
    served = data_dir / "fashion-mnist" / info.files[0].served_name
    assert hashlib.md5(served.read_bytes()).hexdigest() != info.files[0].archive_md5  # not the published .gz
    data = load_dataset("FashionMNIST", data_dir, download=False)
    assert torch.bincount(data.train_y).tolist() == [6000] * 10
    assert torch.bincount(data.test_y).tolist() == [1000] * 10


def test_fetch_data_from_a_folder_installs_debians_fashion_mnist(data_dir: Path, tmp_path: Path) -> None:
    if not (data_dir / "fashion-mnist").is_dir():
        pytest.skip(f"{data_dir} has no fashion-mnist/")
    env = {**os.environ, "FEDLAND_DATA_DIR": str(tmp_path / "data"), "FEDLAND_LOG_LEVEL": "INFO"}
    command = [sys.executable, "-m", "stack.fetch_data", "--from", str(data_dir / "fashion-mnist")]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "FashionMNIST installed in" in result.stderr
    assert not (tmp_path / "data" / "mnist").exists()  # the same file names, but not MNIST's content
    manifest = json.loads((tmp_path / "data" / "fashion-mnist" / "compact" / "manifest.json").read_text())
    assert [s["digest"] for s in manifest["sources"]] == [
        "f4a8712d7a061bf5bd6d2ca38dc4d50a", "9018921c3c673c538a1fc5bad174d6f9",
        "8181f5470baa50b63fa0f6fddb340f0a", "15d484375f8d13e6eb1aabb0c3f46965",
    ]
    labels = np.load(tmp_path / "data" / "fashion-mnist" / "compact" / "test_labels.npy", mmap_mode="r")
    assert np.bincount(labels).tolist() == [1000] * 10
    # nothing there: a failure naming the folders looked in
    empty = subprocess.run([*command[:-1], str(tmp_path / "data" / "fashion-mnist" / "compact")], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=300)
    assert empty.returncode == 1 and "no dataset's official files found there" in empty.stderr


def test_a_directory_marked_read_only_is_left_as_it_is(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    info = write_tiny("CIFAR10", tmp_path)
    monkeypatch.setitem(DATASETS, "CIFAR10", info)
    directory = tmp_path / info.directory
    directory.chmod(0o555)  # as a shared copy of the data is: even root does not write there
    try:
        verify_dataset("CIFAR10", tmp_path, download=False)
        data = load_dataset("CIFAR10", tmp_path, download=False)
        assert not (directory / "compact").exists()
        assert not isinstance(data.train_x.pixels, np.memmap)  # the process's own uint8 copy
        assert torch.bincount(data.train_y).tolist() == [6] * 10
    finally:
        directory.chmod(0o755)


def test_images_index_the_example_dimension_only() -> None:
    images = Images(np.zeros((4, 1, 2, 2), dtype=np.uint8), (0.5,), (0.25,))
    assert images[1].shape == (1, 2, 2) and float(images[1].max()) == -2.0  # (0 - 0.5) / 0.25
    with pytest.raises(TypeError, match="only the first"):
        images[0, 0]
    with pytest.raises(TypeError, match="boolean masks"):
        images[torch.tensor([True, False, True, False])]
    with pytest.raises(ValueError, match="one entry per channel"):
        Images(np.zeros((4, 3, 2, 2), dtype=np.uint8), (0.5,), (0.25,))


def test_training_on_images_per_batch_equals_training_on_the_tensor(installed_mnist: Path, data_dir: Path) -> None:
    from fedland.models import build_model
    from fedland.training import train_local

    info = DATASETS["MNIST"]
    data = load_dataset("MNIST", installed_mnist, download=False)
    member = data.train_x.subset(np.arange(0, 60_000, 100))  # (600, 1, 28, 28)
    up_front = normalised_up_front(idx_images(data_dir / "mnist" / "train-images-idx3-ubyte.gz"), info.mean, info.std)
    labels = data.train_y[::100]
    per_batch, _ = train_local(
        build_model("FedNet", seed=0), member, labels, epochs=1, batch_size=32, learning_rate=0.05, momentum=0.5, seed=11
    )
    reference, _ = train_local(
        build_model("FedNet", seed=0), up_front[::100], labels, epochs=1, batch_size=32, learning_rate=0.05,
        momentum=0.5, seed=11,
    )
    for name, value in reference.state_dict().items():
        assert torch.equal(per_batch.state_dict()[name], value), name
