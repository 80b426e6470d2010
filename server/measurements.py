"""The server's background landscape measurements and analysis: one thread, each scheduled round once.

The coordinator writes a round's `rounds` document and advances the experiment
first, then queues the round here, so clients start the next round while the
server measures (DEVELOPERS.md "Who measures what"). A queued experiment's
initial model is evaluated here too (`queue_initial`). Before an experiment is
marked finished, `finish_then` waits for its queued rounds, measures what is still
missing and stores the experiment's analysis (`server.analysis`: trajectory,
spectral densities), so a finished experiment has every scheduled round's
landscape and everything its report draws. A
restart drops queued rounds; `queue_unmeasured` finds them again. A measurement
cut off by a store outage is measured again once the store answers (with backoff,
up to `RETRY_MAX_S` between tries), never stored as an error.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures

from server.analysis import analyse_finished, evaluate_initial
from server.landscape import measure_stored_round
from server.resources import Resources
from server.store import Store, StoreUnavailable
from stack.records import ExperimentRecord

log = logging.getLogger(__name__)

RETRY_FIRST_S = 1.0  # after a store outage cut a measurement off: first wait, doubled up to RETRY_MAX_S
RETRY_MAX_S = 30.0


class LandscapeWorker:
    """Measures stored rounds on one background thread; a job never kills the thread."""

    def __init__(self, store: Store, resources: Resources) -> None:
        self.store = store
        self.resources = resources
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="landscape")
        self._pending: dict[tuple[str, int], Future[None]] = {}
        self._finishing: dict[str, Future[None]] = {}  # experiment -> its final job (`finish_then`)
        self._lock = threading.Lock()
        self._closed = threading.Event()

    def close(self, timeout_s: float = 2.0) -> bool:
        """Drop the queued measurements (the next start recovers them) and wait up to `timeout_s` for the running one.

        True if none is running any more. A measurement cannot be cut off midway: a
        caller that must stop sooner (the server on SIGTERM) exits without waiting
        for it, and the next start measures that round again.
        """
        self._closed.set()  # a measurement waiting for the store gives up
        self.executor.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            running = [*self._pending.values(), *self._finishing.values()]
        return not wait_futures(running, timeout=timeout_s).not_done

    def queue(self, experiment_id: str, server_round: int) -> None:
        """Measure the stored round's landscape on the background thread (once; dropped after `close`)."""
        key = (experiment_id, server_round)
        with self._lock:
            if key in self._pending:
                return
            try:
                future = self.executor.submit(self._measure_safely, experiment_id, server_round)
            except RuntimeError:  # closed: the next start recovers it
                log.info("experiment %s round %d: measurement not queued, shutting down", experiment_id, server_round)
                return
            self._pending[key] = future
        future.add_done_callback(lambda done: self._forget(key, done))

    def queue_unmeasured(self, experiment: ExperimentRecord) -> None:
        """Queue the initial evaluation and every scheduled round of `experiment` not measured yet."""
        self.queue_initial(experiment)
        for server_round in self._unmeasured_rounds(experiment):
            self.queue(experiment.id, server_round)

    def queue_initial(self, experiment: ExperimentRecord) -> None:
        """Evaluate the experiment's initial model on the background thread, unless stored (dropped after `close`)."""
        key = (experiment.id, 0)  # round 0: no aggregated round has this number
        with self._lock:
            if key in self._pending:
                return
            try:
                future = self.executor.submit(self._evaluate_initial_safely, experiment)
            except RuntimeError:  # closed: the next start recovers it
                log.info("experiment %s: initial evaluation not queued, shutting down", experiment.id)
                return
            self._pending[key] = future
        future.add_done_callback(lambda done: self._forget(key, done))

    def wait(self, experiment_id: str | None = None, timeout_s: float | None = None) -> bool:
        """Wait for the measurements and final jobs queued so far (of one experiment, or all); True if none is left."""
        with self._lock:
            futures = [f for (eid, _), f in self._pending.items() if experiment_id is None or eid == experiment_id]
            futures += [f for eid, f in self._finishing.items() if experiment_id is None or eid == experiment_id]
        return not wait_futures(futures, timeout=timeout_s).not_done

    def _measure_missing(self, experiment: ExperimentRecord) -> None:
        self._evaluate_initial_safely(experiment)
        for server_round in self._unmeasured_rounds(experiment):
            self._measure_safely(experiment.id, server_round)

    def finish_then(self, experiment: ExperimentRecord, then: Callable[[], None]) -> None:
        """On the measurement thread, after the rounds queued so far: any unmeasured round, then `then` (dropped after `close`)."""

        def job() -> None:  # the rounds queued before it are done: one thread, first in first out
            def finish() -> None:
                try:
                    self._measure_missing(experiment)
                except StoreUnavailable:
                    raise
                except Exception:  # noqa: BLE001 - the measurement thread must outlive any job
                    log.exception("experiment %s: final measurements failed", experiment.id)
                self._analyse(experiment)
                then()

            self._until_stored(f"experiment {experiment.id}: finishing", finish)

        with self._lock:
            try:
                future = self.executor.submit(job)
            except RuntimeError:  # closed: the next start finishes it (`Rounds.recover`)
                log.info("experiment %s: not finished, shutting down", experiment.id)
                return
            self._finishing[experiment.id] = future

        def forget(done: Future[None]) -> None:
            with self._lock:
                if self._finishing.get(experiment.id) is done:
                    del self._finishing[experiment.id]

        future.add_done_callback(forget)

    def _forget(self, key: tuple[str, int], future: Future[None]) -> None:
        with self._lock:
            if self._pending.get(key) is future:
                del self._pending[key]

    def _unmeasured_rounds(self, experiment: ExperimentRecord) -> list[int]:
        spec = experiment.spec
        return [
            r for r in self.store.rounds_without_landscape(experiment.id) if spec.landscape.scheduled(r, spec.rounds)
        ]

    def _measure_safely(self, experiment_id: str, server_round: int) -> None:
        def measure() -> None:
            try:
                self._measure(experiment_id, server_round)
            except StoreUnavailable:
                raise
            except Exception:  # noqa: BLE001 - the measurement thread must outlive any job
                log.exception("experiment %s round %d: landscape measurement not stored", experiment_id, server_round)

        self._until_stored(f"experiment {experiment_id} round {server_round}: landscape measurement", measure)

    def _until_stored(self, what: str, job: Callable[[], None]) -> None:
        """Run `job` again (with backoff) while the store does not answer, until it completes or `close`."""
        wait_s = RETRY_FIRST_S
        while True:
            try:
                job()
                return
            except StoreUnavailable as error:
                log.warning("%s: the store did not answer (%s); trying again in %.0f s", what, type(error).__name__, wait_s)
            if self._closed.wait(wait_s):
                return
            wait_s = min(wait_s * 2, RETRY_MAX_S)

    def _evaluate_initial_safely(self, experiment: ExperimentRecord) -> None:
        def evaluate() -> None:
            try:
                if evaluate_initial(self.store, self.resources, experiment):
                    log.info("experiment %s: initial model evaluated", experiment.id)
            except StoreUnavailable:
                raise
            except Exception:  # noqa: BLE001 - the measurement thread must outlive any job
                log.exception("experiment %s: initial model not evaluated", experiment.id)

        self._until_stored(f"experiment {experiment.id}: initial evaluation", evaluate)

    def _analyse(self, experiment: ExperimentRecord) -> None:
        """The experiment's analysis (trajectory, densities); a failure is logged and the experiment finishes."""
        if self.store.get_experiment(experiment.id) is None:
            return  # deleted meanwhile
        started = time.perf_counter()
        try:
            analyse_finished(self.store, self.resources, experiment)
        except StoreUnavailable:
            raise
        except Exception:  # noqa: BLE001 - the measurement thread must outlive any job
            log.exception("experiment %s: analysis not stored", experiment.id)
            return
        log.info("experiment %s: analysis stored in %.2f s", experiment.id, time.perf_counter() - started)

    def _measure(self, experiment_id: str, server_round: int) -> None:
        experiment = self.store.get_experiment(experiment_id)
        if experiment is None:
            log.info("experiment %s is gone: round %d not measured", experiment_id, server_round)
            return
        round_record = self.store.get_round(experiment_id, server_round)
        if round_record is None or round_record.landscape is not None:
            return
        landscape = measure_stored_round(self.store, self.resources, experiment.spec, experiment_id, server_round)
        if self.store.set_round_landscape(experiment_id, server_round, landscape) and "error" not in landscape:
            log.info(
                "experiment %s round %d: landscape measured in %.2f s",
                experiment_id, server_round, landscape["duration_s"],
            )
