"""SIGINT and SIGTERM become one exception with the exit status a shell expects; ignored signals stay ignored;
a stop whose exception Python swallowed is still known."""

from __future__ import annotations

import os
import signal
import sys
import weakref

import pytest

from stack.interrupts import Interrupted, deferred, exit_status, requested, stop_on_signals


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_raises_interrupted_with_its_exit_status(signum: int, status: int) -> None:
    before = signal.getsignal(signum)
    with pytest.raises(Interrupted) as raised, stop_on_signals():
        os.kill(os.getpid(), signum)  # the handler raises before the next statement
        raise AssertionError("no Interrupted")
    assert exit_status(raised.value) == status
    assert signal.getsignal(signum) is before  # the previous handler is back
    assert exit_status(KeyboardInterrupt()) == 130


def test_a_signal_within_a_deferred_block_raises_when_the_outermost_block_ends() -> None:
    finished = []
    with pytest.raises(Interrupted) as raised, stop_on_signals():
        with deferred():
            with deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                finished.append("inner")  # the handler recorded the stop and returned
            finished.append("outer")  # the inner block's end does not raise either
        raise AssertionError("the outermost block's end raises")
    assert finished == ["inner", "outer"]
    assert exit_status(raised.value) == 143
    with stop_on_signals(), deferred():
        pass  # no signal: the block ends quietly, and the earlier stop is forgotten


def test_a_signal_ignored_before_stays_ignored() -> None:
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with stop_on_signals():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGINT)  # nothing happens
            assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_signal_whose_exception_python_swallowed_still_stops_and_prints_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A signal handled inside a weakref callback raises there and Python drops it: ``requested`` still says,
    and no "Exception ignored ... Traceback" is printed for it."""
    unraised: list[BaseException | None] = []
    monkeypatch.setattr(sys, "unraisablehook", lambda hook_args: unraised.append(hook_args.exc_value))

    class Thing:
        pass

    def callback(_: object) -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(100_000):  # the handler runs here, inside the callback, and its exception is dropped
            pass

    with stop_on_signals():
        assert requested() is None
        thing = Thing()
        reference = weakref.ref(thing, callback)
        del thing
        assert reference() is None
        stopped = requested()
        assert stopped is not None and exit_status(stopped) == 143
    assert requested() is None  # the next block starts afresh
    assert unraised == []
    other = ValueError("not a stop")

    class Broken:
        def __del__(self) -> None:
            raise other

    with stop_on_signals():
        Broken()  # any other dropped exception still reaches the hook
    assert unraised == [other]
