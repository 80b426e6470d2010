"""`python -m stack.fetch_data`: make sure the datasets are in FEDLAND_DATA_DIR, verified and converted once.

Downloads what is absent (checksum-verified), verifies what is present by
content and writes each dataset's compact copy (uint8 arrays every process
memory-maps), then exits 0; any missing or corrupted file exits 1 with a
message naming it. `--dataset MNIST|FashionMNIST|CIFAR10|CIFAR100`
(repeatable), else FEDLAND_DATASETS (comma-separated; default MNIST).
`--from DIR` installs a local copy instead (offline): the official files found
in DIR or DIR/<dataset directory> (every supported dataset found there, or the
`--dataset`s named) are verified, copied into the data directory and converted.
The Compose stack runs it once (service `data-init`) so that the server and the
clients share one read-only copy instead of each downloading it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from fedland.datasets import (
    DATASETS,
    DatasetIntegrityError,
    DatasetMissingError,
    install_dataset,
    load_dataset,
    verify_dataset,
)
from stack.settings import DataSettings, configure_logging

log = logging.getLogger("stack.fetch_data")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m stack.fetch_data", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dataset",
        action="append",
        choices=sorted(DATASETS),
        help="dataset to fetch (repeatable; default: FEDLAND_DATASETS, else MNIST only: the others are large)",
    )
    parser.add_argument(
        "--no-download", action="store_true", help="only verify: fail if a file is absent instead of downloading it"
    )
    parser.add_argument(
        "--from",
        dest="source",
        type=Path,
        metavar="DIR",
        help="install a local copy: the official files in DIR or DIR/<mnist|fashion-mnist|cifar10|cifar100> "
        "(every dataset found there unless --dataset names some), verified and converted once",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] = os.environ) -> int:
    args = parse_args(argv)
    try:
        settings = DataSettings.from_env(env)
    except ValueError as error:
        print(f"fetch_data: {error}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    data_dir = settings.data_dir
    if args.source is not None:
        return install(args.source, args.dataset, data_dir)
    for name in args.dataset or settings.datasets:
        try:
            verify_dataset(name, data_dir, download=not args.no_download)
            dataset = load_dataset(name, data_dir, download=False)
        except (DatasetMissingError, DatasetIntegrityError) as error:
            log.error("%s", error)
            return 1
        log.info(
            "%s ready in %s: %d train, %d test examples",
            name,
            data_dir / DATASETS[name].directory,
            len(dataset.train_y),
            len(dataset.test_y),
        )
    return 0


def install(source: Path, names: Sequence[str] | None, data_dir: Path) -> int:
    """Install the named datasets (or every one found) from ``source``; 0 if at least one and all named were.

    Without names, a dataset whose files are there but whose content is another's (MNIST and
    Fashion-MNIST share file names) is skipped; with names, any missing or refused file fails.
    """
    if not source.is_dir():
        log.error("--from %s: not a directory", source)
        return 1
    installed, refused = [], []
    for name in names or sorted(DATASETS):
        try:
            target = install_dataset(name, source, data_dir)
        except PermissionError as error:  # a read-only data directory (DatasetMissingError is an OSError too)
            log.error("cannot install %s into %s: %s", name, data_dir, error)
            return 1
        except (DatasetMissingError, DatasetIntegrityError) as error:
            if names:
                log.error("%s", error)
                return 1
            if isinstance(error, DatasetIntegrityError):
                refused.append(f"{name}: {error}")
            continue
        installed.append(name)
        log.info("%s installed in %s (verified, converted)", name, target)
    if not installed:
        log.error(
            "--from %s: no dataset's official files found there (nor in its %s subfolders)%s",
            source,
            ", ".join(f"{info.directory}/" for info in DATASETS.values()),
            "".join(f"\n  {line}" for line in refused),
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
