"""Finding, verifying and downloading dataset files (md5-checked, atomic, with a progress bar)."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import logging
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger("fedland.datasets")


class DatasetMissingError(FileNotFoundError):
    """The dataset files are absent and could not be downloaded."""


class DatasetIntegrityError(ValueError):
    """A dataset file exists but is corrupted (bad gzip, bad checksum, bad header)."""


@dataclass(frozen=True)
class DataFile:
    """One distributed file: its name (without ``.gz`` when gzip-served) and its md5 digests.

    ``md5`` is the digest of the decompressed content (so a gunzipped copy also
    verifies), ``archive_md5`` the digest of the file as served. At least one is
    given; when only ``archive_md5`` is known the file is accepted only in its
    served form. ``gzipped`` files are served as ``<name>.gz``; others (a
    ``.tar.gz`` archive) as ``<name>`` and read as they are.
    """

    name: str
    md5: str | None = None
    archive_md5: str | None = None
    gzipped: bool = True

    @property
    def served_name(self) -> str:
        return f"{self.name}.gz" if self.gzipped else self.name

    def candidates(self, directory: Path) -> tuple[Path, ...]:
        """The paths this file may have under ``directory``, in order of preference."""
        if not self.gzipped:
            return (directory / self.name,)
        raw = (directory / self.name,) if self.md5 is not None else ()
        return (*raw, directory / self.served_name)


def find_file(directory: Path, data_file: DataFile) -> Path | None:
    """The first existing candidate path of ``data_file`` under ``directory``, or None."""
    for candidate in data_file.candidates(directory):
        if candidate.is_file():
            return candidate
    return None


def read_verified(path: Path, data_file: DataFile, compressed: bool | None = None, *, as_served: bool = False) -> bytes:
    """Return the content of ``path`` (decompressed when gzipped) after checking it is the official one.

    A gzip file is accepted when its decompressed content has the official
    content md5 (``md5``), whatever its own bytes (a re-compressed copy, such as
    Debian's ``dataset-fashion-mnist``), or when it is the file as published
    (``archive_md5``). ``as_served`` (a download) asks for the published file's
    own md5 when it is known. ``compressed`` defaults to: the file is
    gzip-served and ``path`` ends in ``.gz``.

    Raises:
        DatasetIntegrityError: unreadable, not gzip, or not the official content; names the file and the fix.
    """
    if compressed is None:
        compressed = data_file.gzipped and path.name.endswith(".gz")
    try:
        raw = path.read_bytes()
        content = gzip.decompress(raw) if compressed else raw
    except (OSError, EOFError, zlib.error, gzip.BadGzipFile) as error:
        raise DatasetIntegrityError(f"{path} is corrupted ({error}); {_fix(data_file)}") from error
    archive_digest = hashlib.md5(raw).hexdigest() if data_file.archive_md5 is not None else None
    if as_served and archive_digest is not None and archive_digest != data_file.archive_md5:
        raise DatasetIntegrityError(
            f"{path} is not the official {data_file.served_name}: its md5 is {archive_digest}, "
            f"expected {data_file.archive_md5}"
        )
    if data_file.md5 is not None:
        content_digest = archive_digest if content is raw and archive_digest else hashlib.md5(content).hexdigest()
        if content_digest == data_file.md5:
            return content
        if compressed and archive_digest is not None and archive_digest == data_file.archive_md5:
            return content  # the published .gz itself (its content digest is then the official one too)
        which = "its decompressed content's" if compressed else "its"
        raise DatasetIntegrityError(
            f"{path} is not the official {data_file.name}: {which} md5 is {content_digest}, "
            f"expected {data_file.md5}; {_fix(data_file)}"
        )
    if data_file.archive_md5 is not None and archive_digest != data_file.archive_md5:
        raise DatasetIntegrityError(
            f"{path} is not the official {data_file.served_name}: its md5 is {archive_digest}, "
            f"expected {data_file.archive_md5}; {_fix(data_file)}"
        )
    return content


def check_verified(path: Path, data_file: DataFile) -> None:
    """Check ``path`` as ``read_verified`` does, streaming it: no more than a chunk is held in memory.

    Raises:
        DatasetIntegrityError: as ``read_verified``.
    """
    compressed = data_file.gzipped and path.name.endswith(".gz")
    raw_md5, content_md5 = hashlib.md5(), hashlib.md5()
    try:
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                raw_md5.update(chunk)
        if compressed:
            with gzip.open(path, "rb") as stream:
                for chunk in iter(lambda: stream.read(1 << 20), b""):
                    content_md5.update(chunk)
    except (OSError, EOFError, zlib.error, gzip.BadGzipFile) as error:
        raise DatasetIntegrityError(f"{path} is corrupted ({error}); {_fix(data_file)}") from error
    archive_digest = raw_md5.hexdigest()
    content_digest = content_md5.hexdigest() if compressed else archive_digest
    if data_file.md5 is not None:
        if content_digest == data_file.md5 or (compressed and archive_digest == data_file.archive_md5):
            return
        which = "its decompressed content's" if compressed else "its"
        raise DatasetIntegrityError(
            f"{path} is not the official {data_file.name}: {which} md5 is {content_digest}, "
            f"expected {data_file.md5}; {_fix(data_file)}"
        )
    if data_file.archive_md5 is not None and archive_digest != data_file.archive_md5:
        raise DatasetIntegrityError(
            f"{path} is not the official {data_file.served_name}: its md5 is {archive_digest}, "
            f"expected {data_file.archive_md5}; {_fix(data_file)}"
        )


def _fix(data_file: DataFile) -> str:
    return (
        f"replace it with an official copy of {data_file.served_name} "
        f"(`python -m stack.fetch_data --from DIR` installs one from a folder), or delete it to download it again"
    )


def content_digest(data_file: DataFile) -> str:
    """The digest a verified file is recorded under: the official content md5, else the published file's."""
    digest = data_file.md5 or data_file.archive_md5
    if digest is None:
        raise ValueError(f"files: {data_file.name} has neither an md5 nor an archive_md5")
    return digest


def download(
    files: Sequence[DataFile], directory: Path, mirrors: Sequence[str], on_failure: Callable[[str], str]
) -> None:
    """Fetch each file from the first mirror that serves it intact, into ``directory``.

    Raises:
        DatasetMissingError: no mirror served a file; ``on_failure(reason)`` is the message.
    """
    directory.mkdir(parents=True, exist_ok=True)
    for data_file in files:
        target = directory / data_file.served_name
        errors = []
        for mirror in mirrors:
            url = f"{mirror}{data_file.served_name}"
            try:
                fetch(url, target, data_file)
                break
            except (OSError, urllib.error.URLError, DatasetIntegrityError) as error:
                logger.warning("download of %s failed: %s", url, error)
                errors.append(f"{url}: {error}")
        else:
            raise DatasetMissingError(on_failure("download failed: " + "; ".join(errors)))


def fetch(url: str, target: Path, data_file: DataFile) -> None:
    """Download ``url`` to ``target`` (atomically) with a progress bar, then verify it.

    The bar is tqdm's when tqdm is installed (the stack has it; the library does
    not depend on it), else progress is logged every 25%.
    """
    partial = target.with_name(target.name + ".part")
    logger.info("downloading %s", url)
    try:
        with urllib.request.urlopen(url, timeout=30) as response, open(partial, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0)
            with _progress(data_file.served_name, total) as advance:
                while chunk := response.read(1 << 16):
                    out.write(chunk)
                    advance(len(chunk))
        read_verified(partial, data_file, compressed=data_file.gzipped, as_served=True)
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
