"""Datasets: the class-count table against real MNIST, loading, checksum and missing-file errors, download."""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import os
import shutil
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import cast

import pytest
import torch

from fedland.datasets import (
    DATASETS,
    DatasetIntegrityError,
    DatasetMissingError,
    load_dataset,
)

DATA_DIR = os.environ.get("FEDLAND_DATA_DIR")
needs_mnist = pytest.mark.skipif(
    not DATA_DIR, reason="FEDLAND_DATA_DIR is unset: point it at a directory holding mnist/ IDX files"
)
MNIST = DATASETS["MNIST"]


def test_table_totals_are_the_mnist_split_sizes() -> None:
    assert MNIST.num_train == 60_000 and MNIST.num_test == 10_000
    assert MNIST.num_classes == len(MNIST.train_class_counts) == len(MNIST.test_class_counts) == 10
    assert MNIST.input_shape == (1, 28, 28)


@needs_mnist
def test_real_mnist_matches_the_table() -> None:
    assert DATA_DIR is not None  # needs_mnist: skipped unless it is set
    data = load_dataset("MNIST", DATA_DIR, download=False)
    assert data.train_x.shape == (60_000, 1, 28, 28) and data.train_x.dtype == torch.float32
    assert data.test_x.shape == (10_000, 1, 28, 28) and data.test_x.dtype == torch.float32
    assert data.train_y.dtype == torch.int64 and data.test_y.dtype == torch.int64
    assert torch.bincount(data.train_y).tolist() == list(MNIST.train_class_counts)
    assert torch.bincount(data.test_y).tolist() == list(MNIST.test_class_counts)
    # Normalised with MNIST's own mean/std, so the train split is ~N(0, 1) overall.
    train_x = data.train_x[:]  # (60000, 1, 28, 28) float32, normalised on indexing
    assert abs(float(train_x.mean())) < 1e-3
    assert abs(float(train_x.std()) - 1.0) < 1e-3
    # Background pixels (0) map to -mean/std.
    assert float(train_x.min()) == pytest.approx(-0.1307 / 0.3081, abs=1e-6)
    assert load_dataset("MNIST", DATA_DIR) is data  # cached per process


@needs_mnist
def test_uncompressed_idx_files_load_the_same(tmp_path: Path) -> None:
    assert DATA_DIR is not None  # needs_mnist: skipped unless it is set
    target = tmp_path / "mnist"
    target.mkdir()
    for data_file in MNIST.files:
        with gzip.open(Path(DATA_DIR) / "mnist" / f"{data_file.name}.gz") as source:
            (target / data_file.name).write_bytes(source.read())
    raw = load_dataset("MNIST", tmp_path, download=False)
    reference = load_dataset("MNIST", DATA_DIR, download=False)
    assert torch.equal(raw.train_y, reference.train_y)
    assert torch.equal(raw.test_x[:], reference.test_x[:])


def test_missing_files_name_every_path_and_the_variable(tmp_path: Path) -> None:
    with pytest.raises(DatasetMissingError) as caught:
        load_dataset("MNIST", tmp_path, download=False)
    message = str(caught.value)
    for data_file in MNIST.files:
        assert str(tmp_path / "mnist" / f"{data_file.name}.gz") in message
    assert "FEDLAND_DATA_DIR" in message


def test_a_bad_gzip_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "mnist").mkdir()
    for data_file in MNIST.files:
        (tmp_path / "mnist" / f"{data_file.name}.gz").write_bytes(b"this is not gzip data")
    with pytest.raises(DatasetIntegrityError, match="train-images-idx3-ubyte.gz is corrupted"):
        load_dataset("MNIST", tmp_path, download=False)


def test_a_checksum_mismatch_names_the_file_and_expected_md5(tmp_path: Path) -> None:
    (tmp_path / "mnist").mkdir()
    content = b"\x00\x00\x08\x01" + (3).to_bytes(4, "big") + bytes([1, 2, 3])  # a valid but wrong IDX file
    for data_file in MNIST.files:
        (tmp_path / "mnist" / f"{data_file.name}.gz").write_bytes(gzip.compress(content))
    with pytest.raises(DatasetIntegrityError) as caught:
        load_dataset("MNIST", tmp_path, download=False)
    message = str(caught.value)
    assert "train-images-idx3-ubyte.gz is not the official train-images-idx3-ubyte" in message
    assert hashlib.md5(content).hexdigest() in message and "fetch_data --from" in message
    assert cast(str, MNIST.train_images.md5) in message  # MNIST lists every md5


def test_unknown_dataset_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="dataset_name: unknown dataset 'CIFAR'.*MNIST"):
        load_dataset("CIFAR", tmp_path)


@needs_mnist
def test_download_tries_mirrors_and_verifies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert DATA_DIR is not None  # needs_mnist: skipped unless it is set
    # Serve the real files over loopback HTTP as the second mirror; the first refuses connections.
    served = tmp_path / "served"
    shutil.copytree(Path(DATA_DIR) / "mnist", served)
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *args: None  # type: ignore[attr-defined]
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        mirrors = ("http://127.0.0.1:9/", f"http://127.0.0.1:{server.server_address[1]}/")
        monkeypatch.setitem(DATASETS, "MNIST", dataclasses.replace(MNIST, mirrors=mirrors))
        data = load_dataset("MNIST", tmp_path / "data")
    finally:
        server.shutdown()
        server.server_close()
    assert torch.bincount(data.test_y).tolist() == list(MNIST.test_class_counts)
    assert sorted(p.name for p in (tmp_path / "data" / "mnist").iterdir() if p.is_file()) == sorted(
        f"{f.name}.gz" for f in MNIST.files
    )


def test_failed_download_says_where_to_put_the_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(DATASETS, "MNIST", dataclasses.replace(MNIST, mirrors=("http://127.0.0.1:9/",)))
    with pytest.raises(DatasetMissingError) as caught:
        load_dataset("MNIST", tmp_path)
    message = str(caught.value)
    assert "download failed" in message and "FEDLAND_DATA_DIR" in message
    assert str(tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz") in message
    assert not list((tmp_path / "mnist").glob("*.part"))
