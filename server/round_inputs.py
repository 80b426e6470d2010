"""A round's inputs read back from the store: the one way aggregation and measurement get them."""

from __future__ import annotations

from dataclasses import dataclass

from fedland.strategies import ClientUpdate, NamedArrays
from server.store import Store
from stack import wire
from stack.records import ClientStatsRecord


@dataclass(frozen=True)
class RoundInputs:
    """What a round starts from and what its participants sent."""

    previous: NamedArrays  # the global model the round trained from (round r - 1's)
    state: NamedArrays  # the strategy state the round started from
    updates: list[ClientUpdate]  # in the order of client_indices
    client_indices: list[int]
    stats: list[ClientStatsRecord]  # the participants' reports, same order


def load_round_inputs(
    store: Store,
    experiment_id: str,
    server_round: int,
    participants: list[int] | None = None,
    *,
    previous: bytes | None = None,
) -> RoundInputs:
    """Read round ``server_round``'s starting model, strategy state and updates from the store.

    ``participants``: the client indices whose updates to load (in that order); all
    stored updates of the round, in store order, when None. ``previous``: the
    safetensors of round ``server_round - 1``'s global model when the caller
    already holds them (they are then not read again).

    Raises:
        LookupError: the previous global model or a participant's update is not stored.
    """
    if previous is None:
        previous_id = store.global_model_id(experiment_id, server_round - 1)
        if previous_id is None:
            raise LookupError(f"global model of round {server_round - 1} of experiment {experiment_id} is missing")
        previous = store.load_model(previous_id)
    state_id = store.strategy_state_id(experiment_id, server_round - 1)
    if participants is not None and not participants:
        chosen: list[ClientStatsRecord] = []
    else:
        stored = store.stats_of_round(experiment_id, server_round)
        if participants is None:
            chosen = stored
        else:
            by_client = {stats.client_index: stats for stats in stored}
            missing = [index for index in participants if index not in by_client]
            if missing:
                raise LookupError(f"round {server_round} of experiment {experiment_id}: no update of clients {missing}")
            chosen = [by_client[index] for index in participants]
    updates = []
    for stats in chosen:
        if stats.weights_file_id is None:
            raise LookupError(
                f"round {server_round} of experiment {experiment_id}: the update of client {stats.client_index} "
                "was not kept"
            )
        message: NamedArrays = {}
        if stats.state_file_id is not None:  # the client algorithm's message, aggregated with the weights
            payload = wire.decode(store.load_member_state(stats.state_file_id))
            _, message = wire.split(payload, wire.STATE_PREFIX, wire.MESSAGE_PREFIX)
        weights = wire.decode(store.load_client_model(stats.weights_file_id))
        updates.append(ClientUpdate(weights, stats.num_examples, message))
    return RoundInputs(
        previous=wire.decode(previous),
        state={} if state_id is None else wire.decode(store.load_model(state_id)),
        updates=updates,
        client_indices=[stats.client_index for stats in chosen],
        stats=chosen,
    )
