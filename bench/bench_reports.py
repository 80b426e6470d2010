"""Benchmark of an experiment report's render: CPU seconds with and without the stored analysis.

    FEDLAND_DATA_DIR=../shared/data python bench/bench_reports.py [--rounds 5] [--clients 3] [--renders 3]

Stores one experiment of real FedNet models (main.py's shape: MNIST, 3 clients,
5 rounds, every round measured) in an embedded nx-27017, as the server stores it:
members, global models 0..R, each member's update and a landscape per round. Then:

- analysis: the server's analysis of the stored models (`server.analysis`: the
  initial evaluation, the trajectory, the spectral densities), once, as the
  measurement thread computes it before the experiment is finished;
- render, analysis stored: `load_experiment` + `write_experiment_report`, what every
  render costs now (read and draw);
- render, analysis at render time: the same render plus the analysis, what every
  render cost when the report evaluated the stored models itself.

Prints process CPU seconds per render and per round (render CPU / rounds). A
benchmark, not a test: it prints figures and asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedland import schemes  # noqa: E402
from fedland.spec import ExperimentSpec, LandscapeSpec  # noqa: E402
from reports import write_experiment_report  # noqa: E402
from reports.data import load_experiment  # noqa: E402
from server.analysis import (  # noqa: E402
    analyse_finished,
    evaluate_initial,
    global_models,
    round_densities,
    trajectory,
)
from server.resources import Resources  # noqa: E402
from server.store import Store  # noqa: E402
from stack import records, wire  # noqa: E402
from stack.embedded import EmbeddedMongo  # noqa: E402
from stack.records import (  # noqa: E402
    ClientModelFile,
    ClientStatsRecord,
    ExperimentRecord,
    MemberRecord,
    ModelFile,
    RoundRecord,
)
from stack.settings import DataSettings  # noqa: E402


def store_experiment(store: Store, resources: Resources, rounds: int, clients: int) -> str:
    """An experiment with every round stored: models moved a little per round, a landscape per member and round."""
    ratios, _ = schemes.iid(clients)
    spec = ExperimentSpec(description="bench: IID", target_balance_ratios=ratios, subset_fractions=[0.05] * clients,
                          rounds=rounds, seed=42, landscape=LandscapeSpec(every=1))
    experiment_id = "bench-report"
    members = [MemberRecord.of_partition(experiment_id, s) for s in resources.partition_summary(spec)]
    store.insert_experiments([ExperimentRecord(experiment_id, spec.with_id(experiment_id), status="finished",
                                               current_round=rounds, created_at=1.0)], members)
    plan = resources.plan(spec)
    generator = torch.Generator().manual_seed(0)
    state = {k: v.detach().clone() for k, v in plan.model().state_dict().items()}
    store.save_model(wire.encode(state), ModelFile(experiment_id, 0, records.GLOBAL))
    for r in range(1, rounds + 1):
        locals_ = [{k: v + 0.02 * torch.randn(v.shape, generator=generator) for k, v in state.items()}
                   for _ in range(clients)]
        state = {k: torch.stack([m[k] for m in locals_]).mean(0) for k in state}
        for i, local in enumerate(locals_):
            file_id = store.save_client_model(wire.encode(local), ClientModelFile(experiment_id, r, i))
            loss = 2.0 / (r + 1) + 0.1 * i
            block = {"loss": loss, "accuracy": 1 - loss / 4, "top_eigenvalues": [3.0 * r, r], "trace": 10.0 * r}
            store.insert_client_stats(ClientStatsRecord(
                experiment_id, r, i, f"w{i}", float(r), members[i].num_train, file_id, {
                    "duration_s": {"train": 1.0, "total": 1.5},
                    "global": {"test_loss": loss, "test_accuracy": 1 - loss / 4},
                    "local": {"test_loss": loss * 0.9, "test_accuracy": 1 - loss / 5},
                    "landscape": {"num_samples": 256, "global": block, "local": block,
                                  "interpolation": {"alphas": [0.0, 0.5, 1.0], "losses": [loss, loss * 1.1, loss]}},
                }))
        evaluation = resources.evaluate(spec, {k: v.numpy() for k, v in state.items()})
        store.insert_round(RoundRecord(
            experiment_id, r, 10.0 * r, 10.0 * r + 5, evaluation.loss, evaluation.accuracy, 10_000,
            tuple(range(clients)), tuple(range(clients)), sum(m.num_train for m in members), "FedAvg", 5.0, 0.1,
            store.save_model(wire.encode(state), ModelFile(experiment_id, r, records.GLOBAL)),
            store.save_model(wire.encode({}), ModelFile(experiment_id, r, records.STRATEGY_STATE)),
            landscape={"num_samples": 256, "global": {"loss": 1.0 / r, "top_eigenvalues": [2.0 * r]},
                       "gradient_dissimilarity": 1.0 + 0.1 * r},
        ))
    return experiment_id


def cpu_seconds(job: Callable[[], object]) -> float:
    started = time.process_time()
    job()
    return time.process_time() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--renders", type=int, default=3, help="renders timed per variant (median printed)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as the server and report processes (FEDLAND_TORCH_THREADS=1)
    resources = Resources(DataSettings.from_env().data_dir)
    with tempfile.TemporaryDirectory() as tmp, EmbeddedMongo(Path(tmp) / "store") as uri:
        store = Store(uri, "bench_reports")
        store.prepare()
        experiment_id = store_experiment(store, resources, args.rounds, args.clients)
        experiment = store.get_experiment(experiment_id)
        assert experiment is not None
        out = Path(tmp) / "reports"

        def forget_analysis() -> None:
            store.db[records.LANDSCAPES].delete_many({"experiment_id": experiment_id,
                                                      "kind": {"$in": list(records.ANALYSIS_KINDS)}})

        def initial() -> None:
            forget_analysis()
            evaluate_initial(store, resources, experiment)

        def analysis() -> None:
            initial()
            analyse_finished(store, resources, experiment)

        def render() -> None:
            write_experiment_report(load_experiment(store.db, experiment_id), out)

        def render_with_analysis() -> None:
            analysis()
            render()

        analysis_s = cpu_seconds(analysis)
        plan = resources.plan(experiment.spec)
        models = global_models(store, experiment_id)
        parts = {
            "initial evaluation (full test split)": cpu_seconds(initial),
            "trajectory (21 x 21 grid, 1,000 images)": cpu_seconds(lambda: trajectory(plan, models)),
            "spectral densities": cpu_seconds(lambda: round_densities(store, plan, experiment_id, models)),
        }
        stored = [cpu_seconds(render) for _ in range(args.renders)]
        at_render = [cpu_seconds(render_with_analysis) for _ in range(args.renders)]
        store.close()
    rounds = args.rounds
    print(f"experiment: {args.clients} clients x {rounds} rounds, FedNet on MNIST; CPU seconds (median of "
          f"{args.renders})")
    print(f"  analysis, once per experiment (server)        {analysis_s:8.2f} s")
    for part, seconds in parts.items():
        print(f"    {part:<44}{seconds:8.2f} s")
    for label, values in (("render, analysis stored (now)", stored),
                          ("render, analysis at render time (before)", at_render)):
        median = statistics.median(values)
        print(f"  {label:<46}{median:8.2f} s   {median / rounds:6.2f} s per round   "
              f"(min {np.min(values):.2f}, max {np.max(values):.2f})")


if __name__ == "__main__":
    main()
