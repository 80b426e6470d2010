"""The local launcher behind `python main.py`: store, server and clients on this machine.

`run` validates every experiment, starts what is missing (an embedded nx-27017
unless a MongoDB URI is given, then `python -m server` and N `python -m client`),
queues the experiments, shows progress, prints a summary and tears it all down.
With `--server URL` it only queues the experiments on a running stack.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import secrets
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from fedland.components import resolve_dataset
from fedland.replicates import expand_replicates
from fedland.spec import ExperimentSpec, SpecError
from launch.processes import Child, child_env, start_clients, start_server, stop_all, wait_healthy
from launch.progress import Progress, summary_table
from stack.api_client import Transport
from stack.embedded import EmbeddedMongo, free_port
from stack.interrupts import exit_status, ignore_signals, stop_on_signals
from stack.settings import DEFAULT_LOG_DIR, StoreSettings
from stack.submission import Submitted

log = logging.getLogger(__name__)

DONE = ("finished", "failed")


@dataclasses.dataclass(frozen=True)
class RunOptions:
    clients: int | None = None  # worker processes; None: `default_workers(specs)`
    store: StoreSettings = StoreSettings()  # a MongoDB URI, else the embedded store's directory
    log_dir: Path = DEFAULT_LOG_DIR
    poll_interval_s: float = 1.0  # the longest the progress view waits for a change (it long-polls)
    show_progress: bool = True
    fresh: bool = False  # queue every experiment anew instead of resuming an identical unfinished one

MAX_DEFAULT_WORKERS = 4


def default_workers(specs: Sequence[ExperimentSpec]) -> int:
    """Worker processes when --clients is not given: the most members any round trains, at most 4.

    Members are not workers: any number of members is served by one or more workers,
    so more workers only add throughput (each holds torch and the dataset in memory).
    """
    return max(1, min(MAX_DEFAULT_WORKERS, max(spec.members_per_round for spec in specs)))


def prepare(specs: Sequence[ExperimentSpec], rounds: int | None, only: str | None) -> list[ExperimentSpec]:
    """Filter by `only` (a substring of the description), override rounds, validate all, expand replicates.

    A spec with `replicates = n` becomes its n replicates here, so that the ids
    the server answers line up with the specs shown. Raises ValueError listing every invalid experiment; nothing is submitted then.
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
            valid.extend(expand_replicates(spec))
        except SpecError as error:
            errors.append(f"experiment {position} ({_description(spec)!r}): {error}")
    if errors:
        raise ValueError("invalid experiments, nothing submitted:\n  " + "\n  ".join(errors))
    return valid


def _description(spec: ExperimentSpec) -> str:
    text = str(getattr(spec, "description", "") or "")
    replicate = getattr(spec, "replicate", None)
    return text if replicate is None else f"{text} [seed {spec.seed}, replicate {replicate + 1}/{spec.replicates}]"


def make_transport(url: str, token: str, stop: threading.Event | None = None) -> Transport:
    return Transport(url, token, stop=stop or threading.Event(), rng=random.Random(), max_attempts=5)


def queue_only(specs: Sequence[ExperimentSpec], server_url: str, token: str | None, *, fresh: bool = False) -> int:
    """Submit `specs` to a running server (token from FEDLAND_TOKEN); print their ids, and which were resumed."""
    if not token:
        raise ValueError("FEDLAND_TOKEN must be set to queue experiments on --server")
    transport = make_transport(server_url, token)
    try:
        ids = transport.submit_experiments([spec.to_dict() for spec in specs], fresh=fresh)
    finally:
        transport.close()
    for experiment_id, spec in zip(ids, specs):
        verb = "resumed" if experiment_id in ids.resumed else "queued"
        print(f"{verb} {experiment_id}  {_description(spec)}")
    return 0


def say_resumed(ids: Submitted, summaries: Mapping[str, Mapping[str, Any]]) -> None:
    """One line per resumed experiment on stderr: its id and the rounds it has stored."""
    for experiment_id in ids.resumed:
        summary = summaries.get(experiment_id, {})
        done = int((summary.get("last_round") or {}).get("round") or 0)
        description = summary.get("description") or ""
        print(f"resumed {experiment_id} (round {done}/{summary.get('rounds', '?')}) {description}".rstrip(),
              file=sys.stderr)


class LocalRun:
    """Store, server and clients on this machine for the duration of one `run`."""

    def __init__(self, options: RunOptions, env: Mapping[str, str]) -> None:
        self.options = options
        self.env = dict(env)
        self.token = secrets.token_urlsafe(24)  # the submitter's: this process queues and watches
        self.worker_token = secrets.token_urlsafe(24)  # the clients enrol with it; each then gets its own secret
        self.store: EmbeddedMongo | None = None
        self.server: Child | None = None
        self.clients: list[Child] = []
        self.beside: list[Child] = []  # started by the `follow` callback (the report process): stopped with the clients
        self.url = ""
        self.store_uri = ""

    def start(self, num_clients: int) -> None:
        uri = self.options.store.mongo_uri
        if uri is None:
            self.store = EmbeddedMongo(self.options.store.store_dir)
            uri = self.store.start()
        self.store_uri = uri
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        server_env = child_env(
            self.env,
            FEDLAND_MONGO_URI=uri,
            FEDLAND_TOKEN=self.token,
            FEDLAND_WORKER_TOKEN=self.worker_token,
            FEDLAND_HOST="127.0.0.1",
            FEDLAND_PORT=str(port),
        )
        self.server = start_server(server_env, self.options.log_dir / "server.log")
        wait_healthy(self.server, self.url, self.token)
        client_env = child_env(self.env, FEDLAND_SERVER_URL=self.url, FEDLAND_WORKER_TOKEN=self.worker_token)
        client_env.pop("FEDLAND_MONGO_URI", None)
        client_env.pop("FEDLAND_TOKEN", None)  # workers cannot queue experiments
        self.clients = start_clients(num_clients, client_env, self.options.log_dir)
        log.info("server %s, %d clients, logs in %s", self.url, num_clients, self.options.log_dir)

    def stop(self) -> None:
        """Everything at once but the store, which goes last: the teardown takes seconds, not the sum of each.

        The server's close answers long-polling clients at once, and a client whose report
        finds the server gone stops instead of retrying; the report process needs the store only.
        """
        began = time.monotonic()
        children = self.beside + self.clients + ([self.server] if self.server is not None else [])
        stop_all(children)
        self.clients, self.beside, self.server = [], [], None
        stopped_s = time.monotonic() - began
        if self.store is not None:
            self.store.stop()
            self.store = None
        log.debug("stopped the processes in %.1f s, the store in %.1f s", stopped_s, time.monotonic() - began - stopped_s)


def watch(
    transport: Transport,
    ids: Sequence[str],
    local: LocalRun,
    poll_interval_s: float,
    progress: Progress,
    *,
    trained_only: bool = False,
) -> dict[str, dict[str, Any]]:
    """Follow the server until every experiment in `ids` is finished or failed; return their documents.

    With `trained_only`, until every one is finished, failed or has all its rounds
    stored (its last measurements may still run). Each request long-polls: the server
    answers as soon as a round or status changes (or after `poll_interval_s`, so dead
    processes are noticed).
    """
    wanted = set(ids)
    version: int | None = None
    while True:
        if local.server is not None and not local.server.alive():
            raise RuntimeError(f"server exited; log {local.server.log_path}:\n{local.server.log_tail()}")
        if local.clients and not any(c.alive() for c in local.clients):
            raise RuntimeError(f"all clients exited; see {local.options.log_dir}")
        experiments, version = transport.watch_experiments(version, poll_interval_s)
        summaries = {e["id"]: e for e in experiments if e["id"] in wanted}
        progress.update(summaries)
        if len(summaries) == len(wanted) and all(
            e["status"] in DONE or (trained_only and _all_rounds_stored(e)) for e in summaries.values()
        ):
            return {experiment_id: transport.get_experiment(experiment_id) for experiment_id in ids}


def _all_rounds_stored(summary: Mapping[str, Any]) -> bool:
    last = summary.get("last_round") or {}
    return summary.get("status") == "running" and int(last.get("round") or 0) >= int(summary.get("rounds") or 0)


#: Called once the summary is printed, while the store is up (e.g. wait a bounded time for the final
#: reports): (store URI, database, experiment ids) -> the report index, or None.
Finisher = Callable[[str, str, list[str]], "Path | None"]
#: Started once the experiments are queued (e.g. the report process): (store URI, db name, ids) -> the
#: processes it started. They are stopped together with the clients, before the server and the store.
Follower = Callable[[str, str, list[str]], Sequence[Child]]


def print_summary(ids: Sequence[str], documents: Mapping[str, Mapping[str, Any]], last_rounds: Mapping[str, Any],
                  resumed: Sequence[str], wall_s: float, log_dir: Path) -> None:
    """The summary table on stdout, flushed: printed as soon as the last round is stored.

    An experiment whose rounds are all stored but whose last measurements still run
    shows as ``measuring`` (the launcher waits for it before stopping).
    """
    shown = {
        i: {**d, "status": "measuring"} if d.get("status") == "running" and (last_rounds.get(i) or {}).get("round")
        else d
        for i, d in documents.items()
    }
    print(summary_table(ids, shown, last_rounds, resumed=resumed))
    print(f"wall time {wall_s:.1f} s; logs in {log_dir}", flush=True)


def report_failures(documents: Mapping[str, Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Say on stderr why each experiment that did not finish failed; returns them."""
    failed = [d for d in documents.values() if d.get("status") != "finished"]
    for doc in failed:
        print(f"experiment {doc.get('id')} {doc.get('status')}: {doc.get('error')}", file=sys.stderr)
    return failed


def run_local(
    specs: Sequence[ExperimentSpec],
    options: RunOptions,
    env: Mapping[str, str],
    data_dir: Path,
    finish: Finisher | None = None,
    follow: Follower | None = None,
) -> int:
    """Run `specs` on a local stack; 0 if every experiment finished, 130/143 if stopped by SIGINT/SIGTERM.

    The summary is printed as soon as the last experiment ends. `follow` starts
    processes beside the run (e.g. the reports) once the experiments are queued;
    `finish` (e.g. a bounded wait for the final reports) runs after the summary; then
    those processes and the clients stop, then the server and the store. Ctrl-C or
    SIGTERM at any point tears everything down the same way (a second signal is
    ignored, so the teardown completes).
    """
    for name in sorted({spec.dataset_name for spec in specs}):
        try:
            resolve_dataset(name).verify(data_dir)  # download once here, not in every client; nothing stays loaded
        except (OSError, ValueError) as error:  # missing (and not downloadable) or corrupted files
            print(f"error: {error}", file=sys.stderr)
            return 2
    num_clients = options.clients or default_workers(specs)
    local = LocalRun(options, env)
    started = time.monotonic()
    with stop_on_signals():
        try:
            local.start(num_clients)
            transport = make_transport(local.url, local.token)
            submitted = transport.submit_experiments([spec.to_dict() for spec in specs], fresh=options.fresh)
            ids = list(dict.fromkeys(submitted))  # a spec repeated in the run is one experiment
            summaries = {e["id"]: e for e in transport.list_experiments()}
            say_resumed(submitted, summaries)
            earlier = [e for e in summaries.values() if e["status"] not in DONE and e["id"] not in ids]
            if earlier:
                log.warning("%d unfinished experiments from earlier runs are queued ahead of these", len(earlier))
            if follow is not None:
                local.beside += follow(local.store_uri, options.store.db_name, list(ids))
            with Progress(submitted, specs, enabled=options.show_progress) as progress:
                documents = watch(transport, ids, local, options.poll_interval_s, progress, trained_only=True)
                last_rounds = {i: progress.last_round(i) for i in ids}
                print_summary(ids, documents, last_rounds, submitted.resumed, time.monotonic() - started,
                              options.log_dir)
                documents = watch(transport, ids, local, options.poll_interval_s, progress)  # measured, finished
            transport.close()
            failed = report_failures(documents)
            reports = None if finish is None else finish(local.store_uri, options.store.db_name, list(ids))
            if reports is not None:
                print(f"reports: {reports.resolve()}", flush=True)
        except KeyboardInterrupt as stopped:
            print("\ninterrupted: stopping clients, server and store", file=sys.stderr)
            return exit_status(stopped)
        except (RuntimeError, OSError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        finally:
            ignore_signals()  # a second Ctrl-C must not cut the teardown short (orphaned clients, a running store)
            local.stop()
    return 0 if not failed else 1
