"""Benchmark of the CIFAR models on this CPU: training samples/s per worker, landscape cost per round.

CIFAR-10-shaped random data (3 x 32 x 32, 10 classes). One torch thread, as a
client process runs (FEDLAND_TORCH_THREADS=1). For each model:

* training throughput: ``train_local`` (SGD, momentum 0.9, batch 64, augmentation on)
  over ``--train-samples`` images, in samples/s;
* landscape cost: one ``measure_client_round`` with the default ``LandscapeSpec`` on
  256 samples (both models' curvature, PAC-Bayes and norms, interpolation), in
  seconds, and as a share of one local epoch over a 10,000-image client (the
  prototype study's full-fraction CIFAR-10 client).

    python bench/bench_models.py [--models ResNet20 CifarCNN] [--train-samples 512]
"""

from __future__ import annotations

import argparse
import time

import torch

from fedland.measure import measure_client_round
from fedland.models import build_model
from fedland.spec import LandscapeSpec
from fedland.training import train_local

CLIENT_IMAGES = 10_000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["CifarCNN", "ResNet20", "ResNet20-noshort", "ResNet18"])
    parser.add_argument("--train-samples", type=int, default=512)
    args = parser.parse_args()
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(args.train_samples, 3, 32, 32, generator=generator)
    y = torch.randint(0, 10, (args.train_samples,), generator=generator)
    lspec = LandscapeSpec(every=1, num_samples=256)  # the settings before the budget; see bench_landscape_budget.py
    print(f"{'model':<18} {'params':>10} {'train samples/s':>16} {'landscape s':>12} {'share of 10k epoch':>19}")
    for name in args.models:
        model = build_model(name, seed=0)
        started = time.perf_counter()
        local, _ = train_local(model, x, y, epochs=1, batch_size=64, learning_rate=0.01, momentum=0.9, seed=1,
                               augment=True)
        rate = args.train_samples / (time.perf_counter() - started)
        started = time.perf_counter()
        measure_client_round(model, local, None, [(x[:lspec.subset_size], y[:lspec.subset_size])], lspec, seed=2)
        landscape_s = time.perf_counter() - started
        epoch_s = CLIENT_IMAGES / rate
        params = sum(p.numel() for p in model.parameters())
        print(f"{name:<18} {params:>10,} {rate:>16.1f} {landscape_s:>12.1f} {landscape_s / epoch_s:>18.1%}", flush=True)


if __name__ == "__main__":
    main()
