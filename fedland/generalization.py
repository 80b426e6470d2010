"""Generalization measures: PAC-Bayes flatness, weight norms, the generalization gap.

Sources and formulas (``w`` the trainable parameters, ``omega`` their number,
``m`` the number of examples the flatness is measured on, ``delta = 0.1``):

* **PAC-Bayes flatness** (Jiang et al. 2019, "Fantastic generalization measures
  and where to find them", ICLR 2020, sec. C.3 / eqs. 47-52). ``sigma`` is the
  largest noise scale such that the expected value of a mean-reduced loss ``L``
  (the training *error* by default, as in the paper) under Gaussian weight
  noise rises by at most ``deviation``: ``E_u[L(w + u)] - L(w) <= deviation``,
  found by geometric bisection. Plain: ``u ~ N(0, sigma^2 I)``. Magnitude-aware:
  ``u_i ~ N(0, sigma^2 w_i^2 + eps^2)`` with ``eps = 1e-3``. The expectation is
  the mean over ``samples`` draws; the same seeded draws (common random
  numbers) are reused at every ``sigma``, so the estimate is a smooth
  function of ``sigma`` and the search deterministic. Reported: ``sigma``,
  ``flatness = 1 / sigma^2`` (pacbayes.flatness / pacbayes.mag.flatness) and
  the bound term (pacbayes.orig / pacbayes.mag.orig)::

      plain:     ||w||^2 / (4 sigma^2) + log(m / delta) + 10
      magnitude: 1/4 sum_i log((eps^2 + (sigma^2 + 1) ||w||^2 / omega) / (eps^2 + sigma^2 w_i^2))
                 + log(m / delta) + 10

* **Norms** (Jiang et al. 2019 sec. C.2; Neyshabur et al. 2015/2017; Bartlett et
  al. 2017): for each weight ``W`` with 2 or more dimensions (linear and conv
  layers; a conv kernel reshaped to ``(out, in * k * k)``) its Frobenius norm
  and its spectral norm (largest singular value, by seeded power iteration on
  ``W^T W``), and over layers their sum and the log of their product.
* **Generalization gap**: ``test_loss - train_loss`` and ``train_accuracy -
  test_accuracy`` (both positive when the model fits its training data better).

Every function leaves the model as it found it and draws randomness only from
its ``seed`` (on the CPU, so results do not depend on the device).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call

from fedland._objective import evaluation_loop, materialize, preserved

__all__ = [
    "PAC_BAYES_DELTA",
    "PAC_BAYES_EPSILON",
    "LayerNorms",
    "NormSummary",
    "PacBayes",
    "generalization_gap",
    "pac_bayes_flatness",
    "pac_bayes_max_rises",
    "weight_norms",
    "zero_one_error",
]

Batch = tuple[Tensor, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]

PAC_BAYES_DELTA = 0.1
PAC_BAYES_EPSILON = 1e-3
#: The bisection is geometric over [upper / SIGMA_RANGE, upper]; below that sigma is reported as 0.
SIGMA_RANGE = 1e4
#: Doublings of the bracket's upper end before sigma is reported as the largest scale tried.
MAX_DOUBLINGS = 16


def pac_bayes_max_rises(steps: int) -> int:
    """The most noise scales `pac_bayes_flatness` evaluates (each over `samples` draws): its cost bound."""
    return 1 + MAX_DOUBLINGS + 1 + steps  # first upper end, doublings, the floor, bisection steps


def zero_one_error(outputs: Tensor, targets: Tensor) -> Tensor:
    """Mean 0-1 error of class scores ``(batch, classes)`` against labels ``(batch,)``."""
    return (outputs.argmax(dim=1) != targets).to(outputs.dtype).mean()


@dataclass(frozen=True)
class PacBayes:
    """The result of ``pac_bayes_flatness``: the noise scale found and the measures built on it."""

    sigma: float
    flatness: float  # 1 / sigma^2
    bound: float  # the KL-based bound term (see the module docstring)
    base_loss: float  # L(w)
    deviation_at_sigma: float  # the estimated E_u[L(w + u)] - L(w) at sigma
    evaluations: int  # noise scales tried


def pac_bayes_flatness(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Batch],
    *,
    deviation: float = 0.1,
    samples: int = 4,
    steps: int = 10,
    magnitude_aware: bool = False,
    sigma_max: float = 1.0,
    seed: int = 0,
) -> PacBayes:
    """The largest ``sigma`` whose weight noise raises the expected loss by at most ``deviation``.

    Brackets first (doubling ``sigma_max`` up to 16 times while the deviation
    stays below ``deviation``), then ``steps`` geometric bisection steps
    (midpoint ``sqrt(low * high)``) from ``[upper / SIGMA_RANGE, upper]``, so
    8 steps pin ``sigma`` to within a factor ``1e4 ** (1 / 256)`` (3.7%);
    returns the lower end of the final bracket (always feasible; 0 when even
    ``upper / SIGMA_RANGE`` rises too much). Each trial ``sigma`` costs
    ``samples`` forward passes over the data, in eval mode.

    Args:
        model: not modified.
        loss_fn: mean-reduced ``(outputs, targets) -> scalar``, e.g. ``zero_one_error``.
        batches: the data (read once).
        deviation: the allowed rise of the expected loss (> 0).
        samples: noise draws averaged per trial ``sigma``.
        steps: bisection steps after bracketing.
        magnitude_aware: scale each weight's noise by its magnitude (see module docstring).
        sigma_max: the first upper end of the bracket.
        seed: seeds the noise draws.
    """
    _check_positive_int(samples, "samples")
    _check_positive_int(steps, "steps")
    if not (math.isfinite(deviation) and deviation > 0):
        raise ValueError(f"deviation: must be a finite number > 0, got {deviation!r}")
    if not (math.isfinite(sigma_max) and sigma_max > 0):
        raise ValueError(f"sigma_max: must be a finite number > 0, got {sigma_max!r}")
    data = materialize(batches, "batches")
    with preserved(model):
        model.eval()
        params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
        if not params:
            raise ValueError("model: has no trainable parameters")
        fixed = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
        buffers = dict(model.named_buffers())

        def loss_at(weights: Mapping[str, Tensor]) -> float:
            state = {**weights, **fixed, **buffers}
            totals = evaluation_loop(
                model, data, loss_fn, forward=lambda inputs: functional_call(model, state, (inputs,)),
                device=next(iter(weights.values())).device,
            )
            return totals.loss / totals.count

        base = loss_at(params)
        draw_seeds = torch.randint(0, 2**62, (samples,), generator=torch.Generator().manual_seed(seed)).tolist()

        def rise(sigma: float) -> float:
            losses = []
            for draw_seed in draw_seeds:
                generator = torch.Generator().manual_seed(int(draw_seed))
                noisy = {}
                for name, w in params.items():
                    z = torch.randn(w.shape, generator=generator, dtype=w.dtype).to(w.device)
                    scale = torch.sqrt((sigma * w) ** 2 + PAC_BAYES_EPSILON**2) if magnitude_aware else sigma
                    noisy[name] = w + scale * z
                losses.append(loss_at(noisy))
            return sum(losses) / samples - base

        evaluations = 0
        low, high, low_rise = 0.0, float(sigma_max), 0.0
        high_rise = rise(high)
        evaluations += 1
        doublings = 0
        while high_rise <= deviation and doublings < MAX_DOUBLINGS:
            low, low_rise = high, high_rise
            high *= 2.0
            high_rise = rise(high)
            evaluations += 1
            doublings += 1
        if high_rise <= deviation:  # never rose enough: report the largest scale tried
            low, low_rise = high, high_rise
        else:
            if low == 0.0:  # geometric search needs a positive lower end: try SIGMA_RANGE below
                floor = high / SIGMA_RANGE
                floor_rise = rise(floor)
                evaluations += 1
                if floor_rise <= deviation:
                    low, low_rise = floor, floor_rise
                else:
                    steps = 0  # even the smallest scale rises too much: sigma is reported as 0
            for _ in range(steps):
                middle = math.sqrt(low * high)  # geometric: sigma spans orders of magnitude
                middle_rise = rise(middle)
                evaluations += 1
                if middle_rise <= deviation:
                    low, low_rise = middle, middle_rise
                else:
                    high = middle
        flat = torch.cat([w.reshape(-1).double() for w in params.values()])  # (omega,)
        num_examples = sum(int(y.shape[0]) for _, y in data)
    sigma = low
    return PacBayes(
        sigma=sigma,
        flatness=1.0 / sigma**2 if sigma > 0 else math.inf,
        bound=pac_bayes_bound(flat, sigma, num_examples, magnitude_aware),
        base_loss=base,
        deviation_at_sigma=low_rise,
        evaluations=evaluations,
    )


def pac_bayes_bound(weights: Tensor, sigma: float, num_examples: int, magnitude_aware: bool) -> float:
    """Jiang et al.'s pacbayes.orig (plain) or pacbayes.mag.orig (magnitude-aware) term for flat ``weights``."""
    tail = math.log(num_examples / PAC_BAYES_DELTA) + 10.0
    squared = float((weights.double() ** 2).sum())
    if not magnitude_aware:
        return squared / (4.0 * sigma**2) + tail if sigma > 0 else math.inf
    eps2, s2 = PAC_BAYES_EPSILON**2, sigma**2
    numerator = eps2 + (s2 + 1.0) * squared / weights.numel()
    terms = torch.log(numerator / (eps2 + s2 * weights.double() ** 2))
    return 0.25 * float(terms.sum()) + tail


@dataclass(frozen=True)
class LayerNorms:
    """Frobenius and spectral norm of one weight (conv kernels reshaped to ``(out, -1)``)."""

    name: str
    frobenius: float
    spectral: float


@dataclass(frozen=True)
class NormSummary:
    """Per-layer norms and their sums and log-products over layers."""

    layers: list[LayerNorms]
    frobenius_sum: float
    spectral_sum: float
    log_frobenius_product: float
    log_spectral_product: float


def weight_norms(model: nn.Module, *, power_iterations: int = 50, seed: int = 0) -> NormSummary:
    """Frobenius and spectral norms of every weight with 2 or more dimensions.

    The spectral norm is ``sqrt`` of the top eigenvalue of ``W^T W`` by power
    iteration from a seeded Gaussian start (float64), ``power_iterations``
    steps; it converges from below, at a rate set by the gap between the two
    largest singular values. The model is only read.
    """
    _check_positive_int(power_iterations, "power_iterations")
    generator = torch.Generator().manual_seed(seed)
    layers = []
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if weight.dim() < 2:
                continue
            matrix = weight.detach().reshape(weight.shape[0], -1).double()  # (out, in * k * k)
            vector = torch.randn(matrix.shape[1], generator=generator, dtype=torch.float64).to(matrix.device)
            spectral = 0.0
            for _ in range(power_iterations):
                norm = float(vector.norm())
                if norm == 0.0:
                    break
                vector = vector / norm
                image = matrix @ vector  # (out,)
                spectral = float(image.norm())
                vector = matrix.T @ image  # (in * k * k,)
            layers.append(LayerNorms(name, float(torch.linalg.norm(matrix)), spectral))
    if not layers:
        raise ValueError("model: has no weight with 2 or more dimensions")
    return NormSummary(
        layers=layers,
        frobenius_sum=sum(layer.frobenius for layer in layers),
        spectral_sum=sum(layer.spectral for layer in layers),
        log_frobenius_product=sum(_log(layer.frobenius) for layer in layers),
        log_spectral_product=sum(_log(layer.spectral) for layer in layers),
    )


def generalization_gap(
    train_loss: float, train_accuracy: float, test_loss: float, test_accuracy: float
) -> dict[str, float]:
    """``{"loss": test_loss - train_loss, "accuracy": train_accuracy - test_accuracy}``."""
    return {"loss": float(test_loss) - float(train_loss), "accuracy": float(train_accuracy) - float(test_accuracy)}


def _log(value: float) -> float:
    return math.log(value) if value > 0 else -math.inf


def _check_positive_int(value: object, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name}: must be a positive integer, got {value!r}")
