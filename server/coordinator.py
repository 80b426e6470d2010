"""The aggregation server's coordinator: experiments, workers, and which worker trains which member.

No HTTP here (see server/api.py); rounds, updates and aggregation are in
server/rounds.py. A *member* is a place in a federation (`client_index`, a data
partition; one `members` document each); a *worker* is a client process (one
`workers` document each). A worker asks for a task and gets (experiment, member,
round): the lowest pending selected member of the oldest experiment with work,
preferring a member it trained before (its data is likely cached). Any number of
members is served by any number of workers.

Liveness is per worker and kept in memory (every request of a worker counts as
a heartbeat; `last_seen` is flushed to the store on the timer). A timer thread
(`start`) reaps: the members assigned to a worker silent for longer than the
heartbeat timeout go back to pending and another worker gets them. It also
closes rounds whose deadline passed. A waiting worker long-polls (`task` with
`wait_s`): it gets the next round's member as soon as that round exists.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from bson import ObjectId

from fedland.replicates import expand_replicates
from fedland.spec import ExperimentSpec, fingerprint
from server.auth import Credentials, new_worker_secret
from server.errors import Invalid, NotFound, Throttled
from server.measurements import DEFAULT_THREADS as DEFAULT_MEASURE_THREADS
from server.measurements import LandscapeWorker
from server.resources import Resources
from server.rounds import Rounds, RoundState
from server.store import Store, StoreClosed, StoreUnavailable, undo_files
from server.validation import (
    check_document_size,
    check_tree,
    parse_registration,
    parse_specs,
    spec_field,
)
from stack import records, wire
from stack.records import ExperimentRecord, MemberRecord, ModelFile, WorkerRecord
from stack.submission import Submitted

log = logging.getLogger(__name__)

#: A store ping slower than this (seconds) means the store stalled: workers' requests were held up meanwhile.
SLOW_PING_S = 1.0

#: An answer of the API (JSON-able).
Answer = dict[str, Any]


def standing(experiment: ExperimentRecord) -> Answer:
    """Where an experiment stands, as the API shows it (times in epoch seconds)."""
    return {
        "status": experiment.status,
        "current_round": experiment.current_round,
        "created_at": experiment.created_at,
        "started_at": experiment.started_at,
        "finished_at": experiment.finished_at,
        "error": experiment.error,
    }


def experiment_view(experiment: ExperimentRecord) -> Answer:
    """An experiment as the API shows it: its spec's fields, then where it stands."""
    return {**experiment.spec.to_dict(), **standing(experiment)}


class Coordinator:
    """Queues experiments, registers workers, assigns members, and reaps lost workers."""

    def __init__(
        self,
        store: Store,
        resources: Resources,
        *,
        heartbeat_timeout_s: float = 30.0,
        retry_after_s: float = 1.0,
        long_poll_slots: int = 64,
        max_workers: int = 1024,
        credentials: Credentials | None = None,
        clock: Callable[[], float] = time.time,
        measure_threads: int = DEFAULT_MEASURE_THREADS,
    ) -> None:
        self.store = store
        self.max_workers = max_workers
        self.credentials = credentials  # told each new worker's secret (server/auth.py)
        self.resources = resources
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.retry_after_s = retry_after_s
        self.clock = clock
        #: Measures the landscape of aggregated rounds in the background (one lane per experiment).
        self.measurements = LandscapeWorker(store, resources, measure_threads)
        self.rounds = Rounds(store, resources, self.measurements, clock=clock, on_change=self._changed)
        self._seen: dict[str, float] = {}  # worker -> last request (the clock's time)
        self._in_flight: dict[str, int] = {}  # worker -> its requests being served (never reaped meanwhile)
        self._seen_lock = threading.Lock()
        self._flushed: dict[str, float] = {}
        self._last_reap = clock()
        self._last_tick = clock()
        self._last_idle = float("-inf")  # when a worker last asked for work and got none
        self._store_back_at = float("-inf")  # when the store last answered again after not answering
        self._store_down = False
        self._work = threading.Condition()  # workers long-polling for a task
        self._work_generation = 0
        self._poll_slots = threading.BoundedSemaphore(max(long_poll_slots, 1))
        self._progress = threading.Condition()  # progress views long-polling for a change
        self._version = 0
        self._stop = threading.Event()
        self._timer: threading.Thread | None = None
        self._rng = random.Random()
        store.prepare()

    def start(self, interval_s: float | None = None) -> None:
        """Reap lost workers, close rounds past their deadline and flush liveness every `interval_s`."""
        interval = interval_s if interval_s is not None else min(5.0, self.heartbeat_timeout_s / 6.0)
        self._timer = threading.Thread(target=self._tick, args=(interval,), name="reaper", daemon=True)
        self._timer.start()

    def close(self) -> bool:
        """Stop the timer and the measurement threads (queued measurements are dropped; see `recover`).

        Workers long-polling for a task get their answer at once (``wait``). False if a
        measurement is still running after a short wait (`LandscapeWorker.close`).
        """
        self._stop.set()
        with self._work:  # long-polling workers answer now, so the HTTP server's threads can end
            self._work_generation += 1
            self._work.notify_all()
        if self._timer is not None:
            self._timer.join(timeout=10)
        return self.measurements.close()

    def recover(self) -> int:
        """Rebuild the rounds of active experiments from the store (see `Rounds.recover`); workers get a grace period.

        First deletes the GridFS files a crash left unreferenced (`Store.delete_orphan_files`).
        """
        orphans = self.store.delete_orphan_files()  # what a crash left between a file and its document
        if orphans:
            log.warning("deleted %d unreferenced GridFS files a crash left behind", orphans)
        aggregated = self.rounds.recover()
        now = self.clock()
        with self._seen_lock:
            for worker in self.rounds.assigned_workers():
                self._seen.setdefault(worker, now)
        return aggregated

    def _tick(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            try:
                self.reap()
                self.rounds.close_due()
                self.flush_liveness()
                self.fail_stalled()
            except StoreUnavailable as error:  # an outage: said once per tick, without a traceback
                log.warning("reaper tick skipped: store unavailable (%s: %s)", type(error).__name__, error)
            except StoreClosed:  # the store's client was closed under a server that was not: nothing left to do
                log.info("the store was closed: the reaper stops")
                return
            except Exception:  # noqa: BLE001 - the timer must outlive a store hiccup
                log.exception("reaper tick failed")

    # experiments -----------------------------------------------------------

    def submit(self, body: Any, *, fresh: bool = False) -> Submitted:
        """Validate one spec or a list (all of them first), then store them; returns their ids in order.

        A spec identical to a queued or running experiment's (same `fingerprint`)
        resumes that experiment instead of queueing a copy, and so does one
        repeated within `body`; `fresh` queues every spec anew. A resumed
        experiment goes on from its stored rounds (the server holds its round:
        opened when it was queued, or rebuilt by `recover`). `resumed` names them.
        A spec with `replicates = n` is queued as its n replicates
        (`fedland.replicates.expand_replicates`), their ids in replicate order.
        """
        specs = parse_specs(body)
        with self.store.submit_lock:  # no identical submit inserts between the search and the insert
            return self._submit(body, specs, fresh)

    def _submit(self, body: Any, specs: list[ExperimentSpec], fresh: bool) -> Submitted:
        positions: list[str | int] = []  # per spec: the id of its unfinished twin, or its index in `prepared`
        first_of: dict[str, int] = {}  # fingerprint -> index in `prepared`: a spec repeated in one submit
        resumed: list[str] = []
        prepared: list[tuple[ExperimentSpec, list[dict[str, Any]], bytes]] = []  # spec, members, initial model
        replicas = [(position, replica) for position, spec in enumerate(specs) for replica in expand_replicates(spec)]
        for position, spec in replicas:  # `position`: the spec's index in `body`, for errors
            identity = fingerprint(spec)
            twin = None if fresh else self.store.unfinished_twin(identity)
            if twin is not None:
                positions.append(twin.id)
                resumed.append(twin.id)
                continue
            if not fresh and identity in first_of:
                positions.append(first_of[identity])
                continue
            try:
                members = self.resources.partition_summary(spec)
            except ValueError as error:
                field = getattr(error, "field", "target_balance_ratios")
                rule = getattr(error, "rule", str(error))
                raise Invalid(spec_field(body, position, field), rule) from None
            document = spec.to_dict()
            where = spec_field(body, position, "").rstrip(".")
            check_tree(document, where)  # storable
            check_document_size(document, where or "body")
            first_of[identity] = len(prepared)
            positions.append(len(prepared))
            prepared.append((spec, members, wire.encode(self.resources.initial_weights(spec))))
        # Nothing was written so far. Round-0 models go first (an experiment without
        # its initial model must never exist) and are deleted if the insert fails.
        now = self.clock()
        experiments: list[ExperimentRecord] = []
        all_members: list[MemberRecord] = []
        for spec, members, _ in prepared:
            experiment_id = str(ObjectId())  # sorts by creation within a process
            experiments.append(ExperimentRecord(id=experiment_id, spec=spec.with_id(experiment_id), created_at=now))
            all_members.extend(MemberRecord.of_partition(experiment_id, stats) for stats in members)
        files: list[str] = []
        try:
            for (_, _, initial), experiment in zip(prepared, experiments):
                files.append(self.store.save_model(initial, ModelFile(experiment.id, 0, records.GLOBAL)))
            self.store.insert_experiments(experiments, all_members)
        except BaseException:
            undo_files(files, self.store.delete_model)
            raise
        pending = 0
        for (spec, _, initial), experiment in zip(prepared, experiments):
            self.rounds.remember_model(experiment.id, 0, initial, spec.rounds)
            self.measurements.queue_initial(experiment)
            state = self.rounds.open(experiment)
            pending += 0 if state is None else len(state.pending)
        if experiments:
            log.info("queued experiments %s", ", ".join(experiment.id for experiment in experiments))
        if resumed:
            log.info("resumed unfinished experiments %s (identical specs)", ", ".join(dict.fromkeys(resumed)))
        self._changed(pending)
        ids = [where if isinstance(where, str) else experiments[where].id for where in positions]
        return Submitted(ids, resumed)

    def list_experiments(self) -> list[Answer]:
        summaries = []
        for experiment in self.store.list_experiments():
            last = self.store.latest_round(experiment.id) if experiment.status != "queued" else None
            summaries.append({
                "id": experiment.id,
                "description": experiment.spec.description,
                "rounds": experiment.spec.rounds,
                **standing(experiment),
                "num_clients": experiment.spec.num_clients,
                "last_round": None if last is None else {
                    "round": last.round, "test_loss": last.test_loss, "test_accuracy": last.test_accuracy,
                },
            })
        return summaries

    def experiment(self, experiment_id: str) -> Answer:
        return experiment_view(self.rounds.experiment(experiment_id))

    @property
    def version(self) -> int:
        """Grows whenever an experiment's status or round changes (see `wait_for_change`)."""
        with self._progress:
            return self._version

    def wait_for_change(self, version: int, timeout_s: float) -> int:
        """Block until the version differs from `version` or `timeout_s` passes; returns the version."""
        with self._progress:
            self._progress.wait_for(lambda: self._version != version, timeout=max(timeout_s, 0.0))
            return self._version

    def _changed(self, newly_pending: int) -> None:
        with self._progress:
            self._version += 1
            self._progress.notify_all()
        if newly_pending:
            self._wake(newly_pending)

    def _wake(self, count: int) -> None:
        with self._work:
            self._work_generation += 1
            self._work.notify(count)

    # workers ---------------------------------------------------------------

    @property
    def heartbeat_interval_s(self) -> float:
        return self.heartbeat_timeout_s / 3.0

    @property
    def max_wait_s(self) -> float:
        """The longest a task request long-polls: a waiting worker's requests are its heartbeats."""
        return self.heartbeat_interval_s

    def register(self, body: Any) -> Answer:
        """A new worker: its id and its own secret (only the secret's digest is stored).

        Throttled (429) while `max_workers` workers are alive (a silent one stops counting once reaped).
        """
        registration = parse_registration(body)
        with self._seen_lock:
            alive = len(self._seen)
        if alive >= self.max_workers:
            raise Throttled(
                "workers",
                f"at most {self.max_workers} workers may be registered at once (FEDLAND_MAX_WORKERS); "
                f"a slot frees when a worker has been silent for {self.heartbeat_timeout_s:.0f} s",
                max(1, round(self.heartbeat_interval_s)),
            )
        now = self.clock()
        worker_id = uuid.uuid4().hex
        secret, digest = new_worker_secret(worker_id)
        self.store.insert_worker(WorkerRecord(
            worker_id=worker_id, hostname=registration.hostname, pid=registration.pid,
            registered_at=now, last_seen=now, secret_sha256=digest,
        ))
        if self.credentials is not None:
            self.credentials.allow_worker(worker_id, digest)
        with self._seen_lock:
            self._seen[worker_id] = now
            self._flushed[worker_id] = now
        log.info("registered worker %s (%s pid %d)", worker_id, registration.hostname, registration.pid)
        return {"worker_id": worker_id, "worker_secret": secret, "heartbeat_interval_s": self.heartbeat_interval_s}

    def heartbeat(self, worker_id: str) -> None:
        """Note that the worker is alive; NotFound if it never registered."""
        now = self.clock()
        with self._seen_lock:
            if worker_id in self._seen:
                self._seen[worker_id] = now
                return
        worker = self.store.get_worker(worker_id)  # known before a restart, or reaped and back
        if worker is None:
            raise NotFound(f"worker {worker_id!r} not registered")
        if worker.status != "alive":
            self.store.set_worker_status(worker_id, "alive", now)
        with self._seen_lock:
            self._seen[worker_id] = now

    def flush_liveness(self) -> None:
        """Write the workers' `last_seen` that moved since the last flush."""
        with self._seen_lock:
            moved = {w: seen for w, seen in self._seen.items() if self._flushed.get(w) != seen}
            self._flushed.update(moved)
        if moved:
            self.store.touch_workers(moved)

    def fail_stalled(self) -> int:
        """Fail the experiments whose round stalled past its deadline (see `Rounds.fail_stalled`)."""
        now = self.clock()
        elapsed, self._last_tick = now - self._last_tick, now
        idle = now - self._last_idle <= max(self.max_wait_s, self.retry_after_s) * 2
        return self.rounds.fail_stalled(elapsed, idle, floor_s=self.heartbeat_timeout_s)

    def _store_answers(self, now: float) -> bool:
        """Ping the store; note when it answers again after an outage or a stall (liveness counts from then)."""
        started = time.monotonic()
        try:
            self.store.ping()
        except StoreUnavailable:
            if not self._store_down:
                log.warning("store unavailable: no worker is reaped until it answers again")
            self._store_down = True
            return False
        stalled = time.monotonic() - started > SLOW_PING_S  # it answered, late: requests were held up too
        if self._store_down or stalled:
            self._store_down = False
            self._store_back_at = self.clock()
            log.info("store answers again: workers get %.0f s to be heard from", self.heartbeat_timeout_s)
        return True

    def reap(self) -> int:
        """Free members of workers silent past the heartbeat timeout, or holding one past its deadline; how many.

        Nothing is reaped while the store does not answer, and silence counts only
        from when it answered again: a worker whose requests the outage held up is
        not silent. A member held longer than the round's hold deadline
        (`RoundState.hold_deadline_s`: derived from the round's reports) goes back to
        pending although its worker heartbeats. The store is written first; memory
        changes only once it was.
        """
        now = self.clock()
        self._last_reap = now
        if not self._store_answers(now):
            return 0
        cutoff = now - self.heartbeat_timeout_s
        with self._seen_lock:
            busy = {w for w, count in self._in_flight.items() if count}  # being served: alive
            lost = {w for w, seen in self._seen.items() if max(seen, self._store_back_at) < cutoff and w not in busy}
        freed: list[tuple[RoundState, int, str, str]] = []
        with self.rounds.lock:
            for state in self.rounds.active():
                for index, worker in state.assigned.items():
                    if worker in lost:
                        freed.append((state, index, worker, f"worker {worker} silent for over {self.heartbeat_timeout_s:.0f} s"))
                        continue
                    deadline = state.hold_deadline_s(index, 2 * self.heartbeat_timeout_s)
                    held = now - max(state.assigned_at.get(index, now), self._store_back_at)  # a stall is not its
                    if deadline is not None and held > deadline and worker not in busy:
                        freed.append((state, index, worker, f"worker {worker} held it {held:.0f} s (deadline {deadline:.0f} s)"))
        for state, index, _, _ in freed:
            self.store.release_member(state.experiment_id, index)
        for worker in lost:
            self.store.set_worker_status(worker, "lost", now)
        count = 0
        with self.rounds.lock:
            for state, index, worker, why in freed:
                if state.closed or state.assigned.get(index) != worker:
                    continue
                del state.assigned[index]
                state.assigned_at.pop(index, None)
                state.pending.append(index)
                state.pending.sort()
                count += 1
                log.warning("member %d of experiment %s round %d freed: %s", index, state.experiment_id, state.server_round, why)
        with self._seen_lock:
            for worker in lost:
                if worker in self._seen and max(self._seen[worker], self._store_back_at) < cutoff:
                    del self._seen[worker]
        if count:
            self._wake(count)
        return count

    @contextlib.contextmanager
    def _serving(self, worker_id: str) -> Iterator[None]:
        """A worker whose request is being served is alive, however long the store holds the request up."""
        with self._seen_lock:
            self._in_flight[worker_id] = self._in_flight.get(worker_id, 0) + 1
        try:
            yield
        finally:
            with self._seen_lock:
                left = self._in_flight.pop(worker_id) - 1
                if left:
                    self._in_flight[worker_id] = left
                if worker_id in self._seen:
                    self._seen[worker_id] = max(self._seen[worker_id], self.clock())

    def task(self, worker_id: str, wait_s: float = 0.0, known: frozenset[str] = frozenset()) -> Answer:
        """The worker's next action: train a member's round, or wait; long-polls up to `wait_s` for work.

        Counts as a heartbeat. `known` lists experiments whose spec the worker holds (left out of the answer).
        """
        with self._serving(worker_id):
            return self._task(worker_id, wait_s, known)

    def _task(self, worker_id: str, wait_s: float, known: frozenset[str]) -> Answer:
        self.heartbeat(worker_id)
        if self.clock() - self._last_reap >= self.heartbeat_timeout_s / 6.0:
            self.reap()
        deadline = time.monotonic() + min(max(wait_s, 0.0), self.max_wait_s)
        while True:
            with self._work:
                generation = self._work_generation
            task = self._claim(worker_id, known)
            if task is not None:
                return task
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._stop.is_set():  # closing: no worker waits for work that will not come
                self._last_idle = self.clock()
                return self._wait(0.0 if wait_s > 0 else self.retry_after_s)
            if not self._poll_slots.acquire(blocking=False):  # every long-poll thread is taken: come back later
                return self._wait(self._rng.uniform(0.5, 1.0) * self.max_wait_s)
            try:
                with self._work:
                    self._work.wait_for(lambda: self._work_generation != generation, timeout=remaining)
            finally:
                self._poll_slots.release()
            self.heartbeat(worker_id)

    def _wait(self, retry_after_s: float) -> Answer:
        return {"action": "wait", "retry_after_s": retry_after_s}

    def _claim(self, worker_id: str, known: frozenset[str]) -> Answer | None:
        with self.rounds.lock:
            held = next(
                ((s, i) for s in self.rounds.active() for i, w in s.assigned.items() if w == worker_id), None
            )
            if held is not None:  # asked again before reporting (e.g. its request was retried): the same task
                return self._train_task(held[0], held[1], known)
            chosen: tuple[RoundState, int] | None = None
            for state in self.rounds.active():
                index = state.claimable(worker_id)
                if index is None:
                    continue
                state.pending.remove(index)
                state.assigned[index] = worker_id
                state.assigned_at[index] = self.clock()
                chosen = (state, index)
                break
        if chosen is None:
            return None
        state, index = chosen
        self.store.assign_member(state.experiment_id, index, worker_id, state.server_round, self.clock())
        self.rounds.mark_running(state.experiment_id)
        log.info(
            "worker %s trains member %d of experiment %s round %d",
            worker_id, index, state.experiment_id, state.server_round,
        )
        return self._train_task(state, index, known)

    def _train_task(self, state: RoundState, index: int, known: frozenset[str]) -> Answer:
        task: Answer = {
            "action": "train",
            "experiment_id": state.experiment_id,
            "client_index": index,
            "round": state.server_round,
            "partition_digest": state.digests[index],
        }
        if state.experiment_id not in known:
            task["spec"] = state.spec.to_dict()
        return task

    # models and updates ----------------------------------------------------

    def global_model(self, experiment_id: str, server_round: int) -> bytes:
        """The safetensors model that round `server_round` trains from (round 1: the initial model)."""
        return self.rounds.global_model(experiment_id, server_round)

    def member_inputs(self, experiment_id: str, server_round: int, client_index: int, worker_id: str) -> bytes:
        """The member's client-algorithm state and the strategy's round payload, for the worker holding it."""
        with self._serving(worker_id):
            return self.rounds.member_inputs(experiment_id, server_round, client_index, worker_id)

    def member_failed(self, experiment_id: str, server_round: int, client_index: int, worker_id: str, reason: str) -> None:
        """The worker holding the member cannot run the experiment: the experiment fails with its reason."""
        with self._serving(worker_id):
            self.rounds.member_failed(experiment_id, server_round, client_index, worker_id, reason)

    def submit_update(
        self, experiment_id: str, server_round: int, meta: Any, weights_data: bytes, state_data: bytes | None = None
    ) -> Answer:
        """Accept one member's weights, stats (and client-algorithm state) for a round; aggregates when complete."""
        worker_id = meta.get("worker_id") if isinstance(meta, Mapping) else None
        if not isinstance(worker_id, str):
            return self.rounds.accept(experiment_id, server_round, meta, weights_data, state_data)  # refuses the meta
        with self._serving(worker_id):
            return self.rounds.accept(experiment_id, server_round, meta, weights_data, state_data)
