"""`python -m stack.fetch_data`: make sure the datasets are in FEDLAND_DATA_DIR.

Downloads what is absent (checksum-verified) and verifies what is present, then
exits 0; any missing or corrupted file exits 1 with a message naming it.
`--dataset MNIST|FashionMNIST|CIFAR10|CIFAR100` (repeatable), else FEDLAND_DATASETS
(comma-separated; default MNIST). The
Compose stack runs it once (service `data-init`) so that the server and the
clients share one read-only copy instead of each downloading it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping, Sequence

from fedland.datasets import DATASETS, DatasetIntegrityError, DatasetMissingError, load_dataset
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
    for name in args.dataset or settings.datasets:
        try:
            dataset = load_dataset(name, data_dir, download=not args.no_download)
        except (DatasetMissingError, DatasetIntegrityError) as error:
            log.error("%s", error)
            return 1
        log.info(
            "%s ready in %s: %d train, %d test examples",
            name,
            data_dir / dataset.info.directory,
            len(dataset.train_y),
            len(dataset.test_y),
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
