"""Bodies refused before they are read (token, size), and a 503 at the connection limit, over real sockets."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests

from server.wsgi import GuardedServer, RequestGuard

TOKEN = "wsgi-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


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
        server = GuardedServer(echo_app, token=TOKEN, host="127.0.0.1", port=0, threads=2, **options)
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


def test_the_connection_limit_answers_503_with_retry_after(guarded: Callable[..., str]) -> None:
    url = guarded(connection_limit=6, max_request_body_size=1000)
    host, port = url.removeprefix("http://").split(":")
    held = []
    try:
        for _ in range(8):  # idle keep-alive connections, as many clients hold
            held.append(socket.create_connection((host, int(port)), timeout=30))
        response = requests.get(url + "/health", headers=AUTH, timeout=30)
        assert response.status_code == 503 and response.headers["Retry-After"] == "1"
        assert "connection limit" in response.json()["error"]
    finally:
        for sock in held:
            sock.close()
    answers = []
    for _ in range(200):  # the server sees the closed connections within a few loop turns
        answers.append(requests.get(url + "/health", headers=AUTH, timeout=30).status_code)
        if answers[-1] == 200:
            break
    assert answers[-1] == 200


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
    guard = RequestGuard(echo_app, TOKEN, max_body_bytes=1000)
    environ = {"wsgi.input": Unreadable(), "REQUEST_METHOD": "POST", **headers}
    body = b"".join(guard(environ, lambda s, h: answered.append(s)))
    assert answered[0].startswith(str(status)) and "error" in json.loads(body)
