"""Rounds of the aggregation server: selected members, updates, aggregation, recovery.

No HTTP and no worker bookkeeping here (see server/coordinator.py). A round's
live state (`RoundState`: which selected members are pending, assigned to a
worker, or reported, and the running weighted sum of their updates) is kept in
memory and written through to the store, so `Rounds.recover` rebuilds it after
a restart. One server process owns a store at a time.

Updates are folded into a `RunningMean` as they arrive (memory O(model)) for the
averaging strategies. An update is also saved (GridFS `client_models`) when the
round needs it later: a robust strategy (every update at once) or a round whose
server-side landscape is scheduled. An update kept only in the running sum is
lost if the server stops before the round is aggregated: `recover` removes its
`client_stats` and the member trains again.

Rounds close when every selected member has reported, or at the spec's
`round_timeout_s` once `min_reports` have (FEDn's semantics: a deadline, then a
minimum number of updates; stragglers' late updates are refused with 409).
Measurements run on the background `LandscapeWorker`; the last round's
measurements finish there too and only then is the experiment marked `finished`,
so no request waits for a measurement.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fedland.algorithms import round_payload
from fedland.components import resolve_strategy
from fedland.participation import selected_members
from fedland.spec import ExperimentSpec
from fedland.strategies import NamedArrays, RunningMean, make_strategy, relative_distance
from server.errors import Conflict, Invalid, NotFound, Refused
from server.measurements import LandscapeWorker
from server.resources import Resources
from server.round_inputs import load_round_inputs
from server.store import DuplicateError, Store, StoreUnavailable, undo_files
from server.validation import UpdateMeta, check_weights_bounded, parse_meta
from stack import records, wire
from stack.records import (
    ClientModelFile,
    ClientStatsRecord,
    ExperimentRecord,
    MemberRecord,
    MemberStateFile,
    ModelFile,
    RefusedUpdateRecord,
    RoundRecord,
)

log = logging.getLogger(__name__)

MEMBER_STATE_PARTS = (wire.STATE_PREFIX, wire.MESSAGE_PREFIX)  # a member-state file: its state, then its message

MODEL_CACHE_ENTRIES = 64  # global models kept in memory for the workers' downloads (~0.2 MB each for FedNet)
#: A worker holding a member this many times the round's longest report (per example) without reporting loses it.
HOLD_FACTOR = 5.0
#: Refused updates from this many distinct workers in one round fail the experiment.
REFUSING_WORKERS_TO_FAIL = 2
#: A round stalled (workers idle, none of its members trained) this many times its longest round so far fails.
STALL_FACTOR = 10.0


@dataclass
class RoundState:
    """The live state of one experiment's current round (guarded by `Rounds.lock`; `mean` by `fold_lock`)."""

    spec: ExperimentSpec
    experiment_id: str
    server_round: int
    selected: tuple[int, ...]
    started_at: float
    durable: bool  # updates are saved to GridFS (robust strategy or server-side landscape this round)
    num_train: dict[int, int]  # the members' training examples
    digests: dict[int, str]  # the members' partition digests
    pending: list[int] = field(default_factory=list)  # selected, neither assigned nor reported; ascending
    assigned: dict[int, str] = field(default_factory=dict)  # member -> worker training it
    reported: set[int] = field(default_factory=set)
    last_worker: dict[int, str] = field(default_factory=dict)  # member -> worker of its latest report
    mean: RunningMean | None = None  # None: the strategy needs each update (robust)
    folded: set[int] = field(default_factory=set)  # members whose update is in `mean` / stored
    closed: bool = False
    written: bool = False  # closed, and its round document and the next round are in the store
    writing: bool = False  # a thread is writing the closed round (guarded by `fold_lock`)
    stragglers: list[int] = field(default_factory=list)  # assigned when the round closed: released on writing
    assigned_at: dict[int, float] = field(default_factory=dict)  # member -> when its worker got it (the clock)
    task_s: dict[int, float] = field(default_factory=dict)  # member -> seconds from assignment to its report
    barred: dict[int, set[str]] = field(default_factory=dict)  # member -> workers whose update for it was refused
    refused_by: dict[str, str] = field(default_factory=dict)  # worker -> why its (first) update was refused
    stalled_s: float = 0.0  # seconds nobody trained any member while a worker was idle (`Rounds.fail_stalled`)
    previous: NamedArrays | None = None  # the global model the round trains from, for screening (lazy)
    fold_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def deadline_at(self) -> float | None:
        timeout = self.spec.round_timeout_s
        return None if timeout is None else self.started_at + timeout

    @property
    def min_reports(self) -> int:
        return self.spec.min_reports or 1

    def complete(self, now: float) -> bool:
        """Whether the round can close: every selected member folded, or past the deadline with enough."""
        if len(self.folded) == len(self.selected):
            return True
        deadline = self.deadline_at
        return deadline is not None and now >= deadline and len(self.folded) >= self.min_reports

    def claimable(self, worker_id: str) -> int | None:
        """The pending member `worker_id` should train: one it trained before if any; never one it was refused for."""
        allowed = [i for i in self.pending if worker_id not in self.barred.get(i, ())]
        return next((i for i in allowed if self.last_worker.get(i) == worker_id), allowed[0] if allowed else None)

    def hold_deadline_s(self, index: int, floor_s: float) -> float | None:
        """How long a worker may hold member `index` without reporting; None until a member reported this round.

        `HOLD_FACTOR` times the longest report of the round, scaled up for a member
        with more training examples than the one that took the longest per example,
        and at least `floor_s`: a slow member is not a stuck one.
        """
        if not self.task_s:
            return None
        longest = max(self.task_s.values())
        per_example = max(seconds / max(self.num_train[member], 1) for member, seconds in self.task_s.items())
        return max(floor_s, HOLD_FACTOR * max(longest, per_example * self.num_train[index]))


class Rounds:
    """Round states of the active experiments, the updates route and aggregation."""

    def __init__(
        self,
        store: Store,
        resources: Resources,
        measurements: LandscapeWorker,
        *,
        clock: Callable[[], float],
        on_change: Callable[[int], None],
    ) -> None:
        self.store = store
        self.resources = resources
        self.measurements = measurements
        self.clock = clock
        self.on_change = on_change  # (members newly pending) -> None: wakes waiting workers and progress views
        self.lock = threading.RLock()
        self.states: dict[str, RoundState] = {}  # experiment id -> its current round, in queue order
        self._experiments: dict[str, ExperimentRecord] = {}  # the active experiments (written through)
        self._models: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._models_lock = threading.Lock()
        self._total_rounds: dict[str, int] = {}
        self._longest_round_s: dict[str, float] = {}  # experiment -> its longest stored round (stall deadlines)

    # experiments -------------------------------------------------------------

    def experiment(self, experiment_id: str) -> ExperimentRecord:
        with self.lock:
            cached = self._experiments.get(experiment_id)
        experiment = cached if cached is not None else self.store.get_experiment(experiment_id)
        if experiment is None:
            raise NotFound(f"experiment {experiment_id!r} not found")
        return experiment

    def _update(self, experiment_id: str, changes: Mapping[str, Any], where: Mapping[str, Any] | None = None) -> bool:
        changed = self.store.update_experiment(experiment_id, changes, where=where)
        with self.lock:
            if changed and experiment_id in self._experiments:
                self._experiments[experiment_id] = self._experiments[experiment_id].replace(**changes)
        return changed

    def mark_running(self, experiment_id: str) -> None:
        """A queued experiment's first member was assigned."""
        now = self.clock()
        with self.lock:
            experiment = self._experiments.get(experiment_id)
            if experiment is None or experiment.status != "queued":
                return
            self._experiments[experiment_id] = experiment.replace(status="running")
            state = self.states.get(experiment_id)
            if state is not None and state.server_round == 1:
                state.started_at = now  # round 1 starts with the experiment, not when it was queued
        if self._update(experiment_id, {"status": "running", "started_at": now}, {"status": "queued"}):
            self.on_change(0)  # progress views long-poll for status changes

    def open(self, experiment: ExperimentRecord, *, recovering: bool = False) -> RoundState | None:
        """Start tracking the experiment's current round (pending: its selected members)."""
        spec, experiment_id, server_round = experiment.spec, experiment.id, experiment.current_round
        selected = selected_members(spec, server_round)
        members = self._selected_members(experiment_id, spec, selected)
        averages = resolve_strategy(spec.strategy.name).averages  # the class says it: nothing to build
        state = RoundState(
            spec=spec,
            experiment_id=experiment_id,
            server_round=server_round,
            selected=selected,
            started_at=self._round_started_at(experiment) or self.clock(),
            durable=not averages or spec.landscape.scheduled(server_round, spec.rounds),
            num_train={m.client_index: m.num_train for m in members},
            digests={m.client_index: m.partition_digest for m in members},
            last_worker=self._last_workers(experiment_id, server_round),
            mean=RunningMean() if averages else None,
        )
        assigned: dict[int, str] = {}
        if recovering:
            self._recover_reports(state)
            assigned = {
                m.client_index: m.worker_id
                for m in members
                if m.worker_id and m.assigned_round == server_round
                and m.client_index in selected and m.client_index not in state.reported
            }
        state.assigned = assigned
        state.pending = [i for i in selected if i not in state.reported and i not in assigned]
        with self.lock:
            self._experiments[experiment_id] = experiment
            self.states[experiment_id] = state
        return state

    def _selected_members(self, experiment_id: str, spec: ExperimentSpec, selected: Sequence[int]) -> list[MemberRecord]:
        """The round's members as stored; a scheme's members selected for the first time are stored now."""
        members = self.store.members(experiment_id, selected)
        if spec.partition is not None and len(members) < len(selected):
            known = {m.client_index for m in members}
            missing = [i for i in selected if i not in known]
            self.store.add_members([
                MemberRecord.of_partition(experiment_id, stats)
                for stats in self.resources.member_summaries(spec, missing)
            ])
            members = self.store.members(experiment_id, selected)
        return members

    def _last_workers(self, experiment_id: str, server_round: int) -> dict[int, str]:
        """Member -> the worker that trained it in the previous round (a worker is offered its members again)."""
        if server_round <= 1:
            return {}
        return {
            stats.client_index: stats.worker_id
            for stats in self.store.stats_of_round(experiment_id, server_round - 1)
            if stats.worker_id
        }

    def _recover_reports(self, state: RoundState) -> None:
        """Fold the round's stored updates back in; reports whose update was not stored train again."""
        for stats in self.store.stats_of_round(state.experiment_id, state.server_round):
            index = stats.client_index
            if index not in state.selected:
                continue
            if stats.weights_file_id is None:
                log.warning(
                    "experiment %s round %d: member %d's update was lost with the restart; it trains again",
                    state.experiment_id, state.server_round, index,
                )
                self.store.unreport(state.experiment_id, index, state.server_round)
                continue
            if state.mean is not None:
                weights = wire.decode(self.store.load_client_model(stats.weights_file_id))
                state.mean.add({**weights, **self._message(stats)}, stats.num_examples)
            state.reported.add(index)
            state.folded.add(index)
            if stats.worker_id:
                state.last_worker[index] = stats.worker_id

    def active(self) -> list[RoundState]:
        """Open rounds, oldest experiment first (call under `lock`)."""
        return [state for state in self.states.values() if not state.closed]

    # models ----------------------------------------------------------------

    def remember_model(self, experiment_id: str, aggregated_round: int, data: bytes, total_rounds: int) -> None:
        """Keep a global model for downloads (round `aggregated_round` of `total_rounds`)."""
        with self._models_lock:
            self._total_rounds[experiment_id] = total_rounds
            self._models[(experiment_id, aggregated_round)] = data
            while len(self._models) > MODEL_CACHE_ENTRIES:
                self._models.popitem(last=False)

    def _cached_model(self, experiment_id: str, aggregated_round: int) -> bytes | None:
        key = (experiment_id, aggregated_round)
        with self._models_lock:
            if key in self._models and key[1] < self._total_rounds.get(experiment_id, 0):
                self._models.move_to_end(key)
                return self._models[key]
        return None

    def global_model(self, experiment_id: str, server_round: int) -> bytes:
        """The safetensors model that round `server_round` trains from (round 1: the initial model)."""
        cached = self._cached_model(experiment_id, server_round - 1)
        if cached is not None:
            return cached
        experiment = self.experiment(experiment_id)
        rounds = experiment.spec.rounds
        if not 1 <= server_round <= rounds:
            raise NotFound(f"round {server_round} is outside 1..{rounds}")
        file_id = self.store.global_model_id(experiment_id, server_round - 1)
        if file_id is None:
            raise NotFound(f"round {server_round - 1} of experiment {experiment_id} is not aggregated yet")
        data = self.store.load_model(file_id)
        self.remember_model(experiment_id, server_round - 1, data, rounds)
        return data

    def member_inputs(self, experiment_id: str, server_round: int, client_index: int, worker_id: str) -> bytes:
        """What member `client_index` starts round `server_round` from, for the worker holding it.

        Its client algorithm's state from its latest kept report before this round
        (none in its first round) and the strategy's round payload
        (``fedland.algorithms.round_payload`` of the state the round starts from),
        as ``stack.wire.encode_member_inputs``.
        """
        experiment = self.experiment(experiment_id)
        state = self._holding(experiment, server_round, client_index, worker_id)
        spec = state.spec
        state_id = self.store.member_state_id(experiment_id, client_index, server_round)
        member_state: NamedArrays = {}
        if state_id is not None:
            member_state, _ = wire.split(wire.decode(self.store.load_member_state(state_id)), *MEMBER_STATE_PARTS)
        strategy_state_id = self.store.strategy_state_id(experiment_id, server_round - 1)
        strategy_state = {} if strategy_state_id is None else wire.decode(self.store.load_model(strategy_state_id))
        payload = round_payload(make_strategy(spec.strategy, spec.participation), strategy_state)
        return wire.encode_member_inputs(member_state, payload)

    def member_failed(self, experiment_id: str, server_round: int, client_index: int, worker_id: str, reason: str) -> None:
        """The worker holding a member cannot run the experiment (a component it cannot import): fail it, with why."""
        experiment = self.experiment(experiment_id)
        self._holding(experiment, server_round, client_index, worker_id)
        log.error("experiment %s round %d: worker %s cannot train member %d: %s",
                  experiment_id, server_round, worker_id, client_index, reason)
        self.fail(experiment_id, f"round {server_round}: worker {worker_id} cannot train member {client_index}: {reason}")

    def _message(self, stats: ClientStatsRecord) -> NamedArrays:
        """The message the member's client algorithm sent with this report (empty if none)."""
        if stats.state_file_id is None:
            return {}
        _, message = wire.split(wire.decode(self.store.load_member_state(stats.state_file_id)), *MEMBER_STATE_PARTS)
        return message

    # updates ---------------------------------------------------------------

    def accept(
        self, experiment_id: str, server_round: int, raw_meta: Any, weights_data: bytes, state_data: bytes | None = None
    ) -> dict[str, bool]:
        """Accept one member's update of the current round; closes and aggregates the round when complete.

        An update whose values the round cannot use (non-finite statistics or
        weights, weights out of bounds, or farther from the global model than the
        spec's ``update_screening``) is refused (`Refused`, 422), recorded, and
        its member goes to another worker (see `refuse`).
        """
        experiment = self.experiment(experiment_id)
        spec = experiment.spec
        try:
            meta = parse_meta(raw_meta, spec.num_clients, spec.local_epochs)
        except Refused as refusal:  # the ids were parsed before the statistics
            self.refuse(experiment_id, server_round, raw_meta["worker_id"], raw_meta["client_index"], refusal)
            raise
        worker_id, index = meta.worker_id, meta.client_index
        state = self._holding(experiment, server_round, index, worker_id)
        with self.lock:
            expected = state.num_train[index]
        if meta.num_examples != expected:  # strategies weight by it: a worker may not inflate a member's share
            raise Invalid("meta.num_examples", f"must be the member's {expected} training examples, got {meta.num_examples}")
        try:
            weights = wire.decode(weights_data)
        except ValueError as error:
            raise Invalid("weights", str(error)) from None
        try:
            check_weights_bounded(weights)  # one worker's absurd (or diverged) weights must not sink the aggregate
        except Refused as refusal:
            self.refuse(experiment_id, server_round, worker_id, index, refusal)
            raise
        try:
            wire.check_compatible(weights, self.resources.reference(spec.model, spec.num_classes))
        except ValueError as error:
            raise Invalid("weights", str(error)) from None
        try:
            self._screen(state, weights)
        except Refused as refusal:
            self.refuse(experiment_id, server_round, worker_id, index, refusal)
            raise
        message = self._check_member_state(state_data, weights)
        with self.lock:  # the assignment may have moved while the weights were checked
            if state.closed or index in state.reported or state.assigned.get(index) != worker_id:
                raise Conflict(f"member {index} is no longer assigned to worker {worker_id} in round {server_round}")
            del state.assigned[index]
            state.reported.add(index)
            assigned_at = state.assigned_at.pop(index, None)
        try:
            self._store_update(state, meta, weights, weights_data, state_data, message)
        except BaseException:
            with state.fold_lock:
                folded = index in state.folded
            if not folded:  # give the assignment back: the worker may retry
                with self.lock:
                    state.reported.discard(index)
                    state.assigned[index] = worker_id
                    if assigned_at is not None:
                        state.assigned_at[index] = assigned_at
            raise
        if assigned_at is not None:
            with self.lock:
                state.task_s[index] = max(self.clock() - assigned_at, 0.0)
        log.info("experiment %s round %d: update of member %d", experiment_id, server_round, index)
        return {"accepted": True, "aggregated": self.close_if_complete(state)}

    def _holding(self, experiment: ExperimentRecord, server_round: int, index: int, worker_id: str) -> RoundState:
        """The open round in which `worker_id` holds member `index` (Conflict otherwise)."""
        if experiment.status != "running":
            raise Conflict(f"experiment {experiment.id} is {experiment.status}")
        with self.lock:
            state = self.states.get(experiment.id)
            if state is None or state.server_round != server_round or state.closed:
                current = experiment.current_round if state is None else state.server_round
                raise Conflict(f"round {server_round} is not open (current round {current})")
            if index in state.reported:
                raise Conflict(f"member {index} already reported round {server_round}")
            if state.assigned.get(index) != worker_id:
                raise Conflict(f"member {index} is not assigned to worker {worker_id} in round {server_round}")
            return state

    def _screen(self, state: RoundState, weights: NamedArrays) -> None:
        """Refuse an update farther from the round's global model than the spec's ``update_screening``."""
        limit = state.spec.update_screening
        if limit is None:
            return
        if state.previous is None:
            state.previous = wire.decode(self.global_model(state.experiment_id, state.server_round))
        distance = relative_distance(weights, state.previous)
        if not distance <= limit:
            raise Refused(
                "weights",
                f"moved the global model {distance:.3g} times its size; update_screening allows {limit:g}",
            )

    def refuse(self, experiment_id: str, server_round: int, worker_id: Any, index: Any, refusal: Invalid) -> None:
        """Record a refused update, hand its member to another worker, and fail the experiment if refusals spread.

        The worker is not offered that member again this round. Refused updates from
        `REFUSING_WORKERS_TO_FAIL` distinct workers end the experiment as failed, with
        the reasons: its training diverges or the federation is under attack, and
        waiting would never end. (With a single worker, the round stalls once that
        worker may train none of what is left: `fail_stalled` ends it.)
        """
        experiment = self.experiment(experiment_id)
        state = self._holding(experiment, server_round, int(index), str(worker_id))  # only the holder is recorded
        worker_id, index = str(worker_id), int(index)
        self.store.insert_refused_update(RefusedUpdateRecord(
            experiment_id=experiment_id, round=server_round, client_index=index, worker_id=worker_id,
            refused_at=self.clock(), field=refusal.field, rule=refusal.rule,
        ))
        with self.lock:
            if state.assigned.get(index) == worker_id:
                del state.assigned[index]
                state.assigned_at.pop(index, None)
                state.pending.append(index)
                state.pending.sort()
            state.barred.setdefault(index, set()).add(worker_id)
            state.refused_by.setdefault(worker_id, f"{refusal.field} {refusal.rule}")
            refusing = dict(state.refused_by)
        self.store.release_member(experiment_id, index)
        log.warning(
            "experiment %s round %d: update of member %d from worker %s refused (%s); the member trains elsewhere",
            experiment_id, server_round, index, worker_id, refusal,
        )
        if len(refusing) >= REFUSING_WORKERS_TO_FAIL:
            reasons = "; ".join(f"worker {w}: {why}" for w, why in refusing.items())
            self.fail(experiment_id, f"round {server_round}: updates refused from {len(refusing)} worker(s): {reasons}")
        else:
            self.on_change(1)

    def _check_member_state(self, state_data: bytes | None, weights: NamedArrays) -> NamedArrays:
        """The message in a client algorithm's state upload (checked: finite, bounded, no weight key)."""
        if state_data is None:
            return {}
        try:
            state, message = wire.split(wire.decode(state_data), *MEMBER_STATE_PARTS)
        except ValueError as error:
            raise Invalid("state", str(error)) from None
        clash = sorted(set(message) & set(weights))
        if clash:
            raise Invalid("state", f"message key {clash[0]!r} is also a weight key (message keys contain '/')")
        try:
            check_weights_bounded({**state, **message})
        except Invalid as error:
            raise Invalid("state", f"{error.field} {error.rule}") from None
        return message

    def _store_update(
        self,
        state: RoundState,
        meta: UpdateMeta,
        weights: NamedArrays,
        weights_data: bytes,
        state_data: bytes | None = None,
        message: NamedArrays | None = None,
    ) -> None:
        experiment_id, server_round, index = state.experiment_id, state.server_round, meta.client_index
        file_id = (
            self.store.save_client_model(weights_data, ClientModelFile(experiment_id, server_round, index))
            if state.durable else None
        )
        try:
            state_file_id = (
                None if state_data is None
                else self.store.save_member_state(state_data, MemberStateFile(experiment_id, server_round, index))
            )
        except BaseException:
            if file_id is not None:
                undo_files([file_id], self.store.delete_client_model)
            raise
        written = [file_id] if file_id is not None else []

        def undo() -> None:
            if written:
                undo_files(written, self.store.delete_client_model)
            if state_file_id is not None:
                undo_files([state_file_id], self.store.delete_member_state)

        stats = ClientStatsRecord(
            experiment_id=experiment_id,
            round=server_round,
            client_index=index,
            worker_id=meta.worker_id,
            received_at=self.clock(),
            num_examples=meta.num_examples,
            weights_file_id=file_id,
            stats=meta.stats,
            state_file_id=state_file_id,
        )
        try:
            try:
                self.store.insert_client_stats(stats)
            except DuplicateError:
                with state.fold_lock:
                    folded = index in state.folded
                if folded:
                    raise
                # an earlier attempt stored these stats, then failed (a store that answered late) before its
                # update was folded: that document stands for nothing, so this attempt replaces it
                for stale in self.store.delete_client_stats(experiment_id, server_round, index):
                    if stale.weights_file_id is not None and stale.weights_file_id != file_id:
                        undo_files([stale.weights_file_id], self.store.delete_client_model)
                    if stale.state_file_id is not None and stale.state_file_id != state_file_id:
                        undo_files([stale.state_file_id], self.store.delete_member_state)
                self.store.insert_client_stats(stats)
        except DuplicateError:
            undo()
            raise Conflict(f"member {index} already reported round {server_round}") from None
        except BaseException:  # a refused or failed insert leaves no file behind
            undo()
            raise
        with state.fold_lock:
            if state.closed:  # closed by its deadline meanwhile: a straggler
                self.store.unreport(experiment_id, index, server_round)
                undo()
                raise Conflict(f"round {server_round} closed at its deadline before member {index}'s update")
            if state.mean is not None:  # the message (e.g. SCAFFOLD's control delta) is averaged like the weights
                state.mean.add({**weights, **(message or {})}, meta.num_examples)
            state.folded.add(index)
        with self.lock:
            state.last_worker[index] = meta.worker_id

    # closing and aggregation --------------------------------------------------

    def close_if_complete(self, state: RoundState) -> bool:
        """Close, aggregate and advance the round if it is complete; True if this call aggregated it.

        A round whose writing a store outage cut off stays closed (no update is
        folded into it any more) and unwritten: the timer (`close_due`) writes it
        again once the store answers.
        """
        with state.fold_lock:
            if state.closed or not state.complete(self.clock()):
                return False
            state.closed = True
            state.writing = True
        with self.lock:
            state.stragglers = sorted(state.assigned)
            state.assigned.clear()
            state.assigned_at.clear()
            state.pending.clear()
        return self._write_closed(state)

    def _write_closed(self, state: RoundState) -> bool:
        """Write a closed round (stragglers released, reports marked, aggregate, next round); `writing` is held."""
        try:
            for index in state.stragglers:
                self.store.release_member(state.experiment_id, index)
            self.store.mark_round_reported(state.experiment_id, sorted(state.folded), state.server_round)
            aggregated = self._aggregate_and_advance(state)
            state.written = True
            return aggregated
        except StoreUnavailable:
            log.warning(
                "experiment %s round %d: closed, but the store did not answer while writing it; the timer retries",
                state.experiment_id, state.server_round,
            )
            raise
        finally:
            with state.fold_lock:
                state.writing = False

    def close_due(self) -> int:
        """Close the rounds past their deadline with enough updates, and write closed rounds an outage cut off.

        The coordinator's timer calls this.
        """
        with self.lock:
            due = [s for s in self.states.values() if not s.closed and s.deadline_at is not None]
            unwritten = [s for s in self.states.values() if s.closed and not s.written]
        aggregated = 0
        for state in unwritten:
            with state.fold_lock:
                if state.writing or state.written:
                    continue
                state.writing = True
            aggregated += self._write_closed(state)
        return aggregated + sum(self.close_if_complete(state) for state in due)

    def _aggregate_and_advance(self, state: RoundState) -> bool:
        experiment_id, server_round = state.experiment_id, state.server_round
        experiment = self.experiment(experiment_id)
        if experiment.status != "running":
            return False
        if experiment.current_round > server_round:  # advanced in the store; an outage cut off the next round's opening
            with self.lock:
                reopen = self.states.get(experiment_id) is state
            if reopen:
                opened = self.open(experiment)
                self.on_change(0 if opened is None else len(opened.pending))
            return False
        if experiment.current_round != server_round:
            return False
        aggregated = True
        if self.store.get_round(experiment_id, server_round) is None:
            try:
                aggregated = self._aggregate(state)
            except StoreUnavailable:
                raise  # not the round's fault: 503, and the timer writes the closed round again (`close_due`)
            except Exception as error:  # any failure ends the experiment, visibly
                log.exception("experiment %s round %d: aggregation failed", experiment_id, server_round)
                self.fail(experiment_id, f"round {server_round}: {type(error).__name__}: {error}")
                return False
        self.advance(experiment, server_round)
        return aggregated

    def fail_stalled(self, elapsed_s: float, worker_idle: bool, floor_s: float) -> int:
        """Count `elapsed_s` of stalled time and fail the experiments whose round is stalled past its deadline.

        A running experiment's round is stalled while no worker trains any of its
        members and some worker is idle (asked for work and got none): what is
        left, nobody can or will train. Its stall deadline is `STALL_FACTOR` times
        the longest of `floor_s`, the spec's ``round_timeout_s`` and the
        experiment's longest round so far; past it the experiment ends as failed,
        with that reason, instead of holding the queue forever. Returns how many
        experiments it failed.
        """
        with self.lock:
            running = {i for i, experiment in self._experiments.items() if experiment.status == "running"}
            states = [s for s in self.states.values() if not s.closed and s.experiment_id in running]
            for state in states:
                stalled = worker_idle and not state.assigned
                state.stalled_s = state.stalled_s + elapsed_s if stalled else 0.0
        failed = 0
        for state in states:
            deadline = self._stall_deadline_s(state, floor_s)
            if state.stalled_s > deadline:
                self.fail(
                    state.experiment_id,
                    f"round {state.server_round} stalled: for {state.stalled_s:.0f} s no worker trained any of its "
                    f"members while workers were idle ({len(state.folded)} of {len(state.selected)} members reported, "
                    f"{len(state.pending)} left that no live worker may train); the stall deadline is "
                    f"{deadline:.0f} s ({STALL_FACTOR:g} times the longest round so far, round_timeout_s or "
                    f"{floor_s:g} s)"
                    + "".join(f"; worker {w}'s update refused: {why}" for w, why in state.refused_by.items()),
                )
                failed += 1
        return failed

    def _stall_deadline_s(self, state: RoundState, floor_s: float) -> float:
        longest = self._longest_round_s.get(state.experiment_id)
        if longest is None and state.server_round > 1:
            longest = max((r.duration_s for r in self.store.rounds_of(state.experiment_id)), default=0.0)
            self._longest_round_s[state.experiment_id] = longest
        return STALL_FACTOR * max(floor_s, state.spec.round_timeout_s or 0.0, longest or 0.0)

    def _aggregate(self, state: RoundState) -> bool:
        started = time.perf_counter()
        spec, experiment_id, server_round = state.spec, state.experiment_id, state.server_round
        participants = sorted(state.folded)
        strategy = make_strategy(spec.strategy, spec.participation)
        inputs = load_round_inputs(  # the averaging strategies' updates are already in the running mean
            self.store, experiment_id, server_round, participants if state.mean is None else [],
            previous=self._cached_model(experiment_id, server_round - 1),
        )
        if state.mean is not None:
            new_global, new_state = strategy.aggregate_mean(inputs.previous, state.mean.mean(), inputs.state)
            num_examples = state.mean.total_examples
        else:
            new_global, new_state = strategy.aggregate(inputs.previous, inputs.updates, inputs.state)
            num_examples = sum(update.num_examples for update in inputs.updates)
        wire.check_compatible(new_global, self.resources.reference(spec.model, spec.num_classes))
        try:  # checked before it replaces the global model
            check_weights_bounded(new_global)
        except Invalid as error:
            raise ValueError(f"the aggregated model is out of bounds: {error}") from None
        evaluation = self.resources.evaluate(spec, new_global)
        if not math.isfinite(evaluation.loss):
            raise ValueError(f"test loss of the aggregated model is {evaluation.loss}")
        aggregation_s = time.perf_counter() - started

        # files of an attempt cut off before its rounds document stay unreferenced: harmless
        model_data = wire.encode(new_global)
        model_file_id = self.store.save_model(model_data, ModelFile(experiment_id, server_round, records.GLOBAL))
        state_file_id = self.store.save_model(
            wire.encode(new_state), ModelFile(experiment_id, server_round, records.STRATEGY_STATE)
        )
        finished_at = self.clock()
        round_record = RoundRecord(
            experiment_id=experiment_id,
            round=server_round,
            started_at=state.started_at,
            finished_at=finished_at,
            test_loss=float(evaluation.loss),
            test_accuracy=float(evaluation.accuracy),
            num_test=int(evaluation.num_examples),
            selected=tuple(state.selected),
            participants=tuple(participants),
            num_examples=int(num_examples),
            strategy=spec.strategy.name,
            duration_s=finished_at - state.started_at,
            aggregation_s=aggregation_s,
            model_file_id=model_file_id,
            strategy_state_file_id=state_file_id,
        )
        try:
            self.store.insert_round(round_record)
        except DuplicateError:
            log.warning("experiment %s round %d was already aggregated", experiment_id, server_round)
            self.store.delete_model(model_file_id)
            self.store.delete_model(state_file_id)
            return False
        self.remember_model(experiment_id, server_round, model_data, spec.rounds)
        with self.lock:
            longest = self._longest_round_s.get(experiment_id, 0.0)
            self._longest_round_s[experiment_id] = max(longest, round_record.duration_s)
        log.info(
            "experiment %s round %d/%d: %d of %d selected members, test loss %.4f, accuracy %.4f",
            experiment_id, server_round, spec.rounds, len(participants), len(state.selected),
            evaluation.loss, evaluation.accuracy,
        )
        return True

    def _round_started_at(self, experiment: ExperimentRecord) -> float | None:
        if experiment.current_round == 1:
            return experiment.started_at
        previous = self.store.get_round(experiment.id, experiment.current_round - 1)
        return None if previous is None else previous.finished_at

    def advance(self, experiment: ExperimentRecord, server_round: int) -> None:
        """After round `server_round` is stored: open the next round, or finish once measured."""
        experiment_id, spec = experiment.id, experiment.spec
        where = {"status": "running", "current_round": server_round}
        if server_round >= spec.rounds:
            with self.lock:
                self.states.pop(experiment_id, None)
            self.store.release_experiment_members(experiment_id)
            # "finished" promises every scheduled round's landscape and the analysis: finish on the measurement thread
            self.measurements.finish_then(experiment, lambda: self._finish(experiment_id, where))
            self.on_change(0)
            return
        if not self._update(experiment_id, {"current_round": server_round + 1}, where):
            self._resync(experiment_id)  # another coordinator on the store advanced it (recovery races)
            return
        if spec.landscape.scheduled(server_round, spec.rounds):
            self.measurements.queue(experiment_id, server_round)
        state = self.open(self.experiment(experiment_id))
        self.on_change(0 if state is None else len(state.pending))

    def _resync(self, experiment_id: str) -> None:
        experiment = self.store.get_experiment(experiment_id)
        with self.lock:
            state = self.states.get(experiment_id)
            if experiment is None or experiment.status != "running":
                self.states.pop(experiment_id, None)
                self._experiments.pop(experiment_id, None)
                return
            self._experiments[experiment_id] = experiment
        if state is None or state.server_round != experiment.current_round:
            self.open(experiment, recovering=True)

    def _finish(self, experiment_id: str, where: Mapping[str, Any]) -> None:
        if self._update(experiment_id, {"status": "finished", "finished_at": self.clock()}, where):
            log.info("experiment %s finished", experiment_id)
        with self.lock:
            self._experiments.pop(experiment_id, None)
        self.on_change(0)

    def fail(self, experiment_id: str, error: str) -> None:
        self._update(experiment_id, {"status": "failed", "error": error, "finished_at": self.clock()})
        with self.lock:
            self.states.pop(experiment_id, None)
            self._experiments.pop(experiment_id, None)
        self.store.release_experiment_members(experiment_id)
        self.on_change(0)

    # recovery -----------------------------------------------------------------

    def recover(self) -> int:
        """Rebuild the active experiments' rounds from the store; returns how many rounds it aggregated.

        A round cut off after its `rounds` document was written is advanced; one whose
        stored updates are complete is aggregated. Then every scheduled round of a
        running or finished experiment that has no `landscape` is queued for measurement.
        """
        aggregated = 0
        for experiment in self.store.active_experiments():
            self.resources.load(experiment.spec)  # load now, not in a request
            server_round = experiment.current_round
            if experiment.status == "running" and self.store.get_round(experiment.id, server_round) is not None:
                with self.lock:
                    self._experiments[experiment.id] = experiment
                self.advance(experiment, server_round)
                continue
            state = self.open(experiment, recovering=True)
            if state is not None and experiment.status == "running":
                aggregated += self.close_if_complete(state)
        for experiment in self.store.list_experiments():
            if experiment.status in ("running", "finished"):
                self.measurements.queue_unmeasured(experiment)
            elif experiment.status == "queued":
                self.measurements.queue_initial(experiment)
        return aggregated

    def assigned_workers(self) -> set[str]:
        with self.lock:
            return {worker for state in self.states.values() for worker in state.assigned.values()}
