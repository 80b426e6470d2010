"""The HTTP layer: a thin Flask blueprint under /api/v1 over the Coordinator."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from flask import Blueprint, Flask, Response, current_app, jsonify, request
from werkzeug.exceptions import HTTPException

from server.auth import Credentials, Principal, RateLimit
from server.coordinator import Coordinator
from server.errors import Conflict, Forbidden, Invalid, NotFound, Throttled
from server.resources import Resources
from server.store import Store, StoreUnavailable
from server.validation import check_id, parse_json, parse_query_flag, parse_query_number, parse_task_request
from server.wsgi import PRINCIPAL, RequestGuard
from stack.settings import ServerSettings

log = logging.getLogger(__name__)

api = Blueprint("api", __name__, url_prefix="/api/v1")


def create_app(
    settings: ServerSettings,
    store: Store | None = None,
    *,
    clock: Callable[[], float] = time.time,
    recover: bool = True,
) -> Flask:
    """A Flask app serving the fedland API on `store` (opened from the settings if not given)."""
    if store is None:
        if settings.mongo_uri is None:
            raise ValueError("FEDLAND_MONGO_URI must be set to serve without an explicit store")
        store = Store(settings.mongo_uri, settings.db_name, timeouts=settings.store_timeouts)
    credentials = credentials_of(settings, store)
    coordinator = Coordinator(
        store,
        Resources(settings.data_dir, device=settings.device),
        heartbeat_timeout_s=settings.heartbeat_timeout_s,
        long_poll_slots=settings.long_poll_slots,
        max_workers=settings.max_workers,
        credentials=credentials,
        clock=clock,
        measure_threads=settings.measure_threads,
    )
    if recover:
        coordinator.recover()
    coordinator.start()
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.config["STORE_RETRY_AFTER_S"] = settings.store_retry_after_s
    app.extensions["fedland.store"] = store
    app.extensions["fedland.coordinator"] = coordinator
    app.extensions["fedland.credentials"] = credentials
    app.extensions["fedland.registrations"] = RateLimit(settings.registrations_per_min, clock=clock)
    app.register_blueprint(api)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(StoreUnavailable, _store_unavailable)
    # credential, route and Content-Length are checked before Flask (or anything) reads the body
    app.wsgi_app = RequestGuard(app.wsgi_app, credentials, settings.max_body_bytes)  # type: ignore[method-assign]
    return app


def credentials_of(settings: ServerSettings, store: Store) -> Credentials:
    """The submitter and enrolment tokens of `settings`, and the secrets of the workers in `store`."""
    credentials = Credentials(settings.token, settings.worker_token)
    credentials.load(store.worker_secret_digests())
    return credentials


def coordinator_of(app: Flask) -> Coordinator:
    coordinator: Coordinator = app.extensions["fedland.coordinator"]
    return coordinator


def app_credentials(app: Flask) -> Credentials:
    """The credentials `app` accepts (the waitress guard checks the same ones before a body is read)."""
    credentials: Credentials = app.extensions["fedland.credentials"]
    return credentials


def _coordinator() -> Coordinator:
    return coordinator_of(current_app)


def _error(status: int, message: str, field: str | None = None, rule: str | None = None) -> tuple[Response, int]:
    body: dict[str, Any] = {"error": message}
    if field is not None:
        body["field"] = field
    if rule is not None:
        body["rule"] = rule
    return jsonify(body), status


def _http_error(error: HTTPException) -> tuple[Response, int]:
    return _error(error.code or 500, error.description or error.name)


def _store_unavailable(error: StoreUnavailable) -> tuple[Response, int]:
    """The store did not answer in time: 503 with Retry-After, one log line (no traceback)."""
    retry_after_s = current_app.config["STORE_RETRY_AFTER_S"]
    log.warning(
        "%s %s: store unavailable (%s: %s); answered 503, retry after %d s",
        request.method, request.path, type(error).__name__, str(error).split(",")[0][:200], retry_after_s,
    )
    response, status = _error(503, f"the store is unavailable; retry after {retry_after_s} s")
    response.headers["Retry-After"] = str(retry_after_s)
    return response, status


@api.errorhandler(NotFound)
def _not_found(error: NotFound) -> tuple[Response, int]:
    return _error(404, str(error))


@api.errorhandler(Conflict)
def _conflict(error: Conflict) -> tuple[Response, int]:
    return _error(409, str(error))


@api.errorhandler(Invalid)
def _invalid(error: Invalid) -> tuple[Response, int]:
    response, status = _error(error.status, str(error), error.field, error.rule)
    if isinstance(error, Throttled):
        response.headers["Retry-After"] = str(error.retry_after_s)
    return response, status


def _json_body(*, check: bool = True) -> Any:
    if not request.is_json:
        raise Invalid("body", "must be JSON (Content-Type: application/json)")
    return parse_json(request.get_data(cache=False), check=check)


@api.get("/health")
def health() -> Response:
    return jsonify({"status": "ok"})


@api.post("/experiments")
def submit_experiments() -> tuple[Response, int]:
    """One spec or a list; `?fresh=1` queues each anew instead of resuming an identical unfinished one.

    Answers `{"ids": [...], "resumed": [...]}`: an id per spec, in order, and those resumed.
    """
    fresh = parse_query_flag("fresh", request.args.get("fresh"))
    # the spec's rules name the field first; the coordinator then checks what it stores
    return jsonify(_coordinator().submit(_json_body(check=False), fresh=fresh).answer()), 201


@api.get("/experiments")
def list_experiments() -> Response:
    """Summaries; with `?version=V&wait_s=S`, first waits up to S s (at most 30) for a change after version V."""
    coordinator = _coordinator()
    version = parse_query_number("version", request.args.get("version"), int)
    if version is not None:
        wait_s = parse_query_number("wait_s", request.args.get("wait_s"), float) or 0.0
        coordinator.wait_for_change(int(version), min(wait_s, 30.0))
    current = coordinator.version
    return jsonify({"experiments": coordinator.list_experiments(), "version": current})


@api.get("/experiments/<experiment_id>")
def get_experiment(experiment_id: str) -> Response:
    return jsonify(_coordinator().experiment(check_id(experiment_id, "experiment_id")))


@api.post("/workers")
def register_worker() -> tuple[Response, int]:
    """A new worker's id and secret; at most FEDLAND_REGISTRATIONS_PER_MIN a minute (429 with Retry-After)."""
    limit: RateLimit = current_app.extensions["fedland.registrations"]
    retry_after_s = limit.take()
    if retry_after_s:
        raise Throttled(
            "workers", f"at most {limit.per_minute} registrations a minute (FEDLAND_REGISTRATIONS_PER_MIN)",
            retry_after_s,
        )
    return jsonify(_coordinator().register(_json_body())), 201


@api.post("/workers/<worker_id>/heartbeat")
def heartbeat(worker_id: str) -> Response:
    _coordinator().heartbeat(check_id(worker_id, "worker_id"))
    return jsonify({"ok": True})


@api.post("/workers/<worker_id>/task")
def task(worker_id: str) -> Response:
    """Optional JSON body `{"wait_s": s, "known_experiments": [ids]}`: long-poll, and specs to leave out."""
    wanted = parse_task_request(_json_body() if request.content_length else {})
    coordinator = _coordinator()
    return jsonify(coordinator.task(check_id(worker_id, "worker_id"), wanted.wait_s, wanted.known_experiments))


@api.get("/experiments/<experiment_id>/rounds/<int:server_round>/model")
def global_model(experiment_id: str, server_round: int) -> Response:
    data = _coordinator().global_model(check_id(experiment_id, "experiment_id"), server_round)
    return Response(data, status=200, mimetype="application/octet-stream")


@api.get("/experiments/<experiment_id>/rounds/<int:server_round>/members/<int:client_index>/state")
def member_inputs(experiment_id: str, server_round: int, client_index: int) -> Response:
    """What the member's client algorithm starts the round from (its state, the strategy's payload): safetensors."""
    principal: Principal = request.environ[PRINCIPAL]
    data = _coordinator().member_inputs(
        check_id(experiment_id, "experiment_id"), server_round, client_index, str(principal.worker_id)
    )
    return Response(data, status=200, mimetype="application/octet-stream")


MAX_REASON_CHARS = 4_000


@api.post("/experiments/<experiment_id>/rounds/<int:server_round>/members/<int:client_index>/failure")
def member_failure(experiment_id: str, server_round: int, client_index: int) -> Response:
    """JSON ``{"error": text}``: the worker holding the member cannot run the experiment; it fails with that text."""
    body = _json_body()
    reason = body.get("error") if isinstance(body, dict) else None
    if not isinstance(reason, str) or not reason.strip():
        raise Invalid("error", "must be a non-empty string saying why the member cannot be trained")
    principal: Principal = request.environ[PRINCIPAL]
    _coordinator().member_failed(
        check_id(experiment_id, "experiment_id"), server_round, client_index, str(principal.worker_id),
        reason[:MAX_REASON_CHARS],
    )
    return jsonify({"failed": True})


@api.post("/experiments/<experiment_id>/rounds/<int:server_round>/updates")
def submit_update(experiment_id: str, server_round: int) -> tuple[Response, int]:
    check_id(experiment_id, "experiment_id")
    raw_meta = request.form.get("meta")
    if raw_meta is None:
        raise Invalid("meta", "multipart field 'meta' (JSON) is missing")
    # NaN statistics are the update's fault, not the request's: parse_meta refuses and records them
    meta = parse_json(raw_meta, "meta", check=False, finite=False)
    principal: Principal = request.environ[PRINCIPAL]
    if isinstance(meta, dict) and meta.get("worker_id") != principal.worker_id:
        raise Forbidden("meta.worker_id", "must be the id of the worker whose secret signs the request")
    upload = request.files.get("weights")
    if upload is None:
        raise Invalid("weights", "multipart file 'weights' (safetensors) is missing")
    state_upload = request.files.get("state")  # a client algorithm's new state and message, if it has any
    state_data = None if state_upload is None else state_upload.read()
    result = _coordinator().submit_update(experiment_id, server_round, meta, upload.read(), state_data)
    return jsonify(result), 202
