"""Bodies refused before they are read (credential, size), connection timeouts and the limit, over real sockets."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests

from server.auth import Credentials
from server.wsgi import ConnectionTimeouts, GuardedServer, RequestGuard
from tests.helpers import seconds_until_closed

TOKEN = "wsgi-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CREDENTIALS = Credentials(TOKEN, "wsgi-test-enrolment-token")


def echo_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    length = int(environ.get("CONTENT_LENGTH") or 0)
    body = environ["wsgi.input"].read(length)
    start_response("200 OK", [("Content-Type", "application/json")])
    return [json.dumps({"received": len(body)}).encode()]


@pytest.fixture
def guarded() -> Iterator[Callable[..., str]]:
    """guarded(**waitress options) -> base URL of a GuardedServer running echo_app."""
    running: list[tuple[GuardedServer, threading.Event, threading.Thread]] = []

    def start(**options: Any) -> str:
        server = GuardedServer(echo_app, credentials=CREDENTIALS, host="127.0.0.1", port=0, threads=2, **options)
        stop = threading.Event()

        def loop() -> None:
            while not stop.is_set():
                server.asyncore.loop(timeout=0.05, map=server._map, count=1)
            server.task_dispatcher.shutdown()
            for channel in list(server._map.values()):
                channel.close()

        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        running.append((server, stop, thread))
        return f"http://127.0.0.1:{server.effective_port}"

    yield start
    for _, stop, thread in running:
        stop.set()
        thread.join(timeout=10)


def headers_only(url: str, lines: list[str]) -> tuple[str, dict[str, str], bytes]:
    """Send a request's headers and no body; return the status line, headers and body answered."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        data = b""
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _length(data):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status, *rest = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in rest)}
    return status, headers, body


def _length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 0


def test_a_body_without_the_token_is_refused_before_it_is_read(guarded: Callable[..., str]) -> None:
    url = guarded(max_request_body_size=1 << 30)
    # 300 MB announced, none sent: the answer comes from the headers alone
    status, headers, body = headers_only(
        url, ["POST /api/v1/experiments HTTP/1.1", "Host: x", "Content-Length: 300000000"]
    )
    assert status.startswith("HTTP/1.1 401")
    assert headers["www-authenticate"] == "Bearer" and json.loads(body) == {"error": "missing or wrong bearer token"}
    status, _, _ = headers_only(
        url, ["POST /x HTTP/1.1", "Host: x", "Authorization: Bearer wrong", "Transfer-Encoding: chunked"]
    )
    assert status.startswith("HTTP/1.1 401")


def test_a_body_over_the_limit_is_refused_before_it_is_read(guarded: Callable[..., str]) -> None:
    url = guarded(max_request_body_size=1000)
    status, _, body = headers_only(
        url, ["POST /x HTTP/1.1", "Host: x", f"Authorization: Bearer {TOKEN}", "Content-Length: 300000000"]
    )
    assert status.startswith("HTTP/1.1 413")
    assert json.loads(body)["field"] == "body" and "limit of 1000 bytes" in json.loads(body)["error"]
    # chunked, no length announced: refused once the limit is crossed
    response = requests.post(url + "/x", data=iter([b"x" * 600, b"x" * 600]), headers=AUTH, timeout=30)
    assert response.status_code == 413
    # within the limit, with the token: served
    response = requests.post(url + "/x", data=b"x" * 999, headers=AUTH, timeout=30)
    assert (response.status_code, response.json()) == (200, {"received": 999})


def working_connection(url: str) -> socket.socket | None:
    """A connection whose authorized request is waiting for its body (the server said 100 Continue); None on 503."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(
        f"POST /x HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
        "Content-Length: 100\r\nExpect: 100-continue\r\n\r\n".encode()
    )
    answer = sock.recv(4096)
    if answer.startswith(b"HTTP/1.1 100"):
        return sock
    assert answer.startswith(b"HTTP/1.1 503") and b"Retry-After: 1" in answer and b"connection limit" in answer
    sock.close()
    return None


def test_the_connection_limit_answers_503_only_when_every_connection_is_working(
    guarded: Callable[..., str],
) -> None:
    url = guarded(connection_limit=6, max_request_body_size=1000)
    working: list[socket.socket] = []
    try:
        for _ in range(10):
            sock = working_connection(url)
            if sock is None:
                break
            working.append(sock)
        assert 0 < len(working) < 10  # the limit was reached, and nothing working was closed for the newcomer
        for sock in working:  # each still waits for its body
            sock.setblocking(False)
            with pytest.raises(BlockingIOError):
                sock.recv(1)
        working.pop().close()
        answers = []
        for _ in range(200):  # the server sees the closed connection within a few loop turns
            answers.append(requests.get(url + "/health", headers=AUTH, timeout=30).status_code)
            if answers[-1] == 200:
                break
        assert answers[-1] == 200
    finally:
        for sock in working:
            sock.close()


def test_slow_headers_and_silent_connections_are_closed_within_the_header_timeout(
    guarded: Callable[..., str],
) -> None:
    url = guarded(timeouts=ConnectionTimeouts(header_timeout_s=1.0))
    host, port = url.removeprefix("http://").split(":")
    slowloris = b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\n" + b"X-a: b\r\n" * 100
    with socket.create_connection((host, int(port))) as silent, socket.create_connection((host, int(port))) as slow:
        assert seconds_until_closed(slow, 10.0, slowloris) < 3.5  # 1 s, and the once-a-second check
        assert seconds_until_closed(silent, 10.0) < 3.5
    # a request that sends its headers at once is served on the same kind of connection
    assert requests.get(url + "/health", headers=AUTH, timeout=30).status_code == 200


def test_a_slow_body_is_closed_within_the_body_timeout(guarded: Callable[..., str]) -> None:
    url = guarded(timeouts=ConnectionTimeouts(body_timeout_s=1.0), max_request_body_size=10_000)
    sock = working_connection(url)
    assert sock is not None
    with sock:
        assert seconds_until_closed(sock, 10.0, b"x" * 100) < 3.5


def test_a_slow_but_steady_body_is_served(guarded: Callable[..., str]) -> None:
    url = guarded(timeouts=ConnectionTimeouts(body_timeout_s=1.0), max_request_body_size=1 << 20)
    host, port = url.removeprefix("http://").split(":")
    chunk, chunks = b"x" * 4096, 32  # 128 KiB at about 40 KiB/s: over three body timeouts, above the minimum rate
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(
            f"POST /x HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Length: {len(chunk) * chunks}\r\n\r\n".encode()
        )
        pace = threading.Event()
        for _ in range(chunks):
            sock.sendall(chunk)
            pace.wait(0.1)  # the pace of a slow link, not a wait for the server
        answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b'{"received": 131072}'), answer


def test_at_the_limit_the_oldest_idle_connection_makes_room(guarded: Callable[..., str]) -> None:
    url = guarded(connection_limit=6, max_request_body_size=1000)
    host, port = url.removeprefix("http://").split(":")
    held = [socket.create_connection((host, int(port)), timeout=30) for _ in range(8)]  # silent, as attackers hold
    try:
        for _ in range(3):  # answered, not 503: each newcomer closes the oldest silent connection
            assert requests.get(url + "/health", headers=AUTH, timeout=30).status_code == 200
        assert seconds_until_closed(held[0], 5.0) < 5.0
    finally:
        for sock in held:
            sock.close()


def test_a_credential_for_another_route_is_refused_before_the_body_is_read(guarded: Callable[..., str]) -> None:
    url = guarded(max_request_body_size=1 << 30)
    status, _, body = headers_only(url, [
        "POST /api/v1/experiments HTTP/1.1", "Host: x", "Authorization: Bearer wsgi-test-enrolment-token",
        "Content-Length: 300000000",
    ])
    assert status.startswith("HTTP/1.1 403") and json.loads(body)["field"] == "Authorization"


class Unreadable:
    def read(self, *args: Any) -> bytes:
        raise AssertionError("the body was read")


@pytest.mark.parametrize(
    ("headers", "status"),
    [({}, 401), ({"HTTP_AUTHORIZATION": "Bearer nope"}, 401),
     ({"HTTP_AUTHORIZATION": f"Bearer {TOKEN}", "CONTENT_LENGTH": "1001"}, 413),
     ({"HTTP_AUTHORIZATION": f"Bearer {TOKEN}", "CONTENT_LENGTH": "ten"}, 400)],
)
def test_request_guard_answers_without_reading(headers: dict[str, str], status: int) -> None:
    answered: list[str] = []
    guard = RequestGuard(echo_app, CREDENTIALS, max_body_bytes=1000)
    environ = {"wsgi.input": Unreadable(), "REQUEST_METHOD": "POST", **headers}
    body = b"".join(guard(environ, lambda s, h: answered.append(s)))
    assert answered[0].startswith(str(status)) and "error" in json.loads(body)
