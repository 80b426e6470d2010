"""A round's inputs read back from the store: the one way aggregation and measurement get them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from server.store import Store
from server.strategies import ClientUpdate, Weights
from stack import wire


@dataclass(frozen=True)
class RoundInputs:
    """What a round starts from and what its participants sent."""

    previous: Weights  # the global model the round trained from (round r - 1's)
    state: Weights  # the strategy state the round started from
    updates: list[ClientUpdate]  # in the order of client_indices
    client_indices: list[int]
    stats: list[dict[str, Any]]  # the participants' client_stats documents, same order


def load_round_inputs(
    store: Store, experiment_id: str, server_round: int, participants: list[int] | None = None
) -> RoundInputs:
    """Read round ``server_round``'s starting model, strategy state and updates from the store.

    ``participants``: the client indices whose updates to load (in that order); all
    stored updates of the round, in store order, when None.

    Raises:
        LookupError: the previous global model or a participant's update is not stored.
    """
    previous_id = store.global_model_id(experiment_id, server_round - 1)
    if previous_id is None:
        raise LookupError(f"global model of round {server_round - 1} of experiment {experiment_id} is missing")
    state_id = store.strategy_state_id(experiment_id, server_round - 1)
    stored = store.stats_of_round(experiment_id, server_round)
    if participants is None:
        chosen = stored
    else:
        by_client = {int(doc["client_index"]): doc for doc in stored}
        missing = [index for index in participants if index not in by_client]
        if missing:
            raise LookupError(f"round {server_round} of experiment {experiment_id}: no update of clients {missing}")
        chosen = [by_client[index] for index in participants]
    updates = [
        ClientUpdate(wire.decode(store.load_client_model(doc["weights_file_id"])), int(doc["num_examples"]))
        for doc in chosen
    ]
    return RoundInputs(
        previous=wire.decode(store.load_model(previous_id)),
        state={} if state_id is None else wire.decode(store.load_model(state_id)),
        updates=updates,
        client_indices=[int(doc["client_index"]) for doc in chosen],
        stats=chosen,
    )
