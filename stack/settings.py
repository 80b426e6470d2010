"""Settings of server and client, read from FEDLAND_* environment variables."""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedland.datasets import DATASETS

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
DEFAULT_DATA_DIR = Path("./data")
#: Where the embedded store keeps its files when no MongoDB URI is given: the one rule
#: `python -m server`, `python main.py` and `python main.py report` all follow.
DEFAULT_STORE_DIR = Path("./data/store")
DEFAULT_LOG_DIR = Path("./data/logs")
DEFAULT_REPORTS_DIR = Path("./data/reports")  # beside the store and the logs (reports/ is the package)


def _text(env: Mapping[str, str], name: str, default: str) -> str:
    value = env.get(name, "").strip()
    return value if value else default


def _token(env: Mapping[str, str]) -> str:
    value = env.get("FEDLAND_TOKEN", "").strip()
    if not value:
        raise ValueError("FEDLAND_TOKEN is required: set it to the submitter's bearer token")
    return value


def _worker_token(env: Mapping[str, str]) -> str:
    value = env.get("FEDLAND_WORKER_TOKEN", "").strip()
    if not value:
        raise ValueError("FEDLAND_WORKER_TOKEN is required: set it to the token workers enrol with")
    return value


def _int(env: Mapping[str, str], name: str, default: int, *, low: int, high: int | None = None) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None
    if value < low or (high is not None and value > high):
        upper = f" and <= {high}" if high is not None else ""
        raise ValueError(f"{name} must be >= {low}{upper}, got {value}")
    return value


def _positive_float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {raw!r}") from None
    if not value > 0 or value == float("inf"):
        raise ValueError(f"{name} must be a finite number > 0, got {raw!r}")
    return value


def _log_level(env: Mapping[str, str]) -> str:
    value = _text(env, "FEDLAND_LOG_LEVEL", "INFO").upper()
    if value not in LOG_LEVELS:
        raise ValueError(f"FEDLAND_LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}, got {value!r}")
    return value


def _url(env: Mapping[str, str], name: str, default: str) -> str:
    value = _text(env, name, default).rstrip("/")
    if not value.startswith(("http://", "https://")):
        raise ValueError(f"{name} must start with http:// or https://, got {value!r}")
    return value


def _mongo_uri(env: Mapping[str, str]) -> str | None:
    mongo_uri = env.get("FEDLAND_MONGO_URI", "").strip() or None
    if mongo_uri is not None and not mongo_uri.startswith(("mongodb://", "mongodb+srv://")):
        raise ValueError(f"FEDLAND_MONGO_URI must start with mongodb://, got {mongo_uri!r}")
    return mongo_uri


DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")


def _device(env: Mapping[str, str]) -> str:
    """FEDLAND_DEVICE: auto, cpu (default), cuda or cuda:N; checked against the GPUs when used."""
    value = _text(env, "FEDLAND_DEVICE", "cpu").lower()
    if not DEVICE_PATTERN.fullmatch(value):
        raise ValueError(f"FEDLAND_DEVICE must be auto, cpu, cuda or cuda:N, got {value!r}")
    return value


WORKSPACE_VARIABLE = "FEDLAND_WORKSPACE"


def _workspace(env: Mapping[str, str]) -> Path | None:
    raw = env.get(WORKSPACE_VARIABLE, "").strip()
    if not raw:
        return None
    return Path(raw).expanduser().resolve()


def _data_dir(env: Mapping[str, str]) -> Path:
    return Path(_text(env, "FEDLAND_DATA_DIR", str(DEFAULT_DATA_DIR)))


@dataclass(frozen=True)
class StoreSettings:
    """Where the results live: a MongoDB URI, or else the embedded store's directory."""

    mongo_uri: str | None = None
    db_name: str = "fedland"
    store_dir: Path = DEFAULT_STORE_DIR  # used only without mongo_uri

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ, mongo_uri: str | None = None) -> StoreSettings:
        """Parse FEDLAND_MONGO_URI (unless `mongo_uri` is given), FEDLAND_DB and FEDLAND_STORE_DIR."""
        uri = mongo_uri or _mongo_uri(env)
        if uri is not None and not uri.startswith(("mongodb://", "mongodb+srv://")):
            raise ValueError(f"the MongoDB URI must start with mongodb://, got {uri!r}")
        # the embedded store's directory matters only without a URI: read it only then
        store_dir = DEFAULT_STORE_DIR if uri else Path(_text(env, "FEDLAND_STORE_DIR", str(DEFAULT_STORE_DIR)))
        return cls(mongo_uri=uri, db_name=_text(env, "FEDLAND_DB", "fedland"), store_dir=store_dir)


@dataclass(frozen=True)
class StoreTimeouts:
    """pymongo timeouts in milliseconds: no store call waits longer than these."""

    server_selection_ms: int = 10_000  # find a reachable store (FEDLAND_MONGO_SELECT_TIMEOUT_MS)
    connect_ms: int = 5_000  # open a connection (FEDLAND_MONGO_CONNECT_TIMEOUT_MS)
    socket_ms: int = 30_000  # wait for one reply (FEDLAND_MONGO_SOCKET_TIMEOUT_MS)

    def client_options(self) -> dict[str, Any]:
        """Keyword arguments of `pymongo.MongoClient` (each an int)."""
        return {
            "serverSelectionTimeoutMS": self.server_selection_ms,
            "connectTimeoutMS": self.connect_ms,
            "socketTimeoutMS": self.socket_ms,
        }

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> StoreTimeouts:
        return cls(
            server_selection_ms=_int(env, "FEDLAND_MONGO_SELECT_TIMEOUT_MS", 10_000, low=1),
            connect_ms=_int(env, "FEDLAND_MONGO_CONNECT_TIMEOUT_MS", 5_000, low=1),
            socket_ms=_int(env, "FEDLAND_MONGO_SOCKET_TIMEOUT_MS", 30_000, low=1),
        )


@dataclass(frozen=True)
class ServerSettings:
    """Configuration of `python -m server` (and of the launcher's store)."""

    token: str  # the submitter's: queues experiments and reads them
    worker_token: str  # the enrolment token: registers workers, nothing else
    data_dir: Path = DEFAULT_DATA_DIR
    mongo_uri: str | None = None
    db_name: str = "fedland"
    store_dir: Path = DEFAULT_STORE_DIR  # the embedded store, without mongo_uri
    host: str = "127.0.0.1"
    port: int = 8080
    heartbeat_timeout_s: float = 30.0
    max_body_mb: int = 64
    torch_threads: int = 1
    log_level: str = "INFO"
    device: str = "cpu"  # of the landscape measurements
    threads: int = 256  # request threads; most of them may hold a waiting worker's long-poll
    connection_limit: int = 4096  # open connections (each worker keeps one or two alive)
    store_timeouts: StoreTimeouts = StoreTimeouts()
    store_retry_after_s: int = 5  # Retry-After of a 503 while the store is unavailable
    max_workers: int = 1024  # workers registered and alive at once
    registrations_per_min: int = 120  # worker registrations a minute (as many at once)
    header_timeout_s: float = 5.0  # a request's headers must be in this long after its first byte (or the connect)
    body_timeout_s: float = 10.0  # a request's body may pause this long (and must then average 16 KiB/s)
    idle_timeout_s: float = 60.0  # a kept-alive connection with no request open is closed after this
    measure_threads: int = 2  # landscape measurements and analyses of different experiments at once
    workspace: Path | None = None  # FEDLAND_WORKSPACE: the folder of the researcher's components (use_workspace)

    def __post_init__(self) -> None:
        if self.token == self.worker_token:
            raise ValueError("FEDLAND_WORKER_TOKEN must differ from FEDLAND_TOKEN (the submitter's)")

    @property
    def max_body_bytes(self) -> int:
        return self.max_body_mb * 1024 * 1024

    @property
    def long_poll_slots(self) -> int:
        """Request threads a waiting worker may hold; the rest stay free for updates and downloads."""
        return max(1, self.threads - max(4, self.threads // 8))

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> ServerSettings:
        """Parse FEDLAND_* variables; a bad value raises ValueError naming the variable."""
        store = StoreSettings.from_env(env)
        return cls(
            token=_token(env),
            worker_token=_worker_token(env),
            data_dir=_data_dir(env),
            mongo_uri=store.mongo_uri,
            db_name=store.db_name,
            store_dir=store.store_dir,
            host=_text(env, "FEDLAND_HOST", cls.host),
            port=_int(env, "FEDLAND_PORT", cls.port, low=0, high=65535),
            heartbeat_timeout_s=_positive_float(env, "FEDLAND_HEARTBEAT_TIMEOUT_S", cls.heartbeat_timeout_s),
            max_body_mb=_int(env, "FEDLAND_MAX_BODY_MB", cls.max_body_mb, low=1),
            torch_threads=_int(env, "FEDLAND_TORCH_THREADS", cls.torch_threads, low=1),
            log_level=_log_level(env),
            device=_device(env),
            threads=_int(env, "FEDLAND_SERVER_THREADS", cls.threads, low=2, high=4096),
            connection_limit=_int(env, "FEDLAND_SERVER_CONNECTIONS", cls.connection_limit, low=16),
            store_timeouts=StoreTimeouts.from_env(env),
            store_retry_after_s=_int(env, "FEDLAND_STORE_RETRY_AFTER_S", cls.store_retry_after_s, low=1, high=3600),
            max_workers=_int(env, "FEDLAND_MAX_WORKERS", cls.max_workers, low=1),
            registrations_per_min=_int(env, "FEDLAND_REGISTRATIONS_PER_MIN", cls.registrations_per_min, low=1),
            header_timeout_s=_positive_float(env, "FEDLAND_HEADER_TIMEOUT_S", cls.header_timeout_s),
            body_timeout_s=_positive_float(env, "FEDLAND_BODY_TIMEOUT_S", cls.body_timeout_s),
            idle_timeout_s=_positive_float(env, "FEDLAND_IDLE_TIMEOUT_S", cls.idle_timeout_s),
            measure_threads=_int(env, "FEDLAND_MEASURE_THREADS", cls.measure_threads, low=1, high=64),
            workspace=_workspace(env),
        )


@dataclass(frozen=True)
class ClientSettings:
    """Configuration of `python -m client`."""

    token: str  # the enrolment token (FEDLAND_WORKER_TOKEN); registration returns the worker's own secret
    data_dir: Path = DEFAULT_DATA_DIR
    server_url: str = "http://127.0.0.1:8080"
    torch_threads: int = 1
    log_level: str = "INFO"
    device: str = "cpu"  # of training, evaluation and landscape measurements
    workspace: Path | None = None  # FEDLAND_WORKSPACE: the folder of the researcher's components (use_workspace)

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> ClientSettings:
        """Parse FEDLAND_* variables; a bad value raises ValueError naming the variable."""
        return cls(
            token=_worker_token(env),
            data_dir=_data_dir(env),
            server_url=_url(env, "FEDLAND_SERVER_URL", cls.server_url),
            torch_threads=_int(env, "FEDLAND_TORCH_THREADS", cls.torch_threads, low=1),
            log_level=_log_level(env),
            device=_device(env),
            workspace=_workspace(env),
        )


@dataclass(frozen=True)
class DataSettings:
    """Configuration of `python -m stack.fetch_data`: where the datasets live, and the log level."""

    data_dir: Path = DEFAULT_DATA_DIR
    log_level: str = "INFO"
    datasets: tuple[str, ...] = ("MNIST",)  # what to fetch without --dataset (CIFAR's archives are ~170 MB each)

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> DataSettings:
        """Parse FEDLAND_DATA_DIR, FEDLAND_LOG_LEVEL and FEDLAND_DATASETS; a bad value raises ValueError naming it."""
        return cls(data_dir=_data_dir(env), log_level=_log_level(env), datasets=_datasets(env))


def _datasets(env: Mapping[str, str]) -> tuple[str, ...]:
    raw = env.get("FEDLAND_DATASETS", "").strip()
    names = tuple(name.strip() for name in raw.split(",") if name.strip()) if raw else ("MNIST",)
    unknown = [name for name in names if name not in DATASETS]
    if unknown:
        raise ValueError(
            f"FEDLAND_DATASETS: unknown dataset {unknown[0]!r}; a comma-separated list of {', '.join(sorted(DATASETS))}"
        )
    return names


@dataclass(frozen=True)
class LauncherSettings:
    """Configuration of `python main.py` (run, report) and `python -m stack.fetch_data`."""

    data_dir: Path = DEFAULT_DATA_DIR
    store: StoreSettings = StoreSettings()
    log_dir: Path = DEFAULT_LOG_DIR
    log_level: str = "INFO"
    token: str | None = None  # only to queue on a running server (--server)
    workspace: Path | None = None  # FEDLAND_WORKSPACE, passed on to the server and workers it starts

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ, mongo_uri: str | None = None) -> LauncherSettings:
        """Parse FEDLAND_* variables (`mongo_uri`: a --store-uri that overrides FEDLAND_MONGO_URI)."""
        return cls(
            data_dir=_data_dir(env),
            store=StoreSettings.from_env(env, mongo_uri),
            log_dir=Path(_text(env, "FEDLAND_LOG_DIR", str(DEFAULT_LOG_DIR))),
            log_level=_log_level(env),
            token=env.get("FEDLAND_TOKEN", "").strip() or None,
            workspace=_workspace(env),
        )


def use_workspace(folder: Path | None) -> None:
    """Put the researcher's workspace folder (``FEDLAND_WORKSPACE``, read by the settings) first on ``sys.path``.

    The one place components named by import path (``fedland.components``) are
    found besides the installed packages: server, workers, reports and the
    launcher call this at start, so all of them import the same code. A folder
    that is not there is logged (its components then fail to import, naming it).
    """
    if folder is not None and not folder.is_dir():
        logging.getLogger(__name__).warning("%s=%s is not a directory", WORKSPACE_VARIABLE, folder)
    if folder is not None and str(folder) not in sys.path:
        sys.path.insert(0, str(folder))


def configure_logging(level: str = "INFO", tag: str = "") -> None:
    """Log to stderr with timestamps at `level` (a name such as "INFO"); `tag` prefixes each line."""
    logging.basicConfig(
        level=level.upper(),
        format=f"%(asctime)s %(levelname)s {tag}%(name)s: %(message)s",
        force=True,
    )


def set_torch_threads(num_threads: int) -> None:
    """Limit torch's intra-op thread pool (the machines share few cores)."""
    if num_threads < 1:
        raise ValueError(f"num_threads must be >= 1, got {num_threads}")
    import torch  # local: settings stay importable without initialising torch

    torch.set_num_threads(num_threads)
