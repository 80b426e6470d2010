"""WSGI guard in front of the app: token and body size are checked before the body is read."""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable, Iterable
from typing import Any

Environ = dict[str, Any]
StartResponse = Callable[..., Any]
WsgiApp = Callable[[Environ, StartResponse], Iterable[bytes]]


class RequestGuard:
    """Answer 401 (no or wrong bearer token) or 413 (declared body over `max_body_bytes`) unread.

    The wrapped app sees only authenticated requests whose Content-Length is
    within the limit; `wsgi.input` is never touched for a refused one. (The WSGI
    server bounds bodies too, chunked ones included: see server/__main__.py.)
    """

    def __init__(self, app: WsgiApp, token: str, max_body_bytes: int) -> None:
        self.app = app
        self.expected = f"Bearer {token}".encode()
        self.max_body_bytes = max_body_bytes

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        given = environ.get("HTTP_AUTHORIZATION", "").encode("latin-1", "replace")
        if not hmac.compare_digest(given, self.expected):
            return _answer(
                start_response, 401, "missing or wrong bearer token", [("WWW-Authenticate", "Bearer")]
            )
        raw_length = environ.get("CONTENT_LENGTH") or "0"
        try:
            length = int(raw_length)
        except ValueError:
            return _answer(start_response, 400, f"Content-Length {raw_length[:40]!r} is not an integer")
        if length > self.max_body_bytes:
            return _answer(
                start_response,
                413,
                f"body of {length} bytes; the limit is {self.max_body_bytes} (FEDLAND_MAX_BODY_MB)"
            )
        return self.app(environ, start_response)


def _answer(
    start_response: StartResponse,
    status: int,
    message: str,
    headers: list[tuple[str, str]] | None = None,
) -> list[bytes]:
    reasons = {400: "Bad Request", 401: "Unauthorized", 413: "Content Too Large"}
    payload = {"error": message} if status == 401 else {"error": message, "field": "body"}
    body = json.dumps(payload).encode()
    all_headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body)))] + (headers or [])
    start_response(f"{status} {reasons[status]}", all_headers)
    return [body]
