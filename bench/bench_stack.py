"""Benchmark of the federated stack: 3 clients x 3 rounds of FedNet on MNIST, real processes.

    FEDLAND_DATA_DIR=../shared/data python bench/bench_stack.py [--rounds 3] [--clients 3]

Runs main.py's IID experiment twice on one local stack (embedded nx-27017, `python -m
server`, N `python -m client`), once with landscape measurements off and once with the
defaults, and prints per round:

- wall time (previous round's end, or the experiment's start, to this round's end);
- client compute: the slowest client's train + evaluation seconds (the critical path);
- framework overhead: wall time minus client compute (HTTP, serialization, store,
  aggregation, global evaluation, waiting), and its share of the wall time;
- bytes moved: model downloads + uploads + stats documents (payloads, not HTTP headers
  or task polling), from the sizes stored in the store.

The second run's extra time per round is the cost of measuring the loss landscape.
A benchmark, not a test: it prints figures and asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import bson
import pymongo

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedland import schemes  # noqa: E402
from fedland.spec import ExperimentSpec  # noqa: E402
from launch.launcher import LocalRun, RunOptions, make_transport  # noqa: E402
from main import EXPERIMENTS  # noqa: E402
from stack import records  # noqa: E402
from stack.settings import StoreSettings  # noqa: E402

DONE = ("finished", "failed")


def experiment(rounds: int, clients: int, landscape: bool) -> ExperimentSpec:
    """main.py's IID example (FedNet, ~20,000 images per client), with rounds and landscape set."""
    ratios, fractions = schemes.iid(clients)
    data = {**EXPERIMENTS[0].to_dict(), "target_balance_ratios": ratios, "subset_fractions": fractions}
    data.update(rounds=rounds, description=f"bench IID {clients}x{rounds} landscape={'on' if landscape else 'off'}")
    data["landscape"] = {**data["landscape"], "enabled": landscape}
    return ExperimentSpec.from_dict(data)


def wait_finished(run: LocalRun, ids: list[str], timeout_s: float = 900.0) -> None:
    transport = make_transport(run.url, run.token)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            status = {e["id"]: e["status"] for e in transport.list_experiments() if e["id"] in ids}
            if len(status) == len(ids) and all(s in DONE for s in status.values()):
                failed = [i for i, s in status.items() if s != "finished"]
                if failed:
                    raise RuntimeError(f"experiments failed: {failed}")
                return
            time.sleep(0.5)
    finally:
        transport.close()
    raise TimeoutError(f"experiments not finished after {timeout_s:.0f} s")


def per_round(db: Any, experiment_id: str) -> list[dict[str, float]]:
    experiment = records.read_experiment(db, experiment_id)
    assert experiment is not None and experiment.started_at is not None
    rounds = records.read_rounds(db, experiment_id)
    file_sizes = {
        (f["metadata"]["round"], f["metadata"].get("kind")): f["length"]
        for f in db[records.files_collection(records.MODELS)].find({"metadata.experiment_id": experiment_id})
    }
    uploads: dict[int, int] = {}
    for f in db[records.files_collection(records.CLIENT_MODELS)].find({"metadata.experiment_id": experiment_id}):
        uploads[f["metadata"]["round"]] = uploads.get(f["metadata"]["round"], 0) + f["length"]
    rows = []
    previous_end = experiment.started_at
    for round_record in rounds:
        r = round_record.round
        stats = records.read_client_stats(db, experiment_id, r)
        durations = [s.stats["duration_s"] for s in stats]
        compute = max(d["train"] + d["eval_global"] + d["eval_local"] for d in durations)
        measure = max(float((s.landscape or {}).get("duration_s") or 0.0) for s in stats)
        server_measure = float((round_record.landscape or {}).get("duration_s") or 0.0)
        wall = round_record.finished_at - previous_end
        previous_end = round_record.finished_at
        downloads = len(stats) * file_sizes.get((r - 1, records.GLOBAL), 0)
        stats_bytes = sum(len(bson.encode(s.to_doc())) for s in stats)
        rows.append(
            {
                "round": r,
                "wall_s": wall,
                "train_s": max(d["train"] for d in durations),
                "compute_s": compute,
                "client_landscape_s": measure,
                "server_landscape_s": server_measure,
                # The server measures in the background except in the last round.
                "overhead_s": wall - compute - measure - (server_measure if r == len(rounds) else 0.0),
                "bytes": downloads + uploads.get(r, 0) + stats_bytes,
                "test_accuracy": round_record.test_accuracy,
            }
        )
    return rows


def print_table(title: str, rows: list[dict[str, float]]) -> None:
    print(f"\n{title}")
    header = (
        "round  wall s  slowest train s  client compute s  landscape s (client/server)  "
        "overhead s  overhead %  bytes/round  test acc"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        print(
            f"{row['round']:>5}  {row['wall_s']:>6.2f}  {row['train_s']:>15.2f}  {row['compute_s']:>16.2f}  "
            f"{row['client_landscape_s']:>13.2f} / {row['server_landscape_s']:<11.2f}  {row['overhead_s']:>10.2f}  "
            f"{100 * row['overhead_s'] / row['wall_s']:>9.1f}%  {row['bytes']:>11,d}  {row['test_accuracy']:>8.4f}"
        )
    mean = {k: statistics.fmean(r[k] for r in rows) for k in rows[0]}
    print(
        f" mean  {mean['wall_s']:>6.2f}  {mean['train_s']:>15.2f}  {mean['compute_s']:>16.2f}  "
        f"{mean['client_landscape_s']:>13.2f} / {mean['server_landscape_s']:<11.2f}  {mean['overhead_s']:>10.2f}  "
        f"{100 * mean['overhead_s'] / mean['wall_s']:>9.1f}%  {int(mean['bytes']):>11,d}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=3)
    args = parser.parse_args()
    env = dict(os.environ)
    with tempfile.TemporaryDirectory(prefix="fedland-bench-") as tmp:
        options = RunOptions(
            store=StoreSettings(store_dir=Path(tmp) / "store"), log_dir=Path(tmp) / "logs"
        )
        run = LocalRun(options, env)
        env.pop("FEDLAND_MONGO_URI", None)
        try:
            run.start(args.clients)
            results = {}
            # A discarded 1-round pass first: clients load MNIST and torch warms up.
            for landscape in (None, False, True):
                transport = make_transport(run.url, run.token)
                spec = experiment(1 if landscape is None else args.rounds, args.clients, bool(landscape))
                [experiment_id] = transport.submit_experiments([spec.to_dict()])
                transport.close()
                wait_finished(run, [experiment_id])
                if landscape is None:
                    continue
                client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(run.store_uri)
                results[landscape] = per_round(client[env.get("FEDLAND_DB", "fedland")], experiment_id)
                client.close()
        finally:
            run.stop()
    print(f"fedland stack benchmark: {args.clients} clients x {args.rounds} rounds, FedNet, MNIST IID, "
          f"main.py's IID example (largest feasible share per client, 1 local epoch), 1 torch thread per process, {os.cpu_count()} cores")
    print_table("landscape measurements off", results[False])
    print_table("landscape measurements on (defaults)", results[True])
    # Round 1 holds start-up latency (idle clients notice a new experiment within a poll),
    # so the comparison uses rounds 2..R.
    later = [r["round"] >= 2 for r in results[False]]
    off = statistics.fmean(r["wall_s"] for r, keep in zip(results[False], later) if keep)
    on = statistics.fmean(r["wall_s"] for r, keep in zip(results[True], later) if keep)
    train = statistics.fmean(r["train_s"] for r, keep in zip(results[False], later) if keep)
    measured = [r for r, keep in zip(results[True], later) if keep and r["client_landscape_s"] > 0]
    per_measured = (
        statistics.fmean(r["wall_s"] for r in measured) - off if measured else 0.0
    )
    print(
        f"\nlandscape cost, rounds 2..{args.rounds}: {on - off:+.2f} s per round ({on:.2f} vs {off:.2f} s): "
        f"{(on - off) / off:.2f}x the round time without landscapes (target <= 0.5x), "
        f"{(on - off) / train:.2f}x the slowest client's pure training time ({train:.2f} s)"
    )
    print(
        f"per measured round: {per_measured:+.2f} s ({len(measured)} of {len(later) - 1} rounds measured)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
