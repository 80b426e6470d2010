"""Who may call what: the submitter's token, the workers' enrolment token, and each worker's own secret.

Three credentials, each a bearer token:

- the **submitter token** (`FEDLAND_TOKEN`) queues experiments and reads them;
- the **enrolment token** (`FEDLAND_WORKER_TOKEN`) registers a worker, and nothing else;
- a **worker secret**, returned once by the registration, is that worker's own:
  its heartbeats, tasks, model downloads and updates need it. The store keeps
  only its SHA-256 (`WorkerRecord.secret_sha256`).

`Credentials.authorize(authorization, path)` is the one rule: the WSGI guard
calls it before a body is read (server/wsgi.py), at the header stage and again
in front of Flask; the API checks that an update's `meta.worker_id` is the
authenticated worker's. No store call here: worker secrets are held in memory
(loaded at start, added at registration), so the check is cheap enough for the
server's event loop.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

SUBMITTER = "submitter"
ENROLMENT = "enrolment"
WORKER = "worker"

_PREFIX = "/api/v1"
_WORKER_ROUTE = re.compile(r"/workers/([^/]+)/(?:heartbeat|task)/?")
_UPDATES = re.compile(r"/experiments/[^/]+/rounds/[^/]+/updates/?")
_MODEL = re.compile(r"/experiments/[^/]+/rounds/[^/]+/model/?")
_MEMBER_STATE = re.compile(r"/experiments/[^/]+/rounds/[^/]+/members/[^/]+/(?:state|failure)/?")
_EXPERIMENT = re.compile(r"/experiments/[^/]+/?")


@dataclass(frozen=True)
class Principal:
    """Who a request is: a role, and the worker's id for a worker."""

    role: str
    worker_id: str | None = None


class Denied(Exception):
    """A request refused before it is served: 401 (no valid credential) or 403 (not this role's route)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def secret_digest(secret: str) -> str:
    """The SHA-256 (hex) of a worker secret: what the store keeps."""
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def new_worker_secret(worker_id: str) -> tuple[str, str]:
    """A fresh secret bound to `worker_id` (it names the worker), and its digest."""
    secret = f"{worker_id}.{secrets.token_urlsafe(32)}"
    return secret, secret_digest(secret)


class Credentials:
    """The valid credentials and the routes each may call."""

    def __init__(self, submitter_token: str, enrolment_token: str) -> None:
        if not submitter_token or not enrolment_token:
            raise ValueError("the submitter and enrolment tokens must be non-empty")
        if hmac.compare_digest(submitter_token.encode(), enrolment_token.encode()):
            raise ValueError("the enrolment token (FEDLAND_WORKER_TOKEN) must differ from FEDLAND_TOKEN")
        self._submitter = submitter_token.encode()
        self._enrolment = enrolment_token.encode()
        self._workers: dict[str, str] = {}  # worker id -> secret digest
        self._lock = threading.Lock()

    def allow_worker(self, worker_id: str, digest: str) -> None:
        """Accept the secret whose digest is `digest` as `worker_id`'s from now on."""
        with self._lock:
            self._workers[worker_id] = digest

    def load(self, digests: Mapping[str, str]) -> None:
        """Accept the stored workers' secrets (worker id -> digest), e.g. after a restart."""
        with self._lock:
            self._workers.update(digests)

    def identify(self, authorization: str) -> Principal | None:
        """The principal an ``Authorization`` header names, or None if it is no valid credential."""
        scheme, _, given = authorization.partition(" ")
        if scheme.lower() != "bearer" or not given:
            return None
        raw = given.encode("utf-8", "surrogatepass")
        # every comparison runs, so the time taken does not tell which credential was close
        is_submitter = hmac.compare_digest(raw, self._submitter)
        is_enrolment = hmac.compare_digest(raw, self._enrolment)
        if is_submitter:
            return Principal(SUBMITTER)
        if is_enrolment:
            return Principal(ENROLMENT)
        worker_id, dot, _ = given.partition(".")
        with self._lock:
            expected = self._workers.get(worker_id) if dot else None
        if expected is not None and hmac.compare_digest(secret_digest(given).encode(), expected.encode()):
            return Principal(WORKER, worker_id)
        return None

    def authorize(self, authorization: str, path: str) -> Principal:
        """The principal of a request for `path` (unquoted); raises Denied if it may not call it."""
        principal = self.identify(authorization)
        if principal is None:
            raise Denied(401, "missing or wrong bearer token")
        allowed = route_roles(path)
        if principal.role not in allowed:
            raise Denied(403, f"{path} is not for the {principal.role} credential (it takes: {', '.join(allowed)})")
        worker_route = _WORKER_ROUTE.fullmatch(_route(path))
        if worker_route is not None and worker_route.group(1) != principal.worker_id:
            raise Denied(403, "this worker secret belongs to another worker")
        return principal


def _route(path: str) -> str:
    collapsed = re.sub("/+", "/", path)
    return collapsed[len(_PREFIX):] if collapsed.startswith(_PREFIX) else collapsed


def route_roles(path: str) -> tuple[str, ...]:
    """The roles that may call `path` (unquoted)."""
    route = _route(path)
    if _WORKER_ROUTE.fullmatch(route) or _UPDATES.fullmatch(route) or _MEMBER_STATE.fullmatch(route):
        return (WORKER,)
    if route.rstrip("/") == "/workers":
        return (ENROLMENT,)
    if route.rstrip("/") == "/experiments":
        return (SUBMITTER,)
    if _MODEL.fullmatch(route) or _EXPERIMENT.fullmatch(route):
        return (SUBMITTER, WORKER)  # a worker reads the spec and the model it trains
    return (SUBMITTER, ENROLMENT, WORKER)  # /health; any other path is answered 404


class RateLimit:
    """A token bucket: `per_minute` events a minute, up to `per_minute` at once."""

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        if per_minute < 1:
            raise ValueError(f"per_minute must be >= 1, got {per_minute}")
        self.per_minute = per_minute
        self.clock = clock
        self._tokens = float(per_minute)
        self._at = clock()
        self._lock = threading.Lock()

    def take(self) -> int:
        """0 if the event may happen now (and count it), else the whole seconds until one may."""
        with self._lock:
            now = self.clock()
            rate_per_s = self.per_minute / 60.0
            self._tokens = min(float(self.per_minute), self._tokens + max(now - self._at, 0.0) * rate_per_s)
            self._at = now
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                return 0
            return max(1, math.ceil((1.0 - self._tokens) / rate_per_s))
