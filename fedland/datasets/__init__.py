"""Datasets: class-count tables, file formats, checksum verification, download.

``DATASETS`` describes each dataset without touching the disk (the spec's
feasibility check uses its class counts). ``load_dataset`` reads the original
distributed files from ``<data_dir>/<directory>/``, verifies their md5 and, if
the files are absent and ``download`` is true, fetches them from public
mirrors first:

* MNIST and Fashion-MNIST: the four IDX files, gzip-compressed (MNIST also
  uncompressed: its digests are of the decompressed content);
* CIFAR-10 and CIFAR-100: the *binary* distribution's archive
  (``cifar-10-binary.tar.gz``, ``cifar-100-binary.tar.gz``) as served, read
  member by member without extracting it and without pickle.

Images are normalised per channel with the dataset's train-split mean and std.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedland.datasets._files import (
    DataFile,
    DatasetIntegrityError,
    DatasetMissingError,
    download,
    find_file,
    read_verified,
)
from fedland.datasets._formats import parse_cifar, parse_idx, tar_members

__all__ = [
    "DATASETS",
    "Dataset",
    "DatasetInfo",
    "DatasetIntegrityError",
    "DatasetMissingError",
    "DataFile",
    "dataset_info",
    "load_dataset",
    "verify_dataset",
]

logger = logging.getLogger(__name__)

DATA_DIR_VARIABLE = "FEDLAND_DATA_DIR"
#: Layouts ``load_dataset`` can read: four IDX files, or one CIFAR binary archive.
LAYOUTS = ("idx", "cifar10-binary", "cifar100-binary")


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
        files=_idx_files(  # digests of the .gz files as published (Zalando; torchvision uses the same)
            (None, None, None, None),
            (
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
    """A loaded dataset as CPU tensors.

    The tensors are shared by every caller in the process (``load_dataset``
    caches them): treat them as read-only, index or ``.clone()`` them instead
    of writing into them.
    """

    info: DatasetInfo
    train_x: torch.Tensor  # (N, C, H, W) float32, normalised
    train_y: torch.Tensor  # (N,) int64
    test_x: torch.Tensor  # (N_test, C, H, W) float32, normalised
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

    Args:
        name: a key of ``DATASETS`` (``"MNIST"``, ``"FashionMNIST"``, ``"CIFAR10"``, ``"CIFAR100"``).
        data_dir: directory holding the dataset's subdirectory (``FEDLAND_DATA_DIR``).
        download: fetch missing files from the public mirrors.

    Returns:
        The dataset; its tensors are cached per process and must not be mutated.

    Raises:
        DatasetMissingError: files absent (and not downloadable); names each path.
        DatasetIntegrityError: a file is corrupted; names the file and the fix.
    """
    info = dataset_info(name)
    directory = Path(data_dir).expanduser().resolve() / info.directory
    missing = [f for f in info.files if find_file(directory, f) is None]
    if missing:
        if not download:
            raise DatasetMissingError(_missing_message(info, directory, missing, reason="download=False"))
        _download(info, directory, missing)
    paths = tuple(find_file(directory, f) for f in info.files)
    # Key the cache on the files' identity so a replaced file is re-read and re-verified.
    stamps = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in paths if p is not None)
    return _load_cached(info, stamps)


def verify_dataset(name: str, data_dir: str | os.PathLike[str], download: bool = True) -> None:
    """Check (downloading what is missing) that the dataset's files are present and intact; loads nothing.

    Raises the errors of ``load_dataset``.
    """
    info = dataset_info(name)
    directory = Path(data_dir).expanduser().resolve() / info.directory
    missing = [f for f in info.files if find_file(directory, f) is None]
    if missing:
        if not download:
            raise DatasetMissingError(_missing_message(info, directory, missing, reason="download=False"))
        _download(info, directory, missing)
    for data_file in info.files:
        path = find_file(directory, data_file)
        if path is None:
            raise DatasetMissingError(_missing_message(info, directory, [data_file], reason="download failed"))
        read_verified(path, data_file)


def _download(info: DatasetInfo, directory: Path, missing: list[DataFile]) -> None:
    download(missing, directory, info.mirrors, lambda reason: _missing_message(info, directory, missing, reason))


@functools.lru_cache(maxsize=4)
def _load_cached(info: DatasetInfo, stamps: tuple[tuple[str, int, int], ...]) -> Dataset:
    contents = [read_verified(Path(path), data_file) for (path, _, _), data_file in zip(stamps, info.files)]
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
    dataset = Dataset(
        info=info,
        train_x=_images_to_tensor(train_images, info),
        train_y=_labels_to_tensor(train_labels),
        test_x=_images_to_tensor(test_images, info),
        test_y=_labels_to_tensor(test_labels),
    )
    if len(dataset.train_x) != len(dataset.train_y) or len(dataset.test_x) != len(dataset.test_y):
        raise DatasetIntegrityError(f"{info.name}: image and label files disagree on the number of samples")
    logger.info("loaded %s: %d train, %d test samples", info.name, len(dataset.train_y), len(dataset.test_y))
    return dataset


def _images_to_tensor(images: np.ndarray, info: DatasetInfo) -> torch.Tensor:
    # (N, H, W) or (N, C, H, W) uint8 -> (N, C, H, W) float32, normalised per channel
    pixels = torch.from_numpy(images.astype(np.float32)).div_(255.0)
    pixels = pixels.reshape(len(images), *info.input_shape)
    channels = info.input_shape[0]
    mean = torch.tensor(info.mean, dtype=torch.float32).reshape(channels, 1, 1)
    std = torch.tensor(info.std, dtype=torch.float32).reshape(channels, 1, 1)
    if channels == 1:  # scalar arithmetic, as the single-channel datasets always were
        return pixels.sub_(info.mean[0]).div_(info.std[0])
    return pixels.sub_(mean).div_(std)


def _labels_to_tensor(labels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(labels.astype(np.int64))


def _missing_message(info: DatasetInfo, directory: Path, missing: list[DataFile], reason: str) -> str:
    wanted = "\n".join(
        f"  {directory / f.served_name}" + (f"  (or uncompressed {f.name})" if f.gzipped and f.md5 else "")
        for f in missing
    )
    return (
        f"{info.name} files not found ({reason}). Put these files there:\n{wanted}\n"
        f"or set {DATA_DIR_VARIABLE} to a directory whose {info.directory}/ subdirectory holds them. "
        f"They are served at {' and '.join(info.mirrors)}."
    )
