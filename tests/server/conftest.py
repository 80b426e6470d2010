"""Server test fixtures: an app on the test store served over loopback HTTP, and a small client."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests

from server.api import create_app
from server.store import Store
from stack import wire
from stack.settings import ServerSettings


def small_spec(**overrides: Any) -> dict[str, Any]:
    """A 2-client MNIST experiment small enough to partition in well under a second."""
    spec: dict[str, Any] = {
        "description": "server test",
        "target_balance_ratios": [[0.1] * 10, [0.1] * 10],
        "subset_fractions": [0.02, 0.02],
        "rounds": 2,
        "model": "FedNet",
        "seed": 7,
        "strategy": {"name": "FedAvg", "params": {}},
        "landscape": {"every": 1, "num_samples": 256},  # every round, as the budget would not on these short rounds
    }
    spec.update(overrides)
    return spec


WORKER_TOKEN = "test-worker-token-0123456789"  # the enrolment token of the test servers
_WORKER_PATH = re.compile(r"/workers/([^/]+)/")


class Api:
    """requests against one server, each with the credential a real caller sends.

    The submitter token by default; the enrolment token to register; a worker's own
    secret on its routes (`/workers/<id>/...`), and on updates that of the worker
    last registered unless `as_worker` names another (`act(worker_id)` gives its header).
    """

    def __init__(self, base_url: str, token: str, app: Any = None, worker_token: str = WORKER_TOKEN) -> None:
        self.app = app  # the Flask app served, when the test started it
        self.base = f"{base_url}/api/v1"
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {token}"
        self.enrolment = {"Authorization": f"Bearer {worker_token}"}
        self.secrets: dict[str, str] = {}  # worker id -> its secret
        self.last_worker: str | None = None

    def act(self, worker_id: str) -> dict[str, str]:
        """The Authorization header of a registered worker."""
        return {"Authorization": f"Bearer {self.secrets[worker_id]}"}

    def headers_for(self, path: str, as_worker: str | None = None) -> dict[str, str]:
        if path == "/workers":
            return self.enrolment
        named = _WORKER_PATH.match(path)
        worker = as_worker or (named.group(1) if named else None)
        if worker is None and path.endswith("/updates"):
            worker = self.last_worker
        return self.act(worker) if worker in self.secrets else {}

    def _send(self, method: str, path: str, as_worker: str | None, kwargs: dict[str, Any]) -> requests.Response:
        headers = {**self.headers_for(path, as_worker), **kwargs.pop("headers", {})}
        return self.session.request(method, self.base + path, timeout=60, headers=headers, **kwargs)

    def get(self, path: str, as_worker: str | None = None, **kwargs: Any) -> requests.Response:
        return self._send("GET", path, as_worker, kwargs)

    def post(self, path: str, as_worker: str | None = None, **kwargs: Any) -> requests.Response:
        return self._send("POST", path, as_worker, kwargs)

    def submit(self, *specs: dict[str, Any]) -> list[str]:
        body: Any = specs[0] if len(specs) == 1 else list(specs)
        response = self.post("/experiments", json=body)
        assert response.status_code == 201, response.text
        return list(response.json()["ids"])

    def register(self, hostname: str = "test-host") -> str:
        response = self.post("/workers", json={"hostname": hostname, "pid": 1234})
        assert response.status_code == 201, response.text
        worker_id = str(response.json()["worker_id"])
        self.secrets[worker_id] = str(response.json()["worker_secret"])
        self.last_worker = worker_id
        return worker_id

    def task(self, worker_id: str) -> dict[str, Any]:
        response = self.post(f"/workers/{worker_id}/task")
        assert response.status_code == 200, response.text
        return dict(response.json())

    def model(self, experiment_id: str, server_round: int) -> dict[str, np.ndarray]:
        response = self.get(f"/experiments/{experiment_id}/rounds/{server_round}/model")
        assert response.status_code == 200, response.text
        assert response.headers["Content-Type"] == "application/octet-stream"
        return wire.decode(response.content)

    def update(
        self,
        experiment_id: str,
        server_round: int,
        worker_id: str,
        client_index: int,
        weights: dict[str, np.ndarray] | bytes,
        num_examples: int = 600,  # small_spec's clients hold round(30000 * 0.02) examples
        stats: dict[str, Any] | None = None,
    ) -> requests.Response:
        meta = {
            "worker_id": worker_id,
            "client_index": client_index,
            "num_examples": num_examples,
            "stats": stats if stats is not None else {"duration_s": {"train": 0.5}},
        }
        data = weights if isinstance(weights, bytes) else wire.encode(weights)
        return self.post(
            f"/experiments/{experiment_id}/rounds/{server_round}/updates",
            as_worker=worker_id if worker_id in self.secrets else None,
            data={"meta": json.dumps(meta)},
            files={"weights": ("weights.safetensors", data, "application/octet-stream")},
        )


@pytest.fixture
def make_settings(token: str, data_dir: Path) -> Callable[..., ServerSettings]:
    def make(**overrides: Any) -> ServerSettings:
        return ServerSettings(token=token, worker_token=WORKER_TOKEN, data_dir=data_dir, **overrides)

    return make


@pytest.fixture
def start_api(
    store: Store, token: str, clock: Any, serve: Callable[[Any], str], make_settings: Callable[..., ServerSettings]
) -> Callable[..., Api]:
    """start_api(**settings) -> Api on a fresh app over the test store (call again to "restart")."""

    def start(**overrides: Any) -> Api:
        app = create_app(make_settings(**overrides), Store.from_database(store.db), clock=clock)
        return Api(serve(app), token, app)

    return start


@pytest.fixture
def api(start_api: Callable[..., Api]) -> Api:
    return start_api()


@pytest.fixture
def make_spec() -> Callable[..., dict[str, Any]]:
    return small_spec
