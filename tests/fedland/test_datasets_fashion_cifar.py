"""Fashion-MNIST, CIFAR-10 and CIFAR-100: the real readers on tiny files in the exact binary formats.

MNIST has its own tests (real files) in ``test_datasets.py``.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import tarfile
from pathlib import Path

import pytest
import torch

from fedland.datasets import DATASETS, DatasetIntegrityError, DatasetMissingError, load_dataset
from tests.datasets_tiny import write_tiny

NAMES = ["FashionMNIST", "CIFAR10", "CIFAR100"]


def test_class_counts_are_known_without_the_files() -> None:
    assert DATASETS["FashionMNIST"].num_train == 60_000 and DATASETS["FashionMNIST"].num_test == 10_000
    assert DATASETS["CIFAR10"].num_train == 50_000 and DATASETS["CIFAR10"].num_test == 10_000
    assert DATASETS["CIFAR100"].num_classes == len(DATASETS["CIFAR100"].train_class_counts) == 100
    assert DATASETS["CIFAR100"].num_train == 50_000 and DATASETS["CIFAR10"].input_shape == (3, 32, 32)
    assert DATASETS["CIFAR10"].augment and not DATASETS["FashionMNIST"].augment


@pytest.mark.parametrize("name", NAMES)
def test_tiny_files_load_with_labels_and_normalisation(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    info = write_tiny(name, tmp_path)
    monkeypatch.setitem(DATASETS, name, info)
    data = load_dataset(name, tmp_path, download=False)
    k = info.num_classes
    assert data.train_x.shape == (6 * k, *info.input_shape) and data.train_x.dtype == torch.float32
    assert torch.bincount(data.train_y, minlength=k).tolist() == [6] * k
    assert torch.bincount(data.test_y, minlength=k).tolist() == [2] * k
    # pixels are bytes normalised per channel: (v / 255 - mean_c) / std_c
    train_x = data.train_x[:]  # (N, C, H, W) float32
    for channel, (mean, std) in enumerate(zip(info.mean, info.std)):
        values = train_x[:, channel] * std + mean
        assert float(values.min()) >= -1e-5 and float(values.max()) <= 1 + 1e-5
        assert torch.allclose(values * 255, (values * 255).round(), atol=1e-3)


def test_cifar_records_are_read_label_then_channel_planes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # one hand-made archive: image i has red = i, green = 100 + i, blue = 200 + i everywhere
    records = bytearray()
    for i in range(10):
        records += bytes([i]) + bytes([i]) * 1024 + bytes([100 + i]) * 1024 + bytes([200 + i]) * 1024
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        names = [f"cifar-10-batches-bin/data_batch_{j}.bin" for j in range(1, 6)] + ["cifar-10-batches-bin/test_batch.bin"]
        for j, member in enumerate(names):
            content = bytes(records[j * 2 * 3073 : (j + 1) * 2 * 3073]) if j < 5 else bytes(records[: 3073])
            entry = tarfile.TarInfo(member)
            entry.size = len(content)
            archive.addfile(entry, io.BytesIO(content))
    (tmp_path / "cifar10").mkdir()
    (tmp_path / "cifar10" / "cifar-10-binary.tar.gz").write_bytes(buffer.getvalue())
    real = DATASETS["CIFAR10"]
    file = dataclasses.replace(real.files[0], archive_md5=hashlib.md5(buffer.getvalue()).hexdigest())
    monkeypatch.setitem(DATASETS, "CIFAR10", dataclasses.replace(real, files=(file,), mean=(0.0,) * 3, std=(1.0,) * 3))
    data = load_dataset("CIFAR10", tmp_path, download=False)
    assert data.train_y.tolist() == list(range(10)) and data.test_y.tolist() == [0]
    expected = torch.tensor([[i, 100 + i, 200 + i] for i in range(10)], dtype=torch.float32) / 255
    assert torch.allclose(data.train_x[:][:, :, 5, 7], expected)


@pytest.mark.parametrize("name", NAMES)
def test_a_digest_mismatch_is_refused(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    info = write_tiny(name, tmp_path)
    wrong = dataclasses.replace(info.files[0], archive_md5="0" * 32, md5="1" * 32 if info.files[0].md5 else None)
    monkeypatch.setitem(DATASETS, name, dataclasses.replace(info, files=(wrong, *info.files[1:])))
    with pytest.raises(DatasetIntegrityError) as caught:
        load_dataset(name, tmp_path, download=False)
    expected = wrong.md5 or wrong.archive_md5
    assert f"{wrong.served_name} is not the official" in str(caught.value) and f"expected {expected}" in str(caught.value)
    assert "corrupted" not in str(caught.value)  # a readable file of other content is not corrupted


@pytest.mark.parametrize("name", NAMES)
def test_real_digests_refuse_test_files_and_missing_files_say_where(name: str, tmp_path: Path) -> None:
    with pytest.raises(DatasetMissingError) as caught:
        load_dataset(name, tmp_path, download=False)
    info = DATASETS[name]
    assert str(tmp_path / info.directory / info.files[0].served_name) in str(caught.value)
    assert "FEDLAND_DATA_DIR" in str(caught.value)
    write_tiny(name, tmp_path)  # the real registry: the test-written files do not match the published digests
    with pytest.raises(DatasetIntegrityError, match="expected " + (info.files[0].md5 or info.files[0].archive_md5 or "")):
        load_dataset(name, tmp_path, download=False)


def test_fashion_mnist_is_accepted_uncompressed_by_its_content(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    info = write_tiny("FashionMNIST", tmp_path)
    monkeypatch.setitem(DATASETS, "FashionMNIST", info)
    reference = load_dataset("FashionMNIST", tmp_path, download=False)
    directory = tmp_path / "uncompressed" / info.directory
    directory.mkdir(parents=True)
    for data_file in info.files:  # the content digests verify gunzipped copies too
        (directory / data_file.name).write_bytes(gzip.decompress((tmp_path / info.directory / data_file.served_name).read_bytes()))
    data = load_dataset("FashionMNIST", tmp_path / "uncompressed", download=False)
    assert torch.equal(data.train_y, reference.train_y) and torch.equal(data.test_x[:], reference.test_x[:])
