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

``fit_schedule`` is the rule: with ``budget`` the share of the experiment's
training CPU that measurement may take (the measured rounds, the last one
included, against all rounds' training), it picks the largest ``num_samples``
in ``[MIN_BUDGET_SAMPLES, DEFAULT_NUM_SAMPLES]`` that fits when every round is
measured, then the smallest ``every`` that fits with it. A value the user
gave is kept and only the other one is chosen; with both given the budget
changes nothing. ``resolve_landscape`` applies it to a spec's landscape
section. The members' PAC-Bayes flatness (``member_pac_bayes``) is most of a
member's measurement; left unset, it is kept when the schedule with it fits
and measures at least half as many rounds as the schedule without it, else
left out. ``fedland.spec`` calls it, so the stored spec holds the resolved
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
    "measured_rounds",
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


def _model_measure_s(cost: ModelCost, lspec: LandscapeSpec, num_samples: int, *, pac_bayes: bool = True) -> float:
    """``fedland.measure.measure_model``: a gradient, the Lanczos and trace products, sharpness, PAC-Bayes."""
    products = LANCZOS_PRODUCTS + lspec.trace_probes
    forwards = 1 + (pac_bayes_evaluations(lspec) if pac_bayes else 0)
    return num_samples * (cost.gradient_s + products * cost.hvp_s + forwards * cost.forward_s)


def member_measurement_s(cost: ModelCost, lspec: LandscapeSpec, num_samples: int) -> float:
    """Seconds of one member's measurement on ``num_samples`` samples (``measure_client_round``)."""
    interpolation = lspec.interpolation_points * num_samples * cost.forward_s
    pac_bayes = lspec.member_pac_bayes is not False
    return 2 * _model_measure_s(cost, lspec, num_samples, pac_bayes=pac_bayes) + interpolation


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


def measured_rounds(rounds: int, every: int) -> int:
    """Rounds measured in an experiment of ``rounds`` rounds: every ``every``-th and the last (``ceil``)."""
    return -(-rounds // every)


def fit_schedule(
    measurement_s: Callable[[int], float],
    round_train_s: float,
    budget: float,
    rounds: int,
    *,
    every: int | None = None,
    num_samples: int | None = None,
) -> tuple[int, int]:
    """The ``(every, num_samples)`` that keeps measurement within ``budget`` of the training CPU.

    The experiment's measurement, ``measured_rounds(rounds, every) x measurement_s(num_samples)``, is
    held within ``budget x round_train_s x rounds`` (the last round is measured whatever ``every`` is).

    Args:
        measurement_s: seconds of one measured round on a given ``num_samples`` (non-decreasing).
        round_train_s: seconds of one round's training.
        budget: the share of the training CPU measurement may take, over the experiment.
        rounds: the experiment's rounds.
        every: the user's value, kept as given (then only ``num_samples`` is chosen).
        num_samples: the user's value, kept as given (then only ``every`` is chosen).

    Returns:
        ``num_samples``: the user's, else the largest in ``[MIN_BUDGET_SAMPLES, DEFAULT_NUM_SAMPLES]``
        that fits when measured every ``every`` rounds (every round when ``every`` is not given; the
        smallest when none fits); ``every``: the user's, else the smallest in ``[1, rounds]`` that fits
        with it (``rounds`` when even the last round alone does not).
    """
    allowance = budget * round_train_s * rounds
    if num_samples is None:
        times = measured_rounds(rounds, every or 1)
        low, high = MIN_BUDGET_SAMPLES, DEFAULT_NUM_SAMPLES
        while low < high:  # the largest that fits, by bisection (measurement_s grows with the samples)
            middle = (low + high + 1) // 2
            if times * measurement_s(middle) <= allowance:
                low = middle
            else:
                high = middle - 1
        num_samples = low
    if every is None:
        seconds = measurement_s(num_samples)
        affordable = min(rounds, math.floor(allowance / seconds * (1 + 1e-12))) if seconds > 0 else rounds
        # the smallest every with ceil(rounds / every) <= affordable
        every = measured_rounds(rounds, affordable) if affordable >= 1 else rounds
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
    """``lspec`` with ``every``, ``num_samples`` and ``member_pac_bayes`` set: the given values, the rest fitted.

    ``members`` train each round for ``local_epochs`` epochs over ``member_samples`` samples on average;
    the server's subset is drawn from ``held_out_samples``. ``every`` is at most ``max_every`` (the last
    round is measured anyway), the experiment's rounds. ``every`` and ``num_samples`` come from
    ``fit_schedule``; an unset ``member_pac_bayes`` is on when the schedule with it keeps measurement
    within the budget and measures at least half as many rounds as the schedule without it, else off. Switched off,
    or with ``every`` and ``num_samples`` both given, the budget changes nothing: the unset values take 1,
    ``DEFAULT_NUM_SAMPLES`` and on. A model without a calibration entry (named by import path) gets the
    cheapest schedule for what is unset: the last round only (``max_every``) on ``MIN_BUDGET_SAMPLES``,
    without the members' PAC-Bayes.
    """
    if not lspec.enabled or (lspec.every is not None and lspec.num_samples is not None):
        return dataclasses.replace(lspec, every=lspec.every or 1, num_samples=lspec.num_samples or DEFAULT_NUM_SAMPLES,
                                   member_pac_bayes=lspec.member_pac_bayes is not False)
    cost = model_costs().get(model)
    if cost is None:  # a model of the researcher's own (an import path): no calibration, so the cheapest schedule
        return dataclasses.replace(lspec, every=lspec.every or max_every, num_samples=lspec.num_samples or MIN_BUDGET_SAMPLES,
                                   member_pac_bayes=bool(lspec.member_pac_bayes))
    train_s = round_training_s(cost, members, local_epochs, member_samples)

    def fitted(member_pac_bayes: bool) -> tuple[LandscapeSpec, bool]:
        candidate = dataclasses.replace(lspec, member_pac_bayes=member_pac_bayes)

        def measurement_s(num_samples: int) -> float:
            member = max(1, min(num_samples, math.floor(member_samples)))
            held_out = min(num_samples, held_out_samples)
            return members * member_measurement_s(cost, candidate, member) + server_measurement_s(
                cost, candidate, held_out, members, member
            )

        every, num_samples = fit_schedule(measurement_s, train_s, lspec.budget, max_every, every=lspec.every,
                                          num_samples=lspec.num_samples)
        every = min(every, max_every)
        spent = measured_rounds(max_every, every) * measurement_s(num_samples)
        fits = spent <= lspec.budget * train_s * max_every * (1 + 1e-9)
        return dataclasses.replace(candidate, every=every, num_samples=num_samples), fits

    if lspec.member_pac_bayes is not None:
        return fitted(lspec.member_pac_bayes)[0]
    with_members, fits = fitted(True)
    without = fitted(False)[0]
    assert with_members.every is not None and without.every is not None  # fitted
    often_enough = 2 * measured_rounds(max_every, with_members.every) >= measured_rounds(max_every, without.every)
    return with_members if fits and often_enough else without
