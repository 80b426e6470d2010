"""A store outage: every route answers 503 with Retry-After, logs one line (no traceback), then recovers."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
