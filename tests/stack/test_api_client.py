"""The client's transport against a real HTTP server on loopback that fails on purpose."""

from __future__ import annotations

import json
import random
import threading
import time
from typing import Any

import pytest

from stack.api_client import ApiError, Backoff, Conflict, Stopped, Transport, UnknownWorker
from stack.embedded import free_port

TOKEN = "test-token"  # the stub server (conftest.py) does not check it; the tests read what it received


FAST = Backoff(base_s=0.01, factor=2.0, max_s=0.05)


def transport(url: str, **kwargs: Any) -> Transport:
    kwargs.setdefault("stop", threading.Event())
    kwargs.setdefault("rng", random.Random(7))
    kwargs.setdefault("backoff", FAST)
    return Transport(url, TOKEN, **kwargs)


def test_retries_5xx_until_success_and_sends_token(stub_server: Any) -> None:
    script = stub_server(fail_first=3, status=201, body={"worker_id": "c-1", "worker_secret": "c-1.s", "heartbeat_interval_s": 2.5})
    registration = transport(script.url).register("host-a", 1234)
    assert (registration.worker_id, registration.worker_secret) == ("c-1", "c-1.s")
    assert registration.heartbeat_interval_s == 2.5
    assert len(script.calls) == 4  # three 503s, then the answer
    for method, path, headers, body in script.calls:
        assert (method, path) == ("POST", "/api/v1/workers")
        assert headers["Authorization"] == f"Bearer {TOKEN}"
        assert json.loads(body) == {"hostname": "host-a", "pid": 1234}


def test_retry_after_is_honoured(stub_server: Any) -> None:
    script = stub_server(fail_first=2, fail_headers={"Retry-After": "0.4"})
    t0 = time.monotonic()
    assert transport(script.url).health() is True  # FAST backoff alone would wait 0.05 s at most
    assert time.monotonic() - t0 >= 0.8 and len(script.calls) == 3


def test_retry_after_values() -> None:
    import requests

    from stack.api_client import retry_after

    def answer(value: str | None) -> requests.Response:
        response = requests.Response()
        if value is not None:
            response.headers["Retry-After"] = value
        return response

    assert retry_after(answer("5")) == 5.0 and retry_after(answer(None)) == 0.0
    assert retry_after(answer("Wed, 21 Oct 2015 07:28:00 GMT")) == 0.0  # the date form: backoff decides
    assert retry_after(answer("99999")) == 300.0 and retry_after(answer("-3")) == 0.0
    assert retry_after(answer("nan")) == 0.0


def test_gives_up_after_max_attempts(stub_server: Any) -> None:
    script = stub_server(fail_first=10)
    with pytest.raises(ConnectionError, match="after 3 attempts: HTTP 503: warming up"):
        transport(script.url, max_attempts=3).health()
    assert len(script.calls) == 3


def test_retries_while_server_is_unreachable_then_connects(stub_server: Any) -> None:
    port = free_port()
    started: list[Any] = []
    threading.Timer(0.5, lambda: started.append(stub_server(port=port))).start()
    t0 = time.monotonic()
    assert transport(f"http://127.0.0.1:{port}", backoff=Backoff(base_s=0.05, max_s=0.2)).health() is True
    assert time.monotonic() - t0 >= 0.4
    assert len(started[0].calls) == 1


def test_stop_event_interrupts_backoff(stub_server: Any) -> None:
    url = stub_server(fail_first=1000).url
    stop = threading.Event()
    slow = Backoff(base_s=30.0, max_s=30.0)
    threading.Timer(0.3, stop.set).start()
    t0 = time.monotonic()
    with pytest.raises(Stopped):
        transport(url, stop=stop, backoff=slow).health()
    assert time.monotonic() - t0 < 5.0


@pytest.mark.parametrize(
    ("status", "call", "error"),
    [
        (404, lambda t: t.next_task("c-9"), UnknownWorker),
        (404, lambda t: t.heartbeat("c-9"), UnknownWorker),
        (409, lambda t: t.post_update("e-1", 2, {"worker_id": "c-9"}, b"weights"), Conflict),
        (400, lambda t: t.submit_experiments([{}]), ApiError),
    ],
)
def test_client_errors_are_not_retried(stub_server: Any, status: int, call: Any, error: type[Exception]) -> None:
    script = stub_server(status=status, body={"error": "nope", "field": "rounds"})
    with pytest.raises(error, match="nope"):
        call(transport(script.url))
    assert len(script.calls) == 1


def test_update_is_multipart_with_meta_and_weights(stub_server: Any) -> None:
    script = stub_server(status=202, body={"accepted": True, "aggregated": False})
    meta = {"worker_id": "c-1", "client_index": 0, "num_examples": 10, "stats": {}}
    answer = transport(script.url).post_update("e-1", 3, meta, b"\x00\x01weights")
    assert answer == {"accepted": True, "aggregated": False}
    method, path, headers, body = script.calls[0]
    assert (method, path) == ("POST", "/api/v1/experiments/e-1/rounds/3/updates")
    assert headers["Content-Type"].startswith("multipart/form-data")
    assert b'name="meta"' in body and json.dumps(meta).encode() in body
    assert b'name="weights"' in body and b"\x00\x01weights" in body


def test_backoff_grows_with_jitter_and_caps() -> None:
    backoff = Backoff(base_s=1.0, factor=2.0, max_s=8.0)
    rng = random.Random(3)
    for attempt, cap in [(0, 1.0), (1, 2.0), (2, 4.0), (3, 8.0), (10, 8.0)]:
        delays = [backoff.delay_s(attempt, rng) for _ in range(200)]
        assert min(delays) >= cap / 2 and max(delays) <= cap
        assert len(set(delays)) > 100  # jittered, not constant
    assert Backoff().delay_s(2, random.Random(5)) == Backoff().delay_s(2, random.Random(5))


@pytest.mark.parametrize("kwargs", [{"base_s": 0.0}, {"factor": 0.5}, {"base_s": 2.0, "max_s": 1.0}])
def test_backoff_rejects_bad_parameters(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        Backoff(**kwargs)


def test_a_submission_that_may_have_been_applied_is_not_repeated(stub_server: Any) -> None:
    # A 5xx after the server read the request: resending would queue the experiments twice.
    script = stub_server(fail_first=1, status=201, body={"ids": ["e-1"]})
    with pytest.raises(ConnectionError, match="may have been applied"):
        transport(script.url, max_attempts=5).submit_experiments([{"description": "x"}])
    assert len(script.calls) == 1


def test_a_submission_is_retried_while_the_server_refuses_connections(stub_server: Any) -> None:
    port = free_port()
    started: list[Any] = []
    threading.Timer(0.3, lambda: started.append(stub_server(port=port, status=201, body={"ids": ["e-1"]}))).start()
    ids = transport(f"http://127.0.0.1:{port}", backoff=Backoff(base_s=0.05, max_s=0.2)).submit_experiments([{}])
    assert ids == ["e-1"]
    assert len(started[0].calls) == 1
