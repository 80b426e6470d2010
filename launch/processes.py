"""Local processes of the stack: `python -m server`, `python -m client` (and the reports) as children."""

from __future__ import annotations

import logging
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

from stack.api_client import Transport

log = logging.getLogger(__name__)


def child_env(base: Mapping[str, str], **overrides: str) -> dict[str, str]:
    """Environment of a child process: `base`, one torch thread unless set, plus `overrides`."""
    env = dict(base)
    env.setdefault("FEDLAND_TORCH_THREADS", "1")
    env.update(overrides)
    return env


class Child:
    """A child process in its own session (a terminal's Ctrl-C reaches only the launcher)."""

    def __init__(self, name: str, module: str, env: Mapping[str, str], log_path: Path,
                 args: Sequence[str] = ()) -> None:
        self.name = name
        self.log_path = log_path
        self._terminated = False
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log: IO[bytes] = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", module, *args],
                env=dict(env),
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except BaseException:
            self._log.close()
            raise
        log.debug("started %s (pid %d), log %s", name, self.process.pid, log_path)

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def terminate(self) -> None:
        """SIGTERM, once: a second signal means "stop now" to a client."""
        if self.alive() and not self._terminated:
            self._terminated = True
            self.process.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        if self.alive():
            self.process.kill()

    def wait(self, timeout_s: float) -> int | None:
        """Exit code, or None if still running after `timeout_s`."""
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout_s: float = 15.0) -> int:
        """SIGTERM, then SIGKILL after `timeout_s`; returns the exit code."""
        self.terminate()
        code = self.wait(timeout_s)
        if code is None:
            log.warning("%s did not stop within %.0f s; killing it", self.name, timeout_s)
            self.kill()
            code = self.process.wait()
        self._log.close()
        return code

    def log_tail(self, num_lines: int = 20) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-num_lines:])


    def stop_now(self) -> None:
        """A second SIGTERM: a client then leaves at once, even in the middle of its local training."""
        if self.alive():
            self._terminated = True
            self.process.send_signal(signal.SIGTERM)


#: How long children asked to stop may take to finish their current step before they are told to stop now.
STOP_GRACE_S = 1.5


def stop_all(children: list[Child], timeout_s: float = 15.0, grace_s: float = STOP_GRACE_S) -> None:
    """Signal all children at once; those still running after ``grace_s`` are signalled again (stop now).

    A client finishes its current step (a whole local training) after the first
    SIGTERM; the second keeps a teardown within seconds. Stragglers are killed
    after ``timeout_s``.
    """
    for child in children:
        child.terminate()
    deadline = time.monotonic() + grace_s
    for child in children:
        child.wait(max(0.0, deadline - time.monotonic()))
    for child in children:
        child.stop_now()
    for child in children:
        child.stop(timeout_s)


def start_server(env: Mapping[str, str], log_path: Path) -> Child:
    return Child("server", "server", env, log_path)


def start_clients(count: int, env: Mapping[str, str], log_dir: Path, first: int = 0) -> list[Child]:
    return [
        Child(f"client-{i}", "client", env, log_dir / f"client-{i}.log") for i in range(first, first + count)
    ]


def wait_healthy(server: Child, url: str, token: str, timeout_s: float = 60.0) -> None:
    """Wait until `GET /health` answers 200; raise RuntimeError if the server exits or times out."""
    stop = threading.Event()
    transport = Transport(url, token, stop=stop, rng=random.Random(0), max_attempts=1, timeout_s=(1.0, 5.0))
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            if not server.alive():
                raise RuntimeError(
                    f"server exited with code {server.process.returncode}; log {server.log_path}:\n"
                    + server.log_tail()
                )
            try:
                if transport.health():
                    return
            except ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server did not answer /health within {timeout_s:.0f} s; log {server.log_path}")
            time.sleep(0.2)
    finally:
        transport.close()
