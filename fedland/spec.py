"""The experiment spec: a validated, JSON-able description of one FL experiment.

An ``ExperimentSpec`` cannot exist invalid: ``__post_init__`` validates every
field (including that the partition is feasible on the dataset's class counts)
and raises ``SpecError`` naming the field. Validation is pure: it reads no
file and writes nothing.

``from_dict`` ignores the keys the store adds to an experiment document
(``STORE_KEYS``: ``_id``, ``status``, ``current_round``, ``created_at``,
``started_at``, ``finished_at``, ``error``) so a stored document reads back as
its spec; any other unknown key is refused.

``fingerprint(spec)`` is the one definition of "the same experiment": a rerun
of an unfinished experiment resumes it (see ``fingerprint``).

``LandscapeSpec`` is the ``landscape`` section: when and how the loss
landscape is measured (see DEVELOPERS.md "Landscape measurements").
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fedland.algorithm_spec import ClientAlgorithmSpec, check_pairing
from fedland.algorithms import cyclical_learning_rate
from fedland.components import DatasetComponent, is_import_path, resolve_dataset, resolve_model, resolve_strategy
from fedland.landscape_budget import DEFAULT_BUDGET, ModelCost, member_measurement_s, model_costs, resolve_landscape
from fedland.models import MODEL_INPUT_SHAPES
from fedland.partition import PartitionError, client_sizes, plan_counts
from fedland.partition_scheme import TEST_SPLITS, PartitionScheme

__all__ = [
    "STORE_KEYS",
    "STRATEGY_NAMES",
    "STRATEGY_PARAMS",
    "DEFAULT_UPDATE_SCREENING",
    "ROBUST_MAX_UPDATES",
    "ExperimentSpec",
    "LandscapeSpec",
    "SpecError",
    "StrategySpec",
    "fingerprint",
    "load_specs",
]

STORE_KEYS: frozenset[str] = frozenset(
    {"_id", "status", "current_round", "created_at", "started_at", "finished_at", "error"}
)

RATIO_TOLERANCE = 1e-6
INT64_MAX = 2**63 - 1  # the store keeps integers as BSON int64

# Documented limits (README "Limits"): far above any sensible experiment, far
# below what would overflow a store field or stall the server.
MAX_DESCRIPTION_CHARS = 10_000
MAX_ROUNDS = 100_000
MAX_LOCAL_EPOCHS = 1_000
MAX_BATCH_SIZE = 65_536
MAX_LEARNING_RATE = 100.0
#: Upper bounds of the landscape section's fields, one by one.
LANDSCAPE_MAX: dict[str, float] = {
    "every": MAX_ROUNDS,
    "num_samples": 60_000,
    "top_k": 50,
    "trace_probes": 1_000,
    "interpolation_points": 1_001,
    "grid_points": 101,
    "sharpness_rho": 100.0,
    "grid_radius": 1_000.0,
    "pac_bayes_samples": 4_096,
    "pac_bayes_steps": 64,
    "power_iterations": 1_000,
}
#: Cost bound of one member's landscape measurement, in calibrated CPU seconds (a day of one core;
#: ``fedland.landscape_budget.member_measurement_s``; ResNet18's defaults take ~7 hours with 128 PAC-Bayes draws).
LANDSCAPE_COST_BUDGET_S = 86_400.0
#: The largest ``landscape.budget``: measurement may take at most this many times the training CPU.
MAX_LANDSCAPE_BUDGET = 100.0
#: Memory bound of the Hessian trace's probe block: trace_probes x parameters x 8 bytes.
LANDSCAPE_MEMORY_BUDGET_BYTES = 1 << 30


class SpecError(ValueError):
    """An invalid experiment spec; ``field`` names the input, the message the rule."""

    def __init__(self, field: str, rule: str) -> None:
        super().__init__(f"{field}: {rule}")
        self.field = field
        self.rule = rule


# --- strategy parameters ------------------------------------------------------
# The one table of aggregation strategies and their parameters: the spec accepts
# exactly what fedland.strategies can build (make_strategy takes these values as given).

_REQUIRED = object()


@dataclass(frozen=True)
class StrategyParam:
    """One strategy parameter: its default (or required), the rule in words, and its check."""

    default: Any
    rule: str
    check: Callable[[Any], bool]

    @property
    def required(self) -> bool:
        return self.default is _REQUIRED


def _number_in(low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> Callable[[Any], bool]:
    def check(value: Any) -> bool:
        if not _is_real(value):
            return False
        above = value > low if low_open else value >= low
        below = value < high if high_open else value <= high
        return above and below

    return check


_POSITIVE = StrategyParam(None, "a finite number > 0", _number_in(0.0, math.inf, low_open=True, high_open=True))
_FRACTION = StrategyParam(None, "a number in [0, 1)", _number_in(0.0, 1.0, high_open=True))


def _param(template: StrategyParam, default: Any) -> StrategyParam:
    return dataclasses.replace(template, default=default)


_ADAPTIVE = {
    "eta": _param(_POSITIVE, 1e-2),
    "beta_1": _param(_FRACTION, 0.9),
    "beta_2": _param(_FRACTION, 0.99),
    "tau": _param(_POSITIVE, 1e-3),
}

STRATEGY_PARAMS: dict[str, dict[str, StrategyParam]] = {
    "FedAvg": {},
    "FedAvgM": {"server_learning_rate": _param(_POSITIVE, 1.0), "server_momentum": _param(_FRACTION, 0.9)},
    "FedProx": {"mu": StrategyParam(_REQUIRED, "a proximal weight mu >= 0", _number_in(0.0, math.inf, high_open=True))},
    "FedAdam": dict(_ADAPTIVE),
    "FedYogi": dict(_ADAPTIVE),
    "FedAdagrad": dict(_ADAPTIVE),
    "FedMedian": {},
    "FedTrimmedAvg": {"beta": StrategyParam(0.1, "a number in [0, 0.5)", _number_in(0.0, 0.5, high_open=True))},
    "Krum": {
        "num_malicious": StrategyParam(0, "an integer >= 0", lambda v: _is_int(v) and 0 <= v <= INT64_MAX),
        "num_selected": StrategyParam(1, "an integer >= 1", lambda v: _is_int(v) and 1 <= v <= INT64_MAX),
    },
    # the server halves of fedland.algorithms (participation comes from the experiment: make_strategy)
    "SCAFFOLD": {"server_learning_rate": _param(_POSITIVE, 1.0)},
    "FedDyn": {"alpha": _param(_POSITIVE, 0.01)},
    "FedSWA": {
        "start_round": StrategyParam(_REQUIRED, "an integer >= 1", lambda v: _is_int(v) and 1 <= v <= MAX_ROUNDS),
        "cycle_length": StrategyParam(1, "an integer >= 1", lambda v: _is_int(v) and 1 <= v <= MAX_ROUNDS),
        "lr_min": StrategyParam(
            None, "null (a constant learning rate) or a finite number > 0", lambda v: v is None or _POSITIVE.check(v)
        ),
    },
}
STRATEGY_NAMES: tuple[str, ...] = tuple(STRATEGY_PARAMS)
# Robust strategies (STRATEGIES[name].averages is False) need every update of a round
# at once (the others only their weighted mean): the server holds at most
# ROBUST_MAX_UPDATES of them per round.
ROBUST_MAX_UPDATES = 100
#: The default `ExperimentSpec.update_screening`: an update that moved the model a hundred times its own size is
#: corrupt, not heterogeneous (honest updates of the examples, tiny and skewed members included, stay far below 1).
DEFAULT_UPDATE_SCREENING = 100.0


@dataclass(frozen=True)
class StrategySpec:
    """An aggregation strategy by name, with its parameters (``STRATEGY_PARAMS`` holds the rules).

    Unknown parameters and values outside a parameter's rule raise ``SpecError``;
    ``FedProx`` requires ``params["mu"] >= 0`` (clients read it: ``prox_mu``).
    ``resolved_params`` adds the defaults of the parameters not given. A name
    ``"package.module:Class"`` is resolved (``fedland.components``) and built
    with ``params`` as given, which its class checks.
    """

    name: str = "FedAvg"
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.name, str) and is_import_path(self.name):
            object.__setattr__(self, "params", _json_object(self.params, "strategy.params"))
            factory = _resolved(resolve_strategy, self.name, "strategy.name")
            try:
                factory(**self.params)
            except (TypeError, ValueError) as error:
                raise SpecError("strategy.params", f"refused by {self.name}: {error}") from None
            return
        if self.name not in STRATEGY_NAMES:
            raise SpecError("strategy.name", f"unknown strategy {self.name!r}; valid: {', '.join(STRATEGY_NAMES)}")
        object.__setattr__(self, "params", _json_object(self.params, "strategy.params"))
        rules = STRATEGY_PARAMS[self.name]
        for param, value in self.params.items():
            field_name = f"strategy.params.{param}"
            if param not in rules:
                known = ", ".join(sorted(rules)) or "none"
                raise SpecError(field_name, f"unknown parameter for {self.name} (allowed: {known})")
            if not rules[param].check(value):
                raise SpecError(field_name, f"must be {rules[param].rule}, got {value!r}")
        for param, rule in rules.items():
            if rule.required and param not in self.params:
                raise SpecError(f"strategy.params.{param}", f"{self.name} needs {rule.rule}; missing")

    @property
    def resolved_params(self) -> dict[str, Any]:
        """Every parameter of the strategy: the given ones, and the defaults of the rest."""
        if self.name not in STRATEGY_PARAMS:
            return dict(self.params)
        return {param: self.params.get(param, rule.default) for param, rule in STRATEGY_PARAMS[self.name].items()}

    @property
    def prox_mu(self) -> float:
        """The FedProx proximal weight clients train with (0.0 for other strategies)."""
        return float(self.params["mu"]) if self.name == "FedProx" else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "params": json.loads(json.dumps(self.params))}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StrategySpec:
        if not isinstance(data, Mapping):
            raise SpecError("strategy", f"must be an object with 'name' and 'params', got {data!r}")
        for key in data:
            if key not in ("name", "params"):
                raise SpecError(f"strategy.{key}", "unknown key; valid keys: name, params")
        if "name" not in data:
            raise SpecError("strategy.name", "missing")
        return cls(name=data["name"], params=data.get("params", {}))


@dataclass(frozen=True, kw_only=True)
class LandscapeSpec:
    """When and how the loss landscape is measured; every field has a default.

    Measured in rounds where ``round % every == 0`` and always in the last
    round (``scheduled``). ``num_samples`` is the size of the fixed subset each
    measurement uses. ``budget`` is the share of a round's training CPU that
    measurement may take: left unset (``None``), ``every`` and ``num_samples``
    are chosen to fit it when the experiment spec is built
    (``fedland.landscape_budget.resolve_landscape``), and a value given wins;
    an ``ExperimentSpec`` always holds them resolved. ``top_k`` is ``top_k`` the number of Hessian eigenvalues,
    ``trace_probes`` the Hutch++ products for the trace, ``sharpness_rho`` the
    SAM radius, ``interpolation_points`` the alphas in [0, 1] from global to
    local, ``grid_points`` the odd 2D surface resolution per axis and
    ``grid_radius`` its extent in units of the principal directions.
    ``pac_bayes_deviation`` is the allowed rise of the training error under
    weight noise that defines the PAC-Bayes sigma, ``pac_bayes_samples`` the
    noise draws per trial sigma, ``pac_bayes_steps`` the bisection steps and
    ``power_iterations`` the steps of each layer's spectral norm (see
    ``fedland.generalization``). ``member_pac_bayes``: whether the members
    measure the PAC-Bayes flatness of their two models too (the server always
    measures the global model's). It is most of a member's measurement (128
    draws at each noise scale tried): left unset, the budget keeps it when the
    schedule with it measures at least half as many rounds as without it.

    The defaults: 12 trace products, a 9 x 9 surface, and a budget of 25%.
    """

    enabled: bool = True
    every: int | None = None
    num_samples: int | None = None
    budget: float = DEFAULT_BUDGET
    top_k: int = 2
    trace_probes: int = 12
    sharpness_rho: float = 0.05
    interpolation_points: int = 11
    grid_points: int = 9
    grid_radius: float = 1.0
    pac_bayes_deviation: float = 0.1
    pac_bayes_samples: int = 128  # the interval on sigma within +-10% on FedNet (README "PAC-Bayes")
    pac_bayes_steps: int = 10
    power_iterations: int = 30
    member_pac_bayes: bool | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise SpecError("landscape.enabled", f"must be true or false, got {self.enabled!r}")
        if self.member_pac_bayes is not None and not isinstance(self.member_pac_bayes, bool):
            raise SpecError("landscape.member_pac_bayes",
                            f"must be true, false or null (the budget decides), got {self.member_pac_bayes!r}")
        for name in ("every", "num_samples", "top_k", "trace_probes", "pac_bayes_samples", "pac_bayes_steps",
                     "power_iterations"):
            value = getattr(self, name)
            if name in ("every", "num_samples") and value is None:
                continue  # chosen by the budget
            if not _is_int(value) or value <= 0:
                raise SpecError(f"landscape.{name}", f"must be a positive integer, got {value!r}")
        if self.pac_bayes_samples < 2:
            raise SpecError("landscape.pac_bayes_samples", f"must be >= 2 (sigma's interval needs a spread), got {self.pac_bayes_samples}")
        if self.trace_probes < 4:
            raise SpecError("landscape.trace_probes", f"Hutch++ needs at least 4 products, got {self.trace_probes}")
        if not _is_int(self.interpolation_points) or self.interpolation_points < 2:
            raise SpecError(
                "landscape.interpolation_points", f"must be an integer >= 2, got {self.interpolation_points!r}"
            )
        if not _is_int(self.grid_points) or self.grid_points < 3 or self.grid_points % 2 == 0:
            raise SpecError(
                "landscape.grid_points",
                f"must be an odd integer >= 3 (the centre is the model itself), got {self.grid_points!r}",
            )
        if not _is_real(self.pac_bayes_deviation) or not 0 < self.pac_bayes_deviation <= 1:
            raise SpecError(
                "landscape.pac_bayes_deviation",
                f"must be a number in (0, 1] (a rise of the training error), got {self.pac_bayes_deviation!r}",
            )
        object.__setattr__(self, "pac_bayes_deviation", float(self.pac_bayes_deviation))
        if not _is_real(self.budget) or not 0 < self.budget <= MAX_LANDSCAPE_BUDGET:
            raise SpecError(
                "landscape.budget",
                f"must be a number in (0, {MAX_LANDSCAPE_BUDGET:g}] (the share of a round's training CPU "
                f"measurement may take), got {self.budget!r}",
            )
        object.__setattr__(self, "budget", float(self.budget))
        for name in ("sharpness_rho", "grid_radius"):
            value = getattr(self, name)
            if not _is_real(value) or not value > 0:
                raise SpecError(f"landscape.{name}", f"must be a finite number > 0, got {value!r}")
            object.__setattr__(self, name, float(value))
        for name, high in LANDSCAPE_MAX.items():
            if getattr(self, name) is not None and getattr(self, name) > high:
                raise SpecError(f"landscape.{name}", f"must be at most {high:g}, got {getattr(self, name)!r}")

    @property
    def subset_size(self) -> int:
        """``num_samples`` as resolved by the experiment spec (``ValueError`` while unset)."""
        if self.num_samples is None:
            raise ValueError("landscape.num_samples: unset; an ExperimentSpec resolves it from the budget")
        return self.num_samples

    def scheduled(self, server_round: int, rounds: int) -> bool:
        """Whether round ``server_round`` of an experiment of ``rounds`` rounds is measured."""
        if not self.enabled:
            return False
        if self.every is None:
            raise ValueError("landscape.every: unset; an ExperimentSpec resolves it from the budget")
        return server_round % self.every == 0 or server_round == rounds

    def to_dict(self) -> dict[str, Any]:
        """The fields as a dict; ``budget`` only when not the default and ``member_pac_bayes`` only when off,
        so older documents (members measured it) read back unchanged."""
        data = dataclasses.asdict(self)
        if self.budget == DEFAULT_BUDGET:
            del data["budget"]
        if data["member_pac_bayes"] is not False:
            del data["member_pac_bayes"]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LandscapeSpec:
        """Build from a dict; missing keys take their defaults, unknown keys raise ``SpecError``."""
        if not isinstance(data, Mapping):
            raise SpecError("landscape", f"must be an object, got {type(data).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        for key in data:
            if key not in names:
                raise SpecError(f"landscape.{key}", f"unknown key; valid keys: {', '.join(names)}")
        return cls(**data)


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True, kw_only=True)
class ExperimentSpec:
    """One experiment: data partition, model, optimisation and aggregation settings.

    ``target_balance_ratios[i]`` is client ``i``'s class distribution (one
    frequency per class, summing to 1) and ``subset_fractions[i]`` the share of
    ``floor(N / num_clients)`` training samples it gets (see
    ``fedland.partition``). ``seed`` seeds the partition and the initial model.
    ``replicates`` (1) runs the experiment over that many seeds, ``seed``,
    ``seed + 1``, ...: queued as one group (``fedland.replicates``), each copy
    carrying its ``replicate`` index.
    Instead of these two lists, ``partition`` may name a scheme with its
    parameters (``fedland.partition_scheme.PartitionScheme``: iid, dirichlet,
    shards, quantity_skew; the member count and its own seed); members are then
    derived one at a time and the lists stay empty. ``member_test_split`` says
    how a member's local test set is drawn: ``proportional`` (its share of each
    test class, the default), ``shared`` (the whole test split) or ``none`` (no
    local test set, so no local test metrics).
    ``landscape`` holds the loss-landscape measurement settings.
    ``augment`` switches the seeded random crop and flip of training batches
    (``fedland.augment``; never applied to evaluation); ``None`` takes the
    dataset's default (on for CIFAR, off for MNIST and Fashion-MNIST) and is
    replaced by it. The model must take the dataset's input shape.

    Participation (see ``fedland.participation``): ``clients_per_round`` is how
    many members train each round, an integer count in ``1..num_clients`` or a
    fraction in ``(0, 1]`` of ``num_clients`` (``None``: every member);
    ``round_timeout_s`` (``None``: no deadline) closes a round after that many
    seconds with the updates received, once at least ``min_reports`` arrived
    (default 1; at most the members per round).

    ``update_screening`` is the largest distance an update may move the
    round's global model, relative to its size
    (``fedland.strategies.relative_distance``); the server refuses, records
    and reassigns an update beyond it. ``None`` turns screening off (robust
    aggregation stays a choice of ``strategy``).
    ``client_algorithm`` is the members' local training
    (``fedland.algorithm_spec.ClientAlgorithmSpec``; default plain SGD). ``model``
    and ``strategy.name`` may be import paths ``"package.module:attr"``
    (``fedland.components``).
    Lists are stored as tuples; ``to_dict`` gives lists back (the participation
    keys and a non-default client algorithm only when set, so older documents
    read back unchanged).
    """

    target_balance_ratios: Sequence[Sequence[float]] = ()
    subset_fractions: Sequence[float] = ()
    partition: PartitionScheme | None = None
    member_test_split: str = "proportional"
    description: str = ""
    dataset_name: str = "MNIST"
    model: str = "FedNet"
    rounds: int = 10
    local_epochs: int = 1
    batch_size: int = 32
    learning_rate: float = 0.01
    momentum: float = 0.0
    strategy: StrategySpec = field(default_factory=StrategySpec)
    client_algorithm: ClientAlgorithmSpec = field(default_factory=ClientAlgorithmSpec)
    seed: int = 0
    replicates: int = 1  # the same experiment over this many seeds (fedland.replicates)
    replicate: int | None = None  # which of them, set when queued: runs with the first seed + replicate
    augment: bool | None = None
    landscape: LandscapeSpec = field(default_factory=LandscapeSpec)
    clients_per_round: int | float | None = None
    round_timeout_s: float | None = None
    min_reports: int | None = None
    update_screening: float | None = DEFAULT_UPDATE_SCREENING
    timestamp: str = field(default_factory=_now_iso)
    id: str | None = None

    def __post_init__(self) -> None:
        _validate_and_normalise(self)
        _check_replicates(self)

    @property
    def num_clients(self) -> int:
        """Members of the federation: the scheme's count, or one per row of ``target_balance_ratios``."""
        return self.partition.members if self.partition is not None else len(self.target_balance_ratios)

    @property
    def num_classes(self) -> int:
        """Classes of the dataset: the width of the model's output."""
        return self.dataset.num_classes

    @property
    def dataset(self) -> DatasetComponent:
        """The dataset ``dataset_name`` names (a built-in or an import path): its facts and ``load(data_dir)``."""
        return _dataset(self.dataset_name)

    @property
    def members_per_round(self) -> int:
        """How many members train each round: all, a count, or ``max(1, floor(fraction * num_clients))``."""
        if self.clients_per_round is None:
            return self.num_clients
        if isinstance(self.clients_per_round, int):
            return self.clients_per_round
        return max(1, math.floor(self.clients_per_round * self.num_clients + 1e-9))

    @property
    def participation(self) -> float:
        """Members per round over the federation's size (SCAFFOLD's and FedDyn's server step)."""
        return self.members_per_round / self.num_clients

    def round_learning_rate(self, server_round: int) -> float:
        """The clients' learning rate in round ``server_round``: FedSWA's cyclical one, else ``learning_rate``."""
        if self.strategy.name == "FedSWA" and self.strategy.params.get("lr_min") is not None:
            params = self.strategy.resolved_params
            return cyclical_learning_rate(
                server_round, params["start_round"], params["cycle_length"], self.learning_rate, params["lr_min"]
            )
        return self.learning_rate

    def with_id(self, experiment_id: str) -> ExperimentSpec:
        """Return a copy carrying the id the store assigned."""
        return dataclasses.replace(self, id=experiment_id)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-able dict that ``from_dict`` turns back into an equal spec."""
        return {
            "id": self.id,
            "description": self.description,
            "dataset_name": self.dataset_name,
            "model": self.model,
            "timestamp": self.timestamp,
            **(
                {"partition": self.partition.to_dict()} if self.partition is not None else {
                    "target_balance_ratios": [list(r) for r in self.target_balance_ratios],
                    "subset_fractions": list(self.subset_fractions),
                }
            ),
            **({} if self.member_test_split == "proportional" else {"member_test_split": self.member_test_split}),
            "rounds": self.rounds,
            "local_epochs": self.local_epochs,
            "batch_size": self.batch_size,
            "learning_rate": self.learning_rate,
            "momentum": self.momentum,
            "strategy": self.strategy.to_dict(),
            **({} if self.client_algorithm.is_default else {"client_algorithm": self.client_algorithm.to_dict()}),
            "seed": self.seed,
            **({} if self.replicates == 1 else {"replicates": self.replicates}),
            **({} if self.replicate is None else {"replicate": self.replicate}),
            "augment": self.augment,
            "landscape": self.landscape.to_dict(),
            **{
                name: getattr(self, name)
                for name in ("clients_per_round", "round_timeout_s", "min_reports")
                if getattr(self, name) is not None
            },
            **(
                {} if self.update_screening == DEFAULT_UPDATE_SCREENING
                else {"update_screening": self.update_screening}
            ),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ExperimentSpec:
        """Build and validate a spec from a dict (e.g. parsed JSON or a store document).

        Store-only keys (``STORE_KEYS``) are ignored; other unknown keys and a
        missing ``target_balance_ratios``/``subset_fractions`` raise ``SpecError``.
        """
        if not isinstance(data, Mapping):
            raise SpecError("experiment", f"must be an object, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key in STORE_KEYS:
                continue
            if key not in names:
                raise SpecError(str(key), f"unknown key; valid keys: {', '.join(sorted(names))}")
            kwargs[key] = value
        if "partition" in kwargs:
            try:
                kwargs["partition"] = PartitionScheme.from_dict(kwargs["partition"])
            except PartitionError as error:
                raise SpecError(error.field, error.rule) from None
        else:
            for required in ("target_balance_ratios", "subset_fractions"):
                if required not in kwargs:
                    raise SpecError(required, "missing (one entry per client, or name a partition scheme)")
        if "strategy" in kwargs:
            kwargs["strategy"] = StrategySpec.from_dict(kwargs["strategy"])
        if "landscape" in kwargs:
            kwargs["landscape"] = LandscapeSpec.from_dict(kwargs["landscape"])
        if "client_algorithm" in kwargs:
            kwargs["client_algorithm"] = ClientAlgorithmSpec.from_dict(kwargs["client_algorithm"])
        return cls(**kwargs)


#: Fields left out of a spec's fingerprint: the id the store gave it and when the spec was written
#: (`timestamp` defaults to the moment of construction, so every run of main.py differs in it).
FINGERPRINT_EXCLUDED = frozenset({"id", "timestamp"})


def fingerprint(spec: ExperimentSpec) -> str:
    """The identity of an experiment: SHA-256 (hex) of its canonical JSON without `FINGERPRINT_EXCLUDED`.

    Two specs share a fingerprint when every other field of ``to_dict`` is equal:
    data, model, optimisation, strategy, landscape, participation, seed, and the
    description too (a renamed experiment is a new one, shown under its new name).
    Same spec and seed, same numbers: an unfinished experiment with this
    fingerprint can be resumed instead of run again.
    """
    data = {key: value for key, value in spec.to_dict().items() if key not in FINGERPRINT_EXCLUDED}
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"))  # ASCII: any text, lone surrogates too
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def load_specs(path: str | Path) -> list[ExperimentSpec]:
    """Read a list of experiments from a JSON or TOML file.

    JSON: a list of spec objects, or ``{"experiments": [...]}``. TOML: an
    ``[[experiments]]`` table per experiment. A bad entry raises ``SpecError``
    whose field starts with ``experiments[<index>]``.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".json", ".toml"):
        raise ValueError(f"path: expected a .json or .toml file, got {path.name!r}")
    text = path.read_text(encoding="utf-8")
    if suffix == ".toml":
        try:
            import tomllib  # Python >= 3.11
        except ImportError:
            raise ValueError("path: reading TOML needs Python >= 3.11 (tomllib); use a .json file") from None
        document: Any = tomllib.loads(text)
    else:
        document = json.loads(text)
    entries = document.get("experiments") if isinstance(document, dict) else document
    if isinstance(document, dict) and set(document) - {"experiments"}:
        extra = sorted(set(document) - {"experiments"})[0]
        raise SpecError(extra, "unknown top-level key; the file holds only 'experiments'")
    if not isinstance(entries, list):
        raise SpecError("experiments", "the file must hold a list of experiments")
    specs = []
    for index, entry in enumerate(entries):
        try:
            specs.append(ExperimentSpec.from_dict(entry))
        except SpecError as error:
            raise SpecError(f"experiments[{index}].{error.field}", error.rule) from error
    return specs


# --- validation ------------------------------------------------------------


def _check_replicates(spec: ExperimentSpec) -> None:
    from fedland.replicates import MAX_REPLICATES

    if not _is_int(spec.replicates) or not 1 <= spec.replicates <= MAX_REPLICATES:
        raise SpecError("replicates", f"must be an integer in [1, {MAX_REPLICATES}], got {spec.replicates!r}")
    if spec.replicate is not None and (not _is_int(spec.replicate) or not 0 <= spec.replicate < spec.replicates):
        raise SpecError("replicate", f"must be an integer in [0, replicates), got {spec.replicate!r}")
    first_seed = spec.seed - (spec.replicate or 0)
    if first_seed < 0 or first_seed + spec.replicates - 1 > INT64_MAX:
        raise SpecError("seed", f"the replicates' seeds {first_seed}..{first_seed + spec.replicates - 1} must lie in "
                                "[0, 2**63 - 1]")


def _validate_and_normalise(spec: ExperimentSpec) -> None:
    def put(name: str, value: Any) -> None:
        object.__setattr__(spec, name, value)

    if spec.id is not None and not isinstance(spec.id, str):
        raise SpecError("id", f"must be a string or None, got {spec.id!r}")
    if not isinstance(spec.description, str):
        raise SpecError("description", f"must be a string, got {spec.description!r}")
    if len(spec.description) > MAX_DESCRIPTION_CHARS:
        raise SpecError(
            "description", f"has {len(spec.description)} characters; the limit is {MAX_DESCRIPTION_CHARS}"
        )
    if not isinstance(spec.timestamp, str):
        raise SpecError("timestamp", f"must be an ISO 8601 string, got {spec.timestamp!r}")
    try:
        datetime.fromisoformat(spec.timestamp)
    except ValueError:
        raise SpecError("timestamp", f"must be an ISO 8601 string, got {spec.timestamp!r}") from None
    dataset: DatasetComponent = _resolved(lambda name, _: _dataset(name), spec.dataset_name, "dataset_name")
    model_shape = _resolved(resolve_model, spec.model, "model").input_shape
    if model_shape != dataset.input_shape:
        fitting = [name for name, shape in MODEL_INPUT_SHAPES.items() if shape == dataset.input_shape]
        raise SpecError(
            "model",
            f"{spec.model} takes inputs of shape {model_shape} but {spec.dataset_name} images "
            f"have shape {dataset.input_shape}; models for {spec.dataset_name}: {', '.join(fitting)}",
        )
    if spec.augment is None:
        put("augment", dataset.augment)
    elif not isinstance(spec.augment, bool):
        raise SpecError("augment", f"must be true, false or null (the dataset's default), got {spec.augment!r}")
    if not isinstance(spec.strategy, StrategySpec):
        raise SpecError("strategy", f"must be a StrategySpec, got {type(spec.strategy).__name__}")
    if not isinstance(spec.client_algorithm, ClientAlgorithmSpec):
        raise SpecError(
            "client_algorithm", f"must be a ClientAlgorithmSpec, got {type(spec.client_algorithm).__name__}"
        )
    check_pairing(spec.strategy.name, spec.strategy.resolved_params, spec.client_algorithm)
    for name, high in (("rounds", MAX_ROUNDS), ("local_epochs", MAX_LOCAL_EPOCHS), ("batch_size", MAX_BATCH_SIZE)):
        value = getattr(spec, name)
        if not _is_int(value) or not 0 < value <= high:
            raise SpecError(name, f"must be a positive integer of at most {high}, got {value!r}")
    if not _is_int(spec.seed) or not 0 <= spec.seed <= INT64_MAX:
        raise SpecError("seed", f"must be an integer in [0, 2**63 - 1] (stored as int64), got {spec.seed!r}")
    if not _is_real(spec.learning_rate) or not 0 < spec.learning_rate <= MAX_LEARNING_RATE:
        raise SpecError(
            "learning_rate", f"must be a finite number > 0 and at most {MAX_LEARNING_RATE:g}, got {spec.learning_rate!r}"
        )
    put("learning_rate", float(spec.learning_rate))
    lr_min = spec.strategy.params.get("lr_min") if spec.strategy.name == "FedSWA" else None
    if lr_min is not None and lr_min > spec.learning_rate:
        raise SpecError("strategy.params.lr_min", f"must be at most learning_rate = {spec.learning_rate!r}, got {lr_min!r}")
    if not _is_real(spec.momentum) or not 0 <= spec.momentum < 1:
        raise SpecError("momentum", f"must be a number in [0, 1), got {spec.momentum!r}")
    put("momentum", float(spec.momentum))
    if not isinstance(spec.landscape, LandscapeSpec):
        raise SpecError("landscape", f"must be a LandscapeSpec, got {type(spec.landscape).__name__}")

    if spec.member_test_split not in TEST_SPLITS:
        raise SpecError(
            "member_test_split", f"must be one of {', '.join(TEST_SPLITS)}, got {spec.member_test_split!r}"
        )
    _validate_partition(spec, put)
    _validate_participation(spec, put)
    put("landscape", _resolved_landscape(spec))
    _check_landscape_cost(spec.landscape, spec.model)
    deadline = spec.round_timeout_s is not None  # a round may then close with min_reports updates
    _check_strategy_fits(spec.strategy, spec.members_per_round, (spec.min_reports or 1) if deadline else None)


def _validate_partition(spec: ExperimentSpec, put: Any) -> None:
    """Either a partition scheme (checked against the dataset's class counts) or explicit ratio and fraction lists."""
    info = spec.dataset
    if spec.partition is not None:
        if isinstance(spec.partition, Mapping):  # the JSON form, as from_dict reads it
            try:
                put("partition", PartitionScheme.from_dict(spec.partition))
            except PartitionError as error:
                raise SpecError(error.field, error.rule) from None
        if not isinstance(spec.partition, PartitionScheme):
            raise SpecError("partition", f"must be a PartitionScheme or its dict, got {type(spec.partition).__name__}")
        if spec.target_balance_ratios or spec.subset_fractions:
            raise SpecError(
                "partition", "a partition scheme replaces target_balance_ratios and subset_fractions: give one or the other"
            )
        try:
            spec.partition.check_dataset(info)
        except PartitionError as error:
            raise SpecError(error.field, error.rule) from None
        put("target_balance_ratios", ())
        put("subset_fractions", ())
        return
    ratios = _ratio_table(spec.target_balance_ratios, info.num_classes)
    fractions = _fractions(spec.subset_fractions)
    if len(fractions) != len(ratios):
        raise SpecError(
            "subset_fractions",
            f"has {len(fractions)} entries but target_balance_ratios has {len(ratios)}: one per client",
        )
    try:
        plan_counts(
            info.train_class_counts, info.test_class_counts, ratios, fractions,
            require_test=spec.member_test_split == "proportional",
        )
    except PartitionError as error:
        raise SpecError(error.field, error.rule) from None
    put("target_balance_ratios", ratios)
    put("subset_fractions", fractions)


def _validate_participation(spec: ExperimentSpec, put: Any) -> None:
    num_clients = spec.num_clients
    per_round = spec.clients_per_round
    if per_round is not None:
        if _is_int(per_round):
            if not 1 <= per_round <= num_clients:
                raise SpecError(
                    "clients_per_round", f"a count must be an integer in [1, {num_clients}] (the members), got {per_round}"
                )
        elif isinstance(per_round, float) and math.isfinite(per_round):
            if not 0 < per_round <= 1:
                raise SpecError("clients_per_round", f"a fraction must be in (0, 1], got {per_round!r}")
        else:
            raise SpecError(
                "clients_per_round", f"must be an integer count or a fraction in (0, 1] (or null), got {per_round!r}"
            )
    screening = spec.update_screening
    if screening is not None:
        if not _is_real(screening) or not screening > 0:
            raise SpecError(
                "update_screening",
                f"must be a finite number > 0 (the largest relative distance of an update) or null, got {screening!r}",
            )
        put("update_screening", float(screening))
    timeout = spec.round_timeout_s
    if timeout is not None:
        if not _is_real(timeout) or not timeout > 0:
            raise SpecError("round_timeout_s", f"must be a finite number of seconds > 0 (or null), got {timeout!r}")
        put("round_timeout_s", float(timeout))
    minimum = spec.min_reports
    if minimum is not None:
        if timeout is None:
            raise SpecError("min_reports", "only applies with a round_timeout_s (without one, every member reports)")
        if not _is_int(minimum) or not 1 <= minimum <= spec.members_per_round:
            raise SpecError(
                "min_reports",
                f"must be an integer in [1, {spec.members_per_round}] (the members per round), got {minimum!r}",
            )


def _check_strategy_fits(strategy: StrategySpec, num_updates: int, fewest: int | None = None) -> None:
    """Refuse a strategy that cannot aggregate the updates a round brings.

    A round brings `num_updates`, or with a deadline anything from `fewest` up.
    """
    if not resolve_strategy(strategy.name).averages and num_updates > ROBUST_MAX_UPDATES:
        raise SpecError(
            "clients_per_round",
            f"{strategy.name} holds every update of a round in memory: at most {ROBUST_MAX_UPDATES} members per "
            f"round, got {num_updates}",
        )
    if strategy.name == "Krum" and num_updates > 1:  # one update is passed through as is
        params = strategy.resolved_params
        needed = 2 * params["num_malicious"] + 2
        if fewest is not None and max(fewest, 2) <= needed:
            raise SpecError(
                "min_reports",
                f"a round closed at its deadline may bring {max(fewest, 2)} updates, and Krum needs more than "
                f"2 * num_malicious + 2 = {needed} (or exactly 1): min_reports must be > {needed}",
            )
        if num_updates <= needed:
            raise SpecError(
                "strategy.params.num_malicious",
                f"Krum needs more than 2 * num_malicious + 2 = {needed} client updates per round, got {num_updates}",
            )


def _resolved_landscape(spec: ExperimentSpec) -> LandscapeSpec:
    """The landscape section with ``every`` and ``num_samples`` fitted to its budget on this federation."""
    info = spec.dataset
    if spec.partition is not None:
        member_samples: float = spec.partition.member_samples(info)
    else:
        sizes = client_sizes(sum(info.train_class_counts), spec.subset_fractions)
        member_samples = max(1.0, sum(sizes) / len(sizes))
    return resolve_landscape(
        spec.landscape, spec.model, members=spec.members_per_round, local_epochs=spec.local_epochs,
        member_samples=member_samples, held_out_samples=sum(info.test_class_counts), max_every=spec.rounds,
    )


def _check_landscape_cost(lspec: LandscapeSpec, model: str) -> None:
    """Refuse landscape settings too costly for the model (LANDSCAPE_COST_BUDGET_S, LANDSCAPE_MEMORY_BUDGET_BYTES)."""
    if not lspec.enabled:
        return
    cost: ModelCost | None = model_costs().get(model)  # None: a model named by import path, not calibrated
    seconds = 0.0 if cost is None else member_measurement_s(cost, lspec, lspec.subset_size)
    if seconds > LANDSCAPE_COST_BUDGET_S:
        raise SpecError(
            "landscape",
            f"one member's measurement of {model} on {lspec.subset_size} samples costs about {seconds:.3g} CPU "
            f"seconds (calibrated, fedland/landscape_costs.json); the bound is {LANDSCAPE_COST_BUDGET_S:g}: "
            "lower num_samples, trace_probes or pac_bayes_samples",
        )
    num_params = num_parameters(model)
    memory = lspec.trace_probes * num_params * 8
    if memory > LANDSCAPE_MEMORY_BUDGET_BYTES:
        raise SpecError(
            "landscape.trace_probes",
            f"{lspec.trace_probes} probes of {model} ({num_params} parameters) need {memory / 2**20:.0f} MiB; "
            f"the bound is {LANDSCAPE_MEMORY_BUDGET_BYTES / 2**20:.0f} MiB",
        )


@functools.cache
def num_parameters(model: str) -> int:
    """Number of parameters of the named model, a built-in or an import path (built once per process)."""
    return sum(p.numel() for p in resolve_model(model).build(0, 10).parameters())


@functools.lru_cache(maxsize=64)
def _dataset(name: str) -> DatasetComponent:
    """``resolve_dataset(name)``, once per process (``num_classes`` and the checks ask it often)."""
    return resolve_dataset(name)


def _resolved(resolver: Callable[[str, str], Any], name: Any, field_name: str) -> Any:
    """``resolver(name, field_name)`` with its ``ValueError`` as a ``SpecError`` naming the field."""
    if not isinstance(name, str):
        raise SpecError(field_name, f"must be a name or an import path 'package.module:attr', got {name!r}")
    try:
        return resolver(name, field_name)
    except ValueError as error:
        where, _, rule = str(error).partition(": ")
        raise SpecError(where or field_name, rule or str(error)) from None


def _ratio_table(value: Any, num_classes: int) -> tuple[tuple[float, ...], ...]:
    name = "target_balance_ratios"
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) == 0:
        raise SpecError(name, f"must be a non-empty list (one class-ratio list per client), got {value!r}")
    table = []
    for i, row in enumerate(value):
        if isinstance(row, (str, bytes)) or not isinstance(row, Sequence):
            raise SpecError(f"{name}[{i}]", f"must be a list of {num_classes} class ratios, got {row!r}")
        if len(row) != num_classes:
            raise SpecError(f"{name}[{i}]", f"has {len(row)} entries but the dataset has {num_classes} classes")
        for c, ratio in enumerate(row):
            if not _is_real(ratio):
                raise SpecError(f"{name}[{i}][{c}]", f"must be a finite number, got {ratio!r}")
            if ratio < 0:
                raise SpecError(f"{name}[{i}][{c}]", f"must be >= 0, got {ratio}")
        total = math.fsum(row)
        if abs(total - 1.0) > RATIO_TOLERANCE:
            raise SpecError(f"{name}[{i}]", f"must sum to 1 (within {RATIO_TOLERANCE:g}), got {total!r}")
        table.append(tuple(float(r) for r in row))
    return tuple(table)


def _fractions(value: Any) -> tuple[float, ...]:
    name = "subset_fractions"
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) == 0:
        raise SpecError(name, f"must be a non-empty list (one fraction per client), got {value!r}")
    for i, fraction in enumerate(value):
        if not _is_real(fraction) or not 0 < fraction <= 1:
            raise SpecError(f"{name}[{i}]", f"must be a number in (0, 1], got {fraction!r}")
    return tuple(float(f) for f in value)


def _json_object(value: Any, name: str) -> dict[str, Any]:
    """Return a deep copy of a JSON-able dict with string keys, or raise ``SpecError``."""
    if not isinstance(value, Mapping):
        raise SpecError(name, f"must be an object, got {type(value).__name__}")
    _check_keys(value, name)
    try:
        return json.loads(json.dumps(dict(value), allow_nan=False))
    except (TypeError, ValueError) as error:
        raise SpecError(name, f"must be JSON-able with string keys and finite numbers ({error})") from None


def _check_keys(value: Any, name: str) -> None:
    # json.dumps would silently turn a key 1 into "1"; refuse instead.
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise SpecError(name, f"keys must be strings, got {key!r}")
            _check_keys(item, f"{name}.{key}")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_keys(item, f"{name}[{index}]")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
