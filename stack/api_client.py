"""HTTP transport to the fedland server: one method per API call, retries with backoff."""

from __future__ import annotations

import json
import logging
import random
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import requests
import urllib3

from stack.submission import Submitted

log = logging.getLogger(__name__)

API_PREFIX = "/api/v1"


class Stopped(Exception):
    """The stop event was set while waiting for the server."""


class UnknownWorker(Exception):
    """The server does not know this worker or its secret (404 or 401 on a worker route): register again."""


class Conflict(Exception):
    """The server refused an update as late, duplicate, or for a member this worker no longer holds (409)."""


class ApiError(RuntimeError):
    """The server answered a 4xx other than the ones the loop handles."""

    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        detail = f" (field {field!r})" if field else ""
        super().__init__(f"HTTP {status}: {message}{detail}")
        self.status = status
        self.message = message
        self.field = field


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with jitter: attempt `n` (0-based) waits in [cap/2, cap], cap = base * factor**n."""

    base_s: float = 0.5
    factor: float = 2.0
    max_s: float = 30.0

    def __post_init__(self) -> None:
        if self.base_s <= 0:
            raise ValueError(f"base_s must be > 0, got {self.base_s}")
        if self.factor < 1:
            raise ValueError(f"factor must be >= 1, got {self.factor}")
        if self.max_s < self.base_s:
            raise ValueError(f"max_s must be >= base_s, got {self.max_s} < {self.base_s}")

    def delay_s(self, attempt: int, rng: random.Random) -> float:
        """Seconds to wait before retry number `attempt + 1`."""
        cap = min(self.max_s, self.base_s * self.factor ** min(attempt, 64))
        return rng.uniform(cap / 2, cap)


@dataclass(frozen=True)
class Registration:
    worker_id: str
    worker_secret: str  # this worker's own credential: every later request of the worker sends it
    heartbeat_interval_s: float


class Transport:
    """Calls the server's HTTP API, retrying connection failures, 5xx and 429 answers.

    A 5xx or 429 with ``Retry-After`` (the store is down, the server is at its
    connection limit, registrations are over their rate) is retried no sooner
    than the server asks. `token` is the credential sent until `act_as` gives a
    worker's own secret; `register` always sends `token` (the enrolment token).

    Retries go on until `max_attempts` (None: forever) or until `stop` is set, in
    which case `Stopped` is raised. Not thread-safe: give each thread its own.
    """

    def __init__(
        self,
        server_url: str,
        token: str,
        *,
        stop: threading.Event,
        rng: random.Random,
        backoff: Backoff = Backoff(),
        max_attempts: int | None = None,
        timeout_s: tuple[float, float] = (5.0, 120.0),  # (connect, read)
    ) -> None:
        if max_attempts is not None and max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1 or None, got {max_attempts}")
        self.base_url = server_url.rstrip("/") + API_PREFIX
        self.stop = stop
        self.rng = rng
        self.backoff = backoff
        self.max_attempts = max_attempts
        self.timeout_s = timeout_s
        self.token = token
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {token}"

    def act_as(self, worker_secret: str) -> None:
        """Send `worker_secret` (a registration's) with every later request but `register`."""
        self.session.headers["Authorization"] = f"Bearer {worker_secret}"

    def close(self) -> None:
        self.session.close()

    def request(self, method: str, path: str, *, idempotent: bool = True, **kwargs: Any) -> requests.Response:
        """One API call; retries connection errors, timeouts and 5xx; returns any other answer.

        A call that is not `idempotent` is retried only when the request cannot have
        reached the server (the connection was never made): resending one that may
        have been applied would apply it twice.
        """
        url = self.base_url + path
        timeout = kwargs.pop("timeout", self.timeout_s)
        attempt = 0
        while True:
            if self.stop.is_set():
                raise Stopped(f"{method} {path}")
            retry_after_s = 0.0
            try:
                response = self.session.request(method, url, timeout=timeout, **kwargs)
            except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as error:
                problem = f"{type(error).__name__}: {error}"
                if not idempotent and not _never_sent(error):
                    raise ConnectionError(
                        f"{method} {path} failed ({problem}); it may have been applied: check before repeating it"
                    ) from error
            else:
                if response.status_code < 500 and response.status_code != 429:
                    return response
                problem = f"HTTP {response.status_code}: {_error_message(response)}"
                retry_after_s = retry_after(response)
                if not idempotent and response.status_code != 429:  # a 429 was not applied
                    raise ConnectionError(
                        f"{method} {path} failed ({problem}); it may have been applied: check before repeating it"
                    )
            attempt += 1
            if self.max_attempts is not None and attempt >= self.max_attempts:
                raise ConnectionError(f"{method} {path} failed after {attempt} attempts: {problem}")
            delay_s = max(self.backoff.delay_s(attempt - 1, self.rng), retry_after_s)  # the server's word wins
            log.warning("%s %s failed (%s); retry %d in %.1f s", method, path, problem, attempt, delay_s)
            if self.stop.wait(delay_s):
                raise Stopped(f"{method} {path}")

    # -- API calls -----------------------------------------------------------

    def health(self) -> bool:
        return self.request("GET", "/health").status_code == 200

    def register(self, hostname: str, pid: int) -> Registration:
        """A new worker id and its secret (sent with the enrolment token; see `act_as`)."""
        enrolment = {"Authorization": f"Bearer {self.token}"}
        response = self.request("POST", "/workers", json={"hostname": hostname, "pid": pid}, headers=enrolment)
        body = _json(response, 201)
        return Registration(str(body["worker_id"]), str(body["worker_secret"]), float(body["heartbeat_interval_s"]))

    def heartbeat(self, worker_id: str) -> None:
        _json(self.request("POST", f"/workers/{worker_id}/heartbeat"), 200, unknown_worker=True)

    def next_task(
        self, worker_id: str, wait_s: float = 0.0, known_experiments: Sequence[str] = ()
    ) -> dict[str, Any]:
        """The next task; the server holds the request up to `wait_s` s for work (long-poll).

        `known_experiments`: experiments whose spec this worker holds (the server leaves them out).
        """
        body = {"wait_s": wait_s, "known_experiments": list(known_experiments)}
        timeout = (self.timeout_s[0], self.timeout_s[1] + wait_s)
        response = self.request("POST", f"/workers/{worker_id}/task", json=body, timeout=timeout)
        return _json(response, 200, unknown_worker=True)

    def fetch_model(self, experiment_id: str, server_round: int) -> bytes:
        """Safetensors bytes of the global model that round `server_round` trains from."""
        response = self.request("GET", f"/experiments/{experiment_id}/rounds/{server_round}/model")
        _check(response, 200)
        return response.content

    def fetch_member_inputs(self, experiment_id: str, server_round: int, client_index: int) -> bytes:
        """Safetensors of what the member's client algorithm starts the round from (``stack.wire.encode_member_inputs``)."""
        response = self.request("GET", f"/experiments/{experiment_id}/rounds/{server_round}/members/{client_index}/state")
        _check(response, 200)
        return response.content

    def report_failure(self, experiment_id: str, server_round: int, client_index: int, error: str) -> None:
        """Tell the server this worker cannot train the member (e.g. a component it cannot import)."""
        response = self.request(
            "POST", f"/experiments/{experiment_id}/rounds/{server_round}/members/{client_index}/failure",
            json={"error": error},
        )
        _json(response, 200)

    def post_update(
        self, experiment_id: str, server_round: int, meta: dict[str, Any], weights: bytes, state: bytes | None = None
    ) -> dict[str, Any]:
        """Send a client update (with its client algorithm's state and message, if any); raises `Conflict` on 409."""
        files = {"weights": ("weights.safetensors", weights, "application/octet-stream")}
        if state is not None:
            files["state"] = ("state.safetensors", state, "application/octet-stream")
        response = self.request(
            "POST",
            f"/experiments/{experiment_id}/rounds/{server_round}/updates",
            data={"meta": json.dumps(meta)},
            files=files,
        )
        if response.status_code == 409:
            raise Conflict(_error_message(response))
        return _json(response, 202)

    def submit_experiments(self, specs: list[dict[str, Any]], *, fresh: bool = False) -> Submitted:
        """Queue experiments (all or nothing); returns their ids, in order, and those resumed.

        A spec identical to a queued or running experiment's resumes it (its id is
        returned, and listed in `resumed`); `fresh` queues every spec anew.
        """
        params = {"fresh": "1"} if fresh else None
        body = _json(self.request("POST", "/experiments", json=specs, params=params, idempotent=False), 201)
        return Submitted([str(i) for i in body["ids"]], [str(i) for i in body.get("resumed") or ()])

    def list_experiments(self) -> list[dict[str, Any]]:
        return list(_json(self.request("GET", "/experiments"), 200)["experiments"])

    def watch_experiments(self, version: int | None, wait_s: float) -> tuple[list[dict[str, Any]], int]:
        """Experiment summaries once they changed after `version` (or `wait_s` passed), and the new version."""
        params = {} if version is None else {"version": version, "wait_s": wait_s}
        timeout = (self.timeout_s[0], self.timeout_s[1] + wait_s)
        body = _json(self.request("GET", "/experiments", params=params, timeout=timeout), 200)
        return list(body["experiments"]), int(body.get("version", 0))

    def get_experiment(self, experiment_id: str) -> dict[str, Any]:
        return _json(self.request("GET", f"/experiments/{experiment_id}"), 200)


MAX_RETRY_AFTER_S = 300.0


def retry_after(response: requests.Response) -> float:
    """Seconds the server's ``Retry-After`` asks to wait (delta-seconds form; at most 5 minutes), else 0."""
    raw = response.headers.get("Retry-After", "").strip()
    try:
        seconds = float(raw)
    except ValueError:
        return 0.0
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S) if seconds == seconds else 0.0


def _never_sent(error: Exception) -> bool:
    """True when the connection itself failed, so the server cannot have seen the request."""
    if isinstance(error, requests.exceptions.ConnectTimeout):
        return True
    reason = error.args[0] if error.args else None
    reason = getattr(reason, "reason", reason)  # urllib3's MaxRetryError wraps the cause
    return isinstance(reason, (urllib3.exceptions.NewConnectionError, ConnectionRefusedError))


def _error_message(response: requests.Response) -> str:
    try:
        return str(response.json().get("error", response.text[:200]))
    except (ValueError, AttributeError):
        return response.text[:200]


def _check(response: requests.Response, expected: int, *, unknown_worker: bool = False) -> None:
    if response.status_code == expected:
        return
    if unknown_worker and response.status_code in (401, 404):
        raise UnknownWorker(_error_message(response))
    try:
        field = response.json().get("field")
    except (ValueError, AttributeError):
        field = None
    raise ApiError(response.status_code, _error_message(response), field)


def _json(response: requests.Response, expected: int, *, unknown_worker: bool = False) -> Any:
    _check(response, expected, unknown_worker=unknown_worker)
    return response.json()
