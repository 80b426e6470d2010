"""Credentials and body size checked before a body is read, and connections that cannot starve the server.

A WSGI guard, and a waitress server doing the same checks at the header stage (see `GuardedServer`).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import waitress.channel
import waitress.parser
import waitress.server
import waitress.utilities

from server.auth import Credentials, Denied

log = logging.getLogger(__name__)

Environ = dict[str, Any]
StartResponse = Callable[..., Any]
WsgiApp = Callable[[Environ, StartResponse], Iterable[bytes]]


#: The WSGI environ key holding the request's `server.auth.Principal` (set by `RequestGuard`).
PRINCIPAL = "fedland.principal"


class RequestGuard:
    """Answer 401 (no valid credential), 403 (not this credential's route) or 413 (body over the limit) unread.

    The wrapped app sees only authorized requests whose Content-Length is within
    the limit, with their `server.auth.Principal` in ``environ[PRINCIPAL]``;
    `wsgi.input` is never touched for a refused one. (The WSGI server checks the
    same before reading a body, chunked ones included: see `GuardedServer`.)
    """

    def __init__(self, app: WsgiApp, credentials: Credentials, max_body_bytes: int) -> None:
        self.app = app
        self.credentials = credentials
        self.max_body_bytes = max_body_bytes

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        try:
            principal = self.credentials.authorize(environ.get("HTTP_AUTHORIZATION", ""), environ.get("PATH_INFO", ""))
        except Denied as denied:
            return _answer(start_response, denied.status, denied.message, _denied_headers(denied.status))
        environ[PRINCIPAL] = principal
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


def _denied_headers(status: int) -> list[tuple[str, str]]:
    return [("WWW-Authenticate", "Bearer")] if status == 401 else []


def _payload(status: int, message: str) -> dict[str, str]:
    if status == 401:
        return {"error": message}
    return {"error": message, "field": "Authorization" if status == 403 else "body", "rule": message}


_REASONS = {400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 413: "Content Too Large"}


def _answer(
    start_response: StartResponse,
    status: int,
    message: str,
    headers: list[tuple[str, str]] | None = None,
) -> list[bytes]:
    body = json.dumps(_payload(status, message)).encode()
    all_headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body)))] + (headers or [])
    start_response(f"{status} {_REASONS[status]}", all_headers)
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
        headers = [("Content-Type", "application/json"), *self.extra_headers]
        return f"{self.code} {self.reason}", headers, json.dumps(_payload(self.code, self.body)).encode()


class GuardedParser(waitress.parser.HTTPRequestParser):
    """Refuses a request as soon as its headers are in: no valid credential for its route, or a body too large.

    Notes when the request began and when its headers were in, for `GuardedServer`'s timeouts.
    """

    credentials: Credentials  # set on the subclass each server makes

    def __init__(self, adj: Any) -> None:
        super().__init__(adj)
        self.started_at = time.time()
        self.headers_at: float | None = None
        self.body_at = 0.0  # when a byte of the body last came
        self.body_bytes = 0

    def received(self, data: bytes) -> int:
        consumed: int = super().received(data)
        if self.headers_at is not None:
            self.body_at = time.time()
            self.body_bytes += consumed
        elif self.headers_finished:
            self.headers_at = self.body_at = time.time()
            if isinstance(self.error, waitress.utilities.RequestEntityTooLarge):  # type: ignore[has-type]
                limit = self.adj.max_request_body_size
                self.error = _JsonError(
                    413, "Content Too Large", f"body over the limit of {limit} bytes (FEDLAND_MAX_BODY_MB)"
                )
            elif self.error is None:
                try:
                    self.credentials.authorize(self.headers.get("AUTHORIZATION", ""), self.path)
                except Denied as denied:
                    self.error = _JsonError(
                        denied.status, _REASONS[denied.status], denied.message, _denied_headers(denied.status)
                    )
                    self.completed = True
        return consumed


class GuardedChannel(waitress.channel.HTTPChannel):
    """A connection that notes whether it ever sent a byte (a silent one is not a client yet)."""

    parser_class = GuardedParser
    heard = False

    def received(self, data: bytes) -> bool:
        self.heard = True
        return bool(super().received(data))


def _guarded_channel(credentials: Credentials) -> type[GuardedChannel]:
    parser = type("Parser", (GuardedParser,), {"credentials": credentials})
    return type("Channel", (GuardedChannel,), {"parser_class": parser})


#: A body slower than this on average (after its first `body_timeout_s`) is closed: a trickle, not a slow link.
MIN_BODY_BYTES_PER_S = 16 * 1024


@dataclass(frozen=True)
class ConnectionTimeouts:
    """How long a connection may take, in seconds (`ServerSettings` fields of the same names)."""

    header_timeout_s: float = 5.0  # a request's headers, from its first byte (or from the connect)
    body_timeout_s: float = 10.0  # its body: the longest pause, and when its average rate starts to count
    idle_timeout_s: float = 60.0  # a kept-alive connection between requests


def expired(channel: GuardedChannel, now: float, timeouts: ConnectionTimeouts) -> str | None:
    """Why `channel` must be closed now (a timeout's name), or None; a request being served never expires."""
    if channel.requests or channel.total_outbufs_len:
        return None
    request = channel.request
    if request is None:
        if not channel.heard:
            return "header" if now - channel.creation_time > timeouts.header_timeout_s else None
        return "idle" if now - channel.last_activity > timeouts.idle_timeout_s else None
    if request.headers_at is None:
        return "header" if now - request.started_at > timeouts.header_timeout_s else None
    if now - request.body_at > timeouts.body_timeout_s:
        return "body"  # paused too long
    elapsed_s = now - request.headers_at
    too_slow = request.body_bytes < MIN_BODY_BYTES_PER_S * elapsed_s
    return "body" if elapsed_s > timeouts.body_timeout_s and too_slow else None


def _eviction_order(channel: GuardedChannel) -> tuple[int, float] | None:
    """Which connection to close first at the limit (smallest first); None: it does authenticated work."""
    if channel.requests or channel.total_outbufs_len or channel.will_close:
        return None
    request = channel.request
    if request is None:
        # a silent connection is no client yet; an idle kept-alive one reconnects when it needs to
        return (0, channel.creation_time) if not channel.heard else (1, channel.last_activity)
    if request.headers_at is None:
        return (0, channel.creation_time)  # headers still coming: not authenticated yet
    return None  # an authorized body on its way


OVERLOADED = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: %d\r\n"
    b"Connection: close\r\nContent-Length: %d\r\n\r\n%s"
)


class GuardedServer(waitress.server.TcpWSGIServer):
    """waitress that checks credentials before a body is read, and that idle or slow connections cannot starve.

    - A request's headers must be in within `header_timeout_s` of its first byte
      (of the connect for a silent connection); its body may pause at most
      `body_timeout_s` and, after that long, must average `MIN_BODY_BYTES_PER_S`
      (16 KiB/s: a slow link passes, a trickle does not); a kept-alive connection is closed after `idle_timeout_s`
      without a request. Checked every second.
    - At `connection_limit` open connections, a new connection closes the oldest
      one doing no authenticated work (silent or sending headers first, then
      idle kept-alive ones). Only when every connection is working is a new one
      answered ``503`` with ``Retry-After`` and closed (logged once per episode).
    """

    def __init__(
        self,
        application: Any,
        *,
        credentials: Credentials,
        timeouts: ConnectionTimeouts = ConnectionTimeouts(),
        retry_after_s: int = 1,
        **kwargs: Any,
    ) -> None:
        self.channel_class = _guarded_channel(credentials)
        self.timeouts = timeouts
        message = json.dumps(
            {"error": f"the server is at its connection limit; retry after {retry_after_s} s"}
        ).encode()
        self._overloaded = OVERLOADED % (retry_after_s, len(message), message)
        self.refused = 0  # connections answered 503 in the current overload episode
        self.evicted = 0  # connections closed to make room in the current episode
        kwargs.setdefault("cleanup_interval", 1)
        kwargs.setdefault("channel_timeout", timeouts.idle_timeout_s)
        super().__init__(application, **kwargs)

    def readable(self) -> bool:
        now = time.time()
        if now >= self.next_channel_cleanup:  # type: ignore[has-type]
            self.next_channel_cleanup = now + self.adj.cleanup_interval
            self.maintenance(now)
        return bool(self.accepting)  # always accept: at the limit, handle_accept makes room or answers 503

    def maintenance(self, now: float) -> None:
        """Close the connections past a timeout (see `expired`)."""
        closed: dict[str, int] = {}
        for channel in list(self.active_channels.values()):
            reason = expired(channel, now, self.timeouts)
            if reason is not None and not channel.will_close:
                channel.will_close = True  # closed by the loop (it is writable now)
                closed[reason] = closed.get(reason, 0) + 1
        if closed:
            log.debug("closed connections past a timeout: %s", ", ".join(f"{n} {r}" for r, n in sorted(closed.items())))

    def handle_accept(self) -> None:
        if len(self._map) < self.adj.connection_limit:
            if self.refused or self.evicted:
                log.warning(
                    "connections below the limit again; %d were closed to make room, %d answered 503",
                    self.evicted, self.refused,
                )
                self.refused = self.evicted = 0
            super().handle_accept()
            return
        if self._evict_one():
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
                "connection limit (%d) reached and every connection is working: answering new connections 503",
                self.adj.connection_limit,
            )
        self.refused += 1

    def _evict_one(self) -> bool:
        """Close the connection `_eviction_order` puts first; False if every connection is working."""
        candidates = [
            (order, fileno) for fileno, channel in list(self.active_channels.items())
            if (order := _eviction_order(channel)) is not None
        ]
        if not candidates:
            return False
        _, fileno = min(candidates)
        self.active_channels[fileno].handle_close()
        if not self.evicted:
            log.warning(
                "connection limit (%d) reached: closing the oldest silent, unauthenticated or idle connections",
                self.adj.connection_limit,
            )
        self.evicted += 1
        return True
