"""Token and body size checked before a body is read: a WSGI guard, and a waitress server doing the same."""

from __future__ import annotations

import hmac
import json
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import waitress.channel
import waitress.parser
import waitress.server
import waitress.utilities

log = logging.getLogger(__name__)

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
    payload = {"error": message} if status == 401 else {"error": message, "field": "body", "rule": message}
    body = json.dumps(payload).encode()
    all_headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body)))] + (headers or [])
    start_response(f"{status} {reasons[status]}", all_headers)
    return [body]


# --- waitress: the same refusals before the body is read, and a clear answer at the connection limit ----


class _JsonError(waitress.utilities.Error):
    """A waitress parser error answered as fedland's JSON error body, with extra headers."""

    def __init__(self, code: int, reason: str, message: str, headers: list[tuple[str, str]] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.extra_headers = headers or []

    def to_response(self, ident: str | None = None) -> tuple[str, list[tuple[str, str]], bytes]:
        payload = {"error": self.body} if self.code == 401 else {"error": self.body, "field": "body", "rule": self.body}
        headers = [("Content-Type", "application/json"), *self.extra_headers]
        return f"{self.code} {self.reason}", headers, json.dumps(payload).encode()


def _guarded_channel(token: str) -> type[waitress.channel.HTTPChannel]:
    expected = f"Bearer {token}".encode()

    class GuardedParser(waitress.parser.HTTPRequestParser):
        """Refuses a request with a body and no valid token as soon as its headers are in."""

        def received(self, data: bytes) -> int:
            consumed: int = super().received(data)
            if self.headers_finished and not getattr(self, "_guarded", False):
                self._guarded = True
                if isinstance(self.error, waitress.utilities.RequestEntityTooLarge):  # type: ignore[has-type]
                    limit = self.adj.max_request_body_size
                    self.error = _JsonError(
                        413, "Content Too Large", f"body over the limit of {limit} bytes (FEDLAND_MAX_BODY_MB)"
                    )
                elif self.error is None:
                    given = self.headers.get("AUTHORIZATION", "").encode("latin-1", "replace")
                    if not hmac.compare_digest(given, expected):
                        self.error = _JsonError(
                            401, "Unauthorized", "missing or wrong bearer token", [("WWW-Authenticate", "Bearer")]
                        )
                        self.completed = True
            return consumed

    class GuardedChannel(waitress.channel.HTTPChannel):
        parser_class = GuardedParser

    return GuardedChannel


OVERLOADED = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: %d\r\n"
    b"Connection: close\r\nContent-Length: %d\r\n\r\n%s"
)


class GuardedServer(waitress.server.TcpWSGIServer):
    """waitress with the token checked before a body is read, and a 503 (not a stall) at the connection limit.

    At `connection_limit` open connections, a new connection is accepted, answered
    ``503`` with ``Retry-After`` and closed (logged once per episode), instead of
    waiting unaccepted in the kernel's backlog.
    """

    def __init__(self, application: Any, *, token: str, retry_after_s: int = 1, **kwargs: Any) -> None:
        self.channel_class = _guarded_channel(token)
        message = json.dumps(
            {"error": f"the server is at its connection limit; retry after {retry_after_s} s"}
        ).encode()
        self._overloaded = OVERLOADED % (retry_after_s, len(message), message)
        self.refused = 0  # connections answered 503 in the current overload episode
        super().__init__(application, **kwargs)

    def readable(self) -> bool:
        now = time.time()
        # as waitress does: close channels idle past channel_timeout
        if now >= self.next_channel_cleanup:  # type: ignore[has-type]
            self.next_channel_cleanup = now + self.adj.cleanup_interval
            self.maintenance(now)
        return bool(self.accepting)  # always accept: over the limit, handle_accept answers 503

    def handle_accept(self) -> None:
        if len(self._map) < self.adj.connection_limit:
            if self.refused:
                log.warning("connections below the limit again; %d were answered 503", self.refused)
                self.refused = 0
            super().handle_accept()
            return
        try:
            accepted = self.accept()
            if accepted is None:
                return
            conn = accepted[0]
            try:
                conn.setblocking(False)
                conn.send(self._overloaded)  # small: fits the socket buffer
            except OSError:
                pass
            finally:
                conn.close()
        except OSError:
            return
        if not self.refused:
            log.warning(
                "connection limit (%d) reached: answering new connections 503 with Retry-After",
                self.adj.connection_limit,
            )
        self.refused += 1
