"""Datasets: class-count tables, IDX loading, checksum verification, download.

``DATASETS`` describes each dataset without touching the disk (the spec's
feasibility check uses its class counts). ``load_dataset`` reads the original
IDX files (gzip-compressed or raw) from ``<data_dir>/<dataset>/``, verifies the
md5 of the decompressed content and, if the files are absent and ``download``
is true, fetches them from public mirrors first.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import logging
import os
import struct
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

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


@dataclass(frozen=True)
class DataFile:
    """One IDX file: its original name (without ``.gz``) and md5 of its raw bytes."""

    name: str
    md5: str


@dataclass(frozen=True)
class DatasetInfo:
    """What is known about a dataset without reading it."""

    name: str
    num_classes: int
    input_shape: tuple[int, int, int]  # (channels, height, width)
    train_class_counts: tuple[int, ...]
    test_class_counts: tuple[int, ...]
    mean: float  # normalisation applied to pixel values in [0, 1]
    std: float
    directory: str  # subdirectory of the data dir holding the files
    train_images: DataFile
    train_labels: DataFile
    test_images: DataFile
    test_labels: DataFile
    mirrors: tuple[str, ...]  # base URLs serving ``<name>.gz``

    @property
    def num_train(self) -> int:
        return sum(self.train_class_counts)

    @property
    def num_test(self) -> int:
        return sum(self.test_class_counts)

    @property
    def files(self) -> tuple[DataFile, ...]:
        return (self.train_images, self.train_labels, self.test_images, self.test_labels)


DATASETS: dict[str, DatasetInfo] = {
    "MNIST": DatasetInfo(
        name="MNIST",
        num_classes=10,
        input_shape=(1, 28, 28),
        train_class_counts=(5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949),
        test_class_counts=(980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009),
        mean=0.1307,
        std=0.3081,
        directory="mnist",
        train_images=DataFile("train-images-idx3-ubyte", "6bbc9ace898e44ae57da46a324031adb"),
        train_labels=DataFile("train-labels-idx1-ubyte", "a25bea736e30d166cdddb491f175f624"),
        test_images=DataFile("t10k-images-idx3-ubyte", "2646ac647ad5339dbf082846283269ea"),
        test_labels=DataFile("t10k-labels-idx1-ubyte", "27ae3e4e09519cfbb04c329615203637"),
        mirrors=(
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "https://storage.googleapis.com/cvdf-datasets/mnist/",
        ),
    ),
}


class DatasetMissingError(FileNotFoundError):
    """The dataset files are absent and could not be downloaded."""


class DatasetIntegrityError(ValueError):
    """A dataset file exists but is corrupted (bad gzip, bad checksum, bad IDX header)."""


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
        name: a key of ``DATASETS`` (``"MNIST"``).
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
    missing = [f for f in info.files if _find_file(directory, f) is None]
    if missing:
        if not download:
            raise DatasetMissingError(_missing_message(info, directory, missing, reason="download=False"))
        _download(info, directory, missing)
    paths = tuple(_find_file(directory, f) for f in info.files)
    # Key the cache on the files' identity so a replaced file is re-read and re-verified.
    stamps = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in paths if p is not None)
    return _load_cached(info.name, stamps)


def verify_dataset(name: str, data_dir: str | os.PathLike[str], download: bool = True) -> None:
    """Check (downloading what is missing) that the dataset's files are present and intact; loads nothing.

    Raises the errors of ``load_dataset``.
    """
    info = dataset_info(name)
    directory = Path(data_dir).expanduser().resolve() / info.directory
    missing = [f for f in info.files if _find_file(directory, f) is None]
    if missing:
        if not download:
            raise DatasetMissingError(_missing_message(info, directory, missing, reason="download=False"))
        _download(info, directory, missing)
    for data_file in info.files:
        path = _find_file(directory, data_file)
        if path is None:
            raise DatasetMissingError(_missing_message(info, directory, [data_file], reason="download failed"))
        _read_verified(path, data_file)


@functools.lru_cache(maxsize=4)
def _load_cached(name: str, stamps: tuple[tuple[str, int, int], ...]) -> Dataset:
    info = DATASETS[name]
    train_images, train_labels, test_images, test_labels = (
        _read_verified(Path(path), data_file) for (path, _, _), data_file in zip(stamps, info.files)
    )
    dataset = Dataset(
        info=info,
        train_x=_images_to_tensor(_parse_idx(train_images, info.train_images.name), info),
        train_y=_labels_to_tensor(_parse_idx(train_labels, info.train_labels.name)),
        test_x=_images_to_tensor(_parse_idx(test_images, info.test_images.name), info),
        test_y=_labels_to_tensor(_parse_idx(test_labels, info.test_labels.name)),
    )
    if len(dataset.train_x) != len(dataset.train_y) or len(dataset.test_x) != len(dataset.test_y):
        raise DatasetIntegrityError(f"{name}: image and label files disagree on the number of samples")
    logger.info("loaded %s: %d train, %d test samples", name, len(dataset.train_y), len(dataset.test_y))
    return dataset


def _find_file(directory: Path, data_file: DataFile) -> Path | None:
    for candidate in (directory / data_file.name, directory / f"{data_file.name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _read_verified(path: Path, data_file: DataFile, compressed: bool | None = None) -> bytes:
    """Return the decompressed content of ``path`` after checking its md5."""
    if compressed is None:
        compressed = path.suffix == ".gz"
    try:
        raw = path.read_bytes()
        content = gzip.decompress(raw) if compressed else raw
    except (OSError, EOFError, zlib.error) as error:
        raise DatasetIntegrityError(
            f"{path} is corrupted ({error}); delete it and run again to download it, "
            f"or replace it with the original {data_file.name}.gz"
        ) from error
    digest = hashlib.md5(content).hexdigest()
    if digest != data_file.md5:
        raise DatasetIntegrityError(
            f"{path} is corrupted: md5 of its decompressed content is {digest}, expected {data_file.md5}; "
            f"delete it and run again to download it, or replace it with the original {data_file.name}.gz"
        )
    return content


def _parse_idx(content: bytes, name: str) -> np.ndarray:
    """Parse an IDX file of unsigned bytes into an array of its declared shape."""
    if len(content) < 4:
        raise DatasetIntegrityError(f"{name}: too short for an IDX header")
    zero, dtype_code, num_dims = struct.unpack(">HBB", content[:4])
    if zero != 0 or dtype_code != 0x08:
        raise DatasetIntegrityError(f"{name}: not an IDX file of unsigned bytes")
    shape = struct.unpack(f">{num_dims}I", content[4 : 4 + 4 * num_dims])
    data = np.frombuffer(content, dtype=np.uint8, offset=4 + 4 * num_dims)
    if data.size != int(np.prod(shape)):
        raise DatasetIntegrityError(f"{name}: header declares shape {shape} but holds {data.size} values")
    return data.reshape(shape)


def _images_to_tensor(images: np.ndarray, info: DatasetInfo) -> torch.Tensor:
    # (N, H, W) uint8 -> (N, C, H, W) float32, normalised
    pixels = torch.from_numpy(images.astype(np.float32)).div_(255.0)
    pixels = pixels.reshape(len(images), *info.input_shape)
    return pixels.sub_(info.mean).div_(info.std)


def _labels_to_tensor(labels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(labels.astype(np.int64))


def _missing_message(info: DatasetInfo, directory: Path, missing: list[DataFile], reason: str) -> str:
    wanted = "\n".join(f"  {directory / f.name}.gz  (or uncompressed {f.name})" for f in missing)
    return (
        f"{info.name} files not found ({reason}). Put these files there:\n{wanted}\n"
        f"or set {DATA_DIR_VARIABLE} to a directory whose {info.directory}/ subdirectory holds them. "
        f"They are served at {' and '.join(info.mirrors)}."
    )


def _download(info: DatasetInfo, directory: Path, missing: list[DataFile]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for data_file in missing:
        target = directory / f"{data_file.name}.gz"
        errors = []
        for mirror in info.mirrors:
            url = f"{mirror}{data_file.name}.gz"
            try:
                _fetch(url, target, data_file)
                break
            except (OSError, urllib.error.URLError, DatasetIntegrityError) as error:
                logger.warning("download of %s failed: %s", url, error)
                errors.append(f"{url}: {error}")
        else:
            reason = "download failed: " + "; ".join(errors)
            raise DatasetMissingError(_missing_message(info, directory, missing, reason=reason))


def _fetch(url: str, target: Path, data_file: DataFile) -> None:
    """Download ``url`` to ``target`` (atomically) with a progress bar, then verify it.

    The bar is tqdm's when tqdm is installed (the stack has it; the library does
    not depend on it), else progress is logged every 25%.
    """
    partial = target.with_name(target.name + ".part")
    logger.info("downloading %s", url)
    try:
        with urllib.request.urlopen(url, timeout=30) as response, open(partial, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0)
            with _progress(data_file.name, total) as advance:
                while chunk := response.read(1 << 16):
                    out.write(chunk)
                    advance(len(chunk))
        _read_verified(partial, data_file, compressed=True)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    partial.replace(target)


@contextlib.contextmanager
def _progress(name: str, total_bytes: int) -> Iterator[Callable[[int], None]]:
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is not None:
        with tqdm(total=total_bytes or None, unit="B", unit_scale=True, desc=name, leave=False) as bar:
            yield bar.update
        return
    received, next_report = 0, 0.25

    def advance(num_bytes: int) -> None:
        nonlocal received, next_report
        received += num_bytes
        if total_bytes and received / total_bytes >= next_report:
            logger.info("%s: %d%% of %.1f MB", name, 100 * received // total_bytes, total_bytes / 1e6)
            next_report += 0.25

    yield advance
