"""Per-round participation: which members of a federation train in a round.

The draw depends only on (seed, round, num_clients, members per round), never on
the strategy or anything else of the spec, so two experiments that differ only
in strategy select the same members in the same rounds (paired comparisons stay
paired). Every component that needs the selection calls `selected_members`.
"""

from __future__ import annotations

import numpy as np

from fedland.spec import ExperimentSpec

__all__ = ["select_members", "selected_members"]

_STREAM = 0x5E1EC7  # separates this draw from the other seeded streams of an experiment


def select_members(seed: int, server_round: int, num_clients: int, members_per_round: int) -> tuple[int, ...]:
    """The sorted client indices training round `server_round`: all, or a seeded draw without replacement."""
    if not 1 <= members_per_round <= num_clients:
        raise ValueError(f"members_per_round must be in [1, {num_clients}], got {members_per_round}")
    if server_round < 1:
        raise ValueError(f"server_round must be >= 1, got {server_round}")
    if members_per_round == num_clients:
        return tuple(range(num_clients))
    sequence = np.random.SeedSequence([seed, _STREAM, server_round, num_clients, members_per_round])
    drawn = np.random.Generator(np.random.PCG64(sequence)).choice(num_clients, size=members_per_round, replace=False)
    return tuple(sorted(int(index) for index in drawn))


def selected_members(spec: ExperimentSpec, server_round: int) -> tuple[int, ...]:
    """The members of `spec` that train round `server_round` (see the module docstring)."""
    return select_members(spec.seed, server_round, spec.num_clients, spec.members_per_round)
