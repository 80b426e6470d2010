"""`python -m reports [EXPERIMENT_ID ...] [--watch] [--out DIR]`: the reports in a process of their own.

The launcher starts it with ``--watch`` once the experiments are queued, so no
figure is ever drawn in the launcher's process; ``python main.py report`` runs
the same ``report_main`` in the foreground. Configuration from the environment
(``FEDLAND_MONGO_URI``/``FEDLAND_STORE_DIR``, ``FEDLAND_DB``, ``FEDLAND_DATA_DIR``,
``FEDLAND_TORCH_THREADS``, ``FEDLAND_LOG_LEVEL``). Exit status: 0 when the final
state is on disk, 2 for a bad id or store, 130/143 when stopped by SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from reports import report_main
from stack.settings import DEFAULT_REPORTS_DIR, LauncherSettings, configure_logging, use_workspace


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reports", description=__doc__.splitlines()[0])
    parser.add_argument("experiment_ids", nargs="*", metavar="EXPERIMENT_ID")
    parser.add_argument("--out", type=Path, default=DEFAULT_REPORTS_DIR, help="output directory")
    parser.add_argument("--watch", action="store_true", help="re-render as rounds land until the experiments end")
    parser.add_argument("--poll-interval", type=float, default=2.0, metavar="S",
                        help="seconds between two looks at the store while watching (default 2)")
    args = parser.parse_args(argv)
    try:
        settings = LauncherSettings.from_env(os.environ)
        use_workspace(settings.workspace)
        threads = int(os.environ.get("FEDLAND_TORCH_THREADS", "1"))
    except ValueError as error:
        print(f"reports: bad configuration: {error}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, tag=f"[reports {os.getpid()}] ")
    for chatty in ("fontTools", "fedland.slices"):  # PDF font subsetting; per-row progress of loss slices
        logging.getLogger(chatty).setLevel(max(logging.WARNING, logging.getLogger().level))
    return report_main(args.experiment_ids, settings.store, args.out, data_dir=settings.data_dir, watch=args.watch,
                       poll_interval_s=args.poll_interval, torch_threads=max(1, threads))


if __name__ == "__main__":
    sys.exit(main())
