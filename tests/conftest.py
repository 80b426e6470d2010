"""Shared fixtures: a real nx-27017 store, fresh databases, real MNIST, a loopback HTTP server.

- `mongo_uri` (session): an embedded nx-27017 on a free loopback port.
- `mongo_db_name`: a fresh database name per test, so tests never see each other's data.
- `store`: a `server.store.Store` on that database (indexes created).
- `data_dir` (session): FEDLAND_DATA_DIR holding mnist/; skips the test if unset.
- `token`: the bearer token the test servers accept.
- `clock`: a `ManualClock` to inject where code takes `clock=`; advance it instead of sleeping.
- `serve`: `serve(app) -> base_url` runs a WSGI app under waitress on 127.0.0.1 for the test.
- `local_stack`: `local_stack(**server_env) -> tests.helpers.LocalStack`, a `python -m server` child process on
  the test's database (clients added with `add_clients`); every stack started is stopped after the test.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from tests.helpers import LocalStack

TEST_TOKEN = "test-token-0123456789"


class ManualClock:
    """A clock that moves only when told: `clock()` returns the time, `advance(s)` moves it."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self.now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.now += seconds


@pytest.fixture(scope="session")
def mongo_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from stack.embedded import EmbeddedMongo

    with EmbeddedMongo(tmp_path_factory.mktemp("nx-27017")) as uri:
        yield uri


@pytest.fixture
def mongo_db_name() -> str:
    return f"test_{uuid.uuid4().hex[:16]}"


@pytest.fixture
def store(mongo_uri: str, mongo_db_name: str) -> Iterator[Any]:
    from server.store import Store

    store = Store(mongo_uri, mongo_db_name)
    store.prepare()
    yield store
    store.close()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    value = os.environ.get("FEDLAND_DATA_DIR", "").strip()
    if not value:
        pytest.skip("FEDLAND_DATA_DIR is unset: point it at a directory holding mnist/ to run this test")
    path = Path(value)
    if not (path / "mnist").is_dir():
        pytest.skip(f"FEDLAND_DATA_DIR={value} has no mnist/ directory")
    return path


@pytest.fixture
def token() -> str:
    return TEST_TOKEN


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def serve() -> Iterator[Callable[[Any], str]]:
    import waitress

    running: list[tuple[threading.Event, threading.Thread]] = []

    def start(app: Any) -> str:
        server = waitress.create_server(app, host="127.0.0.1", port=0, threads=4)
        stop = threading.Event()

        def loop() -> None:
            # waitress's own run() has no stop; poll here so the loop thread closes its sockets itself
            while not stop.is_set():
                server.asyncore.loop(timeout=0.05, map=server._map, count=1)
            server.task_dispatcher.shutdown()
            for channel in list(server._map.values()):
                channel.close()

        thread = threading.Thread(target=loop, name="waitress-test", daemon=True)
        thread.start()
        running.append((stop, thread))
        return f"http://127.0.0.1:{server.effective_port}"

    yield start
    for stop, thread in running:
        stop.set()
        thread.join(timeout=10)


@pytest.fixture
def local_stack(
    mongo_uri: str, mongo_db_name: str, data_dir: Path, tmp_path: Path
) -> Iterator[Callable[..., LocalStack]]:
    from tests.helpers import LocalStack

    stacks: list[LocalStack] = []

    def make(**server_env: str) -> LocalStack:
        stack = LocalStack(mongo_uri, mongo_db_name, data_dir, tmp_path / "logs", **server_env)
        stacks.append(stack)
        stack.start_server()
        return stack

    yield make
    for stack in stacks:
        stack.stop()
