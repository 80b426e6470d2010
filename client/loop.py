"""The worker loop: register, ask for a task, train it or wait, report; forever until stopped.

A task names (experiment, member, round): a worker trains whichever member the
server hands it, of any experiment. While there is nothing to do it long-polls
(`next_task` with `wait_s`), so it starts the next round as soon as it exists.
Specs are cached per experiment (`SPEC_CACHE_ENTRIES`, least recently used out);
the data of each member is cached by `LocalData`.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from types import TracebackType
from typing import Any

from client.work import LocalData, MemberInputs, load_weights, run_round
from fedland.components import is_import_path
from fedland.spec import ExperimentSpec, SpecError
from stack.api_client import ApiError, Conflict, Registration, Stopped, Transport, UnknownWorker
from stack.settings import WORKSPACE_VARIABLE

log = logging.getLogger(__name__)

TransportFactory = Callable[..., Transport]  # (max_attempts: int | None = None) -> Transport
SPEC_CACHE_ENTRIES = 32


class Heartbeat:
    """Background thread posting a heartbeat every `interval_s` while the client works."""

    def __init__(
        self, make_transport: TransportFactory, worker_id: str, interval_s: float, worker_secret: str | None = None
    ) -> None:
        self.transport = make_transport(max_attempts=1)  # a missed beat is retried at the next beat
        if worker_secret is not None:
            self.transport.act_as(worker_secret)
        self.worker_id = worker_id
        self.interval_s = interval_s
        self.lost = threading.Event()  # the server no longer knows this client
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def _run(self) -> None:
        transport = self.transport
        try:
            while not self._done.wait(self.interval_s):
                try:
                    transport.heartbeat(self.worker_id)
                except UnknownWorker:
                    log.warning("heartbeat: server does not know worker %s or its secret", self.worker_id)
                    self.lost.set()
                    return
                except Stopped:
                    return
                except Exception as error:  # noqa: BLE001 - a missed beat is not fatal; the next may pass
                    log.warning("heartbeat failed: %s", error)
        finally:
            transport.close()

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._done.set()
        self._thread.join(timeout=5.0)


class ClientLoop:
    """Works for the server until `stop` is set."""

    def __init__(
        self,
        make_transport: TransportFactory,
        local_data: LocalData,
        stop: threading.Event,
    ) -> None:
        self.make_transport = make_transport
        self.transport = make_transport()
        self.local_data = local_data
        self.stop = stop
        self._specs: OrderedDict[str, ExperimentSpec] = OrderedDict()
        self._tasks_done = 0  # tasks received under the current registration

    def run(self) -> None:
        """Loop until stopped; returns normally on stop."""
        forgotten = 0  # consecutive registrations the server forgot before giving a task
        try:
            while not self.stop.is_set():
                registration = self.transport.register(socket.gethostname(), os.getpid())
                log.info("registered as worker %s", registration.worker_id)
                self.transport.act_as(registration.worker_secret)
                try:
                    self._work(registration)
                except UnknownWorker as error:
                    # back off only if the server keeps forgetting fresh registrations
                    forgotten = 0 if self._tasks_done else forgotten + 1
                    delay_s = self.transport.backoff.delay_s(forgotten - 1, self.transport.rng) if forgotten else 0.0
                    log.warning(
                        "server forgot worker %s (%s); registering again in %.1f s",
                        registration.worker_id, error, delay_s,
                    )
                    self.stop.wait(delay_s)
        except Stopped:
            pass
        finally:
            self.transport.close()
        log.info("client stopped")

    def _work(self, registration: Registration) -> None:
        worker_id, heartbeat_interval_s = registration.worker_id, registration.heartbeat_interval_s
        self._tasks_done = 0
        failures = 0  # consecutive tasks that failed
        while not self.stop.is_set():
            task = self.transport.next_task(worker_id, heartbeat_interval_s, list(self._specs))
            self._tasks_done += 1  # the 404 that ends this loop is raised before this line
            action = task.get("action")
            if action == "wait":
                self.stop.wait(float(task.get("retry_after_s", 1.0)))
                continue
            heartbeat = Heartbeat(self.make_transport, worker_id, heartbeat_interval_s, registration.worker_secret)
            try:
                if action != "train":
                    raise ValueError(f"unknown task action {action!r}")
                with heartbeat:
                    self._train(worker_id, task)
                failures = 0
            except (ApiError, ValueError, KeyError, TypeError) as error:
                # the server refused or sent something unusable: log, back off, ask again
                delay_s = self.transport.backoff.delay_s(failures, self.transport.rng)
                failures += 1
                log.error("task failed (%s: %s); asking again in %.1f s", type(error).__name__, error, delay_s)
                self.stop.wait(delay_s)
            if heartbeat.lost.is_set():
                raise UnknownWorker("heartbeat answered 401 or 404")

    def _spec(self, experiment_id: str, spec_dict: dict[str, Any] | None) -> ExperimentSpec:
        if experiment_id not in self._specs:
            if spec_dict is None:  # the server thought it cached here: ask for it
                spec_dict = self.transport.get_experiment(experiment_id)
            self._specs[experiment_id] = ExperimentSpec.from_dict(spec_dict)
            while len(self._specs) > SPEC_CACHE_ENTRIES:
                self._specs.popitem(last=False)
        self._specs.move_to_end(experiment_id)
        return self._specs[experiment_id]

    def _train(self, worker_id: str, task: dict[str, Any]) -> None:
        experiment_id = str(task["experiment_id"])
        client_index = int(task["client_index"])
        server_round = int(task["round"])
        try:
            spec = self._spec(experiment_id, task.get("spec"))
        except SpecError as error:
            # the server accepted this spec: this worker's environment lacks what it names (a component
            # by import path, most often); the experiment fails with the reason instead of waiting forever
            log.error("experiment %s: cannot build its spec here: %s", experiment_id, error)
            self.transport.report_failure(
                experiment_id, server_round, client_index,
                f"{error} (on host {socket.gethostname()}; {WORKSPACE_VARIABLE}={os.environ.get(WORKSPACE_VARIABLE, '')!r})",
            )
            return
        plan = self.local_data.plan(experiment_id, spec)
        data = self.local_data.client_data(experiment_id, plan, client_index, str(task["partition_digest"]))
        log.info("experiment %s round %d/%d as client %d", experiment_id, server_round, spec.rounds, client_index)

        started = time.perf_counter()
        payload = self.transport.fetch_model(experiment_id, server_round)
        global_model = load_weights(plan, payload)
        if self.stop.is_set():
            return
        inputs = None
        if not spec.client_algorithm.is_default:  # plain SGD keeps no state and needs no payload
            inputs = MemberInputs.decode(self.transport.fetch_member_inputs(experiment_id, server_round, client_index))
        fetch_s = time.perf_counter() - started
        previous = self.local_data.previous_global(experiment_id, client_index, server_round)
        try:
            result = run_round(
                plan, data, global_model, server_round, fetch_s, previous, device=self.local_data.device, inputs=inputs
            )
        except Exception as error:
            brought = [name for name in (spec.model, spec.client_algorithm.name) if is_import_path(name)]
            if not brought:
                raise
            # the researcher's code raised: every worker would, so the experiment fails with the reason
            log.exception("experiment %s round %d: training with %s failed", experiment_id, server_round, brought)
            self.transport.report_failure(
                experiment_id, server_round, client_index,
                f"training with {', '.join(brought)} raised {type(error).__name__}: {error}",
            )
            return
        self.local_data.remember_global(experiment_id, client_index, server_round, global_model)
        if self.stop.is_set():
            log.info("stopping: abandoning round %d of experiment %s", server_round, experiment_id)
            return
        meta = {
            "worker_id": worker_id,
            "client_index": client_index,
            "num_examples": result.num_examples,
            "stats": result.stats,
        }
        try:
            answer = self.transport.post_update(experiment_id, server_round, meta, result.weights, result.state)
        except Conflict as error:
            log.warning("update for experiment %s round %d refused: %s", experiment_id, server_round, error)
            return
        log.info(
            "experiment %s round %d: local test accuracy %.4f, aggregated=%s",
            experiment_id, server_round, result.stats["local"]["test_accuracy"], answer.get("aggregated"),
        )


def make_transport_factory(
    server_url: str, token: str, stop: threading.Event, seed: int | None = None
) -> TransportFactory:
    """A factory of transports sharing `stop`; each gets its own jitter RNG."""
    seeds = random.Random(seed)

    def make(max_attempts: int | None = None) -> Transport:
        return Transport(
            server_url, token, stop=stop, rng=random.Random(seeds.getrandbits(64)), max_attempts=max_attempts
        )

    return make
