"""The local launcher behind `python main.py`: store, server and clients on this machine.

`run` validates every experiment, starts what is missing (an embedded nx-27017
unless a MongoDB URI is given, then `python -m server` and N `python -m client`),
queues the experiments, shows progress, prints a summary and tears it all down.
With `--server URL` it only queues the experiments on a running stack.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import random
import secrets
import signal
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from stack.api_client import ApiError, Transport
from fedland.datasets import load_dataset
from fedland.spec import ExperimentSpec, SpecError, load_specs
from server.strategies import validate_strategy
from stack.embedded import EmbeddedMongo, free_port
from launch.processes import Child, child_env, start_clients, start_server, stop_all, wait_healthy
from launch.progress import Progress, summary_table

log = logging.getLogger(__name__)

COMMANDS = ("run", "report", "export")
DONE = ("finished", "failed")


@dataclasses.dataclass(frozen=True)
class RunOptions:
    clients: int | None = None  # None: the largest num_clients of the experiments
    rounds: int | None = None  # override every experiment's rounds
    server_url: str | None = None  # queue on a running stack and return
    store_uri: str | None = None  # None: FEDLAND_MONGO_URI, else an embedded store
    store_dir: Path = Path("./data/store")
    log_dir: Path = Path("./data/logs")
    poll_interval_s: float = 1.0
    show_progress: bool = True
    reports_dir: Path | None = Path("data/reports")  # None: no reports (live and at the end of the run)


def prepare(specs: Sequence[ExperimentSpec], rounds: int | None, only: str | None) -> list[ExperimentSpec]:
    """Filter by `only` (a substring of the description), override rounds, and validate all.

    Raises ValueError listing every invalid experiment; nothing is submitted then.
    """
    chosen = [s for s in specs if only is None or only.lower() in _description(s).lower()]
    if not chosen:
        raise ValueError(f"no experiment matches --only {only!r}" if only else "no experiments given")
    valid: list[ExperimentSpec] = []
    errors: list[str] = []
    for position, spec in enumerate(chosen):
        data = spec.to_dict()
        if rounds is not None:
            data["rounds"] = rounds
        try:
            spec = ExperimentSpec.from_dict(data)
            validate_strategy(spec.strategy)  # the server's rule for strategy parameters
            valid.append(spec)
        except SpecError as error:
            errors.append(f"experiment {position} ({_description(spec)!r}): {error}")
    if errors:
        raise ValueError("invalid experiments, nothing submitted:\n  " + "\n  ".join(errors))
    return valid


def _description(spec: ExperimentSpec) -> str:
    return str(getattr(spec, "description", "") or "")


def make_transport(url: str, token: str, stop: threading.Event | None = None) -> Transport:
    return Transport(url, token, stop=stop or threading.Event(), rng=random.Random(), max_attempts=5)


def queue_only(specs: Sequence[ExperimentSpec], server_url: str, env: Mapping[str, str]) -> int:
    """Submit `specs` to a running server (token from FEDLAND_TOKEN); print their ids."""
    token = env.get("FEDLAND_TOKEN", "").strip()
    if not token:
        raise ValueError("FEDLAND_TOKEN must be set to queue experiments on --server")
    transport = make_transport(server_url, token)
    try:
        ids = transport.submit_experiments([spec.to_dict() for spec in specs])
    finally:
        transport.close()
    for experiment_id, spec in zip(ids, specs):
        print(f"queued {experiment_id}  {_description(spec)}")
    return 0


class LocalRun:
    """Store, server and clients on this machine for the duration of one `run`."""

    def __init__(self, options: RunOptions, env: Mapping[str, str]) -> None:
        self.options = options
        self.env = dict(env)
        self.token = secrets.token_urlsafe(24)
        self.store: EmbeddedMongo | None = None
        self.server: Child | None = None
        self.clients: list[Child] = []
        self.url = ""
        self.store_uri = ""

    def start(self, num_clients: int) -> None:
        uri = self.options.store_uri or self.env.get("FEDLAND_MONGO_URI", "").strip() or None
        if uri is None:
            self.store = EmbeddedMongo(self.options.store_dir)
            uri = self.store.start()
        self.store_uri = uri
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        server_env = child_env(
            self.env,
            FEDLAND_MONGO_URI=uri,
            FEDLAND_TOKEN=self.token,
            FEDLAND_HOST="127.0.0.1",
            FEDLAND_PORT=str(port),
        )
        self.server = start_server(server_env, self.options.log_dir / "server.log")
        wait_healthy(self.server, self.url, self.token)
        client_env = child_env(self.env, FEDLAND_SERVER_URL=self.url, FEDLAND_TOKEN=self.token)
        client_env.pop("FEDLAND_MONGO_URI", None)
        self.clients = start_clients(num_clients, client_env, self.options.log_dir)
        log.info("server %s, %d clients, logs in %s", self.url, num_clients, self.options.log_dir)

    def stop(self) -> None:
        stop_all(self.clients)
        self.clients = []
        if self.server is not None:
            self.server.stop()
            self.server = None
        if self.store is not None:
            self.store.stop()
            self.store = None


class LiveReports:
    """Re-renders the reports of a run's experiments on a background thread as their rounds land.

    Leaving the ``with`` block normally waits for the final state (every experiment
    finished or failed) to be rendered; leaving it by an exception stops at once.
    """

    def __init__(self, store_uri: str, env: Mapping[str, str], ids: Sequence[str], reports_dir: Path) -> None:
        self.stop_event = threading.Event()
        self._args = (store_uri, env, list(ids), reports_dir)
        self._thread = threading.Thread(target=self._run, name="live-reports", daemon=True)
        self.index: Path | None = None  # the index page, once the final state is rendered

    def __enter__(self) -> LiveReports:
        self._thread.start()
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is not None:  # interrupted or failed: stop now; else let it render the final state
            self.stop_event.set()
        self._thread.join()

    def _run(self) -> None:
        import pymongo

        from reports import watch_reports

        store_uri, env, ids, reports_dir = self._args
        client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(
            store_uri, serverSelectionTimeoutMS=10_000, connectTimeoutMS=10_000, socketTimeoutMS=60_000)
        try:
            db = client[env.get("FEDLAND_DB", "").strip() or "fedland"]
            self.index = watch_reports(db, ids, reports_dir, self.stop_event, poll_interval_s=2.0)
        except Exception:  # noqa: BLE001 - a failed live render must not stop the run; the final one reports
            log.exception("live reports stopped")
        finally:
            client.close()


def watch(
    transport: Transport,
    ids: Sequence[str],
    local: LocalRun,
    poll_interval_s: float,
    progress: Progress,
) -> dict[str, dict[str, Any]]:
    """Poll the server until every experiment in `ids` is finished or failed; return their documents."""
    wanted = set(ids)
    while True:
        if local.server is not None and not local.server.alive():
            raise RuntimeError(f"server exited; log {local.server.log_path}:\n{local.server.log_tail()}")
        if local.clients and not any(c.alive() for c in local.clients):
            raise RuntimeError(f"all clients exited; see {local.options.log_dir}")
        summaries = {e["id"]: e for e in transport.list_experiments() if e["id"] in wanted}
        progress.update(summaries)
        if len(summaries) == len(wanted) and all(e["status"] in DONE for e in summaries.values()):
            return {experiment_id: transport.get_experiment(experiment_id) for experiment_id in ids}
        time.sleep(poll_interval_s)


def write_run_reports(
    store_uri: str, env: Mapping[str, str], ids: Sequence[str], reports_dir: Path | None
) -> Path | None:
    """Write the reports of this run's experiments while the store is still up; the index page."""
    if reports_dir is None:
        return None
    import pymongo

    from reports import write_reports

    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(store_uri, serverSelectionTimeoutMS=10_000)
    try:
        return write_reports(client[env.get("FEDLAND_DB", "").strip() or "fedland"], list(ids), reports_dir)
    finally:
        client.close()


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # SIGTERM tears down like Ctrl-C


def run_local(specs: Sequence[ExperimentSpec], options: RunOptions, env: Mapping[str, str]) -> int:
    """Run `specs` on a local stack; 0 if every experiment finished, 130 if interrupted."""
    data_dir = Path(env.get("FEDLAND_DATA_DIR", "").strip() or "./data")
    for name in sorted({spec.dataset_name for spec in specs}):
        try:
            load_dataset(name, data_dir)  # download once here, not in every client at the same time
        except (OSError, ValueError) as error:  # missing (and not downloadable) or corrupted files
            print(f"error: {error}", file=sys.stderr)
            return 2
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    num_clients = options.clients or max(spec.num_clients for spec in specs)
    local = LocalRun(options, env)
    started = time.monotonic()
    try:
        local.start(num_clients)
        transport = make_transport(local.url, local.token)
        earlier = [e for e in transport.list_experiments() if e["status"] not in DONE]
        if earlier:
            log.warning("%d unfinished experiments from earlier runs are queued ahead of these", len(earlier))
        ids = transport.submit_experiments([spec.to_dict() for spec in specs])
        live: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
        if options.reports_dir is not None:
            live = LiveReports(local.store_uri, env, ids, options.reports_dir)
            log.info("live reports: %s (pages reload while experiments run)", options.reports_dir.resolve() / "index.html")
        with Progress(ids, specs, enabled=options.show_progress) as progress:
            with live:
                documents = watch(transport, ids, local, options.poll_interval_s, progress)
        last_rounds = {i: progress.last_round(i) for i in ids}
        transport.close()
        reports = live.index if isinstance(live, LiveReports) else None
        if reports is None:  # the live thread failed: one plain pass
            reports = write_run_reports(local.store_uri, env, ids, options.reports_dir)
    except KeyboardInterrupt:
        print("\ninterrupted: stopping clients, server and store", file=sys.stderr)
        return 130
    except (RuntimeError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    finally:
        local.stop()
    print(summary_table(ids, documents, last_rounds))
    print(f"wall time {time.monotonic() - started:.1f} s; logs in {options.log_dir}")
    if reports is not None:
        print(f"reports: {reports.resolve()}")
    failed = [d for d in documents.values() if d.get("status") != "finished"]
    for doc in failed:
        print(f"experiment {doc.get('id')} {doc.get('status')}: {doc.get('error')}", file=sys.stderr)
    return 0 if not failed else 1


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
    run.add_argument("--reports", metavar="DIR", type=Path, default=Path("data/reports"),
                     help="where to write the reports (default data/reports)")
    run.add_argument("--no-reports", action="store_true", help="no reports, neither live nor at the end")
    report = commands.add_parser("report", help="write PNG/PDF/HTML reports of stored experiments")
    report.add_argument("experiment_ids", nargs="*", metavar="EXPERIMENT_ID", help="default: every finished one")
    report.add_argument("--store-uri", metavar="URI", help="MongoDB URI (default FEDLAND_MONGO_URI, else embedded)")
    report.add_argument("--out", metavar="DIR", type=Path, default=Path("data/reports"), help="output directory")
    report.add_argument("--watch", action="store_true",
                        help="re-render as rounds land until the experiments finish (pages reload themselves)")
    export = commands.add_parser("export", help="write stored results as tidy tables or TensorBoard event files")
    export.add_argument("experiment_ids", nargs="*", metavar="EXPERIMENT_ID", help="default: every experiment")
    export.add_argument("--format", choices=("csv", "parquet", "tensorboard"), default="csv")
    export.add_argument("--out", metavar="DIR", type=Path, default=Path("data/export"), help="output directory")
    export.add_argument("--store-uri", metavar="URI", help="MongoDB URI (default FEDLAND_MONGO_URI, else embedded)")
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
    logging.basicConfig(
        level=env.get("FEDLAND_LOG_LEVEL", "INFO").upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for chatty in ("fontTools", "fedland.slices"):  # PDF font subsetting, per-row slice progress of the reports
        logging.getLogger(chatty).setLevel(max(logging.WARNING, logging.getLogger().level))
    if args.command == "report":
        from reports import report_main

        store_dir = Path(env.get("FEDLAND_STORE_DIR", "").strip() or "./data/store")
        return report_main(args.experiment_ids, args.store_uri, None, args.out, store_dir=store_dir, env=env,
                           watch=args.watch)
    if args.command == "export":
        from reports.tables import export_main

        store_dir = Path(env.get("FEDLAND_STORE_DIR", "").strip() or "./data/store")
        return export_main(args.experiment_ids, args.format, args.out, args.store_uri, store_dir=store_dir, env=env)
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
            return queue_only(specs, args.server, env)
        except (ValueError, ConnectionError, ApiError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2 if isinstance(error, ValueError) else 1
    needed = max(spec.num_clients for spec in specs)
    if args.clients is not None and args.clients < needed:
        print(f"--clients {args.clients}: an experiment needs {needed} clients; it would wait forever", file=sys.stderr)
        return 2
    options = RunOptions(
        clients=args.clients,
        store_uri=args.store_uri,
        store_dir=Path(env.get("FEDLAND_STORE_DIR", "").strip() or "./data/store"),
        log_dir=Path(env.get("FEDLAND_LOG_DIR", "").strip() or "./data/logs"),
        show_progress=not args.no_progress and sys.stderr.isatty(),
        reports_dir=None if args.no_reports else args.reports,
    )
    return run_local(specs, options, env)
