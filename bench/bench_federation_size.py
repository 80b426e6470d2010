"""Large federations: queue time, round time and the stored experiment document's size.

    FEDLAND_DATA_DIR=../shared/data python bench/bench_federation_size.py [--workers 4]

Runs on a local stack (embedded nx-27017, `python -m server`, `--workers`
`python -m client`) two MNIST federations named by a partition scheme
(Dirichlet alpha 0.5, FedNet, 10 members per round, landscape off):

- 10,000 members (6 training samples each, their proportional local test
  sample), 3 rounds;
- 100,000 members (1 training sample each, no local test set: members outnumber
  the 60,000 training samples, so they overlap), 1 round.

Each stack first runs a 4-member warm-up experiment, so that the server and
the workers have loaded MNIST before the figures start. Per federation it
prints: the time to queue (the submit request: validation, the round-0 model
and the first round's members derived and stored), the mean wall time per
round (each round's end minus the previous one's; round 1 from the
experiment's start), the
experiment document's size as stored (BSON bytes) and the members stored (only
those ever selected). A listed 100,000-member partition would need ~10 MB of
ratios alone.

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

from fedland.spec import ExperimentSpec  # noqa: E402
from launch.launcher import LocalRun, RunOptions, make_transport  # noqa: E402
from stack import records  # noqa: E402
from stack.settings import StoreSettings  # noqa: E402

DONE = ("finished", "failed")


def federation(members: int, rounds: int, test_split: str) -> ExperimentSpec:
    return ExperimentSpec.from_dict({
        "description": f"bench: {members} members, Dirichlet 0.5, 10 per round",
        "partition": {"scheme": "dirichlet", "alpha": 0.5, "members": members, "seed": 1},
        "member_test_split": test_split,
        "clients_per_round": 10,
        "rounds": rounds,
        "learning_rate": 0.05,
        "landscape": {"enabled": False},
        "seed": 1,
    })


WARM_UP = {
    "description": "bench: warm-up", "target_balance_ratios": [[0.1] * 10] * 4, "subset_fractions": [0.01] * 4,
    "rounds": 1, "landscape": {"enabled": False},
}


def run(spec: ExperimentSpec, workers: int, env: dict[str, str]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        store_dir = Path(tmp) / "store"
        options = RunOptions(store=StoreSettings(store_dir=store_dir), log_dir=Path(tmp) / "logs", show_progress=False)
        local = LocalRun(options, {**env, "FEDLAND_LOG_LEVEL": "WARNING"})
        local.start(workers)
        try:
            transport = make_transport(local.url, local.token)
            # a small experiment first: the server and the workers load MNIST once, outside the figures
            [warm_up] = transport.submit_experiments([WARM_UP])
            while transport.get_experiment(warm_up)["status"] not in DONE:
                time.sleep(0.2)
            started = time.perf_counter()
            [experiment_id] = transport.submit_experiments([spec.to_dict()])
            queue_s = time.perf_counter() - started
            while transport.get_experiment(experiment_id)["status"] not in DONE:
                time.sleep(0.2)
            transport.close()
            client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(
                local.store_uri, serverSelectionTimeoutMS=10_000, socketTimeoutMS=60_000
            )
            db = client[options.store.db_name]
            experiment = records.read_experiment(db, experiment_id)
            raw = db[records.EXPERIMENTS].find_one({"_id": experiment_id})
            assert experiment is not None and raw is not None and experiment.started_at is not None
            rounds = records.read_rounds(db, experiment_id)
            members = db[records.MEMBERS].count_documents({"experiment_id": experiment_id})
            client.close()
        finally:
            local.stop()
    ends = [experiment.started_at, *(r.finished_at for r in rounds)]
    return {
        "status": experiment.status,
        "error": experiment.error,
        "queue_s": queue_s,
        "round_s": statistics.fmean(b - a for a, b in zip(ends, ends[1:])) if rounds else float("nan"),
        "rounds": len(rounds),
        "document_bytes": len(bson.encode(raw)),
        "members_stored": members,
        "accuracy": rounds[-1].test_accuracy if rounds else float("nan"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=4)
    args = parser.parse_args()
    print(f"{'members':>8} {'rounds':>6} {'status':>8} {'queue s':>8} {'round s':>8} {'document B':>10} "
          f"{'members stored':>14} {'test acc':>8}", flush=True)
    for members, rounds, test_split in ((10_000, 3, "proportional"), (100_000, 1, "none")):
        r = run(federation(members, rounds, test_split), args.workers, dict(os.environ))
        print(f"{members:>8} {r['rounds']:>6} {r['status']:>8} {r['queue_s']:>8.2f} {r['round_s']:>8.2f} "
              f"{r['document_bytes']:>10} {r['members_stored']:>14} {r['accuracy']:>8.4f}", flush=True)
        if r["error"]:
            print(f"  error: {r['error']}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
