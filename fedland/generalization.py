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

from fedland._objective import check_finite, evaluation_loop, materialize, preserved

__all__ = [
    "PAC_BAYES_CONFIDENCE",
    "PAC_BAYES_DELTA",
    "PAC_BAYES_EPSILON",
    "LayerNorms",
    "NormSummary",
    "PacBayes",
    "generalization_gap",
    "pac_bayes_flatness",
    "pac_bayes_max_rises",
    "pac_bayes_typical_draws",
    "weight_norms",
    "zero_one_error",
]

Batch = tuple[Tensor, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]

PAC_BAYES_DELTA = 0.1
PAC_BAYES_EPSILON = 1e-3
#: Confidence of the interval on sigma (two-sided normal interval on the mean rise, z = 1.96).
PAC_BAYES_CONFIDENCE = 0.95
_Z = 1.959963984540054
#: Draws taken first at each trial sigma; more, doubling up to ``samples``, unless the mean is already
#: EARLY_STOP_Z standard errors from the deviation (so far that stopping early barely changes the 95% level).
FIRST_DRAWS = 8
EARLY_STOP_Z = 3.0
#: The bisection is geometric over [upper / SIGMA_RANGE, upper]; below that sigma is reported as 0.
SIGMA_RANGE = 1e4
#: Doublings of the bracket's upper end before sigma is reported as the largest scale tried.
MAX_DOUBLINGS = 16


def pac_bayes_max_rises(steps: int) -> int:
    """The most noise scales `pac_bayes_flatness` evaluates (each over at most `samples` draws): its cost bound."""
    # first upper end, doublings, the floor, then three bisections (the estimate and both interval ends)
    return 1 + MAX_DOUBLINGS + 1 + 3 * steps


def pac_bayes_typical_draws(samples: int, steps: int) -> int:
    """The noisy models `pac_bayes_flatness` typically evaluates: its cost.

    8 draws at every scale tried, all ``samples`` at about ``steps + 4`` scales
    near the crossing (measured on FedNet: 1,472-1,824 draws with 128 samples and
    10 steps, against this 2,176).
    """
    return min(FIRST_DRAWS, samples) * pac_bayes_max_rises(steps) + samples * (steps + 4)


def zero_one_error(outputs: Tensor, targets: Tensor) -> Tensor:
    """Mean 0-1 error of class scores ``(batch, classes)`` against labels ``(batch,)``."""
    return (outputs.argmax(dim=1) != targets).to(outputs.dtype).mean()


@dataclass(frozen=True)
class PacBayes:
    """The result of ``pac_bayes_flatness``: the noise scale found, its interval, and the measures built on it.

    When ``saturated`` the search ran into an end of its range (noise up to
    ``sigma_max * 2**16`` could not be shown to raise the loss by ``deviation``, as
    for a model near chance under the 0-1 error; or even ``upper / 1e4`` raised it
    too much): ``sigma``, ``flatness`` and ``bound`` then measure the range, not the
    model, and are not to be read as numbers.
    """

    sigma: float
    sigma_low: float  # the PAC_BAYES_CONFIDENCE interval on sigma (see pac_bayes_flatness)
    sigma_high: float  # inf when the interval reaches the largest scale tried
    flatness: float  # 1 / sigma^2
    bound: float  # the KL-based bound term (see the module docstring)
    base_loss: float  # L(w)
    deviation_at_sigma: float  # the estimated E_u[L(w + u)] - L(w) at sigma
    deviation_stderr: float  # its standard error over the draws
    saturated: bool
    evaluations: int  # noise scales tried
    draws: int  # noisy models evaluated over all scales (the cost: one forward pass over the data each)

    @property
    def relative_half_width(self) -> float:
        """``(sigma_high - sigma_low) / (2 sigma)``: the interval's half width relative to ``sigma``."""
        if self.saturated or not self.sigma > 0:
            return math.inf
        return (self.sigma_high - self.sigma_low) / (2.0 * self.sigma)

    @property
    def flatness_interval(self) -> tuple[float, float]:
        """``(1 / sigma_high^2, 1 / sigma_low^2)``: the interval on the flatness."""
        return (1.0 / self.sigma_high**2 if self.sigma_high > 0 else math.inf,
                1.0 / self.sigma_low**2 if self.sigma_low > 0 else math.inf)


def pac_bayes_flatness(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Batch],
    *,
    deviation: float = 0.1,
    samples: int = 128,
    steps: int = 10,
    magnitude_aware: bool = False,
    sigma_max: float = 1.0,
    seed: int = 0,
) -> PacBayes:
    """The largest ``sigma`` whose weight noise raises the expected loss by at most ``deviation``, with an interval.

    The expected rise ``r(sigma) = E_u[L(w + u)] - L(w)`` is estimated by the mean
    over seeded draws (the same draws, in the same order, at every ``sigma``), with
    its standard error ``se``: sequentially, 8 draws first, doubling up to
    ``samples`` unless the mean is already 3 standard errors from ``deviation``
    (scales far from the crossing are decided cheaply; those near it, which set
    the estimate and the interval, get all ``samples`` draws). Brackets first (doubling ``sigma_max`` up to 16 times
    while the estimate stays below ``deviation``), then ``steps`` geometric
    bisection steps (midpoint ``sqrt(low * high)``) from ``[upper / SIGMA_RANGE,
    upper]``; ``sigma`` is the lower end of the final bracket (its rise is at most
    ``deviation``). The 95% interval inverts the normal test on the mean: the
    same search on ``mean + 1.96 se`` gives ``sigma_low`` and on ``mean - 1.96 se``
    gives ``sigma_high`` (the scales at which ``deviation`` is inside the 95%
    interval of the rise), so it covers the sigma an infinite number of draws
    would give with about 95% confidence, up to the bisection's resolution.
    ``saturated`` when the search hits an end of its range (see :class:`PacBayes`).
    Each trial ``sigma`` costs ``samples`` forward passes over the data, in eval mode.

    Args:
        model: not modified; its weights and its outputs on ``batches`` must be
            finite (else ``NonFiniteLossError``).
        loss_fn: mean-reduced ``(outputs, targets) -> scalar``, e.g. ``zero_one_error``.
        batches: the data (read once).
        deviation: the allowed rise of the expected loss (> 0).
        samples: the most noise draws averaged per trial ``sigma`` (>= 2: the interval needs a spread);
            the default 128 keeps the interval's half width within 10% of ``sigma`` on the example
            models (FedNet on 256 MNIST images; README "PAC-Bayes").
        steps: bisection steps after bracketing, for the estimate and for each interval end.
        magnitude_aware: scale each weight's noise by its magnitude (see module docstring).
        sigma_max: the first upper end of the bracket.
        seed: seeds the noise draws.
    """
    _check_positive_int(samples, "samples")
    if samples < 2:
        raise ValueError(f"samples: must be >= 2 (the interval needs a spread over draws), got {samples!r}")
    _check_positive_int(steps, "steps")
    if not (isinstance(deviation, (int, float)) and math.isfinite(deviation) and deviation > 0):
        raise ValueError(f"deviation: must be a finite number > 0, got {deviation!r}")
    if not (isinstance(sigma_max, (int, float)) and math.isfinite(sigma_max) and sigma_max > 0):
        raise ValueError(f"sigma_max: must be a finite number > 0, got {sigma_max!r}")
    if not callable(loss_fn):
        raise ValueError(f"loss_fn: must be callable, got {loss_fn!r}")
    data = materialize(batches, "batches")
    with preserved(model):
        model.eval()
        params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
        if not params:
            raise ValueError("model: has no trainable parameters")
        for weight in params.values():
            check_finite(weight, "weights")
        fixed = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
        buffers = dict(model.named_buffers())

        def loss_at(weights: Mapping[str, Tensor], check_outputs: bool = False) -> float:
            state = {**weights, **fixed, **buffers}

            def forward(inputs: Tensor) -> Tensor:
                if check_outputs and inputs.is_floating_point():  # tanh(inf) is finite: check the inputs too
                    check_finite(inputs, "inputs")
                outputs = functional_call(model, state, (inputs,))
                if check_outputs:  # a 0-1 error stays finite on NaN outputs: check them at the model
                    check_finite(outputs, "outputs")
                return outputs

            totals = evaluation_loop(model, data, loss_fn, forward=forward, device=next(iter(weights.values())).device)
            return totals.loss / totals.count

        base = loss_at(params, check_outputs=True)
        check_finite(base)
        draw_seeds = torch.randint(0, 2**62, (samples,), generator=torch.Generator().manual_seed(seed)).tolist()
        cache: dict[float, list[float]] = {}  # sigma -> the losses of the draws taken so far, in draw order

        def draw(sigma: float, index: int) -> float:
            generator = torch.Generator().manual_seed(int(draw_seeds[index]))
            noisy = {}
            for name, w in params.items():
                z = torch.randn(w.shape, generator=generator, dtype=w.dtype).to(w.device)
                scale = torch.sqrt((sigma * w) ** 2 + PAC_BAYES_EPSILON**2) if magnitude_aware else sigma
                noisy[name] = w + scale * z
            return loss_at(noisy)

        def rise(sigma: float) -> tuple[float, float]:
            """Mean rise over the draws at ``sigma`` and its standard error (sequential, see above)."""
            losses = cache.setdefault(sigma, [])
            wanted = min(FIRST_DRAWS, samples)
            while True:
                losses.extend(draw(sigma, i) for i in range(len(losses), wanted))
                rises = torch.tensor(losses, dtype=torch.float64) - base
                if not bool(torch.isfinite(rises).all()):  # a noisy model whose loss overflows rose without bound
                    return math.inf, 0.0
                mean, stderr = float(rises.mean()), float(rises.std(unbiased=True)) / math.sqrt(len(losses))
                if wanted >= samples or abs(mean - deviation) > EARLY_STOP_Z * stderr:
                    return mean, stderr
                wanted = min(2 * wanted, samples)

        estimate = _largest_below(lambda s: rise(s)[0], deviation, float(sigma_max), steps)
        low_end = _largest_below(lambda s: _shifted(rise(s), _Z), deviation, float(sigma_max), steps)
        high_end = _largest_below(lambda s: _shifted(rise(s), -_Z), deviation, float(sigma_max), steps)
        flat = torch.cat([w.reshape(-1).double() for w in params.values()])  # (omega,)
        num_examples = sum(int(y.shape[0]) for _, y in data)
    sigma = estimate.sigma
    # saturated: the noise could not be shown to raise the loss by `deviation` within the range, or even its
    # smallest scale raised it too much
    saturated = high_end.at_cap or estimate.at_floor
    mean_rise, stderr = rise(sigma) if sigma > 0 else (0.0, 0.0)
    return PacBayes(
        sigma=sigma,
        sigma_low=min(low_end.sigma, sigma),
        sigma_high=math.inf if high_end.at_cap else max(high_end.upper, sigma),
        flatness=1.0 / sigma**2 if sigma > 0 else math.inf,
        bound=pac_bayes_bound(flat, sigma, num_examples, magnitude_aware),
        base_loss=base,
        deviation_at_sigma=mean_rise,
        deviation_stderr=stderr,
        saturated=saturated,
        evaluations=len(cache),
        draws=sum(len(losses) for losses in cache.values()),
    )


@dataclass(frozen=True)
class _Crossing:
    sigma: float  # the largest scale tried whose statistic is at most the deviation (0: none)
    upper: float  # the smallest scale tried above it whose statistic exceeds the deviation (inf: none)
    at_cap: bool  # the statistic never exceeded the deviation up to the largest scale
    at_floor: bool  # the statistic exceeded the deviation even at the smallest scale


def _largest_below(statistic: Callable[[float], float], deviation: float, sigma_max: float, steps: int) -> _Crossing:
    """Bracket by doubling, then bisect geometrically, the scale where ``statistic`` crosses ``deviation``."""
    low, high = 0.0, sigma_max
    doublings = 0
    while statistic(high) <= deviation and doublings < MAX_DOUBLINGS:
        low = high
        high *= 2.0
        doublings += 1
    if statistic(high) <= deviation:  # never rose enough: the largest scale tried
        return _Crossing(high, math.inf, at_cap=True, at_floor=False)
    if low == 0.0:  # geometric search needs a positive lower end: try SIGMA_RANGE below
        floor = high / SIGMA_RANGE
        if statistic(floor) > deviation:
            return _Crossing(0.0, floor, at_cap=False, at_floor=True)
        low = floor
    for _ in range(steps):
        middle = math.sqrt(low * high)  # geometric: sigma spans orders of magnitude
        if statistic(middle) <= deviation:
            low = middle
        else:
            high = middle
    return _Crossing(low, high, at_cap=False, at_floor=False)


def _shifted(mean_and_stderr: tuple[float, float], z: float) -> float:
    mean, stderr = mean_and_stderr
    return mean + z * stderr


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
    for name, weight in model.named_parameters():
        check_finite(weight.detach(), f"weights: {name!r}")
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
    for name, value in (("train_loss", train_loss), ("train_accuracy", train_accuracy), ("test_loss", test_loss),
                        ("test_accuracy", test_accuracy)):
        if isinstance(value, (bool, str)) or not isinstance(value, (int, float, Tensor)) and not hasattr(value, "__float__"):
            raise ValueError(f"{name}: must be a number, got {value!r}")
        check_finite(float(value), name)
    return {"loss": float(test_loss) - float(train_loss), "accuracy": float(train_accuracy) - float(test_accuracy)}


def _log(value: float) -> float:
    return math.log(value) if value > 0 else -math.inf


def _check_positive_int(value: object, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name}: must be a positive integer, got {value!r}")
