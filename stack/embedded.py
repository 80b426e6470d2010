"""Start and stop an embedded nx-27017 MongoDB-wire server as a subprocess."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

import pymongo
import pymongo.errors

log = logging.getLogger(__name__)

EXECUTABLE = "nx-27017"


def find_executable() -> str:
    """Path of the nx-27017 launcher: next to the running interpreter, else on PATH."""
    beside = Path(sys.executable).parent / EXECUTABLE
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(EXECUTABLE)
    if found is None:
        raise FileNotFoundError(
            f"{EXECUTABLE} not found next to {sys.executable} nor on PATH; "
            "install the 'stack' extra (pip install -e '.[stack]')"
        )
    return found


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on `host` a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class EmbeddedMongo:
    """An nx-27017 server on a free loopback port, storing its data under `data_dir`.

    Use as a context manager, or call `start()` / `stop()`; `uri` is valid after start.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        start_timeout_s: float = 30.0,
        stop_timeout_s: float = 10.0,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.host = host
        self.port = port
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        if self.port is None or self._process is None:
            raise RuntimeError("embedded store is not running")
        return f"mongodb://{self.host}:{self.port}/"

    @property
    def log_file(self) -> Path:
        return self.data_dir / "nx-27017.log"

    def start(self) -> str:
        """Start the server and wait until it answers a ping; returns its URI."""
        if self._process is not None:
            return self.uri
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.port is None:
            self.port = free_port(self.host)
        command = [
            find_executable(),
            "--data-dir", str(self.data_dir),
            "--host", self.host,
            "-p", str(self.port),
            "--pid-file", str(self.data_dir / "nx-27017.pid"),
            "--log-file", str(self.log_file),
        ]
        log.info("starting embedded store on %s:%d (data in %s)", self.host, self.port, self.data_dir)
        self._process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self.uri

    def _wait_ready(self) -> None:
        if self._process is None:
            raise RuntimeError("the embedded store was not started")
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"nx-27017 exited with code {self._process.returncode}; see {self.log_file}"
                )
            client: pymongo.MongoClient[dict[str, object]] = pymongo.MongoClient(
                self.uri, serverSelectionTimeoutMS=500, connectTimeoutMS=500
            )
            try:
                client.admin.command("ping")
                return
            except pymongo.errors.PyMongoError:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"nx-27017 did not answer within {self.start_timeout_s} s; see {self.log_file}"
                    ) from None
                time.sleep(0.1)
            finally:
                client.close()

    def stop(self) -> None:
        """Terminate the server; kill it if it does not exit within the stop timeout."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=self.stop_timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("nx-27017 did not stop within %.0f s; killing it", self.stop_timeout_s)
            process.kill()
            process.wait()

    def __enter__(self) -> str:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
