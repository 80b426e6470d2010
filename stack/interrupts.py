"""Ctrl-C and SIGTERM as one exception, and the exit status a shell expects of each (130, 143).

    with stop_on_signals():      # SIGINT and SIGTERM raise Interrupted in the main thread
        ...
    except Interrupted as stopped:
        return stopped.exit_status  # 128 + the signal's number

The handler raises at once rather than setting a flag that is read later: a
model evaluation or a figure can take longer than the few seconds a stop may
take, and every writer cleans up in ``finally`` (see ``reports.atomic``).
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """A stop asked for by a signal (a plain KeyboardInterrupt reads as SIGINT)."""

    def __init__(self, signum: int = signal.SIGINT) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


def exit_status(error: KeyboardInterrupt) -> int:
    """130 for Ctrl-C (SIGINT), 143 for SIGTERM: 128 + the signal's number."""
    return error.exit_status if isinstance(error, Interrupted) else 128 + signal.SIGINT


_requested: list[int] = []  # the signal that asked for the stop, once one has
_deferring: list[None] = []  # one entry per ``deferred`` block the main thread is in


def requested() -> Interrupted | None:
    """The stop a signal asked for within ``stop_on_signals``, if any (None: no signal yet).

    The handler's exception can be lost: a signal that arrives while Python runs a
    ``__del__`` or a weakref callback raises there, and Python drops it (within
    ``stop_on_signals`` without printing it). Code that checks between long steps
    calls this too, so such a stop still happens.
    """
    return Interrupted(_requested[-1]) if _requested else None


def _raise(signum: int, frame: FrameType | None) -> None:
    ignore_signals()  # one stop: a second Ctrl-C must not cut the cleanup short
    _requested.append(signum)
    if not _deferring:
        raise Interrupted(signum)


@contextmanager
def deferred() -> Iterator[None]:
    """Within the block a stop is recorded, not raised; it is raised when the block ends.

    For code that turns an exception raised inside it into another one: matplotlib's
    C++ extensions report an exception raised while they call back into Python as
    "Invalid bounding box", and its PDF writer prints one it meets while closing a
    stream. A report's figure is drawn within this block: it takes a second or two,
    and a stop then comes between two figures.
    """
    _deferring.append(None)
    try:
        yield
    finally:
        _deferring.pop()
    signalled = requested()
    if signalled is not None and not _deferring:
        raise signalled


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within the block the first SIGINT or SIGTERM raises ``Interrupted`` (later ones are ignored).

    The previous handlers come back after the block. A signal ignored when the block
    starts (a shell's background job ignores SIGINT) stays ignored.
    """
    # a signal ignored from the start stays ignored (a background job of a shell, nohup)
    previous = {signum: signal.signal(signum, _raise) for signum in SIGNALS
                if signal.getsignal(signum) is not signal.SIG_IGN}
    previous_hook = sys.unraisablehook

    def unraisable(hook_args: sys.UnraisableHookArgs) -> None:
        if not isinstance(hook_args.exc_value, Interrupted):  # a dropped stop is not an error: `requested` has it
            previous_hook(hook_args)

    sys.unraisablehook = unraisable
    _requested.clear()
    try:
        yield
    finally:
        _requested.clear()
        sys.unraisablehook = previous_hook
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def ignore_signals() -> None:
    """SIGINT and SIGTERM ignored from now on: a second Ctrl-C must not cut a teardown short."""
    for signum in SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
