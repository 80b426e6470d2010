"""Benchmark fedland's landscape metrics against PyHessian, hessian-eigenthings, loss-landscapes and a plain loop.

Same model (fedland's FedCNN, ~215k parameters, trained one epoch), same real
MNIST samples, one run, one thread. Every time is CPU time (``time.process_time``,
so other load on the machine changes it little). Prints figures and the speed-up
ratios against the targets in ``TARGETS``; asserts nothing.

    FEDLAND_DATA_DIR=/path/to/data python bench/bench_metrics.py [--samples 2000] [--slice-points 21]

Peers: ``pip install -e '.[bench]'`` (pyhessian, loss-landscapes, hessian-eigenthings).
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from fedland.datasets import load_dataset
from fedland.directions import random_direction
from fedland.hessian import hessian_trace, top_eigenvalues
from fedland.models import build_model
from fedland.slices import centered_grid, loss_slice_2d
from fedland.training import train_local

TARGETS = {"eig_speedup": 3.0, "trace_speedup": 2.0, "slice_speedup": 1.0}


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """``fn()`` and the CPU time it took (seconds)."""
    start = time.process_time()
    out = fn()
    return out, time.process_time() - start


def table(title: str, header: list[str], rows: Sequence[Sequence[object]]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    print(f"\n## {title}")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for row in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)))


def peer(name: str) -> Any:
    try:
        return __import__(name)
    except ImportError:
        return None


def bench_top_eigenvalue(model: nn.Module, loss_fn: nn.Module, batches: list, ref: float) -> float:
    rows, times, ours_runs = [], {}, []
    for tol in (1e-5, 1e-3, 1e-2, 5e-2):
        ours, t = timed(lambda: top_eigenvalues(model, loss_fn, batches, k=1, tol=tol, seed=0))
        err = abs(ours.values[0] - ref) / ref
        ours_runs.append((t, err))
        rows.append([f"fedland lanczos (tol={tol:g})", f"{t:.1f}", ours.num_hvps, f"{ours.values[0]:.6f}", f"{err:.1e}"])
    power, t = timed(lambda: top_eigenvalues(model, loss_fn, batches, k=1, method="power", tol=1e-3, seed=0))
    rows.append(["fedland power (tol=1e-3)", f"{t:.1f}", power.num_hvps, f"{power.values[0]:.6f}", f"{abs(power.values[0] - ref) / ref:.1e}"])

    pyhessian = peer("pyhessian")
    if pyhessian is None:
        rows.append(["PyHessian 0.1", "not installed", "", "", ""])
    else:
        torch.manual_seed(0)  # PyHessian draws from the global RNG
        own = copy.deepcopy(model)  # ... and mutates the model it is given
        counted = [0]
        h = pyhessian.hessian(own, loss_fn, dataloader=batches, cuda=False)
        product = h.dataloader_hv_product

        def counting(v: Any) -> Any:
            counted[0] += 1
            return product(v)

        h.dataloader_hv_product = counting
        (values, _), t = timed(h.eigenvalues)
        times["pyhessian"] = t
        times["pyhessian_err"] = abs(values[0] - ref) / ref
        rows.append(["PyHessian 0.1 eigenvalues()", f"{t:.1f}", counted[0], f"{values[0]:.6f}", f"{abs(values[0] - ref) / ref:.1e}"])

    eigenthings = peer("hessian_eigenthings")
    if eigenthings is None:
        rows.append(["hessian-eigenthings", "not installable here", "", "", ""])
    else:
        own = copy.deepcopy(model).eval()
        op = eigenthings.HessianOperator(own, batches, eigenthings.supervised_loss(loss_fn))
        (value, _, _, iters, _), t = timed(lambda: eigenthings.power_iteration_one(op, seed=0))
        rows.append(["hessian-eigenthings power_iteration_one()", f"{t:.1f}", iters, f"{value:.6f}", f"{abs(value - ref) / ref:.1e}"])
        res, t = timed(lambda: eigenthings.lanczos(op, k=1, max_iter=20, which="LA", seed=0))
        value = float(res.eigenvalues[0])
        rows.append(["hessian-eigenthings lanczos(k=1, max_iter=20)", f"{t:.1f}", res.iterations, f"{value:.6f}", f"{abs(value - ref) / ref:.1e}"])
    table(f"top Hessian eigenvalue (reference {ref:.8f}: float64 Lanczos, tol 1e-10)", ["method", "cpu_s", "hvps", "value", "rel_err"], rows)
    if "pyhessian" not in times:
        return math.nan
    # the fastest fedland run at equal or better accuracy than PyHessian's
    fastest = min((t for t, err in ours_runs if err <= times["pyhessian_err"]), default=math.nan)
    speedup = times["pyhessian"] / fastest
    print(f"speed-up vs PyHessian at equal or better accuracy: {speedup:.1f}x (target >= {TARGETS['eig_speedup']:.0f}x)")
    return speedup


def bench_top5(model: nn.Module, loss_fn: nn.Module, batches: list, reference: np.ndarray) -> float:
    """Top-5 eigenvalues: fedland Lanczos (default acceptance) against PyHessian's deflated power iteration."""
    rows, worst = [], {}
    for tol in (1e-2, 1e-3):
        ours, t = timed(lambda: top_eigenvalues(model, loss_fn, batches, k=5, tol=tol, seed=0))
        err = float(np.max(np.abs(ours.values - reference) / reference))
        worst[f"ours{tol}"] = (t, err)
        rows.append([f"fedland lanczos k=5 (tol={tol:g})", f"{t:.1f}", ours.num_hvps, f"{err:.1e}", ours.converged])
    pyhessian = peer("pyhessian")
    if pyhessian is None:
        table("top-5 Hessian eigenvalues", ["method", "cpu_s", "hvps", "max_rel_err", "converged"], rows)
        return math.nan
    torch.manual_seed(0)
    h = pyhessian.hessian(copy.deepcopy(model), loss_fn, dataloader=batches, cuda=False)
    counted = [0]
    product = h.dataloader_hv_product

    def counting(v: Any) -> Any:
        counted[0] += 1
        return product(v)

    h.dataloader_hv_product = counting
    (values, _), t_peer = timed(lambda: h.eigenvalues(top_n=5))
    err_peer = float(np.max(np.abs(np.sort(values)[::-1] - reference) / reference))
    rows.append(["PyHessian 0.1 eigenvalues(top_n=5)", f"{t_peer:.1f}", counted[0], f"{err_peer:.1e}", ""])
    table(f"top-5 Hessian eigenvalues (reference {np.round(reference, 4).tolist()})", ["method", "cpu_s", "hvps", "max_rel_err", "converged"], rows)
    fastest = min((t for t, err in worst.values() if err <= err_peer), default=math.nan)
    print(f"top-5 speed-up vs PyHessian at equal or better accuracy: {t_peer / fastest:.1f}x")
    return t_peer / fastest


def bench_trace(model: nn.Module, loss_fn: nn.Module, batches: list) -> float:
    pyhessian = peer("pyhessian")
    if pyhessian is None:
        print("\n## trace: PyHessian not installed")
        return math.nan
    torch.manual_seed(0)
    h = pyhessian.hessian(copy.deepcopy(model), loss_fn, dataloader=batches, cuda=False)
    samples, t_peer = timed(h.trace)
    samples = np.asarray(samples)
    target = float(samples.std(ddof=1) / math.sqrt(samples.size))
    rows = [["PyHessian 0.1 trace() (Hutchinson)", samples.size, f"{t_peer:.1f}", f"{samples.mean():.2f}", f"{target:.2f}"]]
    needed, result, t = None, None, 0.0
    for budget in (4, 6, 9, 12, 15, 18, 24, 30, 36, 48, 60, 72, 96, 120, 150, 200):
        result, t = timed(lambda: hessian_trace(model, loss_fn, batches, num_hvps=budget, seed=0))
        if result.std_error <= target:
            needed = budget
            break
    assert result is not None
    rows.append(["fedland hutch++ (smallest budget reaching that SE)", result.num_hvps, f"{t:.1f}", f"{result.estimate:.2f}", f"{result.std_error:.2f}"])
    same, t_same = timed(lambda: hessian_trace(model, loss_fn, batches, method="hutchinson", num_hvps=samples.size, seed=0))
    rows.append(["fedland hutchinson (PyHessian's product count)", same.num_hvps, f"{t_same:.1f}", f"{same.estimate:.2f}", f"{same.std_error:.2f}"])
    table("Hessian trace", ["method", "hvps", "cpu_s", "estimate", "std_error"], rows)
    reached = target * (1 + 1e-9)  # the same draws give the same error up to rounding
    best = min(t if needed else math.inf, t_same if same.std_error <= reached else math.inf)
    ratio = t_peer / best
    print(f"CPU time to PyHessian's standard error: {t_peer:.1f} s vs {best:.1f} s -> {ratio:.2f}x "
          f"(products {samples.size} vs {needed}; target >= {TARGETS['trace_speedup']:.0f}x)")
    return ratio


def bench_slice(model: nn.Module, loss_fn: nn.Module, batches: list, points: int) -> float:
    rows, times = [], {}
    ours, t = timed(lambda: loss_slice_2d(model, loss_fn, batches, radius=1.0, num_points=points, seed=0))
    times["ours"] = t
    rows.append(["fedland loss_slice_2d", f"{t:.1f}", f"{1e3 * t / points**2:.0f}", f"{ours.losses.min():.4f}"])

    # plain loop over the same directions: copy parameters in, evaluate, per grid point
    gen = torch.Generator().manual_seed(0)
    d1, d2 = random_direction(model, generator=gen), random_direction(model, generator=gen)
    own = copy.deepcopy(model).eval()
    start = {n: p.detach().clone() for n, p in own.named_parameters()}
    grid = centered_grid(1.0, points)
    total = sum(len(y) for _, y in batches)

    def plain() -> np.ndarray:
        out = np.zeros((points, points))
        with torch.no_grad():
            for i, a in enumerate(grid):
                for j, b in enumerate(grid):
                    for n, p in own.named_parameters():
                        p.copy_(start[n] + float(a) * d1[n] + float(b) * d2[n])
                    out[i, j] = sum(float(loss_fn(own(x), y)) * len(y) for x, y in batches) / total
        return out

    losses, t = timed(plain)
    times["plain"] = t
    rows.append(["plain loop (no_grad, copy params in)", f"{t:.1f}", f"{1e3 * t / points**2:.0f}", f"{losses.min():.4f}"])
    print(f"\nplain loop vs fedland, max |loss difference| on the same grid: {np.abs(losses - ours.losses).max():.1e}")

    landscapes = peer("loss_landscapes")
    if landscapes is None:
        rows.append(["loss-landscapes 3.0.6", "not installed", "", ""])
    else:
        import loss_landscapes.metrics as metrics

        x = torch.cat([x for x, _ in batches])
        y = torch.cat([y for _, y in batches])
        metric = metrics.Loss(loss_fn, x, y)
        own = copy.deepcopy(model).eval()
        torch.manual_seed(0)  # loss-landscapes draws its directions from the global RNG
        plane, t = timed(lambda: landscapes.random_plane(own, metric, distance=1, steps=points, normalization="filter", deepcopy_model=True))
        times["loss-landscapes"] = t
        rows.append(["loss-landscapes random_plane (filter)", f"{t:.1f}", f"{1e3 * t / points**2:.0f}", f"{np.min(plane):.4f}"])
    table(f"{points}x{points} filter-normalised 2-D slice", ["method", "cpu_s", "ms_per_point", "min_loss"], rows)
    for other in ("plain", "loss-landscapes"):
        if other in times:
            print(f"speed-up vs {other}: {times[other] / times['ours']:.2f}x")
    return times["plain"] / times["ours"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=125, help="125 divides 2000: every peer then averages the same loss")
    parser.add_argument("--slice-points", type=int, default=21)
    parser.add_argument("--train-samples", type=int, default=None,
                        help="train the CNN one epoch on this many training images (default: --samples)")
    parser.add_argument("--sections", default="eig,trace,slice", help="comma-separated subset of eig,eig5,trace,slice (eig5, top-5 against PyHessian, is slow)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph")  # PyHessian's
    print(f"torch {torch.__version__}, torch.set_num_threads(1): single-thread comparison on CPU")

    data = load_dataset("MNIST", os.environ.get("FEDLAND_DATA_DIR", "./data"), download=False)
    x, y = data.train_x[: args.samples], data.train_y[: args.samples]
    train_samples = args.train_samples or args.samples
    model, _ = train_local(
        build_model("FedCNN", seed=0), data.train_x[:train_samples], data.train_y[:train_samples],
        epochs=1, batch_size=32, learning_rate=0.05, momentum=0.9, seed=0,
    )
    model.eval()
    batches = [(x[i : i + args.batch_size], y[i : i + args.batch_size]) for i in range(0, args.samples, args.batch_size)]
    loss_fn = nn.CrossEntropyLoss()
    print(f"model FedCNN ({sum(p.numel() for p in model.parameters())} parameters, 1 epoch of SGD on {train_samples} images), "
          f"{args.samples} MNIST training samples in batches of {args.batch_size}")

    sections = set(args.sections.split(","))
    eig = trace = slice_ = math.nan
    model64 = copy.deepcopy(model).double()
    batches64 = [(xb.double(), yb) for xb, yb in batches]
    if "eig" in sections:
        reference, t = timed(lambda: top_eigenvalues(model64, loss_fn, batches64, tol=1e-10, max_iter=300, seed=1))
        print(f"reference: lambda_max = {reference.values[0]:.10f} ({reference.num_hvps} float64 products, {t:.0f} s, converged={reference.converged})")

        eig = bench_top_eigenvalue(model, loss_fn, batches, float(reference.values[0]))
    if "eig5" in sections:
        reference5, t = timed(lambda: top_eigenvalues(model64, loss_fn, batches64, k=5, tol=1e-8, max_iter=300, seed=1))
        print(f"reference: top-5 = {reference5.values} ({reference5.num_hvps} float64 products, {t:.0f} s)")
        bench_top5(model, loss_fn, batches, reference5.values)
    if "trace" in sections:
        trace = bench_trace(model, loss_fn, batches)
    if "slice" in sections:
        slice_ = bench_slice(model, loss_fn, batches, args.slice_points)

    print("\n## targets")
    for label, value, key in (
        ("top eigenvalue faster than PyHessian at equal or better accuracy (>= 3x)", eig, "eig_speedup"),
        ("trace: CPU time to PyHessian's standard error, PyHessian / fedland (>= 2x)", trace, "trace_speedup"),
        ("2-D slice: plain no_grad loop / fedland CPU time (>= 1x)", slice_, "slice_speedup"),
    ):
        verdict = "skipped" if math.isnan(value) else f"{value:.2f}x -> {'met' if value >= TARGETS[key] else 'NOT met'}"
        print(f"{label}: {verdict}")

if __name__ == "__main__":
    main()
