"""The server's background landscape measurements and analysis: one lane per experiment, each scheduled round once.

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

Each experiment's jobs run one after another, in the order queued (its rounds,
then its final job); different experiments' jobs run side by side on up to
`threads` threads (`FEDLAND_MEASURE_THREADS`, default 2), so one experiment's
analysis never holds back another's rounds, and the end of a run uses every core
the idle workers leave.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
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
DEFAULT_THREADS = 2


class Lanes:
    """Jobs by key on a thread pool: a key's jobs run one at a time, in the order submitted; up to `threads` keys at once.

    ``submit`` returns the job's future. ``shutdown`` cancels every job not started
    (their futures end cancelled) and refuses new ones (RuntimeError, as an
    executor does); running jobs finish on their own.
    """

    def __init__(self, threads: int, name: str) -> None:
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=name)
        self._waiting: dict[str, deque[tuple[Future[None], Callable[[], None]]]] = {}  # key -> after its running job
        self._unstarted: set[Future[None]] = set()
        self._lock = threading.Lock()
        self._closed = False

    def submit(self, key: str, job: Callable[[], None]) -> Future[None]:
        future: Future[None] = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("cannot submit after shutdown")
            self._unstarted.add(future)
            waiting = self._waiting.get(key)
            if waiting is not None:  # a job of this key runs: this one follows it
                waiting.append((future, job))
                return future
            self._waiting[key] = deque()
        self._start(key, future, job)
        return future

    def shutdown(self) -> None:
        with self._lock:
            self._closed = True
            unstarted, self._unstarted = self._unstarted, set()
        for future in unstarted:
            future.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _start(self, key: str, future: Future[None], job: Callable[[], None]) -> None:
        def run() -> None:
            with self._lock:
                self._unstarted.discard(future)
            try:
                if future.set_running_or_notify_cancel():
                    try:
                        job()
                        future.set_result(None)
                    except BaseException as error:  # noqa: BLE001 - handed to the future, as an executor does
                        future.set_exception(error)
            finally:
                self._next(key)

        try:
            self._executor.submit(run)
        except RuntimeError:  # shut down meanwhile: `shutdown` cancelled the future
            future.cancel()

    def _next(self, key: str) -> None:
        with self._lock:
            waiting = self._waiting[key]
            if not waiting or self._closed:
                del self._waiting[key]
                return
            future, job = waiting.popleft()
        self._start(key, future, job)


class LandscapeWorker:
    """Measures stored rounds on one background thread; a job never kills the thread."""

    def __init__(self, store: Store, resources: Resources, threads: int = DEFAULT_THREADS) -> None:
        self.store = store
        self.resources = resources
        self.lanes = Lanes(threads, "landscape")  # one lane per experiment
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
        self.lanes.shutdown()
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
                future = self.lanes.submit(experiment_id, lambda: self._measure_safely(experiment_id, server_round))
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
                future = self.lanes.submit(experiment.id, lambda: self._evaluate_initial_safely(experiment))
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
        """In the experiment's lane, after its rounds queued so far: any unmeasured round, then `then` (dropped after `close`)."""

        def job() -> None:  # the experiment's rounds queued before it are done: its lane is first in, first out
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
                future = self.lanes.submit(experiment.id, job)
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
