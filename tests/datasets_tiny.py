"""Tiny datasets in the exact distributed binary formats, written by tests, and their registry entries.

`write_tiny(name, directory)` writes a few images per class of Fashion-MNIST (gzip IDX),
CIFAR-10 or CIFAR-100 (binary tar.gz archives) and returns a `DatasetInfo` equal to the
real one except for the class counts and digests, which describe the written files.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import struct
import tarfile
from pathlib import Path

import numpy as np

from fedland.datasets import CIFAR_MEMBERS, DATASETS, DatasetInfo


def _idx(array: np.ndarray) -> bytes:
    return struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def _labels(per_class: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    return rng.permutation(np.repeat(np.arange(num_classes, dtype=np.uint8), per_class))


def write_tiny(name: str, directory: Path, train_per_class: int = 6, test_per_class: int = 2, seed: int = 0) -> DatasetInfo:
    """Write the tiny `name` dataset under `directory / info.directory` and return its registry entry."""
    real = DATASETS[name]
    rng = np.random.default_rng(seed)
    target = directory / real.directory
    target.mkdir(parents=True, exist_ok=True)
    k = real.num_classes
    train_y, test_y = _labels(train_per_class, k, rng), _labels(test_per_class, k, rng)
    if real.layout == "idx":
        arrays = [
            rng.integers(0, 256, (len(train_y), 28, 28), dtype=np.uint8), train_y,
            rng.integers(0, 256, (len(test_y), 28, 28), dtype=np.uint8), test_y,
        ]
        files = []
        for data_file, array in zip(real.files, arrays):
            content = _idx(array)
            packed = gzip.compress(content, mtime=0)
            (target / data_file.served_name).write_bytes(packed)
            files.append(dataclasses.replace(
                data_file, md5=hashlib.md5(content).hexdigest(), archive_md5=hashlib.md5(packed).hexdigest()
            ))
    else:
        train_members, test_members, label_bytes = CIFAR_MEMBERS[real.layout]
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
            for members, labels in ((train_members, train_y), (test_members, test_y)):
                for member, part in zip(members, np.array_split(np.arange(len(labels)), len(members))):
                    records = bytearray()
                    for index in part:
                        if label_bytes == 2:
                            records.append(int(labels[index]) // 5)  # a coarse label, then the fine one
                        records.append(int(labels[index]))
                        records += rng.integers(0, 256, 3072, dtype=np.uint8).tobytes()
                    info = tarfile.TarInfo(member)
                    info.size = len(records)
                    archive.addfile(info, io.BytesIO(bytes(records)))
        packed = buffer.getvalue()
        (target / real.files[0].name).write_bytes(packed)
        files = [dataclasses.replace(real.files[0], archive_md5=hashlib.md5(packed).hexdigest())]
    return dataclasses.replace(
        real,
        train_class_counts=(train_per_class,) * k,
        test_class_counts=(test_per_class,) * k,
        files=tuple(files),
        mirrors=("http://127.0.0.1:9/",),
    )


def registry_hook(directory: Path, infos: list[DatasetInfo]) -> Path:
    """A `sitecustomize.py` under `directory` that registers `infos` in child processes (PYTHONPATH=directory)."""
    entries = [dataclasses.asdict(info) for info in infos]
    (directory / "tiny_datasets.json").write_text(json.dumps(entries))
    (directory / "sitecustomize.py").write_text(
        "import json, pathlib\n"
        "from fedland.datasets import DATASETS, DataFile, DatasetInfo\n"
        "for entry in json.loads((pathlib.Path(__file__).parent / 'tiny_datasets.json').read_text()):\n"
        "    entry['files'] = tuple(DataFile(**f) for f in entry['files'])\n"
        "    for key in ('input_shape', 'train_class_counts', 'test_class_counts', 'mean', 'std', 'mirrors'):\n"
        "        entry[key] = tuple(entry[key])\n"
        "    DATASETS[entry['name']] = DatasetInfo(**entry)\n"
    )
    return directory
