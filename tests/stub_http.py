"""A scripted HTTP server on loopback for the client and API-client tests (real sockets, real HTTP)."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

TOKEN = "test-token"


@dataclass
class Script:
    """What the stub answers: `fail_first` 503s, then per-route answers, else `status` with `body`."""

    fail_first: int = 0
    fail_headers: dict[str, str] = field(default_factory=dict)  # sent with those 503s (e.g. Retry-After)
    status: int = 200
    body: dict[str, Any] = field(default_factory=lambda: {"status": "ok"})
    routes: dict[tuple[str, str], tuple[int, dict[str, Any]]] = field(default_factory=dict)  # (method, path)
    calls: list[tuple[str, str, dict[str, str], bytes]] = field(default_factory=list)
    url: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def answer(self, method: str, path: str) -> tuple[int, dict[str, Any]]:
        if len(self.calls) <= self.fail_first:
            return 503, {"error": "warming up"}
        return self.routes.get((method, path), (self.status, self.body))


def _handler(script: Script) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            with script.lock:
                script.calls.append((self.command, self.path, dict(self.headers), body))
                status, payload = script.answer(self.command, self.path)
                failing = len(script.calls) <= script.fail_first
            data = json.dumps(payload).encode()
            self.send_response(status)
            for name, value in (script.fail_headers if failing else {}).items():
                self.send_header(name, value)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = _answer

        def log_message(self, format: str, *args: Any) -> None:  # keep pytest output quiet
            pass

    return Handler


@pytest.fixture
def stub_server() -> Iterator[Callable[..., Script]]:
    """`stub_server(port=0, **script_fields)` starts a stub server; stopped after the test."""
    servers: list[ThreadingHTTPServer] = []

    def start(port: int = 0, **fields: Any) -> Script:
        script = Script(**fields)
        server = ThreadingHTTPServer(("127.0.0.1", port), _handler(script))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        script.url = f"http://127.0.0.1:{server.server_address[1]}"
        return script

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()
