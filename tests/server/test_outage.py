"""A store outage: every route answers 503 with Retry-After, logs one line (no traceback), then recovers."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pymongo
import pytest

from server.api import create_app
from server.store import Store
from stack import records
from stack.embedded import EmbeddedMongo, free_port
from stack.settings import ServerSettings, StoreTimeouts
from tests.server.conftest import WORKER_TOKEN, Api, small_spec

FAST = StoreTimeouts(server_selection_ms=300, connect_ms=300, socket_ms=2_000)


def test_store_outage_is_a_503_with_retry_after_and_no_traceback(
    tmp_path: Path, token: str, data_dir: Path, serve: Callable[[Any], str], caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    store_dir = tmp_path / "store"
    embedded = EmbeddedMongo(store_dir, port=port)
    uri = embedded.start()
    store = Store(uri, "outage", timeouts=FAST)
    try:
        settings = ServerSettings(
            token=token, worker_token=WORKER_TOKEN, data_dir=data_dir, store_timeouts=FAST, store_retry_after_s=2
        )
        api = Api(serve(create_app(settings, store)), token)
        (experiment_id,) = api.submit(small_spec())
        worker_id = api.register()

        embedded.stop()
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            answers = [
                api.get("/experiments"),
                api.get(f"/experiments/{experiment_id}"),
                api.post("/workers", json={"hostname": "h", "pid": 1}),
                api.post(f"/workers/{worker_id}/task"),
                api.post(f"/workers/{worker_id}/heartbeat"),
                api.get(f"/experiments/{experiment_id}/rounds/1/model"),
                api.post("/experiments", json=small_spec()),
            ]
        # what the server holds in memory (the experiment, liveness, the round's model) it still serves
        refused = [response for response in answers if response.status_code != 200]
        for response in refused:
            assert response.status_code == 503, response.text
            assert response.headers["Retry-After"] == "2"
            assert "store is unavailable" in response.json()["error"]
        assert answers[0].status_code == answers[2].status_code == answers[-1].status_code == 503
        store_lines = [r for r in caplog.records if "store unavailable" in r.getMessage()]
        assert len(store_lines) == len(refused)
        assert not any(r.exc_info for r in caplog.records), "a traceback was logged"

        embedded = EmbeddedMongo(store_dir, port=port)  # the store comes back on the same files
        embedded.start()
        assert api.get(f"/experiments/{experiment_id}").json()["status"] == "queued"
        assert api.task(worker_id)["action"] == "train"
        # the refused submit left nothing
        assert store.count(records.EXPERIMENTS) == 1 and store.count(records.files_collection(records.MODELS)) == 1
    finally:
        store.close()
        embedded.stop()


class OutageAt(Store):
    """The test store, whose server (a real nx-27017) is stopped just before the first `method` call."""

    def __init__(self, uri: str, embedded: EmbeddedMongo, method: str) -> None:
        super().__init__(uri, "outage", timeouts=FAST)
        self.embedded, self.method, self.struck = embedded, method, threading.Event()

    def _strike(self, method: str) -> None:
        if method == self.method and not self.struck.is_set():
            self.embedded.stop()  # a real outage, at the moment under test
            self.struck.set()

    def insert_round(self, round_record: records.RoundRecord) -> None:
        self._strike("insert_round")
        super().insert_round(round_record)

    def save_landscape(self, landscape: records.LandscapeRecord) -> str:
        if landscape.kind not in records.ANALYSIS_KINDS:  # a round's measurement, not the experiment's analysis
            self._strike("save_landscape")
        return super().save_landscape(landscape)


def outage_stack(
    tmp_path: Path, token: str, data_dir: Path, serve: Callable[[Any], str], method: str
) -> tuple[Api, OutageAt, Callable[[], None]]:
    port = free_port()
    embedded = EmbeddedMongo(tmp_path / "store", port=port)
    store = OutageAt(embedded.start(), embedded, method)
    settings = ServerSettings(
        token=token, worker_token=WORKER_TOKEN, data_dir=data_dir, store_timeouts=FAST, heartbeat_timeout_s=3.0
    )

    def restart() -> None:  # the store comes back on the same files and port; the test stops it (store.embedded)
        store.embedded = EmbeddedMongo(tmp_path / "store", port=port)
        store.embedded.start()

    return Api(serve(create_app(settings, store)), token), store, restart


def report_round(api: Api, experiment_id: str, workers: list[str], server_round: int) -> list[Any]:
    weights = api.model(experiment_id, server_round)
    answers = []
    for index, worker in enumerate(workers):
        assert api.task(worker)["client_index"] == index
        shifted = {name: (value + 0.01 * (index + 1)).astype(value.dtype) for name, value in weights.items()}
        answers.append(api.update(experiment_id, server_round, worker, index, shifted))
    return answers


def test_a_round_whose_writing_an_outage_cut_off_is_written_by_the_timer(
    tmp_path: Path, token: str, data_dir: Path, serve: Callable[[Any], str]
) -> None:
    api, store, restart = outage_stack(tmp_path, token, data_dir, serve, "insert_round")
    try:
        (experiment_id,) = api.submit(small_spec(landscape={"enabled": False}))
        workers = [api.register("a"), api.register("b")]
        first, last = report_round(api, experiment_id, workers, 1)
        assert first.status_code == 202
        assert last.status_code == 503  # closed, then the store went away while the round was written
        assert store.struck.is_set()
        restart()
        # no update and no restart: the timer writes the closed round and opens round 2
        deadline = time.monotonic() + 60
        while records.read_round(store.db, experiment_id, 1) is None or api.task(workers[0])["action"] != "train":
            assert time.monotonic() < deadline, "round 1 was never written"
            time.sleep(0.2)
        assert api.get(f"/experiments/{experiment_id}").json()["current_round"] == 2
        assert [r.participants for r in records.read_rounds(store.db, experiment_id)] == [(0, 1)]
    finally:
        store.close()
        store.embedded.stop()


def test_a_landscape_measurement_an_outage_cut_off_is_measured_again(
    tmp_path: Path, token: str, data_dir: Path, serve: Callable[[Any], str]
) -> None:
    cheap = {"num_samples": 64, "trace_probes": 4, "interpolation_points": 2, "grid_points": 3, "top_k": 1}
    api, store, restart = outage_stack(tmp_path, token, data_dir, serve, "save_landscape")
    try:
        (experiment_id,) = api.submit(small_spec(rounds=1, landscape=cheap))
        workers = [api.register("a"), api.register("b")]
        answers = report_round(api, experiment_id, workers, 1)
        assert [a.status_code for a in answers] == [202, 202]
        deadline = time.monotonic() + 60
        while not store.struck.is_set():  # the measurement, on its thread, reached its first write
            assert time.monotonic() < deadline, "the measurement never wrote"
            time.sleep(0.1)
        restart()
        deadline = time.monotonic() + 120
        while api.get(f"/experiments/{experiment_id}").json()["status"] != "finished":
            assert time.monotonic() < deadline, "the experiment never finished"
            time.sleep(0.2)
        landscape = records.read_round(store.db, experiment_id, 1).landscape  # type: ignore[union-attr]
        assert landscape is not None and "error" not in landscape, landscape
        assert landscape.get("surface_id") and records.read_landscapes(store.db, experiment_id, records.SURFACE)
        assert records.read_analysis(store.db, experiment_id).initial_evaluation is not None
    finally:
        store.close()
        store.embedded.stop()


class LateReply(Store):
    """The test store, whose first client-stats insert is applied but its reply lost (as in a store stall)."""

    def __init__(self, uri: str) -> None:
        super().__init__(uri, "late-reply", timeouts=FAST)
        self.lost = threading.Event()

    def insert_client_stats(self, stats: records.ClientStatsRecord) -> None:
        super().insert_client_stats(stats)
        if not self.lost.is_set():
            self.lost.set()
            raise pymongo.errors.NetworkTimeout("the reply was lost (a store that answered too late)")


def test_an_update_whose_stored_stats_lost_their_reply_is_accepted_when_retried(
    tmp_path: Path, token: str, data_dir: Path, serve: Callable[[Any], str]
) -> None:
    embedded = EmbeddedMongo(tmp_path / "store")
    store = LateReply(embedded.start())
    try:
        settings = ServerSettings(token=token, worker_token=WORKER_TOKEN, data_dir=data_dir, store_timeouts=FAST)
        api = Api(serve(create_app(settings, store)), token)
        (experiment_id,) = api.submit(small_spec(rounds=1, landscape={"enabled": False}))
        workers = [api.register("a"), api.register("b")]
        first, second = report_round(api, experiment_id, workers, 1)
        assert first.status_code == 503 and store.lost.is_set()  # stored, but the server never heard so
        assert second.status_code == 202 and second.json()["aggregated"] is False
        weights = api.model(experiment_id, 1)
        retried = api.update(experiment_id, 1, workers[0], 0, {k: (v + 0.01).astype(v.dtype) for k, v in weights.items()})
        assert retried.status_code == 202 and retried.json()["aggregated"] is True, retried.text
        stats = records.read_client_stats(store.db, experiment_id)
        assert sorted(s.client_index for s in stats) == [0, 1]
        assert [r.participants for r in records.read_rounds(store.db, experiment_id)] == [(0, 1)]
    finally:
        store.close()
        embedded.stop()
