"""The command line of `python main.py`: run experiments (launch/), write reports (reports/).

The one place that composes the launcher and the reports; neither imports the other.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from fedland.spec import ExperimentSpec, load_specs
from launch.launcher import RunOptions, prepare, queue_only, run_local
from launch.processes import Child, child_env
from stack.api_client import ApiError
from stack.interrupts import exit_status, stop_on_signals
from stack.settings import DEFAULT_REPORTS_DIR, LauncherSettings, StoreSettings, configure_logging, use_workspace

COMMANDS = ("run", "report", "export", "upgrade-store")


#: Once the summary is printed, how long the launcher waits for the report process to draw the final state.
FINAL_REPORTS_WAIT_S = 15.0


class ReportProcess:
    """`python -m reports --watch` beside a run: the pages are drawn in their own process, never the launcher's.

    ``start`` launches it (the launcher stops it with the clients, before the store);
    ``wait_final()`` gives it a bounded time to draw the final state.
    """

    def __init__(self, reports_dir: Path, env: dict[str, str], log_dir: Path,
                 wait_s: float = FINAL_REPORTS_WAIT_S) -> None:
        self.reports_dir = reports_dir
        self.env = env
        self.log_path = log_dir / "reports.log"
        self.wait_s = wait_s
        self.child: Child | None = None

    def start(self, ids: list[str]) -> Child:
        args = ["--watch", "--out", str(self.reports_dir.resolve()), *ids]
        self.child = Child("reports", "reports", self.env, self.log_path, args=args)
        logging.getLogger("cli").info("live reports: %s (log %s)", (self.reports_dir / "index.html").resolve(),
                                      self.log_path)
        return self.child

    def wait_final(self) -> Path | None:
        """The index once the final state is drawn (within ``wait_s``); else None, saying how to finish it."""
        assert self.child is not None
        code = self.child.wait(self.wait_s)
        if code == 0:
            return self.reports_dir / "index.html"
        finish = f"`python main.py report --out {self.reports_dir}`"
        if code is None:
            print(f"reports: the final figures were not all drawn within {self.wait_s:.0f} s; the pages show the "
                  f"last state drawn. Finish them with {finish} (log {self.log_path})", file=sys.stderr)
        else:
            print(f"reports: the report process exited with status {code}; see {self.log_path}. "
                  f"Write them again with {finish}", file=sys.stderr)
        return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="main.py",
        description="Run fedland experiments (`run` is the default command).",
        epilog="See `python main.py run --help` for the options of a run.",
    )
    commands = parser.add_subparsers(dest="command")
    run = commands.add_parser("run", help="run the experiments (default)")
    run.add_argument("--clients", type=int, help="worker (client) processes; any number serves any number of members "
                     "(default: the most members any round trains, at most 4)")
    run.add_argument("--rounds", type=int, help="override every experiment's rounds (quick runs)")
    run.add_argument("--server", metavar="URL", help="only queue the experiments on this running server")
    run.add_argument("--store-uri", metavar="URI", help="MongoDB URI (default FEDLAND_MONGO_URI, else embedded)")
    run.add_argument("--experiments", metavar="FILE", type=Path, help="JSON/TOML experiments instead of main.py's")
    run.add_argument("--only", metavar="TEXT", help="only experiments whose description contains TEXT")
    run.add_argument("--fresh", action="store_true",
                     help="queue every experiment anew (default: resume an identical unfinished one)")
    run.add_argument("--no-progress", action="store_true", help="log lines instead of progress bars")
    run.add_argument("--reports", metavar="DIR", type=Path, default=DEFAULT_REPORTS_DIR,
                     help=f"where to write the reports, live and at the end (default {DEFAULT_REPORTS_DIR})")
    run.add_argument("--no-reports", action="store_true", help="no reports, neither live nor at the end")
    report = commands.add_parser("report", help="write PNG/PDF/HTML reports of stored experiments")
    report.add_argument("experiment_ids", nargs="*", metavar="EXPERIMENT_ID", help="default: every finished one")
    report.add_argument("--store-uri", metavar="URI", help="MongoDB URI (default FEDLAND_MONGO_URI, else embedded)")
    report.add_argument("--out", metavar="DIR", type=Path, default=DEFAULT_REPORTS_DIR, help="output directory")
    report.add_argument("--watch", action="store_true",
                        help="re-render as rounds land until the experiments finish (pages reload themselves)")
    export = commands.add_parser("export", help="write stored results as tidy tables or TensorBoard event files, "
                                 "and the models as safetensors")
    export.add_argument("experiment_ids", nargs="*", metavar="EXPERIMENT_ID", help="default: every experiment")
    export.add_argument("--format", choices=("csv", "parquet", "tensorboard"), default="csv")
    export.add_argument("--out", metavar="DIR", type=Path, default=Path("data/export"), help="output directory")
    export.add_argument("--store-uri", metavar="URI", help="MongoDB URI (default FEDLAND_MONGO_URI, else embedded)")
    export.add_argument("--models", action="store_true",
                        help="also each round's global model (round 0: the initial one) as safetensors, with "
                             "models/manifest.json")
    export.add_argument("--members", action="store_true", help="with --models: the members' stored models too")
    upgrade = commands.add_parser("upgrade-store",
                                  help="upgrade a store written by an earlier release in place, saying what changed")
    upgrade.add_argument("--store-uri", metavar="URI", help="MongoDB URI (default FEDLAND_MONGO_URI, else embedded)")
    return parser


def upgrade_store_main(store: StoreSettings) -> int:
    """`python main.py upgrade-store`: upgrade the store in place and print what changed; returns the exit code."""
    from stack.embedded import open_database
    from stack.records import SchemaError
    from stack.store_upgrade import upgrade_store

    try:
        with open_database(store) as db:
            changes = upgrade_store(db)
    except (FileNotFoundError, SchemaError) as error:
        print(f"upgrade-store: {error}", file=sys.stderr)
        return 2
    where = store.mongo_uri or store.store_dir
    if not changes:
        print(f"the store {store.db_name!r} in {where} is current: nothing to upgrade")
    for line in changes:
        print(f"upgraded {line}")
    return 0


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    argv = list(argv)
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("-h", "--help")):
        argv = ["run", *argv]
    return build_parser().parse_args(argv)


def main(experiments: Sequence[ExperimentSpec], argv: Sequence[str] | None = None) -> int:
    """CLI entry point of main.py; returns the exit code."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    env = os.environ
    try:
        settings = LauncherSettings.from_env(env, mongo_uri=getattr(args, "store_uri", None))
        use_workspace(settings.workspace)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    for chatty in ("fontTools", "fedland.slices"):  # PDF font subsetting; the report's per-row slice progress
        logging.getLogger(chatty).setLevel(max(logging.WARNING, logging.getLogger().level))
    uri = settings.store.mongo_uri
    if uri is not None and not (args.command == "run" and args.server):  # --server: the store is the server's
        from stack.embedded import StoreUnreachable, check_reachable

        try:
            check_reachable(uri)  # a wrong URI is one line now, not a traceback after the store timeouts
        except StoreUnreachable as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    if args.command == "report":
        from reports import report_main

        return report_main(args.experiment_ids, settings.store, args.out, data_dir=settings.data_dir,
                           watch=args.watch)
    if args.command == "export":
        from reports.export import export_main

        if args.members and not args.models:
            print("--members needs --models", file=sys.stderr)
            return 2
        try:
            with stop_on_signals():
                return export_main(args.experiment_ids, args.format, args.out, settings.store, models=args.models,
                                   members=args.members)
        except KeyboardInterrupt as stopped:
            print("export: stopped", file=sys.stderr)
            return exit_status(stopped)
    if args.command == "upgrade-store":
        return upgrade_store_main(settings.store)
    if args.clients is not None and args.clients < 1:
        print("--clients must be >= 1", file=sys.stderr)
        return 2
    try:
        specs = load_specs(args.experiments) if args.experiments else list(experiments)
        specs = prepare(specs, args.rounds, args.only)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.server:
        try:
            return queue_only(specs, args.server, settings.token, fresh=args.fresh)
        except (ValueError, ConnectionError, ApiError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2 if isinstance(error, ValueError) else 1
    reports_dir = None if args.no_reports else args.reports
    options = RunOptions(
        clients=args.clients,
        store=settings.store,
        log_dir=settings.log_dir,
        show_progress=not args.no_progress and sys.stderr.isatty(),
        fresh=args.fresh,
    )
    report_process: list[ReportProcess] = []  # the run's, once started

    def follow(store_uri: str, db_name: str, ids: list[str]) -> list[Child]:
        if reports_dir is None:
            return []
        env = child_env(os.environ, FEDLAND_MONGO_URI=store_uri, FEDLAND_DB=db_name,
                        FEDLAND_DATA_DIR=str(settings.data_dir), FEDLAND_LOG_LEVEL=settings.log_level)
        report_process.append(ReportProcess(reports_dir, env, settings.log_dir))
        return [report_process[0].start(ids)]

    def finish(store_uri: str, db_name: str, ids: list[str]) -> Path | None:
        return report_process[0].wait_final() if report_process else None

    return run_local(specs, options, env, settings.data_dir, finish, follow)
