"""Parsers of the distributed binary formats: IDX (MNIST, Fashion-MNIST) and CIFAR's binary version.

Neither executes anything from the files: IDX is a header plus bytes, and the
CIFAR archives are read member by member from the tar (never extracted, never
unpickled: the binary distribution has no pickle).
"""

from __future__ import annotations

import io
import struct
import tarfile
from collections.abc import Sequence

import numpy as np

from fedland.datasets._files import DatasetIntegrityError

CIFAR_IMAGE_BYTES = 3 * 32 * 32  # 1024 red, 1024 green, 1024 blue values, rows top to bottom


def parse_idx(content: bytes, name: str) -> np.ndarray:
    """Parse an IDX file of unsigned bytes into an array of its declared shape."""
    if len(content) < 4:
        raise DatasetIntegrityError(f"{name}: too short for an IDX header")
    zero, dtype_code, num_dims = struct.unpack(">HBB", content[:4])
    if zero != 0 or dtype_code != 0x08:
        raise DatasetIntegrityError(f"{name}: not an IDX file of unsigned bytes")
    if len(content) < 4 + 4 * num_dims:
        raise DatasetIntegrityError(f"{name}: too short for its {num_dims} IDX dimensions")
    shape = struct.unpack(f">{num_dims}I", content[4 : 4 + 4 * num_dims])
    data = np.frombuffer(content, dtype=np.uint8, offset=4 + 4 * num_dims)
    if data.size != int(np.prod(shape)):
        raise DatasetIntegrityError(f"{name}: header declares shape {shape} but holds {data.size} values")
    return data.reshape(shape)


def tar_members(content: bytes, name: str, members: Sequence[str]) -> list[bytes]:
    """The bytes of the named regular-file members of a (gzip-compressed) tar archive, in order.

    Raises:
        DatasetIntegrityError: the archive is unreadable or lacks a member.
    """
    try:
        with tarfile.open(fileobj=io.BytesIO(content), mode="r:*") as archive:
            out = []
            for member_name in members:
                try:
                    member = archive.getmember(member_name)
                except KeyError:
                    raise DatasetIntegrityError(f"{name}: the archive has no member {member_name}") from None
                handle = archive.extractfile(member) if member.isfile() else None
                if handle is None:
                    raise DatasetIntegrityError(f"{name}: member {member_name} is not a regular file")
                out.append(handle.read())
            return out
    except (tarfile.TarError, EOFError, OSError) as error:
        raise DatasetIntegrityError(f"{name}: not a readable tar archive ({error})") from error


def parse_cifar(records: Sequence[bytes], label_bytes: int, num_classes: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Images ``(N, 3, 32, 32)`` uint8 and labels ``(N,)`` from CIFAR binary batches.

    Each record is ``label_bytes`` label bytes (CIFAR-10: the class; CIFAR-100:
    the coarse then the fine label, of which the last is used) followed by the
    3072 pixel bytes of one image (channel, row, column order).
    """
    record = label_bytes + CIFAR_IMAGE_BYTES
    images, labels = [], []
    for index, content in enumerate(records):
        if len(content) == 0 or len(content) % record != 0:
            raise DatasetIntegrityError(
                f"{name}: batch {index} holds {len(content)} bytes, not a multiple of the {record}-byte record"
            )
        table = np.frombuffer(content, dtype=np.uint8).reshape(-1, record)
        labels.append(table[:, label_bytes - 1])
        images.append(table[:, label_bytes:].reshape(-1, 3, 32, 32))
    label_array = np.concatenate(labels)
    if label_array.size and int(label_array.max()) >= num_classes:
        raise DatasetIntegrityError(f"{name}: label {int(label_array.max())} is not below {num_classes} classes")
    return np.concatenate(images), label_array
