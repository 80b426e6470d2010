"""The measurement lanes: one experiment's jobs in the order queued, different experiments' side by side,
jobs not started cancelled at shutdown."""

from __future__ import annotations

import threading
from concurrent.futures import CancelledError

import pytest

from server.measurements import Lanes

TIMEOUT_S = 60


def test_a_keys_jobs_run_in_order_and_other_keys_run_beside_them() -> None:
    lanes = Lanes(2, "test-lanes")
    release_a, a_started, b_ran = threading.Event(), threading.Event(), threading.Event()
    order: list[str] = []

    def first_a() -> None:
        a_started.set()
        assert release_a.wait(TIMEOUT_S)
        order.append("a1")

    def first_b() -> None:
        order.append("b1")
        b_ran.set()

    try:
        a1 = lanes.submit("a", first_a)
        a2 = lanes.submit("a", lambda: order.append("a2"))
        b1 = lanes.submit("b", first_b)
        assert a_started.wait(TIMEOUT_S)
        assert b_ran.wait(TIMEOUT_S)  # b's job ran while a's first job was still running
        assert not a2.done() and order == ["b1"]  # a's second waits for its first
        release_a.set()
        a1.result(TIMEOUT_S), a2.result(TIMEOUT_S), b1.result(TIMEOUT_S)
        assert order == ["b1", "a1", "a2"]
    finally:
        release_a.set()
        lanes.shutdown()


def test_a_failing_job_ends_in_its_future_and_the_lane_goes_on() -> None:
    lanes = Lanes(1, "test-lanes")
    try:
        failed = lanes.submit("a", lambda: (_ for _ in ()).throw(ValueError("bad round")))
        after = lanes.submit("a", lambda: None)
        with pytest.raises(ValueError, match="bad round"):
            failed.result(TIMEOUT_S)
        assert after.result(TIMEOUT_S) is None
    finally:
        lanes.shutdown()


def test_shutdown_cancels_the_jobs_not_started_and_refuses_new_ones() -> None:
    lanes = Lanes(1, "test-lanes")
    release, started = threading.Event(), threading.Event()
    ran: list[str] = []

    def running() -> None:
        started.set()
        assert release.wait(TIMEOUT_S)
        ran.append("running")

    first = lanes.submit("a", running)
    queued_same = lanes.submit("a", lambda: ran.append("queued in a"))
    queued_other = lanes.submit("b", lambda: ran.append("queued in b"))  # waits for the pool's one thread
    assert started.wait(TIMEOUT_S)
    lanes.shutdown()
    with pytest.raises(RuntimeError):
        lanes.submit("c", lambda: None)
    assert queued_same.cancelled() and queued_other.cancelled()
    with pytest.raises(CancelledError):
        queued_other.result(TIMEOUT_S)
    release.set()
    assert first.result(TIMEOUT_S) is None  # a running job finishes
    assert ran == ["running"]
