"""The command line of `python main.py`: run experiments (launch/), write reports (reports/).

The one place that composes the launcher and the reports; neither imports the other.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedland.spec import ExperimentSpec, load_specs
from launch.launcher import RunOptions, prepare, queue_only, run_local
from stack.api_client import ApiError
from stack.settings import LauncherSettings, configure_logging

COMMANDS = ("run", "report")


def write_run_reports(reports_dir: Path, store_uri: str, db_name: str, ids: list[str]) -> Path:
    """Write the reports of a run's experiments while its store is still up; returns the index page."""
    import pymongo

    from reports import write_reports

    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(store_uri, serverSelectionTimeoutMS=10_000)
    try:
        return write_reports(client[db_name], ids, reports_dir)
    finally:
        client.close()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="main.py",
        description="Run fedland experiments (`run` is the default command).",
        epilog="See `python main.py run --help` for the options of a run.",
    )
    commands = parser.add_subparsers(dest="command")
    run = commands.add_parser("run", help="run the experiments (default)")
    run.add_argument("--clients", type=int, help="client processes (default: the most any experiment needs)")
    run.add_argument("--rounds", type=int, help="override every experiment's rounds (quick runs)")
    run.add_argument("--server", metavar="URL", help="only queue the experiments on this running server")
    run.add_argument("--store-uri", metavar="URI", help="MongoDB URI (default FEDLAND_MONGO_URI, else embedded)")
    run.add_argument("--experiments", metavar="FILE", type=Path, help="JSON/TOML experiments instead of main.py's")
    run.add_argument("--only", metavar="TEXT", help="only experiments whose description contains TEXT")
    run.add_argument("--no-progress", action="store_true", help="log lines instead of progress bars")
    run.add_argument("--reports", metavar="DIR", type=Path, default=Path("reports"), help="where to write reports")
    run.add_argument("--no-reports", action="store_true", help="skip the reports at the end of the run")
    report = commands.add_parser("report", help="write PNG/HTML reports of stored experiments")
    report.add_argument("experiment_ids", nargs="*", metavar="EXPERIMENT_ID", help="default: every finished one")
    report.add_argument("--store-uri", metavar="URI", help="MongoDB URI (default FEDLAND_MONGO_URI, else embedded)")
    report.add_argument("--out", metavar="DIR", type=Path, default=Path("reports"), help="output directory")
    return parser


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
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    if args.command == "report":
        from reports import report_main

        return report_main(args.experiment_ids, settings.store, args.out)
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
            return queue_only(specs, args.server, settings.token)
        except (ValueError, ConnectionError, ApiError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2 if isinstance(error, ValueError) else 1
    needed = max(spec.num_clients for spec in specs)
    if args.clients is not None and args.clients < needed:
        print(f"--clients {args.clients}: an experiment needs {needed} clients; it would wait forever", file=sys.stderr)
        return 2
    reports_dir = None if args.no_reports else args.reports
    options = RunOptions(
        clients=args.clients,
        store=settings.store,
        log_dir=settings.log_dir,
        show_progress=not args.no_progress and sys.stderr.isatty(),
    )
    def finish(store_uri: str, db_name: str, ids: list[str]) -> Path | None:
        return None if reports_dir is None else write_run_reports(reports_dir, store_uri, db_name, ids)

    return run_local(specs, options, env, settings.data_dir, finish)
