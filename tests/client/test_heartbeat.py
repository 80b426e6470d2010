"""The heartbeat thread against a real HTTP stub on loopback."""

from __future__ import annotations

import threading
import time
from typing import Any

from client.loop import Heartbeat, make_transport_factory


def wait_until(condition: Any, timeout_s: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_beats_every_interval_until_the_block_ends(stub_server: Any) -> None:
    script = stub_server(routes={("POST", "/api/v1/workers/c-1/heartbeat"): (200, {"ok": True})})
    make = make_transport_factory(script.url, "t", threading.Event(), seed=1)
    started = time.monotonic()
    with Heartbeat(make, "c-1", interval_s=0.1) as heartbeat:
        assert wait_until(lambda: len(script.calls) >= 4)  # a busy machine only makes them later
    elapsed = time.monotonic() - started
    beats = len(script.calls)
    assert 4 <= beats <= elapsed / 0.1 + 2  # never faster than the interval
    assert {(method, path) for method, path, _, _ in script.calls} == {("POST", "/api/v1/workers/c-1/heartbeat")}
    assert not heartbeat.lost.is_set()
    time.sleep(0.3)
    assert len(script.calls) == beats  # stopped with the block


def test_a_404_marks_the_worker_lost(stub_server: Any) -> None:
    script = stub_server(status=404, body={"error": "unknown worker"})
    make = make_transport_factory(script.url, "t", threading.Event(), seed=1)
    with Heartbeat(make, "c-1", interval_s=0.05) as heartbeat:
        assert heartbeat.lost.wait(5.0)
    assert len(script.calls) == 1  # no more beats once lost


def test_an_unreachable_server_is_not_fatal(stub_server: Any) -> None:
    script = stub_server(fail_first=2, routes={("POST", "/api/v1/workers/c-1/heartbeat"): (200, {"ok": True})})
    make = make_transport_factory(script.url, "t", threading.Event(), seed=1)
    with Heartbeat(make, "c-1", interval_s=0.05) as heartbeat:
        assert wait_until(lambda: len(script.calls) >= 4)  # one try per beat: two 503s, then beats that pass
    assert not heartbeat.lost.is_set()
