"""Settings from the environment: defaults and refusals naming the variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from stack.settings import ClientSettings, ServerSettings


def test_server_defaults() -> None:
    settings = ServerSettings.from_env({"FEDLAND_TOKEN": "t", "FEDLAND_WORKER_TOKEN": "w"})
    assert settings == ServerSettings(
        token="t",
        worker_token="w",
        data_dir=Path("./data"),
        mongo_uri=None,
        db_name="fedland",
        host="127.0.0.1",
        port=8080,
        heartbeat_timeout_s=30.0,
        max_body_mb=64,
        torch_threads=1,
        log_level="INFO",
    )
    assert settings.max_body_bytes == 64 * 1024 * 1024


def test_server_reads_every_variable() -> None:
    settings = ServerSettings.from_env(
        {
            "FEDLAND_TOKEN": "secret",
            "FEDLAND_WORKER_TOKEN": "enrol",
            "FEDLAND_DATA_DIR": "/srv/data",
            "FEDLAND_MONGO_URI": "mongodb://db:27017/",
            "FEDLAND_DB": "exp",
            "FEDLAND_HOST": "0.0.0.0",
            "FEDLAND_PORT": "9000",
            "FEDLAND_HEARTBEAT_TIMEOUT_S": "2.5",
            "FEDLAND_MAX_BODY_MB": "8",
            "FEDLAND_TORCH_THREADS": "2",
            "FEDLAND_LOG_LEVEL": "debug",
            "FEDLAND_MAX_WORKERS": "12",
            "FEDLAND_REGISTRATIONS_PER_MIN": "30",
            "FEDLAND_HEADER_TIMEOUT_S": "2",
            "FEDLAND_BODY_TIMEOUT_S": "9",
            "FEDLAND_IDLE_TIMEOUT_S": "20",
        }
    )
    assert (settings.token, settings.worker_token, settings.max_workers, settings.registrations_per_min) == (
        "secret", "enrol", 12, 30
    )
    assert (settings.header_timeout_s, settings.body_timeout_s, settings.idle_timeout_s) == (2.0, 9.0, 20.0)
    assert (settings.data_dir, settings.mongo_uri, settings.db_name) == (Path("/srv/data"), "mongodb://db:27017/", "exp")
    assert (settings.host, settings.port, settings.heartbeat_timeout_s) == ("0.0.0.0", 9000, 2.5)
    assert (settings.max_body_mb, settings.torch_threads, settings.log_level) == (8, 2, "DEBUG")


def test_client_defaults_and_url() -> None:
    settings = ClientSettings.from_env({"FEDLAND_WORKER_TOKEN": "t"})
    assert settings.token == "t" and settings.server_url == "http://127.0.0.1:8080" and settings.torch_threads == 1
    settings = ClientSettings.from_env({"FEDLAND_WORKER_TOKEN": "t", "FEDLAND_SERVER_URL": "http://server:8080/"})
    assert settings.server_url == "http://server:8080"


@pytest.mark.parametrize("value", ["", "   "])
def test_tokens_are_required(value: str) -> None:
    with pytest.raises(ValueError, match="FEDLAND_TOKEN"):
        ServerSettings.from_env({"FEDLAND_TOKEN": value, "FEDLAND_WORKER_TOKEN": "w"})
    with pytest.raises(ValueError, match="FEDLAND_WORKER_TOKEN"):
        ServerSettings.from_env({"FEDLAND_TOKEN": "t", "FEDLAND_WORKER_TOKEN": value})
    with pytest.raises(ValueError, match="FEDLAND_WORKER_TOKEN"):
        ClientSettings.from_env({"FEDLAND_TOKEN": "t", "FEDLAND_WORKER_TOKEN": value})


def test_the_enrolment_token_must_differ_from_the_submitter_token() -> None:
    with pytest.raises(ValueError, match="must differ"):
        ServerSettings.from_env({"FEDLAND_TOKEN": "same", "FEDLAND_WORKER_TOKEN": "same"})


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("FEDLAND_PORT", "http"),
        ("FEDLAND_PORT", "70000"),
        ("FEDLAND_HEARTBEAT_TIMEOUT_S", "0"),
        ("FEDLAND_HEARTBEAT_TIMEOUT_S", "nan"),
        ("FEDLAND_MAX_BODY_MB", "0"),
        ("FEDLAND_MAX_WORKERS", "0"),
        ("FEDLAND_REGISTRATIONS_PER_MIN", "many"),
        ("FEDLAND_HEADER_TIMEOUT_S", "0"),
        ("FEDLAND_BODY_TIMEOUT_S", "inf"),
        ("FEDLAND_IDLE_TIMEOUT_S", "-1"),
        ("FEDLAND_TORCH_THREADS", "1.5"),
        ("FEDLAND_LOG_LEVEL", "LOUD"),
        ("FEDLAND_MONGO_URI", "localhost:27017"),
        ("FEDLAND_DEVICE", "gpu"),
        ("FEDLAND_DEVICE", "cuda:x"),
    ],
)
def test_bad_server_value_names_the_variable(name: str, value: str) -> None:
    with pytest.raises(ValueError, match=name):
        ServerSettings.from_env({"FEDLAND_TOKEN": "t", "FEDLAND_WORKER_TOKEN": "w", name: value})


def test_bad_client_url_names_the_variable() -> None:
    with pytest.raises(ValueError, match="FEDLAND_SERVER_URL"):
        ClientSettings.from_env({"FEDLAND_WORKER_TOKEN": "t", "FEDLAND_SERVER_URL": "server:8080"})


@pytest.mark.parametrize("cls", [ServerSettings, ClientSettings])
def test_device_defaults_to_cpu_and_takes_every_form(cls: type[ServerSettings] | type[ClientSettings]) -> None:
    tokens = {"FEDLAND_TOKEN": "t", "FEDLAND_WORKER_TOKEN": "w"}
    assert cls.from_env(tokens).device == "cpu"
    for value in ("auto", "cpu", "cuda", "cuda:1", " CUDA:0 "):
        assert cls.from_env({**tokens, "FEDLAND_DEVICE": value}).device == value.strip().lower()
    with pytest.raises(ValueError, match="FEDLAND_DEVICE must be auto, cpu, cuda or cuda:N"):
        cls.from_env({**tokens, "FEDLAND_DEVICE": "tpu"})


def test_store_timeouts_and_retry_after() -> None:
    from stack.settings import StoreTimeouts

    settings = ServerSettings.from_env({"FEDLAND_TOKEN": "t", "FEDLAND_WORKER_TOKEN": "w"})
    assert settings.store_timeouts == StoreTimeouts(10_000, 5_000, 30_000) and settings.store_retry_after_s == 5
    settings = ServerSettings.from_env({
        "FEDLAND_TOKEN": "t", "FEDLAND_WORKER_TOKEN": "w",
        "FEDLAND_MONGO_SELECT_TIMEOUT_MS": "1500", "FEDLAND_MONGO_CONNECT_TIMEOUT_MS": "700",
        "FEDLAND_MONGO_SOCKET_TIMEOUT_MS": "9000", "FEDLAND_STORE_RETRY_AFTER_S": "2",
    })
    assert settings.store_timeouts.client_options() == {
        "serverSelectionTimeoutMS": 1500, "connectTimeoutMS": 700, "socketTimeoutMS": 9000,
    }
    assert settings.store_retry_after_s == 2
    for name, value in (("FEDLAND_MONGO_SOCKET_TIMEOUT_MS", "0"), ("FEDLAND_STORE_RETRY_AFTER_S", "soon")):
        try:
            ServerSettings.from_env({"FEDLAND_TOKEN": "t", "FEDLAND_WORKER_TOKEN": "w", name: value})
        except ValueError as error:
            assert name in str(error)
        else:
            raise AssertionError(f"{name}={value} was accepted")
