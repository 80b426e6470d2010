"""Start and stop an embedded nx-27017 MongoDB-wire server as a subprocess."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

import pymongo
import pymongo.errors
import pymongo.uri_parser
from pymongo.database import Database
from pymongo.errors import ConnectionFailure

from stack.settings import StoreSettings, StoreTimeouts

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


class StoreLocked(RuntimeError):
    """The store directory is held by another process whose store does not answer."""


class EmbeddedMongo:
    """An nx-27017 server on a free loopback port, storing its data under `data_dir`.

    Use as a context manager, or call `start()` / `stop()`; `uri` is valid after start.

    One store per directory: `data_dir/store.lock` is locked (flock) by the
    starting process and by the nx-27017 child, and records the child's pid and
    URI. A second `start()` on a locked directory uses the running store (and
    leaves it running at `stop()`, unless the process that started it is gone:
    then it adopts and stops it); if that store does not answer it refuses,
    naming the process holding the directory. The store's log (`nx-27017.log`)
    and pid file (`nx-27017.pid`) are written in `data_dir` too.
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
        self._lock_fd: int | None = None
        self._attached_uri: str | None = None  # a store another process started
        self._adopted_pid: int | None = None  # ... whose starter is gone: stopped by us

    @property
    def uri(self) -> str:
        if self._attached_uri is not None:
            return self._attached_uri
        if self.port is None or self._process is None:
            raise RuntimeError("embedded store is not running")
        return f"mongodb://{self.host}:{self.port}/"

    @property
    def log_file(self) -> Path:
        return self.data_dir / "nx-27017.log"

    @property
    def pid_file(self) -> Path:
        return self.data_dir / "nx-27017.pid"

    @property
    def lock_file(self) -> Path:
        return self.data_dir / "store.lock"

    @property
    def pid(self) -> int | None:
        """Pid of the nx-27017 process serving this store (started or attached to), if known."""
        if self._process is not None:
            return self._process.pid
        return self._adopted_pid if self._adopted_pid is not None else _read_lock(self.lock_file).get("pid")

    def start(self) -> str:
        """Start the server (or use the one already serving `data_dir`) and wait until it answers a ping."""
        if self._process is not None or self._attached_uri is not None:
            return self.uri
        self.data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return self._attach()
        self._lock_fd = fd
        try:
            return self._spawn(fd)
        except BaseException:
            self.stop()
            raise

    def _spawn(self, lock_fd: int) -> str:
        if self.port is None:
            self.port = free_port(self.host)
        command = [
            find_executable(),
            "--data-dir", str(self.data_dir),
            "--host", self.host,
            "-p", str(self.port),
            "--pid-file", str(self.pid_file),
            "--log-file", str(self.log_file),
        ]
        log.info("starting embedded store on %s:%d (data in %s)", self.host, self.port, self.data_dir)
        with open(self.log_file, "ab") as log_output:  # the child keeps its own descriptor
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log_output,
                stderr=subprocess.STDOUT,
                pass_fds=(lock_fd,),  # the child holds the lock as long as it lives (and writes pid_file)
                start_new_session=True,  # a terminal's Ctrl-C reaches only our process
            )
        record = {"pid": self._process.pid, "uri": self.uri, "starter": os.getpid()}
        os.ftruncate(lock_fd, 0)
        os.pwrite(lock_fd, json.dumps(record).encode(), 0)
        self._wait_ready(self.uri, lambda: self._process is not None and self._process.poll() is None)
        return self.uri

    def _attach(self) -> str:
        """Use the store another process runs on this directory, or raise StoreLocked."""
        deadline = time.monotonic() + self.start_timeout_s
        record = _read_lock(self.lock_file)
        while not record.get("uri") and time.monotonic() < deadline:  # its starter is writing it
            time.sleep(0.05)
            record = _read_lock(self.lock_file)
        pid, uri = record.get("pid"), record.get("uri")
        holder = f"process {pid}" if pid else "another process"
        if not isinstance(uri, str) or not _answers(uri, deadline):
            raise StoreLocked(
                f"store directory {self.data_dir} is locked by {holder} ({_command_of(pid)}), "
                f"which does not answer on {uri or 'an unknown address'}: stop it, or use another directory"
            )
        self._attached_uri = uri
        starter = record.get("starter")
        if isinstance(starter, int) and not _alive(starter) and isinstance(pid, int):
            self._adopted_pid = pid  # nobody else will stop it
            log.info("adopting the embedded store of a process that is gone (pid %d) on %s", pid, uri)
        else:
            log.info("using the embedded store already serving %s (pid %s) on %s", self.data_dir, pid, uri)
        return uri

    def _wait_ready(self, uri: str, running: Callable[[], bool]) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while not _answers(uri, time.monotonic() + 0.5):
            if not running():
                code = None if self._process is None else self._process.poll()
                raise RuntimeError(f"nx-27017 exited with code {code}; see {self.log_file}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"nx-27017 did not answer within {self.start_timeout_s} s; see {self.log_file}")
            time.sleep(0.1)

    def stop(self) -> None:
        """Stop the server this object started or adopted (terminate, then kill after the stop timeout)."""
        process, self._process = self._process, None
        adopted, self._adopted_pid = self._adopted_pid, None
        self._attached_uri = None
        try:
            if process is not None and process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=self.stop_timeout_s)
                except subprocess.TimeoutExpired:
                    log.warning("nx-27017 did not stop within %.0f s; killing it", self.stop_timeout_s)
                    process.kill()
                    process.wait()
            elif adopted is not None:
                _stop_pid(adopted, self.stop_timeout_s)
        finally:
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None

    def __enter__(self) -> str:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _read_lock(path: Path) -> dict[str, Any]:
    try:
        record = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _answers(uri: str, deadline: float) -> bool:
    """Whether a store answers a ping at `uri` before `deadline` (time.monotonic)."""
    while True:
        client: pymongo.MongoClient[dict[str, object]] = pymongo.MongoClient(
            uri, serverSelectionTimeoutMS=500, connectTimeoutMS=500, socketTimeoutMS=5_000
        )
        try:
            client.admin.command("ping")
            return True
        except pymongo.errors.PyMongoError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        finally:
            client.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _command_of(pid: Any) -> str:
    try:
        return Path(f"/proc/{int(pid)}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip() or "?"
    except (OSError, ValueError, TypeError):
        return "command unknown"


def _stop_pid(pid: int, timeout_s: float) -> None:
    """SIGTERM a process we did not start; SIGKILL it after `timeout_s`."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while _alive(pid) and not _reaped(pid):
        if time.monotonic() > deadline:
            log.warning("nx-27017 (pid %d) did not stop within %.0f s; killing it", pid, timeout_s)
            os.kill(pid, signal.SIGKILL)
            return
        time.sleep(0.05)


def _reaped(pid: int) -> bool:
    """Reap `pid` if it is our exited child (an adopted store may be); True once it is gone."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return False
    return done == pid


class StoreUnreachable(RuntimeError):
    """A configured store did not answer a first ping (the message names its URI, without a password)."""


#: How long the first ping of a configured store waits at start-up: an unreachable URI is said in seconds.
#: Later calls keep the configured timeouts (`StoreTimeouts`), which ride out a store's restart.
FIRST_PING_TIMEOUT_MS = 2_000

_USERINFO = re.compile(r"^(?P<scheme>mongodb(?:\+srv)?://)(?P<user>[^:@/]*)(?::(?P<password>[^@/]*))?@")
_SECRET_OPTION = re.compile(r"(?i)([?&][^=&]*(?:password|secret|token)[^=&]*=)[^&]*")


def redacted(uri: str) -> str:
    """`uri` with any password (in its user info, or an option named like one) replaced by ``***``."""
    match = _USERINFO.match(uri)
    if match is not None and match["password"] is not None:
        uri = f"{match['scheme']}{match['user']}:***@{uri[match.end():]}"
    return _SECRET_OPTION.sub(r"\1***", uri)


def check_reachable(uri: str, timeout_ms: int = FIRST_PING_TIMEOUT_MS) -> None:
    """Ping the store at `uri` once, waiting at most about `timeout_ms`; raise StoreUnreachable if it does not answer.

    For start-up only (`python main.py`, `python -m server`): a wrong URI is said at once
    instead of after the configured timeouts of every later call.
    """
    unreachable = _unreachable_hosts(uri, timeout_ms / 1000)
    if unreachable is not None:  # nothing listens there: a refusal is said at once, not after a selection timeout
        raise StoreUnreachable(f"cannot use the store at {redacted(uri)}: {unreachable}")
    client: pymongo.MongoClient[dict[str, Any]] | None = None
    try:
        client = pymongo.MongoClient(
            uri, serverSelectionTimeoutMS=timeout_ms, connectTimeoutMS=timeout_ms, socketTimeoutMS=timeout_ms
        )
        client.admin.command("ping")
    except (pymongo.errors.PyMongoError, ValueError) as error:
        # pymongo's message: "host:port: reason (configured timeouts: ...), Timeout: ..., Topology Description: ..."
        reason = str(error).split(" (configured timeouts", 1)[0].split(", Timeout:", 1)[0].strip()
        waited = f" (no answer within {timeout_ms / 1000:g} s)" if isinstance(error, ConnectionFailure) else ""
        raise StoreUnreachable(
            f"cannot use the store at {redacted(uri)}: {redacted(reason)[:300] or type(error).__name__}{waited}"
        ) from None
    finally:
        if client is not None:
            client.close()


def _unreachable_hosts(uri: str, timeout_s: float) -> str | None:
    """Why, when no host of a plain ``mongodb://`` URI accepts a TCP connection (refused, or no answer); else None.

    None too when a host fails otherwise (a name not found) or the URI is not a
    plain one (``mongodb+srv://``): the ping then says what is wrong, within its timeout.
    """
    if not uri.startswith("mongodb://"):
        return None
    try:
        hosts = pymongo.uri_parser.parse_uri(uri)["nodelist"]
    except (pymongo.errors.PyMongoError, ValueError):
        return None
    refusals = []
    for host, port in hosts:
        try:
            with socket.create_connection((host, port), timeout=timeout_s):
                return None
        except ConnectionRefusedError as error:
            refusals.append(f"{host}:{port}: {error.strerror or 'Connection refused'}")
        except TimeoutError:
            refusals.append(f"{host}:{port}: no answer within {timeout_s:g} s")
        except OSError:
            return None
    return "; ".join(refusals) or None


def connect(uri: str, timeouts: StoreTimeouts | None = None) -> pymongo.MongoClient[dict[str, Any]]:
    """A pymongo client of `uri` with the configured timeouts (default: FEDLAND_MONGO_*_TIMEOUT_MS)."""
    return pymongo.MongoClient(uri, **(timeouts or StoreTimeouts.from_env()).client_options())


@contextmanager
def open_database(
    store: StoreSettings | None = None, timeouts: StoreTimeouts | None = None
) -> Iterator[Database[dict[str, Any]]]:
    """The results database: ``store.mongo_uri``, else the embedded store in ``store.store_dir``.

    ``store`` None: ``StoreSettings.from_env()`` (FEDLAND_MONGO_URI, FEDLAND_DB,
    FEDLAND_STORE_DIR). An embedded store is started (or a running one attached)
    for the ``with`` block and stopped after it.

    Raises:
        FileNotFoundError: no URI, and no store directory to start from.
    """
    store = StoreSettings.from_env() if store is None else store
    uri, embedded = store.mongo_uri, None
    if uri is None:
        if not Path(store.store_dir).is_dir():
            raise FileNotFoundError(f"no store: {store.store_dir} does not exist and FEDLAND_MONGO_URI is unset")
        embedded = EmbeddedMongo(store.store_dir)
        uri = embedded.start()
    client = connect(uri, timeouts)
    try:
        yield client[store.db_name]
    finally:
        client.close()
        if embedded is not None:
            embedded.stop()
