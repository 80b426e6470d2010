"""The landscape budget: what a measurement costs next to a round's training, and the schedule that fits.

Costs are CPU seconds on one torch thread, from the calibration table
``landscape_costs.json`` next to this file, which ``bench/bench_landscape_budget.py``
measures and rewrites: per model and per sample, a training step
(``train_s``: forward, backward, optimiser, augmentation), a forward pass in
eval mode (``forward_s``), a loss gradient (``gradient_s``) and a
Hessian-vector product (``hvp_s``).

A measured round costs the members' measurements (``member_measurement_s``:
both models' curvature, sharpness and PAC-Bayes flatness, and the
interpolation path, on the member's landscape subset) plus the server's
(``server_measurement_s``: the global model's measures and the 2D surface on
the held-out subset; with at most ``PAIRWISE_MAX_MEMBERS`` participants the
pairwise barriers and the flatness gap too). A round's training costs
``members x local_epochs x samples x train_s``.

``fit_schedule`` is the rule: with ``budget`` the share of a round's training
CPU that measurement may take (averaged over the rounds between two
measurements), it picks the largest ``num_samples`` in
``[MIN_BUDGET_SAMPLES, DEFAULT_NUM_SAMPLES]`` that fits when every round is
measured, then the smallest ``every`` that fits with it. A value the user
gave is kept and only the other one is chosen; with both given the budget
changes nothing. ``resolve_landscape`` applies it to a spec's landscape
section; ``fedland.spec`` calls it, so the stored spec holds the resolved
values and server, workers and reports read the same schedule.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fedland.generalization import pac_bayes_typical_draws

if TYPE_CHECKING:
    from fedland.spec import LandscapeSpec

__all__ = [
    "COSTS_FILE",
    "DEFAULT_BUDGET",
    "DEFAULT_NUM_SAMPLES",
    "LANCZOS_PRODUCTS",
    "MIN_BUDGET_SAMPLES",
    "ModelCost",
    "fit_schedule",
    "member_measurement_s",
    "model_costs",
    "pac_bayes_evaluations",
    "resolve_landscape",
    "round_training_s",
    "server_measurement_s",
]

COSTS_FILE = Path(__file__).with_name("landscape_costs.json")
#: The share of a round's training CPU that measurement may take by default.
DEFAULT_BUDGET = 0.25
#: ``num_samples`` when the budget allows it, and the least the budget shrinks it to before measuring less often.
DEFAULT_NUM_SAMPLES, MIN_BUDGET_SAMPLES = 256, 128
LANCZOS_PRODUCTS = 60  # Hessian-vector products of the top-eigenvalue search at most (fedland.measure.EIGEN_MAX_ITER)
PAIRWISE_MAX_MEMBERS = 16  # fedland.measure.PAIRWISE_MAX_MEMBERS: the between-member measures' participant bound


@dataclass(frozen=True)
class ModelCost:
    """Seconds per sample of one model's operations on one CPU thread (a row of the calibration table)."""

    train_s: float
    forward_s: float
    gradient_s: float
    hvp_s: float


@functools.cache
def model_costs() -> dict[str, ModelCost]:
    """The calibration table: each built-in model's ``ModelCost`` (read once from ``COSTS_FILE``)."""
    table = json.loads(COSTS_FILE.read_text(encoding="utf-8"))
    return {name: ModelCost(**row) for name, row in table["models"].items()}


def pac_bayes_evaluations(lspec: LandscapeSpec) -> int:
    """Forward passes over the subset of one model's PAC-Bayes flatness (plain and magnitude-aware, sequential draws)."""
    return 2 * pac_bayes_typical_draws(lspec.pac_bayes_samples, lspec.pac_bayes_steps)


def _model_measure_s(cost: ModelCost, lspec: LandscapeSpec, num_samples: int) -> float:
    """``fedland.measure.measure_model``: a gradient, the Lanczos and trace products, sharpness, PAC-Bayes."""
    products = LANCZOS_PRODUCTS + lspec.trace_probes
    forwards = 1 + pac_bayes_evaluations(lspec)
    return num_samples * (cost.gradient_s + products * cost.hvp_s + forwards * cost.forward_s)


def member_measurement_s(cost: ModelCost, lspec: LandscapeSpec, num_samples: int) -> float:
    """Seconds of one member's measurement on ``num_samples`` samples (``measure_client_round``)."""
    interpolation = lspec.interpolation_points * num_samples * cost.forward_s
    return 2 * _model_measure_s(cost, lspec, num_samples) + interpolation


def server_measurement_s(
    cost: ModelCost, lspec: LandscapeSpec, held_out: int, members: int, member_samples: int
) -> float:
    """Seconds of the server's measurement of a round: ``members`` participants, subsets of the given sizes."""
    seconds = _model_measure_s(cost, lspec, held_out) + lspec.grid_points**2 * held_out * cost.forward_s
    seconds += members * member_samples * (cost.gradient_s + cost.forward_s)  # gradient dissimilarity, gap
    if members <= PAIRWISE_MAX_MEMBERS:
        pairs = members * (members - 1) // 2
        seconds += pairs * lspec.interpolation_points * held_out * cost.forward_s
        seconds += (members + 1) * LANCZOS_PRODUCTS * member_samples * cost.hvp_s  # flatness gap
    return seconds


def round_training_s(cost: ModelCost, members: int, local_epochs: int, member_samples: float) -> float:
    """Seconds of a round's local training: ``members`` members, ``local_epochs`` epochs of ``member_samples``."""
    return members * local_epochs * member_samples * cost.train_s


def fit_schedule(
    measurement_s: Callable[[int], float],
    round_train_s: float,
    budget: float,
    *,
    every: int | None = None,
    num_samples: int | None = None,
) -> tuple[int, int]:
    """The ``(every, num_samples)`` that keeps measurement within ``budget`` of the training CPU.

    Args:
        measurement_s: seconds of one measured round on a given ``num_samples`` (non-decreasing).
        round_train_s: seconds of one round's training.
        budget: the share of the training CPU measurement may take, averaged over ``every`` rounds.
        every: the user's value, kept as given (then only ``num_samples`` is chosen).
        num_samples: the user's value, kept as given (then only ``every`` is chosen).

    Returns:
        ``num_samples``: the user's, else the largest in ``[MIN_BUDGET_SAMPLES, DEFAULT_NUM_SAMPLES]``
        with ``measurement_s(num_samples) <= budget x round_train_s x (every or 1)`` (the smallest when
        none fits); ``every``: the user's, else the smallest (at least 1) with
        ``measurement_s(num_samples) <= budget x round_train_s x every``.
    """
    allowance = budget * round_train_s
    if num_samples is None:
        low, high = MIN_BUDGET_SAMPLES, DEFAULT_NUM_SAMPLES
        while low < high:  # the largest that fits, by bisection (measurement_s grows with the samples)
            middle = (low + high + 1) // 2
            if measurement_s(middle) <= allowance * (every or 1):
                low = middle
            else:
                high = middle - 1
        num_samples = low
    if every is None:
        every = max(1, math.ceil(measurement_s(num_samples) / allowance - 1e-9)) if allowance > 0 else 1
    return every, num_samples


def resolve_landscape(
    lspec: LandscapeSpec,
    model: str,
    *,
    members: int,
    local_epochs: int,
    member_samples: float,
    held_out_samples: int,
    max_every: int,
) -> LandscapeSpec:
    """``lspec`` with ``every`` and ``num_samples`` set: the given values, the rest by ``fit_schedule``.

    ``members`` train each round for ``local_epochs`` epochs over ``member_samples`` samples on average;
    the server's subset is drawn from ``held_out_samples``. ``every`` is at most ``max_every`` (the last
    round is measured anyway). Switched off, the unset values take 1 and ``DEFAULT_NUM_SAMPLES``. A model
    without a calibration entry (named by import path) gets the cheapest schedule for what is unset: the last
    round only (``max_every``) on ``MIN_BUDGET_SAMPLES``.
    """
    if not lspec.enabled or (lspec.every is not None and lspec.num_samples is not None):
        return dataclasses.replace(lspec, every=lspec.every or 1, num_samples=lspec.num_samples or DEFAULT_NUM_SAMPLES)
    cost = model_costs().get(model)
    if cost is None:  # a model of the researcher's own (an import path): no calibration, so the cheapest schedule
        return dataclasses.replace(lspec, every=lspec.every or max_every, num_samples=lspec.num_samples or MIN_BUDGET_SAMPLES)

    def measurement_s(num_samples: int) -> float:
        member = max(1, min(num_samples, math.floor(member_samples)))
        held_out = min(num_samples, held_out_samples)
        return members * member_measurement_s(cost, lspec, member) + server_measurement_s(
            cost, lspec, held_out, members, member
        )

    train_s = round_training_s(cost, members, local_epochs, member_samples)
    every, num_samples = fit_schedule(measurement_s, train_s, lspec.budget, every=lspec.every,
                                      num_samples=lspec.num_samples)
    return dataclasses.replace(lspec, every=min(every, max_every), num_samples=num_samples)
