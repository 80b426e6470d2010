"""Round logic of the aggregation server: experiments, slots, updates, aggregation.

No HTTP here (see server/api.py). Every piece of state lives in the Store, so a
new Coordinator on the same store resumes where the last one stopped; call
`recover()` once at start-up to finish a round whose aggregation was cut off and
to measure rounds whose landscape measurement was lost.

Landscape measurements (server/landscape.py) run on one background thread after
their round is written and advanced, so clients never wait for them; the last
round of an experiment waits for its pending measurements and is measured before
the experiment is marked finished. `close()` stops the thread (queued
measurements are dropped and recovered at the next start).
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from bson import ObjectId

from fedland.spec import ExperimentSpec, SpecError
from server.errors import BadRequest, Conflict, NotFound
from server.measurements import LandscapeWorker
from server.resources import Resources
from server.round_inputs import load_round_inputs
from server.store import DONE, DuplicateError, Store, StoreUnavailable
from server.strategies import make_strategy
from server.validation import Invalid, check_document_size, check_stats, check_tree, check_weights_bounded
from stack import wire

log = logging.getLogger(__name__)

Doc = dict[str, Any]
ROUND_POLL_S = 0.2  # how soon a client that has reported its round asks again
SUMMARY_KEYS = (
    "id", "description", "status", "current_round", "rounds", "created_at", "started_at", "finished_at", "error",
)


class Coordinator:
    """Assigns client slots, accepts updates and aggregates each round exactly once."""

    def __init__(
        self,
        store: Store,
        resources: Resources,
        *,
        heartbeat_timeout_s: float = 30.0,
        retry_after_s: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.resources = resources
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.retry_after_s = retry_after_s
        self.clock = clock
        self._assign_lock = threading.Lock()
        self._aggregate_lock = threading.Lock()
        #: Measures the landscape of aggregated rounds on one background thread.
        self.measurements = LandscapeWorker(store, resources)
        store.ensure_indexes()

    def close(self) -> None:
        """Stop the measurement thread: the running measurement ends, queued ones are dropped (see `recover`)."""
        self.measurements.close()

    # experiments -----------------------------------------------------------

    def submit(self, body: Any) -> list[str]:
        """Validate one spec or a list (all of them first), then store them; returns their ids."""
        items = body if isinstance(body, list) else [body]
        if not items:
            raise BadRequest("body: an empty list holds no experiment", "body")
        specs: list[ExperimentSpec] = []
        for position, item in enumerate(items):
            prefix = f"experiments[{position}]." if isinstance(body, list) else ""
            try:
                spec = ExperimentSpec.from_dict(item)
            except SpecError as error:
                raise BadRequest(f"{prefix}{error}", f"{prefix}{error.field}") from None
            specs.append(spec)
        prepared = []
        for position, spec in enumerate(specs):
            try:
                slots = self.resources.partition_summary(spec)
            except ValueError as error:
                prefix = f"experiments[{position}]." if isinstance(body, list) else ""
                field = getattr(error, "field", "target_balance_ratios")
                raise BadRequest(f"{prefix}{error}", f"{prefix}{field}") from None
            document = spec.to_dict()
            check_tree(document, f"experiments[{position}]" if isinstance(body, list) else "")  # storable
            check_document_size(document, f"experiments[{position}]" if isinstance(body, list) else "body")
            prepared.append((spec, slots, wire.encode(self.resources.initial_weights(spec))))
        # Nothing was written so far. Round-0 models go first (an experiment without
        # its initial model must never exist) and are deleted if the insert fails.
        now = self.clock()
        experiments, all_slots, files = [], [], []
        for spec, slots, _ in prepared:
            experiment_id = str(ObjectId())  # sorts by creation within a process
            experiments.append(
                {
                    **spec.with_id(experiment_id).to_dict(),
                    "status": "queued",
                    "current_round": 1,
                    "created_at": now,
                    "started_at": None,
                    "finished_at": None,
                    "error": None,
                }
            )
            for stats in slots:
                all_slots.append(
                    {
                        "experiment_id": experiment_id,
                        **stats,
                        "client_id": None,
                        "heartbeat_at": None,
                        "reported_round": 0,
                    }
                )
        try:
            for (_, _, initial), experiment in zip(prepared, experiments):
                files.append(self.store.save_model(initial, experiment["id"], 0, "global"))
            self.store.insert_experiments(experiments, all_slots)
        except BaseException:
            self._undo(files, self.store.delete_model)
            raise
        ids = [doc["id"] for doc in experiments]
        log.info("queued experiments %s", ", ".join(ids))
        return ids

    def list_experiments(self) -> list[Doc]:
        summaries = []
        for doc in self.store.list_experiments():
            summary = {key: doc.get(key) for key in SUMMARY_KEYS}
            summary["num_clients"] = len(doc.get("target_balance_ratios", []))
            last = self.store.latest_round(doc["id"]) if doc.get("status") != "queued" else None
            summary["last_round"] = (
                None if last is None else {key: last.get(key) for key in ("round", "test_loss", "test_accuracy")}
            )
            summaries.append(summary)
        return summaries

    def experiment(self, experiment_id: str) -> Doc:
        doc = self.store.get_experiment(experiment_id)
        if doc is None:
            raise NotFound(f"experiment {experiment_id!r} not found")
        return doc

    # clients ---------------------------------------------------------------

    @property
    def heartbeat_interval_s(self) -> float:
        return self.heartbeat_timeout_s / 3.0

    def register(self, body: Any) -> Doc:
        if not isinstance(body, Mapping):
            raise BadRequest("body must be an object with hostname and pid", "body")
        hostname, pid = body.get("hostname"), body.get("pid")
        if not isinstance(hostname, str) or not hostname or len(hostname) > 255:
            raise BadRequest("hostname must be a non-empty string of at most 255 characters", "hostname")
        if not isinstance(pid, int) or isinstance(pid, bool) or not 0 <= pid < 2**32:
            raise BadRequest("pid must be an integer in [0, 2**32)", "pid")
        now = self.clock()
        client_id = uuid.uuid4().hex
        self.store.insert_worker(
            {"client_id": client_id, "hostname": hostname, "pid": pid, "registered_at": now, "last_seen": now}
        )
        log.info("registered client %s (%s pid %d)", client_id, hostname, pid)
        return {"client_id": client_id, "heartbeat_interval_s": self.heartbeat_interval_s}

    def heartbeat(self, client_id: str) -> None:
        now = self.clock()
        if not self.store.touch_worker(client_id, now):
            raise NotFound(f"client {client_id!r} not registered")
        self.store.touch_slots(client_id, now)

    def reap(self) -> int:
        """Free slots whose holder has been silent longer than the heartbeat timeout."""
        freed = self.store.reap_slots(self.clock() - self.heartbeat_timeout_s)
        for slot in freed:
            log.warning(
                "freed slot %d of experiment %s: client %s silent for over %.0f s",
                slot["client_index"], slot["experiment_id"], slot["client_id"], self.heartbeat_timeout_s,
            )
        return len(freed)

    def task(self, client_id: str) -> Doc:
        """The client's next action: train its slot's current round, or wait (counts as a heartbeat)."""
        with self._assign_lock:
            self.heartbeat(client_id)
            self.reap()
            slot = self.store.slot_held_by(client_id)
            if slot is not None:
                experiment = self.store.get_experiment(slot["experiment_id"])
                if experiment is not None and experiment["status"] not in DONE:
                    return self._task_for(experiment, slot)
                self.store.release_slot(slot["experiment_id"], slot["client_index"], client_id)
            for experiment in self.store.active_experiments():
                slot = self.store.claim_slot(experiment["id"], client_id, self.clock())
                if slot is None:
                    continue
                if experiment["status"] == "queued":
                    now = self.clock()
                    self.store.update_experiment(
                        experiment["id"], {"status": "running", "started_at": now}, where={"status": "queued"}
                    )
                    experiment = self.experiment(experiment["id"])
                log.info(
                    "client %s takes slot %d of experiment %s", client_id, slot["client_index"], experiment["id"]
                )
                return self._task_for(experiment, slot)
            return self._wait()

    def _wait(self, retry_after_s: float | None = None) -> Doc:
        return {"action": "wait", "retry_after_s": self.retry_after_s if retry_after_s is None else retry_after_s}

    def _task_for(self, experiment: Doc, slot: Doc) -> Doc:
        if experiment["status"] != "running" or slot["reported_round"] >= experiment["current_round"]:
            # The slot waits for the round's other clients: the next round is near, so poll
            # more often than an idle client does (the poll is one indexed lookup).
            return self._wait(min(self.retry_after_s, ROUND_POLL_S))
        spec = {key: value for key, value in experiment.items() if key in ExperimentSpec.__dataclass_fields__}
        return {
            "action": "train",
            "experiment_id": experiment["id"],
            "client_index": slot["client_index"],
            "round": experiment["current_round"],
            "spec": spec,
            "partition_digest": slot["partition_digest"],
        }

    # models and updates ----------------------------------------------------

    def global_model(self, experiment_id: str, server_round: int) -> bytes:
        """The safetensors model that round `server_round` trains from (round 1: the initial model)."""
        experiment = self.experiment(experiment_id)
        if not 1 <= server_round <= experiment["rounds"]:
            raise NotFound(f"round {server_round} is outside 1..{experiment['rounds']}")
        file_id = self.store.global_model_id(experiment_id, server_round - 1)
        if file_id is None:
            raise NotFound(f"round {server_round - 1} of experiment {experiment_id} is not aggregated yet")
        return self.store.load_model(file_id)

    def submit_update(self, experiment_id: str, server_round: int, meta: Any, weights_data: bytes) -> Doc:
        """Accept one client's weights and stats for a round; aggregates when the round is complete."""
        experiment = self.experiment(experiment_id)
        client_id, client_index, num_examples, stats = _parse_meta(
            meta, len(experiment["target_balance_ratios"]), int(experiment["local_epochs"])
        )
        if experiment["status"] != "running":
            raise Conflict(f"experiment {experiment_id} is {experiment['status']}")
        if server_round != experiment["current_round"]:
            raise Conflict(f"round {server_round} is not the current round {experiment['current_round']}")
        slot = self.store.slot(experiment_id, client_index)
        if slot is None or slot["client_id"] != client_id:
            raise Conflict(f"slot {client_index} is not held by client {client_id}")
        if slot["reported_round"] >= server_round:
            self._maybe_aggregate(experiment_id, server_round)  # a retry after a store outage cut it off
            raise Conflict(f"slot {client_index} already reported round {server_round}")
        if num_examples != slot["num_train"]:  # strategies weight by it: a client may not inflate its share
            raise BadRequest(
                f"meta.num_examples must be the slot's {slot['num_train']} training examples, got {num_examples}",
                "meta.num_examples",
            )
        try:
            weights = wire.decode(weights_data)
            wire.check_compatible(weights, self.resources.reference(experiment["model"]))
        except ValueError as error:
            raise BadRequest(str(error), "weights") from None
        check_weights_bounded(weights)  # one client's absurd weights must not sink the aggregate

        now = self.clock()
        file_id = self.store.save_client_model(weights_data, experiment_id, server_round, client_index)
        doc = {
            **stats,
            "experiment_id": experiment_id,
            "client_index": client_index,
            "client_id": client_id,
            "round": server_round,
            "num_examples": num_examples,
            "weights_file_id": file_id,
            "received_at": now,
        }
        try:
            self.store.insert_client_stats(doc)
        except DuplicateError:
            self.store.delete_client_model(file_id)
            self._maybe_aggregate(experiment_id, server_round)  # a retry after a store outage cut it off
            raise Conflict(f"slot {client_index} already reported round {server_round}") from None
        except BaseException:
            self._undo([file_id], self.store.delete_client_model)
            raise
        self.store.mark_reported(experiment_id, client_index, server_round, now)
        self.store.touch_worker(client_id, now)
        self.store.touch_slots(client_id, now)
        log.info("experiment %s round %d: update from slot %d", experiment_id, server_round, client_index)
        return {"accepted": True, "aggregated": self._maybe_aggregate(experiment_id, server_round)}

    # aggregation -----------------------------------------------------------

    def recover(self) -> int:
        """Finish rounds cut off by a crash (all updates stored, no rounds document); returns how many.

        First deletes the GridFS files a crash left unreferenced (`Store.delete_orphan_files`).
        Then queues the measurement of every scheduled round of a running or finished
        experiment that has no `landscape` (a restart dropped it).
        """
        orphans = self.store.delete_orphan_files()  # what a crash left between a file and its document
        if orphans:
            log.warning("deleted %d unreferenced GridFS files a crash left behind", orphans)
        finished = 0
        for experiment in self.store.active_experiments():
            self.resources.load(experiment["dataset_name"])  # load now, not in a request
            if experiment["status"] != "running":
                continue
            server_round = experiment["current_round"]
            for stats in self.store.stats_of_round(experiment["id"], server_round):
                self.store.mark_reported(experiment["id"], stats["client_index"], server_round, self.clock())
            finished += self._maybe_aggregate(experiment["id"], server_round)
        for experiment in self.store.list_experiments():
            if experiment.get("status") in ("running", "finished"):
                self.measurements.queue_unmeasured(experiment)
        return finished

    def _maybe_aggregate(self, experiment_id: str, server_round: int) -> bool:
        with self._aggregate_lock:
            experiment = self.experiment(experiment_id)
            if experiment["status"] != "running" or experiment["current_round"] != server_round:
                return False
            if self.store.get_round(experiment_id, server_round) is None:
                num_clients = len(experiment["target_balance_ratios"])
                if self.store.count_client_stats(experiment_id, server_round) < num_clients:
                    return False
                try:
                    self._aggregate(experiment, server_round)
                except StoreUnavailable:
                    raise  # not the round's fault: 503, and the next update or start aggregates it
                except Exception as error:  # any failure ends the experiment, visibly
                    log.exception("experiment %s round %d: aggregation failed", experiment_id, server_round)
                    self._fail(experiment_id, f"round {server_round}: {type(error).__name__}: {error}")
                    return False
            self._advance(experiment, server_round)
            if server_round < experiment["rounds"]:
                spec = ExperimentSpec.from_dict(experiment)
                if spec.landscape.scheduled(server_round, spec.rounds):
                    self.measurements.queue(experiment_id, server_round)
            return True

    def _aggregate(self, experiment: Doc, server_round: int) -> None:
        started = time.perf_counter()
        experiment_id = experiment["id"]
        spec = ExperimentSpec.from_dict(experiment)
        inputs = load_round_inputs(self.store, experiment_id, server_round)
        stats = inputs.stats
        new_global, new_state = make_strategy(spec.strategy).aggregate(inputs.previous, inputs.updates, inputs.state)
        wire.check_compatible(new_global, self.resources.reference(spec.model))
        try:  # checked before it replaces the global model
            check_weights_bounded(new_global)
        except Invalid as error:
            raise ValueError(f"the aggregated model is out of bounds: {error}") from None
        evaluation = self.resources.evaluate(spec, new_global)
        if not math.isfinite(evaluation.loss):
            raise ValueError(f"test loss of the aggregated model is {evaluation.loss}")
        aggregation_s = time.perf_counter() - started

        # files of an attempt cut off before its rounds document stay unreferenced: harmless
        model_file_id = self.store.save_model(wire.encode(new_global), experiment_id, server_round, "global")
        state_file_id = self.store.save_model(wire.encode(new_state), experiment_id, server_round, "strategy_state")
        finished_at = self.clock()
        started_at = self._round_started_at(experiment, server_round)
        doc = {
            "experiment_id": experiment_id,
            "round": server_round,
            "test_loss": float(evaluation.loss),
            "test_accuracy": float(evaluation.accuracy),
            "num_test": int(evaluation.num_examples),
            "participants": [int(d["client_index"]) for d in stats],
            "num_examples": int(sum(d["num_examples"] for d in stats)),
            "strategy": spec.strategy.name,
            "started_at": started_at,
            "finished_at": finished_at,
            "duration_s": None if started_at is None else finished_at - started_at,
            "aggregation_s": aggregation_s,
            "model_file_id": model_file_id,
            "strategy_state_file_id": state_file_id,
        }
        try:
            self.store.insert_round(doc)
        except DuplicateError:
            log.warning("experiment %s round %d was already aggregated", experiment_id, server_round)
            self.store.delete_model(model_file_id)
            self.store.delete_model(state_file_id)
            return
        log.info(
            "experiment %s round %d/%d: test loss %.4f, accuracy %.4f",
            experiment_id, server_round, spec.rounds, evaluation.loss, evaluation.accuracy,
        )

    def _round_started_at(self, experiment: Doc, server_round: int) -> float | None:
        if server_round == 1:
            return experiment.get("started_at")
        previous = self.store.get_round(experiment["id"], server_round - 1)
        return None if previous is None else previous.get("finished_at")

    def _advance(self, experiment: Doc, server_round: int) -> None:
        experiment_id = experiment["id"]
        where = {"status": "running", "current_round": server_round}
        if server_round >= experiment["rounds"]:
            self.measurements.finish(experiment)  # "finished" promises every scheduled round's landscape
            self.store.update_experiment(experiment_id, {"status": "finished", "finished_at": self.clock()}, where=where)
            self.store.release_experiment_slots(experiment_id)
            log.info("experiment %s finished", experiment_id)
        else:
            self.store.update_experiment(experiment_id, {"current_round": server_round + 1}, where=where)

    @staticmethod
    def _undo(file_ids: list[str], delete: Callable[[str], None]) -> None:
        """Delete files a failed request wrote (best effort: the store may be what failed)."""
        for file_id in file_ids:
            try:
                delete(file_id)
            except Exception as error:  # noqa: BLE001 - the original error is the one to report
                log.warning("could not delete file %s of a failed request: %s", file_id, error)

    def _fail(self, experiment_id: str, error: str) -> None:
        self.store.update_experiment(
            experiment_id, {"status": "failed", "error": error, "finished_at": self.clock()}
        )
        self.store.release_experiment_slots(experiment_id)


def _parse_meta(meta: Any, num_clients: int, max_epochs: int) -> tuple[str, int, int, Doc]:
    """(client_id, client_index, num_examples, stats) from the update's `meta`, or BadRequest."""
    if not isinstance(meta, Mapping):
        raise BadRequest("meta must be a JSON object", "meta")
    client_id = meta.get("client_id")
    if not isinstance(client_id, str) or not client_id or len(client_id) > 64:
        raise BadRequest("meta.client_id must be a non-empty string of at most 64 characters", "meta.client_id")
    client_index = meta.get("client_index")
    if not isinstance(client_index, int) or isinstance(client_index, bool) or not 0 <= client_index < num_clients:
        raise BadRequest(f"meta.client_index must be an integer in [0, {num_clients})", "meta.client_index")
    num_examples = meta.get("num_examples")
    if not isinstance(num_examples, int) or isinstance(num_examples, bool) or num_examples <= 0:
        raise BadRequest("meta.num_examples must be an integer > 0", "meta.num_examples")
    for key in meta:
        if key not in ("client_id", "client_index", "num_examples", "stats"):
            raise BadRequest(f"meta.{key}: unknown key", f"meta.{key}")
    stats = check_stats(meta.get("stats", {}), max_epochs=max_epochs)  # known keys only: none is reserved
    return client_id, client_index, num_examples, stats
