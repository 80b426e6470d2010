"""500 idle connections and a few slowloris ones do not stall an experiment: a real server, store and workers.

`python -m server` runs with a connection limit (200) below the crowd (500), so
it must close silent and slow connections (header timeout, and at the limit the
oldest connection doing no authenticated work) for the workers to get through.
"""

from __future__ import annotations

import select
import socket
import threading
from collections.abc import Callable
from types import TracebackType

from tests.helpers import LocalStack, assert_complete, seconds_until_closed, small_spec

IDLE = 500
SLOWLORIS = 5
HEADER_TIMEOUT_S = 2.0
SLOW_HEADERS = b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\n" + b"X-Padding: slow\r\n" * 10_000


class Crowd:
    """`IDLE` silent connections and `SLOWLORIS` slow-header ones, each reopened as soon as the server closes it."""

    def __init__(self, port: int) -> None:
        self.address = ("127.0.0.1", port)
        self.idle: list[socket.socket | None] = [None] * IDLE
        self.slow: list[tuple[socket.socket, int] | None] = [None] * SLOWLORIS  # (socket, bytes sent)
        self.most_open = 0  # the most connections open at once
        self.reopened = 0  # connections the server closed, opened again
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="idle-crowd", daemon=True)

    def __enter__(self) -> Crowd:
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        for sock in [*self.idle, *(entry[0] for entry in self.slow if entry is not None)]:
            if sock is not None:
                sock.close()

    def _connect(self) -> socket.socket | None:
        try:
            return socket.create_connection(self.address, timeout=5)
        except OSError:
            return None

    def _closed(self, sockets: list[socket.socket]) -> set[socket.socket]:
        """The sockets the server closed (or answered: a 503 also ends the connection)."""
        poller = select.poll()
        by_fd = {sock.fileno(): sock for sock in sockets}
        for fd in by_fd:
            poller.register(fd, select.POLLIN)
        return {by_fd[fd] for fd, _ in poller.poll(0)}

    def _run(self) -> None:
        while not self._stop.is_set():
            open_idle = [sock for sock in self.idle if sock is not None]
            open_slow = [entry[0] for entry in self.slow if entry is not None]
            closed = self._closed(open_idle + open_slow)
            for sock in closed:
                sock.close()
            self.reopened += sum(1 for sock in open_idle + open_slow if sock in closed)
            self.idle = [sock if sock is not None and sock not in closed else self._connect() for sock in self.idle]
            slow: list[tuple[socket.socket, int] | None] = []
            for entry in self.slow:
                if entry is None or entry[0] in closed:
                    fresh = self._connect()
                    entry = None if fresh is None else (fresh, 0)
                if entry is not None:
                    slow_sock, sent = entry
                    try:
                        slow_sock.send(SLOW_HEADERS[sent:sent + 1])  # one byte per turn: never a whole header block
                        entry = (slow_sock, sent + 1)
                    except OSError:
                        slow_sock.close()
                        entry = None
                slow.append(entry)
            self.slow = slow
            self.most_open = max(self.most_open, sum(s is not None for s in self.idle) + sum(s is not None for s in slow))
            self._stop.wait(0.5)


def test_an_experiment_completes_its_rounds_through_500_idle_connections(
    local_stack: Callable[..., LocalStack],
) -> None:
    stack = local_stack(FEDLAND_SERVER_CONNECTIONS="200", FEDLAND_HEADER_TIMEOUT_S=str(HEADER_TIMEOUT_S))
    rounds = 3
    with Crowd(stack.port) as crowd:
        stack.add_clients(2)
        [experiment_id] = stack.api.submit_experiments([small_spec(num_clients=2, rounds=rounds)])
        # while the crowd holds its connections, a slow-header connection is closed within a few seconds
        with socket.create_connection(("127.0.0.1", stack.port), timeout=5) as slowloris:
            assert seconds_until_closed(slowloris, 30.0, SLOW_HEADERS) < HEADER_TIMEOUT_S + 3.0
        stack.wait_done(experiment_id, timeout_s=240.0)
        assert crowd.most_open >= IDLE + SLOWLORIS and crowd.reopened > 0, (crowd.most_open, crowd.reopened)
    assert_complete(stack, experiment_id, num_clients=2, rounds=rounds)
