"""Real workers: how much of a round is spent outside the slowest worker's own compute, CPU and memory.

    FEDLAND_DATA_DIR=../shared/data python bench/bench_workers.py [--workers 1,2,4] [--iid-workers 3]

Runs on a local stack (embedded nx-27017, `python -m server`, N `python -m client`):

- main.py's IID example (3 members, ~20,000 images each), landscape off, on
  `--iid-workers` workers (one member each per round);
- main.py's 100-member example (Dirichlet, 10 members per round, landscape off)
  on each of `--workers` worker counts.

Per experiment it prints the mean over rounds 2.. (round 1 includes each worker's
first dataset load) of: wall time per round (the previous round's end to this
round's end); the slowest worker's own compute (for each worker, the sum over the
members it trained in the round of evaluation + training + measurement, i.e. the
client's `duration_s.total` minus its model download; the maximum over workers);
the share of the round outside it; and, over the whole run, CPU seconds per round
of all processes (server, workers, store) and their summed peak RSS.

A benchmark, not a test: it prints figures and asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pymongo

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedland.spec import ExperimentSpec  # noqa: E402
from launch.launcher import LocalRun, RunOptions, make_transport  # noqa: E402
from main import EXPERIMENTS  # noqa: E402
from stack import records  # noqa: E402
from stack.settings import StoreSettings  # noqa: E402

DONE = ("finished", "failed")
TICKS = 100.0  # os.sysconf("SC_CLK_TCK") on Linux


def example(description_part: str, rounds: int) -> ExperimentSpec:
    spec = next(s for s in EXPERIMENTS if description_part in s.description)
    data = spec.to_dict()
    data.update(rounds=rounds, description=f"bench: {spec.description}")
    data["landscape"] = {**data["landscape"], "enabled": False}
    return ExperimentSpec.from_dict(data)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def store_pid(store_dir: Path) -> int | None:
    pid_file = store_dir / "nx-27017.pid"
    return int(pid_file.read_text().strip()) if pid_file.is_file() else None


def run(spec: ExperimentSpec, workers: int, env: dict[str, str]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        store_dir = Path(tmp) / "store"
        options = RunOptions(store=StoreSettings(store_dir=store_dir), log_dir=Path(tmp) / "logs", show_progress=False)
        local = LocalRun(options, {**env, "FEDLAND_LOG_LEVEL": "WARNING"})
        local.start(workers)
        try:
            assert local.server is not None
            pids = [local.server.pid, *(c.pid for c in local.clients)]
            spid = store_pid(store_dir)
            pids += [spid] if spid else []
            cpu_before = sum(cpu_seconds(p) for p in pids)
            transport = make_transport(local.url, local.token)
            [experiment_id] = transport.submit_experiments([spec.to_dict()])
            while True:
                doc = transport.get_experiment(experiment_id)
                if doc["status"] in DONE:
                    break
                time.sleep(0.2)
            cpu = sum(cpu_seconds(p) for p in pids) - cpu_before
            rss = sum(peak_rss_mb(p) for p in pids)
            transport.close()
            client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(local.store_uri, serverSelectionTimeoutMS=10_000)
            db = client[options.store.db_name]
            rows = per_round(db, experiment_id)
            client.close()
        finally:
            local.stop()
    steady = rows[1:] or rows
    return {
        "status": doc["status"],
        "wall_s": statistics.fmean(r["wall_s"] for r in steady),
        "compute_s": statistics.fmean(r["compute_s"] for r in steady),
        "outside": statistics.fmean(1 - r["compute_s"] / r["wall_s"] for r in steady),
        "cpu_per_round_s": cpu / len(rows),
        "rss_mb": rss,
        "rounds": len(rows),
        "accuracy": rows[-1]["accuracy"],
    }


def per_round(db: Any, experiment_id: str) -> list[dict[str, float]]:
    experiment = records.read_experiment(db, experiment_id)
    assert experiment is not None and experiment.started_at is not None
    previous_end = experiment.started_at
    rows = []
    for round_record in records.read_rounds(db, experiment_id):
        per_worker: dict[str, float] = defaultdict(float)
        for stats in records.read_client_stats(db, experiment_id, round_record.round):
            durations = stats.stats["duration_s"]
            per_worker[stats.worker_id] += durations["total"] - durations["fetch"]
        rows.append({
            "wall_s": round_record.finished_at - previous_end,
            "compute_s": max(per_worker.values()),
            "accuracy": round_record.test_accuracy,
        })
        previous_end = round_record.finished_at
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="1,2,4", help="worker counts for the 100-member example")
    parser.add_argument("--iid-workers", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    import os

    env = dict(os.environ)
    print(f"{'experiment':<48} {'workers':>7} {'round s':>8} {'slowest compute s':>17} {'outside %':>9} "
          f"{'CPU s/round':>11} {'peak RSS MB':>11} {'final acc':>9}", flush=True)
    cases = [(example("IID balanced", args.rounds), args.iid_workers)]
    cases += [(example("100 members", args.rounds), int(w)) for w in args.workers.split(",")]
    for spec, workers in cases:
        r = run(spec, workers, env)
        print(f"{spec.description[7:55]:<48} {workers:>7} {r['wall_s']:>8.2f} {r['compute_s']:>17.2f} "
              f"{100 * r['outside']:>8.1f}% {r['cpu_per_round_s']:>11.2f} {r['rss_mb']:>11.0f} {r['accuracy']:>9.4f}",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
