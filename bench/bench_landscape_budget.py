"""Calibrates the landscape cost model per built-in model, and reports a round's training vs landscape CPU.

Dataset-shaped random data (MNIST 1 x 28 x 28 for FedNet and FedCNN, CIFAR-10
3 x 32 x 32 for the others; nothing downloaded), one torch thread as a client
process runs. For each model it times, per sample and over a few batches:

* a training step (``train_local``: batch 32, SGD, the dataset's augmentation),
* a forward pass, a loss gradient and a Hessian-vector product (``HessianOperator``),

and writes them to ``fedland/landscape_costs.json`` (``--no-write`` keeps the
table). Then, at the defaults (``LandscapeSpec()``, budget 25%) on a default
federation (``--members`` iid members of the whole train split, all training
each round, one local epoch), it prints the resolved ``every`` and
``num_samples`` and the per-round CPU of training vs landscape (members' and
server's measurements, averaged over ``every``). ``--check`` models also run
one real member measurement (``measure_client_round``) to compare with the
model's prediction.

    python bench/bench_landscape_budget.py [--models FedNet ResNet20] [--samples 32] [--check FedNet]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from fedland.datasets import DATASETS
from fedland.hessian import HessianOperator
from fedland.landscape_budget import (
    COSTS_FILE,
    ModelCost,
    measured_rounds,
    member_measurement_s,
    model_costs,
    round_training_s,
    server_measurement_s,
)
from fedland.measure import measure_client_round
from fedland.models import MODEL_INPUT_SHAPES, MODEL_NAMES, build_model
from fedland.partition_scheme import PartitionScheme
from fedland.spec import ExperimentSpec
from fedland.training import train_local

BATCH_SIZE = 32  # ExperimentSpec's default


def _seconds(work: Callable[[], object], repeats: int) -> float:
    """Median wall seconds of ``work`` over ``repeats`` runs, after one warm-up run."""
    work()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def dataset_for(model: str) -> str:
    """The built-in dataset whose images the model takes (MNIST, CIFAR10)."""
    return next(name for name in ("MNIST", "CIFAR10") if DATASETS[name].input_shape == MODEL_INPUT_SHAPES[model])


def calibrate(model_name: str, samples: int, train_batches: int, repeats: int) -> ModelCost:
    """Per-sample seconds of a training step, a forward pass, a gradient and a Hessian-vector product."""
    info = DATASETS[dataset_for(model_name)]
    generator = torch.Generator().manual_seed(0)
    n_train = train_batches * BATCH_SIZE
    x = torch.rand(max(n_train, samples), *info.input_shape, generator=generator)
    y = torch.randint(0, info.num_classes, (x.shape[0],), generator=generator)
    model = build_model(model_name, seed=0, num_classes=info.num_classes)

    def train() -> None:
        train_local(model, x[:n_train], y[:n_train], epochs=1, batch_size=BATCH_SIZE, learning_rate=0.01,
                    momentum=0.0, seed=1, augment=info.augment)

    train_s = _seconds(train, repeats) / n_train
    batch = [(x[:samples], y[:samples])]
    operator = HessianOperator(model, F.cross_entropy, batch)
    vector = torch.randn(operator.dim, generator=generator)
    gradient_s = _seconds(lambda: HessianOperator(model, F.cross_entropy, batch).value_and_gradient(), repeats)
    hvp_s = _seconds(lambda: operator.matvec(vector), repeats)
    forward_s = _seconds(lambda: operator.objective.evaluate(operator.params), repeats)
    return ModelCost(train_s=train_s, forward_s=forward_s / samples, gradient_s=gradient_s / samples,
                     hvp_s=hvp_s / samples)


ROUNDS = 100  # the default federation's rounds


def default_spec(model: str, members: int) -> ExperimentSpec:
    """The default experiment of the model on its dataset: iid members, every member each round."""
    return ExperimentSpec(dataset_name=dataset_for(model), model=model, rounds=ROUNDS,
                          partition=PartitionScheme(scheme="iid", members=members))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODEL_NAMES), choices=MODEL_NAMES)
    parser.add_argument("--samples", type=int, default=32, help="samples of the forward/gradient/product batch")
    parser.add_argument("--train-batches", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--members", type=int, default=10)
    parser.add_argument("--check", nargs="*", default=[], help="models to run one real member measurement on")
    parser.add_argument("--no-write", action="store_true", help="print only; keep fedland/landscape_costs.json")
    parser.add_argument("--from-table", action="store_true", help="report from the table, without calibrating")
    args = parser.parse_args()
    torch.set_num_threads(1)

    table = {name: row.__dict__ for name, row in model_costs().items()} if COSTS_FILE.exists() else {}
    print(f"{'model':<17} {'train ms':>9} {'fwd ms':>8} {'grad ms':>8} {'hvp ms':>8}   (per sample, one thread)")
    for name in [] if args.from_table else args.models:
        cost = calibrate(name, args.samples, args.train_batches, args.repeats)
        table[name] = cost.__dict__
        print(f"{name:<17} {1e3 * cost.train_s:>9.3f} {1e3 * cost.forward_s:>8.3f} {1e3 * cost.gradient_s:>8.3f} "
              f"{1e3 * cost.hvp_s:>8.3f}", flush=True)
    if not args.no_write and not args.from_table:
        document = {"about": "seconds per sample on one CPU thread; written by bench/bench_landscape_budget.py",
                    "models": {name: table[name] for name in MODEL_NAMES if name in table}}
        COSTS_FILE.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
        model_costs.cache_clear()
        print(f"wrote {COSTS_FILE}")

    print(f"\nat the defaults ({args.members} iid members, all per round, 1 local epoch, {ROUNDS} rounds, "
          "budget 25%; share: the measured rounds' CPU against all rounds' training):")
    print(f"{'model':<17} {'every':>5} {'measured':>8} {'samples':>7} {'member PAC-Bayes':>16} {'train s/round':>13} "
          f"{'landscape s/measured':>20} {'landscape s/round':>17} {'share':>6}")
    for name in args.models:
        spec = default_spec(name, args.members)
        lspec, info = spec.landscape, DATASETS[spec.dataset_name]
        cost = ModelCost(**table[name])
        member = spec.partition.member_samples(info) if spec.partition else 0
        subset = min(lspec.subset_size, member)
        train_s = round_training_s(cost, spec.members_per_round, spec.local_epochs, member)
        measured_s = spec.members_per_round * member_measurement_s(cost, lspec, subset) + server_measurement_s(
            cost, lspec, min(lspec.subset_size, sum(info.test_class_counts)), spec.members_per_round, subset)
        assert lspec.every is not None
        times = measured_rounds(spec.rounds, lspec.every)
        per_round = times * measured_s / spec.rounds
        member_pac_bayes = "on" if lspec.member_pac_bayes else "off"
        print(f"{name:<17} {lspec.every:>5} {times:>8} {lspec.subset_size:>7} {member_pac_bayes:>16} {train_s:>13.0f} "
              f"{measured_s:>20.0f} {per_round:>17.0f} {per_round / train_s:>6.1%}", flush=True)
    for name in args.check:
        spec = default_spec(name, args.members)
        info, lspec = DATASETS[spec.dataset_name], spec.landscape
        generator = torch.Generator().manual_seed(1)
        x = torch.rand(lspec.subset_size, *info.input_shape, generator=generator)
        y = torch.randint(0, info.num_classes, (lspec.subset_size,), generator=generator)
        global_model, local_model = build_model(name, 0, info.num_classes), build_model(name, 1, info.num_classes)
        started = time.perf_counter()
        measure_client_round(global_model, local_model, None, [(x, y)], lspec, seed=2)
        measured = time.perf_counter() - started
        predicted = member_measurement_s(ModelCost(**table[name]), lspec, lspec.subset_size)
        print(f"check {name}: one member measurement on {lspec.subset_size} samples took {measured:.1f} s, "
              f"the model predicts {predicted:.1f} s", flush=True)


if __name__ == "__main__":
    main()
