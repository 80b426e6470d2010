"""The compact copy of a dataset: uint8 images and labels as ``.npy`` files, memory-mapped read-only.

A dataset's distributed files are verified and parsed once; the arrays are
written next to them (``<directory>/compact/``), each file atomically, then a
small ``manifest.json`` naming the source files (name, size, mtime) and the
official digests they were verified against. A process opens the arrays with
``np.load(mmap_mode="r")``: every process on the machine shares the same pages
of the page cache instead of holding its own copy (a data directory that is
read-only, or marked so, gets none: each process then keeps its own uint8
arrays in memory). A source file replaced or
touched since (another size or mtime) makes the copy stale, and it is rebuilt
from the verified files.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np

logger = logging.getLogger("fedland.datasets")

COMPACT_DIRECTORY = "compact"
MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
ARRAY_NAMES = ("train_images", "train_labels", "test_images", "test_labels")


@dataclass(frozen=True)
class SourceFile:
    """A distributed file a compact copy was made from, and the official digest it matched."""

    name: str
    size: int
    mtime_ns: int
    digest: str

    @classmethod
    def of(cls, path: Path, digest: str) -> SourceFile:
        stat = path.stat()
        return cls(path.name, stat.st_size, stat.st_mtime_ns, digest)


@dataclass(frozen=True, eq=False)
class Arrays:
    """A dataset's uint8 images ``(N, C, H, W)`` and uint8 labels ``(N,)``, memory-mapped or in memory."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray

    def named(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in ARRAY_NAMES}


def compact_directory(directory: Path) -> Path:
    """Where the compact copy of the dataset in ``directory`` lives."""
    return directory / COMPACT_DIRECTORY


def open_compact(
    directory: Path, dataset_name: str, sources: Sequence[SourceFile], input_shape: tuple[int, int, int]
) -> Arrays | None:
    """The memory-mapped arrays when the compact copy exists and was made from exactly ``sources``, else None."""
    target = compact_directory(directory)
    try:
        manifest = json.loads((target / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None
    expected = {
        "format": FORMAT_VERSION,
        "dataset": dataset_name,
        "sources": [source.__dict__ for source in sources],
    }
    if not isinstance(manifest, dict) or any(manifest.get(key) != value for key, value in expected.items()):
        return None
    try:
        arrays = Arrays(**{name: np.load(target / f"{name}.npy", mmap_mode="r") for name in ARRAY_NAMES})
    except (OSError, ValueError) as error:
        logger.warning("%s: the compact copy is unreadable (%s); rebuilding it", target, error)
        return None
    if not _consistent(arrays, input_shape) or manifest.get("shapes") != _shapes(arrays):
        logger.warning("%s: the compact copy disagrees with its manifest; rebuilding it", target)
        return None
    return arrays


def write_compact(directory: Path, dataset_name: str, sources: Sequence[SourceFile], arrays: Arrays) -> Arrays | None:
    """Write ``arrays`` as the compact copy, then reopen it memory-mapped; None if the directory is read-only."""
    target = compact_directory(directory)
    try:
        if not writable(directory):
            raise PermissionError(f"{directory} is read-only")
        target.mkdir(exist_ok=True)
        for name, array in arrays.named().items():
            _write_atomically(target / f"{name}.npy", functools.partial(_save_npy, array=array))
        manifest = {
            "format": FORMAT_VERSION,
            "dataset": dataset_name,
            "sources": [source.__dict__ for source in sources],
            "shapes": _shapes(arrays),
        }
        text = json.dumps(manifest, indent=1).encode()
        _write_atomically(target / MANIFEST_NAME, lambda handle: handle.write(text))
    except OSError as error:
        logger.warning(
            "%s: cannot write the compact copy (%s); this process keeps a private copy in memory. "
            "Install the dataset into a writable data directory (python -m stack.fetch_data --from DIR) "
            "so that every process shares one copy",
            target,
            error,
        )
        return None
    logger.info("%s: wrote the compact copy of %s", target, dataset_name)
    return Arrays(**{name: np.load(target / f"{name}.npy", mmap_mode="r") for name in ARRAY_NAMES})


def writable(directory: Path) -> bool:
    """Whether the compact copy may be written in ``directory``: writable, and not marked read-only.

    A directory whose mode has no write bit is left alone even by root (who
    could write it regardless): a shared, read-only copy of the data stays as it is.
    """
    try:
        mode = directory.stat().st_mode
    except OSError:
        return False
    return bool(mode & 0o222) and os.access(directory, os.W_OK)


def _write_atomically(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    handle = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".part", delete=False)
    try:
        with handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(handle.name, 0o644)
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise


def _save_npy(handle: IO[bytes], array: np.ndarray) -> None:
    np.save(handle, array, allow_pickle=False)


def _shapes(arrays: Arrays) -> dict[str, list[int]]:
    return {name: list(array.shape) for name, array in arrays.named().items()}


def _consistent(arrays: Arrays, input_shape: tuple[int, int, int]) -> bool:
    return (
        all(array.dtype == np.uint8 for array in arrays.named().values())
        and arrays.train_images.shape[1:] == input_shape
        and arrays.test_images.shape[1:] == input_shape
        and arrays.train_images.shape[0] == arrays.train_labels.shape[0]
        and arrays.test_images.shape[0] == arrays.test_labels.shape[0]
    )
