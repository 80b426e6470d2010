"""The researcher's file: the experiments to run, and `python main.py` to run them.

    python main.py                      # all of EXPERIMENTS on this machine (embedded store)
    python main.py --rounds 1           # a quick pass over every experiment
    python main.py --only non-IID       # experiments whose description contains the text
    python main.py --experiments x.toml # experiments from a JSON/TOML file instead
    python main.py --server URL         # only queue them on a running stack (FEDLAND_TOKEN)

`subset_fractions[i]` is client i's share of floor(60000 / num_clients) MNIST
training images; the spec refuses fractions the class counts cannot satisfy
and names the largest feasible one. `clients_per_round` trains only that many
members each round (a seeded draw: experiments differing only in strategy draw
the same members); members are not processes, so `--clients 4` serves all 100.
"""

from __future__ import annotations

from typing import Any

from cli import main
from fedland import schemes
from fedland.spec import ExperimentSpec, LandscapeSpec, StrategySpec

COMMON: dict[str, Any] = dict(dataset_name="MNIST", model="FedNet", rounds=5, local_epochs=1, batch_size=32, seed=42)
SGD: dict[str, Any] = dict(learning_rate=0.05, momentum=0.5)

IID_RATIOS, IID_FRACTIONS = schemes.iid(3)  # the largest feasible fraction: ~20,000 images each
DIRICHLET_RATIOS, DIRICHLET_FRACTIONS = schemes.dirichlet(3, alpha=0.5, seed=42)  # largest feasible
CENTRAL_RATIOS, CENTRAL_FRACTIONS = schemes.centralized()
# 100 members of 150 images each (a quarter of floor(60000 / 100)); 10 train per round
FEDERATION_RATIOS, FEDERATION_FRACTIONS = schemes.dirichlet(100, alpha=0.5, seed=42, fraction=0.25)
NON_IID_RATIOS = [  # the original prototype's clients
    [0.1] * 10,  # balanced
    [0.9, 0.1, 0, 0, 0, 0, 0, 0, 0, 0],  # almost only zeros
    [0, 0, 0.2, 0.2, 0.2, 0.2, 0.2, 0, 0, 0],  # five classes, none of 0, 1, 7, 8, 9
]
NON_IID_FRACTIONS = [0.25, 0.25, 0.25]  # client 1 alone needs 4,500 of MNIST's 5,923 zeros

EXPERIMENTS: list[ExperimentSpec] = [
    ExperimentSpec(
        description="IID balanced, 3 clients, FedAvg",
        target_balance_ratios=IID_RATIOS,  # natural MNIST class frequencies
        subset_fractions=IID_FRACTIONS,
        strategy=StrategySpec("FedAvg"),
        **COMMON, **SGD,
    ),
    ExperimentSpec(
        description="non-IID unbalanced, 3 clients, FedAvg",
        target_balance_ratios=NON_IID_RATIOS,
        subset_fractions=NON_IID_FRACTIONS,
        strategy=StrategySpec("FedAvg"),
        **COMMON, **SGD,
    ),
    ExperimentSpec(
        description="non-IID unbalanced, 3 clients, FedProx mu=0.01",
        target_balance_ratios=NON_IID_RATIOS,
        subset_fractions=NON_IID_FRACTIONS,
        strategy=StrategySpec("FedProx", {"mu": 0.01}),
        **COMMON, **SGD,
    ),
    *(  # the non-IID pair over 3 seeds (42, 43, 44), small and short: the reports show mean and 95% interval
        ExperimentSpec(
            description=f"non-IID unbalanced, 3 clients, {name}, 3 seeds",
            target_balance_ratios=NON_IID_RATIOS,
            subset_fractions=[0.05, 0.05, 0.05],
            strategy=strategy,
            replicates=3,
            landscape=LandscapeSpec(every=3),
            **{**COMMON, "rounds": 3}, **SGD,
        )
        for name, strategy in (("FedAvg", StrategySpec("FedAvg")), ("FedProx mu=0.01", StrategySpec("FedProx", {"mu": 0.01})))
    ),
    ExperimentSpec(
        description="Dirichlet alpha=0.5, 3 clients, FedAvg",
        target_balance_ratios=DIRICHLET_RATIOS,
        subset_fractions=DIRICHLET_FRACTIONS,
        strategy=StrategySpec("FedAvg"),
        **COMMON, **SGD,
    ),
    ExperimentSpec(
        description="Dirichlet alpha=0.5, 100 members, 10 per round, FedAvg",
        target_balance_ratios=FEDERATION_RATIOS,
        subset_fractions=FEDERATION_FRACTIONS,
        clients_per_round=10,  # McMahan et al.'s C = 0.1 of K = 100
        strategy=StrategySpec("FedAvg"),
        landscape=LandscapeSpec(every=5),  # rounds 5 and 10
        **{**COMMON, "rounds": 10}, **SGD,
    ),
    ExperimentSpec(
        description="centralized baseline, 1 client",
        target_balance_ratios=CENTRAL_RATIOS,  # all 60,000 training images
        subset_fractions=CENTRAL_FRACTIONS,
        strategy=StrategySpec("FedAvg"),
        **COMMON, **SGD,
    ),
]

if __name__ == "__main__":
    raise SystemExit(main(EXPERIMENTS))
