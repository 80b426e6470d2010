"""Settings from the environment: defaults and refusals naming the variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from stack.settings import ClientSettings, ServerSettings


def test_server_defaults() -> None:
    settings = ServerSettings.from_env({"FEDLAND_TOKEN": "t"})
    assert settings == ServerSettings(
        token="t",
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
            "FEDLAND_DATA_DIR": "/srv/data",
            "FEDLAND_MONGO_URI": "mongodb://db:27017/",
            "FEDLAND_DB": "exp",
            "FEDLAND_HOST": "0.0.0.0",
            "FEDLAND_PORT": "9000",
            "FEDLAND_HEARTBEAT_TIMEOUT_S": "2.5",
            "FEDLAND_MAX_BODY_MB": "8",
            "FEDLAND_TORCH_THREADS": "2",
            "FEDLAND_LOG_LEVEL": "debug",
        }
    )
    assert (settings.data_dir, settings.mongo_uri, settings.db_name) == (Path("/srv/data"), "mongodb://db:27017/", "exp")
    assert (settings.host, settings.port, settings.heartbeat_timeout_s) == ("0.0.0.0", 9000, 2.5)
    assert (settings.max_body_mb, settings.torch_threads, settings.log_level) == (8, 2, "DEBUG")


def test_client_defaults_and_url() -> None:
    settings = ClientSettings.from_env({"FEDLAND_TOKEN": "t"})
    assert settings.server_url == "http://127.0.0.1:8080" and settings.torch_threads == 1
    settings = ClientSettings.from_env({"FEDLAND_TOKEN": "t", "FEDLAND_SERVER_URL": "http://server:8080/"})
    assert settings.server_url == "http://server:8080"


@pytest.mark.parametrize("env", [{}, {"FEDLAND_TOKEN": ""}, {"FEDLAND_TOKEN": "   "}])
def test_token_is_required(env: dict[str, str]) -> None:
    for cls in (ServerSettings, ClientSettings):
        with pytest.raises(ValueError, match="FEDLAND_TOKEN"):
            cls.from_env(env)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("FEDLAND_PORT", "http"),
        ("FEDLAND_PORT", "70000"),
        ("FEDLAND_HEARTBEAT_TIMEOUT_S", "0"),
        ("FEDLAND_HEARTBEAT_TIMEOUT_S", "nan"),
        ("FEDLAND_MAX_BODY_MB", "0"),
        ("FEDLAND_TORCH_THREADS", "1.5"),
        ("FEDLAND_LOG_LEVEL", "LOUD"),
        ("FEDLAND_MONGO_URI", "localhost:27017"),
        ("FEDLAND_DEVICE", "gpu"),
        ("FEDLAND_DEVICE", "cuda:x"),
    ],
)
def test_bad_server_value_names_the_variable(name: str, value: str) -> None:
    with pytest.raises(ValueError, match=name):
        ServerSettings.from_env({"FEDLAND_TOKEN": "t", name: value})


def test_bad_client_url_names_the_variable() -> None:
    with pytest.raises(ValueError, match="FEDLAND_SERVER_URL"):
        ClientSettings.from_env({"FEDLAND_TOKEN": "t", "FEDLAND_SERVER_URL": "server:8080"})


@pytest.mark.parametrize("cls", [ServerSettings, ClientSettings])
def test_device_defaults_to_cpu_and_takes_every_form(cls: type[ServerSettings] | type[ClientSettings]) -> None:
    assert cls.from_env({"FEDLAND_TOKEN": "t"}).device == "cpu"
    for value in ("auto", "cpu", "cuda", "cuda:1", " CUDA:0 "):
        assert cls.from_env({"FEDLAND_TOKEN": "t", "FEDLAND_DEVICE": value}).device == value.strip().lower()
    with pytest.raises(ValueError, match="FEDLAND_DEVICE must be auto, cpu, cuda or cuda:N"):
        cls.from_env({"FEDLAND_TOKEN": "t", "FEDLAND_DEVICE": "tpu"})


def test_store_timeouts_and_retry_after() -> None:
    from stack.settings import StoreTimeouts

    settings = ServerSettings.from_env({"FEDLAND_TOKEN": "t"})
    assert settings.store_timeouts == StoreTimeouts(10_000, 5_000, 30_000) and settings.store_retry_after_s == 5
    settings = ServerSettings.from_env({
        "FEDLAND_TOKEN": "t", "FEDLAND_MONGO_SELECT_TIMEOUT_MS": "1500", "FEDLAND_MONGO_CONNECT_TIMEOUT_MS": "700",
        "FEDLAND_MONGO_SOCKET_TIMEOUT_MS": "9000", "FEDLAND_STORE_RETRY_AFTER_S": "2",
    })
    assert settings.store_timeouts.client_options() == {
        "serverSelectionTimeoutMS": 1500, "connectTimeoutMS": 700, "socketTimeoutMS": 9000,
    }
    assert settings.store_retry_after_s == 2
    for name, value in (("FEDLAND_MONGO_SOCKET_TIMEOUT_MS", "0"), ("FEDLAND_STORE_RETRY_AFTER_S", "soon")):
        try:
            ServerSettings.from_env({"FEDLAND_TOKEN": "t", name: value})
        except ValueError as error:
            assert name in str(error)
        else:
            raise AssertionError(f"{name}={value} was accepted")
