"""Datasets: class-count tables, file formats, verification by content, offline install, one shared copy.

``DATASETS`` describes each dataset without touching the disk (the spec's
feasibility check uses its class counts). ``load_dataset`` finds the original
distributed files in ``<data_dir>/<directory>/`` (fetching them from public
mirrors first when absent and ``download`` is true), verifies them against the
official digests and converts them once to a compact copy (uint8 ``.npy``
files in ``<directory>/compact/``, see ``_compact``) that every process then
opens memory-mapped, read-only:

* MNIST and Fashion-MNIST: the four IDX files, gzip-compressed or not; a file
  is accepted when its decompressed content is the official one (so a
  re-compressed copy, such as Debian's, is), or when it is the published .gz;
* CIFAR-10 and CIFAR-100: the *binary* distribution's archive
  (``cifar-10-binary.tar.gz``, ``cifar-100-binary.tar.gz``) as published, read
  member by member without extracting it and without pickle.

``install_dataset`` copies a local copy of the files (from a folder) into the
data directory, verified, and converts it. Images stay uint8 and become
float32, normalised per channel with the train split's mean and std, one batch
at a time (``Images``).
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from fedland.datasets._compact import Arrays, SourceFile, open_compact, writable, write_compact
from fedland.datasets._files import (
    DataFile,
    DatasetIntegrityError,
    DatasetMissingError,
    check_verified,
    content_digest,
    download,
    find_file,
    read_verified,
)
from fedland.datasets._formats import parse_cifar, parse_idx, tar_members
from fedland.datasets._images import Images

__all__ = [
    "DATASETS",
    "Dataset",
    "DatasetInfo",
    "DatasetIntegrityError",
    "DatasetMissingError",
    "DataFile",
    "DatasetCounts",
    "Images",
    "dataset_info",
    "install_dataset",
    "load_dataset",
    "verify_dataset",
]

logger = logging.getLogger(__name__)

DATA_DIR_VARIABLE = "FEDLAND_DATA_DIR"
#: The command that installs a local copy of a dataset (``install_dataset``) into the data directory.
INSTALL_COMMAND = "python -m stack.fetch_data --from DIR --dataset {name}"
#: Layouts ``load_dataset`` can read: four IDX files, or one CIFAR binary archive.
LAYOUTS = ("idx", "cifar10-binary", "cifar100-binary")


class DatasetCounts(Protocol):
    """What partitions need of a dataset: its name, classes and per-class sample counts (``DatasetInfo``,
    ``fedland.components.DatasetComponent``)."""

    @property
    def name(self) -> str: ...

    @property
    def num_classes(self) -> int: ...

    @property
    def train_class_counts(self) -> tuple[int, ...]: ...

    @property
    def test_class_counts(self) -> tuple[int, ...]: ...


@dataclass(frozen=True)
class DatasetInfo:
    """What is known about a dataset without reading it.

    ``files`` are the distributed files in the order the layout reads them
    (IDX: train images, train labels, test images, test labels; CIFAR: the
    archive). ``mean``/``std`` have one entry per channel and apply to pixel
    values in [0, 1]. ``augment`` is the spec's default for training-time
    augmentation (random crop and horizontal flip, see ``fedland.augment``).
    """

    name: str
    num_classes: int
    input_shape: tuple[int, int, int]  # (channels, height, width)
    train_class_counts: tuple[int, ...]
    test_class_counts: tuple[int, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    directory: str  # subdirectory of the data dir holding the files
    files: tuple[DataFile, ...]
    mirrors: tuple[str, ...]  # base URLs serving each file's ``served_name``
    layout: str = "idx"
    augment: bool = False

    @property
    def num_train(self) -> int:
        return sum(self.train_class_counts)

    @property
    def num_test(self) -> int:
        return sum(self.test_class_counts)

    @property
    def train_images(self) -> DataFile:
        return self.files[0]


def _idx_files(md5s: tuple[str | None, ...], archive_md5s: tuple[str | None, ...]) -> tuple[DataFile, ...]:
    names = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    return tuple(DataFile(name, md5, archive) for name, md5, archive in zip(names, md5s, archive_md5s))


DATASETS: dict[str, DatasetInfo] = {
    "MNIST": DatasetInfo(
        name="MNIST",
        num_classes=10,
        input_shape=(1, 28, 28),
        train_class_counts=(5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949),
        test_class_counts=(980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009),
        mean=(0.1307,),
        std=(0.3081,),
        directory="mnist",
        files=_idx_files(
            (
                "6bbc9ace898e44ae57da46a324031adb",
                "a25bea736e30d166cdddb491f175f624",
                "2646ac647ad5339dbf082846283269ea",
                "27ae3e4e09519cfbb04c329615203637",
            ),
            (None, None, None, None),
        ),
        mirrors=(
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "https://storage.googleapis.com/cvdf-datasets/mnist/",
        ),
    ),
    "FashionMNIST": DatasetInfo(
        name="FashionMNIST",
        num_classes=10,
        input_shape=(1, 28, 28),
        train_class_counts=(6000,) * 10,
        test_class_counts=(1000,) * 10,
        mean=(0.2860,),
        std=(0.3530,),
        directory="fashion-mnist",
        files=_idx_files(
            (  # the raw IDX files' md5s, as Zalando publishes them (README of zalandoresearch/fashion-mnist)
                "f4a8712d7a061bf5bd6d2ca38dc4d50a",
                "9018921c3c673c538a1fc5bad174d6f9",
                "8181f5470baa50b63fa0f6fddb340f0a",
                "15d484375f8d13e6eb1aabb0c3f46965",
            ),
            (  # the .gz files as published (Zalando; torchvision uses the same)
                "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                "25c81989df183df01b3e8a0aad5dffbe",
                "bef4ecab320f06d8554ea6380940ec79",
                "bb300cfdad3c16e7a12a480ee83cd310",
            ),
        ),
        mirrors=(
            "https://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
            "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
        ),
    ),
    "CIFAR10": DatasetInfo(
        name="CIFAR10",
        num_classes=10,
        input_shape=(3, 32, 32),
        train_class_counts=(5000,) * 10,
        test_class_counts=(1000,) * 10,
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
        directory="cifar10",
        files=(DataFile("cifar-10-binary.tar.gz", archive_md5="c32a1d4ab5d03f1284b67883e8d87530", gzipped=False),),
        mirrors=("https://www.cs.toronto.edu/~kriz/",),
        layout="cifar10-binary",
        augment=True,
    ),
    "CIFAR100": DatasetInfo(
        name="CIFAR100",
        num_classes=100,
        input_shape=(3, 32, 32),
        train_class_counts=(500,) * 100,
        test_class_counts=(100,) * 100,
        mean=(0.5071, 0.4865, 0.4409),
        std=(0.2673, 0.2564, 0.2762),
        directory="cifar100",
        files=(DataFile("cifar-100-binary.tar.gz", archive_md5="03b5dce01913d631647c71ecec9e9cb8", gzipped=False),),
        mirrors=("https://www.cs.toronto.edu/~kriz/",),
        layout="cifar100-binary",
        augment=True,
    ),
}

#: Members of the CIFAR binary archives: (train batches, test batches, label bytes per record).
CIFAR_MEMBERS: dict[str, tuple[tuple[str, ...], tuple[str, ...], int]] = {
    "cifar10-binary": (
        tuple(f"cifar-10-batches-bin/data_batch_{i}.bin" for i in range(1, 6)),
        ("cifar-10-batches-bin/test_batch.bin",),
        1,
    ),
    "cifar100-binary": (("cifar-100-binary/train.bin",), ("cifar-100-binary/test.bin",), 2),
}


@dataclass(frozen=True, eq=False)
class Dataset:
    """A loaded dataset: images normalised per batch, int64 labels.

    ``train_x``/``test_x`` are ``Images`` (a built-in's: over the shared memory-mapped copy):
    index them (``x[batch_indices]``, ``x[a:b]``) to get float32 tensors, or
    ``subset`` them for a view. The labels are small tensors shared by every
    caller in the process (``load_dataset`` caches the dataset): treat them as
    read-only.
    """

    info: DatasetCounts  # a built-in's DatasetInfo (load_dataset), or the spec's DatasetComponent
    train_x: Images  # (N, C, H, W), float32 normalised when indexed
    train_y: torch.Tensor  # (N,) int64
    test_x: Images  # (N_test, C, H, W), float32 normalised when indexed
    test_y: torch.Tensor  # (N_test,) int64

    @property
    def name(self) -> str:
        return self.info.name


def dataset_info(name: str) -> DatasetInfo:
    """Return the ``DatasetInfo`` of ``name`` or raise ``ValueError`` listing the known ones."""
    try:
        return DATASETS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"dataset_name: unknown dataset {name!r}; known datasets: {', '.join(sorted(DATASETS))}"
        ) from None


def load_dataset(name: str, data_dir: str | os.PathLike[str], download: bool = True) -> Dataset:
    """Load a dataset from ``<data_dir>/<directory>/``, downloading it if absent.

    The first load verifies the files and writes the compact copy; later loads
    (in any process) open that copy memory-mapped as long as the files are
    unchanged. A read-only data directory without a compact copy is verified
    and held in memory (uint8) by the process.

    Args:
        name: a key of ``DATASETS`` (``"MNIST"``, ``"FashionMNIST"``, ``"CIFAR10"``, ``"CIFAR100"``).
        data_dir: directory holding the dataset's subdirectory (``FEDLAND_DATA_DIR``).
        download: fetch missing files from the public mirrors.

    Returns:
        The dataset; it is cached per process and must not be mutated.

    Raises:
        DatasetMissingError: files absent (and not downloadable); names each path and the install command.
        DatasetIntegrityError: a file is not the official one; names the file and the fix.
    """
    info = dataset_info(name)
    paths = _present_files(info, Path(data_dir).expanduser().resolve() / info.directory, download)
    # Key the cache on the files' identity so a replaced file is re-read and re-verified.
    stamps = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in paths)
    return _load_cached(info, stamps)


def verify_dataset(name: str, data_dir: str | os.PathLike[str], download: bool = True) -> None:
    """Check (downloading what is missing) that the dataset's files are the official ones, and convert them once.

    Every file's content is checked (streamed); the compact copy is written
    when absent or stale and the directory is writable (a read-only one is left
    as it is). Nothing stays loaded. Raises the errors of ``load_dataset``.
    """
    info = dataset_info(name)
    paths = _present_files(info, Path(data_dir).expanduser().resolve() / info.directory, download)
    for path, data_file in zip(paths, info.files):
        check_verified(path, data_file)  # streamed: a 170 MB archive is not held in memory to check it
    directory = paths[0].parent
    if writable(directory) and open_compact(directory, info.name, _sources(info, paths), info.input_shape) is None:
        _compact(info, paths, [read_verified(path, data_file) for path, data_file in zip(paths, info.files)])


def install_dataset(name: str, source: str | os.PathLike[str], data_dir: str | os.PathLike[str]) -> Path:
    """Install a local copy of a dataset's official files from ``source`` into ``<data_dir>/<directory>/``.

    The files are looked for in ``source/<directory>/`` and in ``source``
    itself, under their published names (IDX files gzip-compressed or not; the
    CIFAR archive as published), verified by content, copied (each
    atomically) and converted once to the compact copy.

    Args:
        name: a key of ``DATASETS``.
        source: a folder holding the files (e.g. Debian's ``/usr/share/datasets/fashion-mnist``).
        data_dir: the data directory (``FEDLAND_DATA_DIR``).

    Returns:
        The dataset's directory in ``data_dir``.

    Raises:
        DatasetMissingError: a file is not in ``source``; names where it was looked for.
        DatasetIntegrityError: a file is not the official one; nothing is installed.
    """
    info = dataset_info(name)
    folder = Path(source).expanduser().resolve()
    target = Path(data_dir).expanduser().resolve() / info.directory
    places = (folder / info.directory, folder)
    found = [next((p for place in places if (p := find_file(place, f)) is not None), None) for f in info.files]
    absent = [f for f, path in zip(info.files, found) if path is None]
    if absent:
        wanted = "\n".join(f"  {place / f.served_name}" for f in absent for place in places)
        raise DatasetMissingError(f"{info.name}: {len(absent)} file(s) not found in {folder}; looked for:\n{wanted}")
    sources = [path for path in found if path is not None]
    contents = [read_verified(path, data_file) for path, data_file in zip(sources, info.files)]  # all before any copy
    target.mkdir(parents=True, exist_ok=True)
    installed = []
    for path, data_file in zip(sources, info.files):
        destination = target / path.name
        if path != destination.resolve():
            partial = destination.with_name(f".{destination.name}.part")
            shutil.copyfile(path, partial)
            os.replace(partial, destination)
        for other in data_file.candidates(target):  # a stale other form (e.g. raw beside .gz) would be read first
            if other.name != path.name:
                other.unlink(missing_ok=True)
        installed.append(destination)
    _compact(info, installed, contents)
    logger.info("installed %s from %s into %s", info.name, folder, target)
    return target


def _present_files(info: DatasetInfo, directory: Path, download: bool) -> list[Path]:
    missing = [f for f in info.files if find_file(directory, f) is None]
    if missing:
        if not download:
            raise DatasetMissingError(_missing_message(info, directory, missing, reason="download=False"))
        _download(info, directory, missing)
    paths = [find_file(directory, f) for f in info.files]
    absent = [f for f, path in zip(info.files, paths) if path is None]
    if absent:
        raise DatasetMissingError(_missing_message(info, directory, absent, reason="download failed"))
    return [path for path in paths if path is not None]


def _download(info: DatasetInfo, directory: Path, missing: list[DataFile]) -> None:
    download(missing, directory, info.mirrors, lambda reason: _missing_message(info, directory, missing, reason))


@functools.lru_cache(maxsize=4)
def _load_cached(info: DatasetInfo, stamps: tuple[tuple[str, int, int], ...]) -> Dataset:
    paths = [Path(path) for path, _, _ in stamps]
    arrays = open_compact(paths[0].parent, info.name, _sources(info, paths), info.input_shape)
    if arrays is None:
        contents = [read_verified(path, data_file) for path, data_file in zip(paths, info.files)]
        arrays = _compact(info, paths, contents)
    dataset = Dataset(
        info=info,
        train_x=Images(arrays.train_images, info.mean, info.std),
        train_y=_labels_to_tensor(arrays.train_labels),
        test_x=Images(arrays.test_images, info.mean, info.std),
        test_y=_labels_to_tensor(arrays.test_labels),
    )
    logger.info("loaded %s: %d train, %d test samples", info.name, len(dataset.train_y), len(dataset.test_y))
    return dataset


def _sources(info: DatasetInfo, paths: Sequence[Path]) -> list[SourceFile]:
    return [SourceFile.of(path, content_digest(data_file)) for path, data_file in zip(paths, info.files)]


def _compact(info: DatasetInfo, paths: Sequence[Path], contents: Sequence[bytes]) -> Arrays:
    """The compact copy made from ``paths`` (verified ``contents``): opened if current, else written (or in memory)."""
    directory, sources = paths[0].parent, _sources(info, paths)
    current = open_compact(directory, info.name, sources, info.input_shape)
    if current is not None:
        return current
    arrays = _parse(info, contents)
    return write_compact(directory, info.name, sources, arrays) or arrays


def _parse(info: DatasetInfo, contents: Sequence[bytes]) -> Arrays:
    """The uint8 arrays of the verified distributed files: images ``(N, C, H, W)``, labels ``(N,)``."""
    if info.layout == "idx":
        names = [f.name for f in info.files]
        train_images, train_labels, test_images, test_labels = (
            parse_idx(content, name) for content, name in zip(contents, names)
        )
    elif info.layout in CIFAR_MEMBERS:
        train_members, test_members, label_bytes = CIFAR_MEMBERS[info.layout]
        archive = info.files[0].name
        records = tar_members(contents[0], archive, train_members + test_members)
        train_images, train_labels = parse_cifar(records[: len(train_members)], label_bytes, info.num_classes, archive)
        test_images, test_labels = parse_cifar(records[len(train_members) :], label_bytes, info.num_classes, archive)
    else:
        raise ValueError(f"layout: unknown layout {info.layout!r}; valid: {', '.join(LAYOUTS)}")
    if len(train_images) != len(train_labels) or len(test_images) != len(test_labels):
        raise DatasetIntegrityError(f"{info.name}: image and label files disagree on the number of samples")
    return Arrays(
        train_images=train_images.reshape(len(train_images), *info.input_shape),
        train_labels=train_labels,
        test_images=test_images.reshape(len(test_images), *info.input_shape),
        test_labels=test_labels,
    )


def _labels_to_tensor(labels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(labels, dtype=np.int64))


def _missing_message(info: DatasetInfo, directory: Path, missing: list[DataFile], reason: str) -> str:
    wanted = "\n".join(
        f"  {directory / f.served_name}" + (f"  (or uncompressed {f.name})" if f.gzipped and f.md5 else "")
        for f in missing
    )
    return (
        f"{info.name} files not found ({reason}). Put these files there:\n{wanted}\n"
        f"or set {DATA_DIR_VARIABLE} to a directory whose {info.directory}/ subdirectory holds them. "
        f"They are served at {' and '.join(info.mirrors)}. To install a local copy of the official files "
        f"from a folder (verified, converted once): {INSTALL_COMMAND.format(name=info.name)}"
    )
