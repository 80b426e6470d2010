#!/usr/bin/env python3
"""Run the fedland stack for real on a Docker engine and check what it stored.

    scripts/compose-test.py [--wheelhouse] [--mnist DIR] [--override FILE] [--swarm] [--keep]

Compose (default): build the one image once, `up --scale client=3`, queue
main.py's way (`python main.py --server URL`, run with this interpreter, so
the project must be installed), `docker compose scale client=4` while it
runs, SIGKILL a client that holds a slot mid-round, restart the server
container mid-experiment, wait until every experiment is `finished`, check
the documents (each round once, one `client_stats` per client x round, each
round's model in GridFS), Mongo Express's login (401 without, 200 with) and its
pages of one `rounds` and one `client_stats` document (identity keys first, in
order; times shown as dates), and `down -v` leaves no container, volume or network.

Swarm (--swarm): the same experiments and checks on a single-node Swarm
(`docker swarm init` on loopback when the engine is in none): the stack from
`scripts/swarm-stack.py` via `docker stack deploy`, `docker service scale`
of the clients, and a client-only project (compose.clients.yaml) joining
through the server's published port, as another host would.

It runs as its own project (fedland-test / fedland-swarm-test) with fresh
secrets and free ports, so it never touches a running stack. Options:
  --wheelhouse     fill wheelhouse/ (scripts/fill-wheelhouse.sh) and build
                   with `docker build --network none`; default `docker compose build`
  --mnist DIR      a directory holding mnist/*-ubyte.gz (FEDLAND_DATA_DIR
                   layout): the data volume is pre-filled from it through
                   Compose (README), so data-init only verifies; default: data-init downloads
  --override FILE  a second compose file (e.g. the credential-free URIs that a
                   MongoDB stand-in without authentication needs)
  --keep           leave everything up at the end
Every command goes to the engine of the environment (DOCKER_HOST); `--pull
never` everywhere, so a missing image fails instead of being pulled.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
IMAGE = "fedland:compose-test"
HEARTBEAT_TIMEOUT_S = 6  # a killed client's slot is freed this soon
POLL_S = 0.5

# A: 3 members, 30 rounds of ~2,000 images each, long enough that a worker is
# caught mid-round and killed, and the server restarted while A still runs;
# B: 4 members (members are not workers: any number of workers serves them), with
# the model, dataset and client algorithm of the example workspace (examples/,
# mounted at /workspace), named by import path.
WORKSPACE = REPO / "examples"
OWN_COMPONENTS = {
    "model": "fedland_examples.nets:SmallCNN",
    "dataset_name": "fedland_examples.data:Bars",
    "client_algorithm": {"name": "fedland_examples.algorithms:ClippedSGD", "max_norm": 1.0},
}
EXPERIMENTS = {
    "experiments": [
        {
            "description": f"compose test {name}: {clients} IID clients, {rounds} rounds",
            "target_balance_ratios": [[0.1] * 10] * clients,
            "subset_fractions": [fraction] * clients,
            "rounds": rounds,
            "seed": seed,
            "landscape": {
                "every": 100, "num_samples": 32, "top_k": 1, "trace_probes": 4,
                "interpolation_points": 3, "grid_points": 3,
            },
            **(OWN_COMPONENTS if name == "B" else {}),
        }
        for name, clients, rounds, fraction, seed in (("A", 3, 30, 0.1, 1), ("B", 4, 2, 0.5, 2))
    ]
}

# Runs inside the server container (its pymongo, its URI, the image's own stack.records): the stored documents.
CHECK_DOCUMENTS = r"""
import json, os, struct, sys
import bson, gridfs, pymongo
from stack import records
from stack.settings import WORKSPACE_VARIABLE, use_workspace
from pathlib import Path
use_workspace(Path(os.environ[WORKSPACE_VARIABLE]))  # experiment B's components, as the server imports them
client = pymongo.MongoClient(os.environ["FEDLAND_MONGO_URI"], serverSelectionTimeoutMS=10000,
                             connectTimeoutMS=10000, socketTimeoutMS=30000)
db = client[os.environ["FEDLAND_DB"]]
models = gridfs.GridFSBucket(db, bucket_name=records.MODELS)
report = []
for e in records.read_experiments(db):
    eid, clients, rounds = e.id, e.spec.num_clients, e.spec.rounds
    round_records = records.read_rounds(db, eid)
    pairs = sorted((s.client_index, s.round) for s in records.read_client_stats(db, eid))
    round_models = []
    for r in round_records:
        files = list(models.find({"_id": bson.ObjectId(r.model_file_id)}))
        data = models.open_download_stream(files[0]._id).read() if files else b""
        header = json.loads(data[8:8 + struct.unpack("<Q", data[:8])[0]]) if len(data) > 8 else {}
        round_models.append({"round": r.round, "bytes": len(data), "tensors": len(header) - ("__metadata__" in header),
                             "meta_round": files[0].metadata.get("round") if files else None})
    report.append({
        "id": eid, "description": e.spec.description, "status": e.status, "clients": clients, "rounds": rounds,
        "model": e.spec.model, "dataset_name": e.spec.dataset_name, "client_algorithm": e.spec.client_algorithm.to_dict(),
        "round_numbers": sorted(r.round for r in round_records), "client_stats": pairs, "round_models": round_models,
        "accuracies": [r.test_accuracy for r in round_records],
        "landscapes_last_round": db[records.LANDSCAPES].count_documents({"experiment_id": eid, "round": rounds}),
    })
print(json.dumps(report))
"""

# Runs inside the server container: which workers (container hostnames) hold slots.
SLOT_HOLDERS = r"""
import json, os, time, pymongo
from stack import records
db = pymongo.MongoClient(os.environ["FEDLAND_MONGO_URI"], serverSelectionTimeoutMS=10000,
                         socketTimeoutMS=30000)[os.environ["FEDLAND_DB"]]
# A member names the worker training it this round (None between rounds): members.worker_id -> workers.worker_id.
# Asked here in a loop (a round lasts about a second; one `docker exec` takes longer), for up to 20 s.
deadline, holders = time.monotonic() + 20, set()
while not holders and time.monotonic() < deadline:
    held = {m.worker_id for m in records.read_members(db, os.environ["EXPERIMENT_ID"]) if m.worker_id is not None}
    if held:
        hosts = {w["worker_id"]: w["hostname"] for w in db[records.WORKERS].find({})}
        holders = {hosts.get(worker, "") for worker in held}
    else:
        time.sleep(0.02)
print(json.dumps(sorted(holders)))
"""

# Runs inside the server container: one stored document of `rounds` and one of `client_stats`, by id, with
# their keys in stored order (what Mongo Express shows on the document's page).
SAMPLE_DOCUMENTS = r"""
import json, os, pymongo
from stack import records
db = pymongo.MongoClient(os.environ["FEDLAND_MONGO_URI"], serverSelectionTimeoutMS=10000,
                         socketTimeoutMS=30000)[os.environ["FEDLAND_DB"]]
out = {}
for name in (records.ROUNDS, records.CLIENT_STATS):
    doc = db[name].find_one({})
    out[name] = None if doc is None else {"_id": str(doc["_id"]), "keys": list(doc)}
print(json.dumps(out))
"""

# Mongo Express: the keys a person finds first in a document's page, in this order; those that are dates.
IDENTITY_KEYS = {
    "rounds": ("experiment_id", "round", "started_at", "finished_at"),
    "client_stats": ("experiment_id", "round", "client_index", "worker_id", "received_at"),
}
DATE_KEYS = {"rounds": ("started_at", "finished_at"), "client_stats": ("received_at",)}
# A date as Mongo Express 1.0.2 prints it: ISODate('2026-...') on a document's page (mongodb-query-parser's
# toJSString), a JavaScript Date string ("Fri Dec 04 2026 20:27:21 GMT+0000 ...") in a collection's table.
ISO_DATE = r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}:\d{2}"
JS_DATE = r"[A-Z][a-z]{2} [A-Z][a-z]{2} \d{2} \d{4} \d{2}:\d{2}:\d{2} GMT"

# Runs inside the server container against a real MongoDB: the server's own account.
CHECK_PRIVILEGES = r"""
import json, os, pymongo, pymongo.errors
client = pymongo.MongoClient(os.environ["FEDLAND_MONGO_URI"], serverSelectionTimeoutMS=10000, socketTimeoutMS=30000)
db = client[os.environ["FEDLAND_DB"]]
status = db.command("connectionStatus")["authInfo"]
try:
    client.admin.command("listDatabases")
    denied = False
except pymongo.errors.OperationFailure:
    denied = True
print(json.dumps({"users": status["authenticatedUsers"], "roles": status["authenticatedUserRoles"],
                  "listDatabases_denied": denied}))
"""


def log(message: str) -> None:
    print(f"compose-test: {message}", file=sys.stderr, flush=True)


class Failure(Exception):
    """A check of the stack failed."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise Failure(message)


def run(*command: str, input: str | None = None, env: dict[str, str] | None = None, timeout: float = 600,
        check_rc: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(command), input=input, env=env, capture_output=True, text=True, timeout=timeout,
                            cwd=REPO)
    if check_rc and result.returncode != 0:
        raise Failure(f"{' '.join(command[:6])} ... exited {result.returncode}:\n{result.stdout[-3000:]}\n"
                      f"{result.stderr[-3000:]}")
    return result


def wait_for(what: str, condition: Callable[[], Any], timeout_s: float) -> Any:
    """Poll `condition` until it returns something truthy; its value, or Failure after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise Failure(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(POLL_S)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def compose_cli() -> list[str]:
    """`docker compose` (the plugin), else docker-compose beside this interpreter or on PATH."""
    if run("docker", "compose", "version", check_rc=False).returncode == 0:
        return ["docker", "compose"]
    beside = Path(sys.executable).parent / "docker-compose"
    found = str(beside) if beside.is_file() else shutil.which("docker-compose")
    if found is None:
        raise Failure("no Docker Compose: neither `docker compose` nor docker-compose")
    return [found]


def env_value(env_file: Path, key: str) -> str:
    values = [line.split("=", 1)[1] for line in env_file.read_text().splitlines() if line.startswith(key + "=")]
    return values[-1]


# --- the stack, as Compose or as a Swarm stack ----------------------------------------


class Stack:
    """One running fedland stack: how to reach its containers and change them."""

    def __init__(self, name: str, work: Path, args: argparse.Namespace, compose: list[str]) -> None:
        self.name = name
        self.work = work
        self.args = args
        self.env_file = work / "stack.env"
        run("bash", str(REPO / "scripts" / "make-env.sh"), str(self.env_file))
        self.port = free_port()
        self.me_port = free_port()
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("FEDLAND_", "MONGO_", "ME_", "COMPOSE_"))},
            "FEDLAND_IMAGE": IMAGE,
            "FEDLAND_PORT": str(self.port),
            "MONGO_EXPRESS_PORT": str(self.me_port),
            "SERVER_PUBLISH_ADDRESS": "127.0.0.1",
            "FEDLAND_HEARTBEAT_TIMEOUT_S": str(HEARTBEAT_TIMEOUT_S),
            "CLIENT_REPLICAS": "3",
        }
        files = ["-f", str(REPO / "compose.yaml")] + (["-f", str(args.override)] if args.override else [])
        self.compose = [*compose, "--project-name", name, "--project-directory", str(REPO),
                        "--env-file", str(self.env_file), *files]
        self.token = env_value(self.env_file, "FEDLAND_TOKEN")  # the submitter's
        self.worker_token = env_value(self.env_file, "FEDLAND_WORKER_TOKEN")  # what clients enrol with
        self.url = f"http://127.0.0.1:{self.port}"

    def c(self, *args: str, timeout: float = 600, check_rc: bool = True) -> subprocess.CompletedProcess[str]:
        return run(*self.compose, *args, env=self.env, timeout=timeout, check_rc=check_rc)

    def containers(self, service: str, *, running: bool = True) -> list[str]:
        raise NotImplementedError

    def server_container(self) -> str:
        return wait_for("a running server container", lambda: self.containers("server"), 120)[0]

    def exec_server(self, code: str, **env: str) -> Any:
        extra = [f"--env={key}={value}" for key, value in env.items()]
        result = run("docker", "exec", "-i", *extra, self.server_container(), "python", "-", input=code, timeout=120)
        return json.loads(result.stdout)

    def restart_server(self) -> None:
        raise NotImplementedError

    def logs(self) -> str:
        raise NotImplementedError

    # --- HTTP on the published ports -------------------------------------------------

    def experiments(self) -> list[dict[str, Any]] | None:
        """The server's experiments, or None while it does not answer (a restart)."""
        request = urllib.request.Request(f"{self.url}/api/v1/experiments",
                                         headers={"Authorization": f"Bearer {self.token}"})
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return list(json.load(response)["experiments"])
        except (OSError, ValueError):
            return None

    def queue(self, experiments_file: Path) -> None:
        """README: FEDLAND_TOKEN=... python main.py --server URL (from a checkout with the project)."""
        env = {**os.environ, "FEDLAND_TOKEN": self.token, "FEDLAND_WORKSPACE": str(WORKSPACE)}  # B's components
        result = run(sys.executable, str(REPO / "main.py"), "--server", self.url, "--experiments",
                     str(experiments_file), env=env, timeout=120)
        log(f"queued: {result.stdout.strip() or result.stderr.strip()}")

    def check_mongo_express(self, db_name: str, standin: bool) -> None:
        url = f"http://127.0.0.1:{self.me_port}/db/{db_name}/"
        user = env_value(self.env_file, "ME_BASICAUTH_USERNAME")
        password = env_value(self.env_file, "ME_BASICAUTH_PASSWORD")

        def status(headers: dict[str, str], url: str = url) -> tuple[int, str]:
            try:
                with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as response:
                    return response.status, response.read().decode(errors="replace")
            except urllib.error.HTTPError as error:
                return error.code, ""
            except OSError:
                return 0, ""

        wait_for("Mongo Express to answer", lambda: status({})[0] != 0, 120)
        check(status({})[0] == 401, f"Mongo Express without login answered {status({})[0]}, not 401")
        wrong = base64.b64encode(f"{user}:wrong".encode()).decode()
        check(status({"Authorization": f"Basic {wrong}"})[0] == 401, "Mongo Express accepted a wrong password")
        auth = base64.b64encode(f"{user}:{password}".encode()).decode()
        code, body = status({"Authorization": f"Basic {auth}"})
        check(code == 200, f"Mongo Express with the login from .env answered {code}, not 200")
        for name in ("rounds", "client_stats"):
            check(name in body, f"Mongo Express's page of {db_name} does not list {name}")
        samples = self.exec_server(SAMPLE_DOCUMENTS)
        for name, sample in samples.items():
            check(sample is not None, f"no {name} document stored")
            how = check_document_page(lambda page: status({"Authorization": f"Basic {auth}"}, page),
                                      f"{url}{name}", name, sample)
            log(f"Mongo Express: {how} of {name} {sample['_id']} opens on {', '.join(IDENTITY_KEYS[name])} "
                f"(in this order, before the other keys), {', '.join(DATE_KEYS[name])} shown as dates")
        me_env = run("docker", "exec", self.containers("mongo-express")[0], "env").stdout.splitlines()
        check("ME_CONFIG_SITE_GRIDFS_ENABLED=true" in me_env, "Mongo Express runs without GridFS enabled")
        if standin:
            # nx-27017 lists a bucket's collections as models_files/models_chunks, not models.files,
            # so Mongo Express (which looks for *.files) shows no GridFS bucket there.
            check("models_files" in body, f"Mongo Express's page of {db_name} does not list models_files")
            log("Mongo Express: 401 without the login (and with a wrong password), 200 with it; lists rounds, "
                "client_stats, models_files; NOT checked here: its GridFS bucket pages (the stand-in names "
                "GridFS collections models_files, which Mongo Express does not take for a bucket)")
            return
        check(f"/db/{db_name}/gridFS/models" in body, "Mongo Express lists no GridFS bucket models")
        code, body = status({"Authorization": f"Basic {auth}"}, f"{url}gridFS/models")
        check(code == 200 and ".safetensors" in body, f"Mongo Express's GridFS bucket page: {code}")
        log("Mongo Express: 401 without the login (and with a wrong password), 200 with it; lists rounds, "
            "client_stats and the GridFS bucket models with its .safetensors files")


def key_position(text: str, key: str) -> int:
    """Where `key:` (quoted or not, not part of a longer name) first occurs in a document's text; -1 if nowhere."""
    match = re.search(rf"(?<![\w$])[\"']?{re.escape(key)}[\"']?\s*:", text)
    return -1 if match is None else match.start()


def check_document_page(fetch: Callable[[str], tuple[int, str]], collection_url: str, name: str,
                        sample: dict[str, Any]) -> str:
    """Mongo Express's page of one stored document: identity keys first, in order, and dates shown as dates.

    Mongo Express 1.0.2 serves a document at <collection>/<JSON of its _id, URL-encoded> (an ObjectId's JSON
    is its hex string) with the document in a textarea, HTML-escaped; should that page not come (Mongo
    Express redirects to the collection when it finds no such document), the collection's table filtered
    to that _id is read instead: its columns in first-seen key order, one cell per column. Says which page.
    """
    identity, dates, doc_id = IDENTITY_KEYS[name], DATE_KEYS[name], str(sample["_id"])
    others = [key for key in sample["keys"] if key not in identity and key != "_id"]
    check([key for key in sample["keys"] if key != "_id"][:len(identity)] == list(identity),
          f"stored {name} document keys {sample['keys']} do not open on {identity}")
    code, body = fetch(f"{collection_url}/{urllib.parse.quote(json.dumps(doc_id), safe='')}")
    check(code == 200, f"Mongo Express's page of {name} document {doc_id} answered {code}")
    textarea = re.search(r"<textarea[^>]*\bid=[\"']document[\"'][^>]*>(.*?)</textarea>", body, re.S)
    if textarea is not None and doc_id in textarea.group(1):
        text = html.unescape(textarea.group(1))
        positions = [key_position(text, key) for key in identity]
        check(all(p >= 0 for p in positions) and positions == sorted(positions),
              f"{name} document page: identity keys {identity} at {positions}:\n{text[:800]}")
        late = [key for key in others if 0 <= key_position(text, key) < positions[-1]]
        check(not late, f"{name} document page: {late} before the identity keys:\n{text[:800]}")
        for key in dates:
            shown = re.search(rf"(?<![\w$])[\"']?{key}[\"']?\s*:\s*(?:ISODate|new Date|Date)?\(?\s*"
                              rf"(?:\{{\s*[\"']?\$date[\"']?\s*:\s*)?[\"']?{ISO_DATE}", text)
            check(shown is not None, f"{name} document page: {key} is not shown as a date:\n{text[:800]}")
        return "the document's page"
    query = urllib.parse.urlencode({"key": "_id", "value": doc_id, "type": "O"})
    code, body = fetch(f"{collection_url}?{query}")
    check(code == 200, f"Mongo Express's page of {name} filtered to {doc_id} answered {code}")
    columns = [html.unescape(c) for c in re.findall(r"<th[^>]*\bdata-column=\"([^\"]*)\"", body)]
    check(columns[1:len(identity) + 1] == list(identity),
          f"{name} collection page: columns {columns} do not open on {identity} (document page: no textarea)")
    cells = [html.unescape(re.sub(r"<[^>]+>", " ", cell)).strip()
             for cell in re.findall(r"<div class=\"tableContent\">(.*?)</div>\s*</td>", body, re.S)]
    check(len(cells) >= len(columns), f"{name} collection page: {len(cells)} cells for columns {columns}")
    for key in dates:
        value = cells[columns.index(key)]
        check(re.search(ISO_DATE, value) is not None or re.search(JS_DATE, value) is not None,
              f"{name} collection page: {key} shows {value!r}, not a date")
    return "the collection's table (filtered to one _id)"


class ComposeStack(Stack):
    def containers(self, service: str, *, running: bool = True) -> list[str]:
        args = ["ps", "-q"] + (["--status", "running"] if running else ["--all"]) + [service]
        return self.c(*args).stdout.split()

    def restart_server(self) -> None:
        self.c("restart", "server")

    def logs(self) -> str:
        return self.c("logs", "--no-color", "--tail", "40", check_rc=False).stdout


class SwarmStack(Stack):
    def containers(self, service: str, *, running: bool = True) -> list[str]:
        args = ["ps", "-q", "--filter", f"label=com.docker.swarm.service.name={self.name}_{service}"]
        return run("docker", *args, *([] if running else ["--all"])).stdout.split()

    def restart_server(self) -> None:
        run("docker", "service", "update", "--force", "--detach", f"{self.name}_server")

    def logs(self) -> str:
        out = []
        for service in ("server", "client", "data-init", "mongo"):
            result = run("docker", "service", "logs", "--tail", "30", f"{self.name}_{service}", check_rc=False)
            out.append(result.stdout + result.stderr)
        return "\n".join(out)


# --- the scenario --------------------------------------------------------------------


def build_image(args: argparse.Namespace, stack: Stack) -> None:
    config = json.loads(stack.c("config", "--format", "json").stdout)
    built = sorted(name for name, service in config["services"].items() if "build" in service)
    images = {config["services"][name]["image"] for name in ("server", "client", "data-init")}
    check(built == ["server"] and images == {IMAGE}, f"expected one build (server) of one image, got {built}, {images}")
    started = time.monotonic()
    if args.wheelhouse:
        run("bash", str(REPO / "scripts" / "fill-wheelhouse.sh"), env={**os.environ, "PYTHON": sys.executable})
        run("docker", "build", "--network", "none", "--tag", IMAGE, str(REPO), timeout=1800)
        how = "docker build --network none from wheelhouse/"
    else:
        stack.c("build", "server", timeout=1800)
        how = "docker compose build server"
    size = int(run("docker", "image", "inspect", "--format", "{{.Size}}", IMAGE).stdout)
    log(f"image {IMAGE} built once ({how}) in {time.monotonic() - started:.0f} s, {size / 1e6:.0f} MB")


#: README's offline install: local IDX files (mounted at /src) into the data volume, verified and converted.
INSTALL_MNIST = ("python", "-m", "stack.fetch_data", "--from", "/src", "--dataset", "MNIST")


def prefill_data(stack: Stack, mnist_parent: Path) -> None:
    """README's offline step: fill the data volume from local IDX files, through Compose."""
    result = stack.c("run", "--rm", "--no-deps", "--pull", "never", "-v", f"{mnist_parent / 'mnist'}:/src:ro",
                     "data-init", *INSTALL_MNIST)
    log("data volume pre-filled through `docker compose run data-init`")
    check("not created by" not in result.stderr, result.stderr)


def experiment_states(stack: Stack) -> list[dict[str, Any]] | None:
    experiments = stack.experiments()
    if experiments is not None:
        failed = [e for e in experiments if e["status"] == "failed"]
        if failed:
            raise Failure(f"experiment failed: {json.dumps(failed)}")
    return experiments


def by_name(experiments: list[dict[str, Any]], name: str) -> dict[str, Any]:
    return next(e for e in experiments if e["description"].startswith(f"compose test {name}:"))


def kill_a_slot_holder(stack: Stack, timeout_s: float) -> dict[str, Any]:
    """SIGKILL a client container holding a slot of A while A is mid-round (round >= 2)."""
    a = wait_for("experiment A in round 2", lambda: _in_round(stack, "A", 2), timeout_s)

    def training_a_member() -> list[str]:
        # Members are assigned per round: between rounds nobody holds one, so ask again.
        check(by_name(experiment_states(stack) or [a], "A")["status"] == "running",
              "experiment A ended before a client container could be caught training one of its members")
        holders = stack.exec_server(SLOT_HOLDERS, EXPERIMENT_ID=a["id"])
        return [cid for cid in stack.containers("client") if any(host and cid.startswith(host) for host in holders)]

    victims = wait_for("a client container training a member of A", training_a_member, timeout_s)
    round_at_kill = (by_name(experiment_states(stack) or [a], "A"))["current_round"]
    run("docker", "kill", "--signal", "KILL", victims[0])
    log(f"SIGKILLed client container {victims[0][:12]} (holds a slot of A) in A's round {round_at_kill}")
    return {"container": victims[0], "round": round_at_kill}


def _in_round(stack: Stack, name: str, server_round: int) -> dict[str, Any] | None:
    experiments = experiment_states(stack)
    if not experiments:
        return None
    e = by_name(experiments, name)
    return e if e["status"] == "running" and e["current_round"] >= server_round else None


def restart_server_mid_experiment(stack: Stack, after_round: int, timeout_s: float) -> None:
    """Restart the server container while A (or, if A already ended, B) is running."""
    def running_after_kill() -> dict[str, Any] | None:
        experiments = experiment_states(stack)
        if not experiments:
            return None
        a, b = by_name(experiments, "A"), by_name(experiments, "B")
        if a["status"] == "running" and a["current_round"] > after_round:
            return a
        check(a["status"] != "finished" or b["status"] != "finished",
              "both experiments finished before the server could be restarted mid-experiment")
        return b if a["status"] == "finished" and b["status"] == "running" else None

    e = wait_for("an experiment running after the kill", running_after_kill, timeout_s)
    stack.restart_server()
    log(f"restarted the server container with {e['description'][:15]} running in round {e['current_round']}")
    wait_for("the server to answer again", lambda: stack.experiments() is not None, 180)


def wait_finished(stack: Stack, timeout_s: float) -> list[dict[str, Any]]:
    def finished() -> list[dict[str, Any]] | None:
        experiments = experiment_states(stack)
        done = experiments and all(e["status"] == "finished" for e in experiments)
        return experiments if done else None

    return list(wait_for("every experiment to finish", finished, timeout_s))


def check_documents(stack: Stack) -> None:
    report = stack.exec_server(CHECK_DOCUMENTS)
    check(len(report) == len(EXPERIMENTS["experiments"]), f"{len(report)} experiments stored")
    for e in report:
        n, rounds = e["clients"], e["rounds"]
        check(e["status"] == "finished", f"{e['description']}: {e['status']}")
        check(e["round_numbers"] == list(range(1, rounds + 1)), f"{e['description']}: rounds {e['round_numbers']}")
        expected = sorted((client, r) for client in range(n) for r in range(1, rounds + 1))
        check([tuple(pair) for pair in e["client_stats"]] == expected, f"{e['description']}: client_stats {e['client_stats']}")
        for model in e["round_models"]:
            check(model["bytes"] > 0 and model["tensors"] > 0 and model["meta_round"] == model["round"],
                  f"{e['description']}: the GridFS model of round {model['round']}: {model}")
        check(all(0 <= accuracy <= 1 for accuracy in e["accuracies"]), f"accuracies {e['accuracies']}")
        check(e["landscapes_last_round"] > 0, f"{e['description']}: no landscape of the last round")
        if e["description"].startswith("compose test B:"):  # run on the mounted workspace's components
            stored = {key: e[key] for key in OWN_COMPONENTS}
            check(stored == OWN_COMPONENTS, f"{e['description']}: stored components {stored}")
            log(f"{e['description']}: {e['model']}, {e['dataset_name']} and {e['client_algorithm']['name']} "
                "from the mounted workspace")
        log(f"{e['description']}: rounds {rounds}/{rounds} once each, client_stats {len(e['client_stats'])} "
            f"= {n} x {rounds} once each, {len(e['round_models'])} round models in GridFS "
            f"({e['round_models'][0]['bytes']} bytes), accuracy {e['accuracies'][-1]:.3f}")


def check_server_account(stack: Stack, standin: bool) -> None:
    """The server connects as the readWrite-only app user; a real MongoDB enforces it."""
    files = list(stack.compose)
    if stack.args.override:  # the project's own files, without the override: what a real mongo:7 gets
        i = files.index(str(stack.args.override))
        files = files[: i - 1] + files[i + 1:]
    config = json.loads(run(*files, "config", "--format", "json", env=stack.env).stdout)
    user = env_value(stack.env_file, "MONGO_APP_USER")
    db_name = env_value(stack.env_file, "FEDLAND_DB")
    uri = config["services"]["server"]["environment"]["FEDLAND_MONGO_URI"]
    check(uri.startswith(f"mongodb://{user}:") and uri.endswith(f"/{db_name}?authSource={db_name}"),
          f"server URI does not use the app user: {uri.split('@')[-1]}")
    mongo = stack.containers("mongo")[0]
    script = run("docker", "exec", mongo, "cat", "/docker-entrypoint-initdb.d/10-create-app-user.js").stdout
    check(script == (REPO / "mongo" / "create-app-user.js").read_text(), "mongo init script not mounted")
    mongo_env = run("docker", "exec", mongo, "env").stdout.splitlines()
    check(f"MONGO_APP_USER={user}" in mongo_env and f"MONGO_APP_DB={db_name}" in mongo_env, "mongo lacks MONGO_APP_*")
    if standin:
        log("server account: URI uses the app user and the init script is mounted in mongo; NOT checked here: "
            "that MongoDB creates the user and enforces readWrite (the stand-in has no authentication)")
        return
    status = stack.exec_server(CHECK_PRIVILEGES)
    check(status["roles"] == [{"role": "readWrite", "db": db_name}], f"server roles {status['roles']}")
    check(status["listDatabases_denied"], "the server's account may list databases")
    log(f"server account: {user}, roles {status['roles']}, listDatabases denied")


def scenario(stack: Stack, scale: Callable[[int], None], timeout_s: float, standin: bool) -> None:
    """Queue, scale while running, kill a client, restart the server, wait, check."""
    experiments_file = stack.work / "experiments.json"
    experiments_file.write_text(json.dumps(EXPERIMENTS))
    stack.queue(experiments_file)
    killed = kill_a_slot_holder(stack, timeout_s)
    scale(4)
    restart_server_mid_experiment(stack, killed["round"], timeout_s)
    started = time.monotonic()
    experiments = wait_finished(stack, timeout_s)
    log(f"all {len(experiments)} experiments finished ({time.monotonic() - started:.0f} s after the restart)")
    check_documents(stack)
    check_server_account(stack, standin)
    stack.check_mongo_express(env_value(stack.env_file, "FEDLAND_DB"), standin)


def project_leftovers(label: str) -> dict[str, list[str]]:
    found = {}
    for kind in ("container", "volume", "network"):
        command = ["docker", kind, "ls", "-q", "--filter", f"label={label}"] + (["--all"] if kind == "container" else [])
        found[kind] = run(*command).stdout.split()
    return found


def compose_main(args: argparse.Namespace, work: Path, compose: list[str], standin: bool) -> None:
    stack = ComposeStack("fedland-test", work, args, compose)
    build_image(args, stack)
    anonymous: set[str] = set()
    try:
        if args.mnist:
            prefill_data(stack, args.mnist)
        up = stack.c("up", "--detach", "--pull", "never", "--no-build", "--scale", "client=3", timeout=900)
        check("not created by Docker Compose" not in up.stderr, up.stderr)
        running = stack.containers("client")
        check(len(running) == 3, f"{len(running)} clients running after up --scale client=3")
        log(f"up --scale client=3: {len(running)} clients running, server healthy")
        for cid in stack.c("ps", "-q", "--all").stdout.split():
            mounts = json.loads(run("docker", "inspect", "--format", "{{json .Mounts}}", cid).stdout)
            anonymous |= {m["Name"] for m in mounts if m["Type"] == "volume" and len(m["Name"]) == 64}

        def scale(clients: int) -> None:
            stack.c("scale", "--no-deps", f"client={clients}")
            count = len(wait_for(f"{clients} running clients",
                                 lambda: len(stack.containers("client")) == clients and stack.containers("client"),
                                 120))
            log(f"docker compose scale client={clients}: {count} clients running")

        scenario(stack, scale, args.timeout, standin)
    except BaseException:
        log(f"FAILED; last log lines:\n{stack.logs()}")
        raise
    finally:
        if not args.keep:
            stack.c("down", "--volumes", "--remove-orphans", "--timeout", "10", check_rc=False)
    if args.keep:
        return
    leftovers = project_leftovers(f"com.docker.compose.project={stack.name}")
    existing = set(run("docker", "volume", "ls", "-q").stdout.split())
    leftovers["anonymous volume"] = sorted(anonymous & existing)
    check(not any(leftovers.values()), f"down -v left {leftovers}")
    log("down -v: no container, volume or network of the project left")


# --- Swarm -----------------------------------------------------------------------------


def swarm_main(args: argparse.Namespace, work: Path, compose: list[str], standin: bool) -> None:
    stack = SwarmStack("fedland-swarm-test", work, args, compose)
    stack.env["SERVER_PUBLISH_ADDRESS"] = "0.0.0.0"  # Swarm publishes on the routing mesh
    stack.env["CLIENT_REPLICAS"] = "2"
    state = run("docker", "info", "--format", "{{.Swarm.LocalNodeState}}").stdout.strip()
    initialised = state != "active"
    if initialised:
        run("docker", "swarm", "init", "--advertise-addr", "127.0.0.1", "--listen-addr", "127.0.0.1:2377")
        log("docker swarm init on loopback")
    build_image(args, stack)
    clients_work = work / "clients"
    clients_work.mkdir()
    env_file = clients_work / "clients.env"
    gateway = run("docker", "network", "inspect", "bridge", "--format", "{{(index .IPAM.Config 0).Gateway}}")
    server_url = f"http://{gateway.stdout.strip()}:{stack.port}"  # this host, as another host would reach it
    env_file.write_text(f"FEDLAND_SERVER_URL={server_url}\nFEDLAND_WORKER_TOKEN={stack.worker_token}\n")
    clients = [*compose, "--project-name", "fedland-swarm-clients", "--project-directory", str(REPO),
               "--env-file", str(env_file), "-f", str(REPO / "compose.clients.yaml")]
    clients_env = {**stack.env, "CLIENT_REPLICAS": "1"}
    stack_label = f"com.docker.stack.namespace={stack.name}"
    endpoint_mode = "vip"
    try:
        if args.mnist:  # Swarm makes <stack>_data on first use; make and fill it first (as data-init would)
            run("docker", "volume", "create", "--label", stack_label, f"{stack.name}_data")
            run("docker", "run", "--rm", "--network", "none", "-v", f"{stack.name}_data:/data",
                "-v", f"{args.mnist / 'mnist'}:/src:ro", "-e", "FEDLAND_DATA_DIR=/data", IMAGE, *INSTALL_MNIST)
            run(*clients, "run", "--rm", "--no-deps", "--pull", "never", "-v", f"{args.mnist / 'mnist'}:/src:ro",
                "data-init", *INSTALL_MNIST, env=clients_env)
        rendered = stack.c("config", "--format", "json").stdout
        endpoint_mode = "vip" if ipvs_available() else "dnsrr"
        stack_file = run(sys.executable, str(REPO / "scripts" / "swarm-stack.py"), "--endpoint-mode", endpoint_mode,
                         input=rendered).stdout
        (work / "stack.json").write_text(stack_file)
        run("docker", "stack", "deploy", "--compose-file", str(work / "stack.json"), stack.name)
        log(f"docker stack deploy: stack from scripts/swarm-stack.py --endpoint-mode {endpoint_mode} deployed"
            + ("" if endpoint_mode == "vip" else " (this kernel has no IPVS: no service VIPs, no routing mesh)"))
        wait_for("the server on its published port", lambda: stack.experiments() is not None, 300)
        wait_for("2 running clients", lambda: len(stack.containers("client")) == 2, 300)
        run("docker", "service", "scale", "--detach", f"{stack.name}_client=3")
        wait_for("3 running clients", lambda: len(stack.containers("client")) == 3, 300)
        log("docker service scale client=3: 3 clients running")
        run("docker", "service", "update", "--detach", "--publish-add",
            f"published={stack.me_port},target=8081,mode={'ingress' if endpoint_mode == 'vip' else 'host'}",
            f"{stack.name}_mongo-express")

        def add_remote_client(count: int) -> None:
            # B needs a 4th client: the client-only project, through the published URL.
            run(*clients, "up", "--detach", "--pull", "never", "--no-build", "--scale", "client=1", env=clients_env,
                timeout=600)
            log(f"client-only project (compose.clients.yaml) up with 1 client -> {server_url} ({count} clients)")

        scenario(stack, add_remote_client, args.timeout, standin)
    except BaseException:
        log(f"FAILED; last log lines:\n{stack.logs()}")
        raise
    finally:
        if not args.keep:
            swarm_teardown(stack, clients, clients_env, initialised)
    if not args.keep:
        leftovers = project_leftovers(stack_label)
        for kind, names in project_leftovers("com.docker.compose.project=fedland-swarm-clients").items():
            leftovers[kind] += names
        check(not any(leftovers.values()), f"teardown left {leftovers}")
        log("stack rm + volume rm, clients down -v: nothing left" + ("; swarm left" if initialised else ""))


def swarm_teardown(stack: Stack, clients: list[str], clients_env: dict[str, str], leave: bool) -> None:
    """Remove the client-only project, the stack, its volumes, and leave the Swarm if this made it."""
    label = f"label=com.docker.stack.namespace={stack.name}"
    run(*clients, "down", "--volumes", "--remove-orphans", "--timeout", "10", env=clients_env, check_rc=False)
    run("docker", "stack", "rm", stack.name, check_rc=False)
    try:
        wait_for("the stack's services and running containers to go", lambda: not (
            run("docker", "service", "ls", "-q", "--filter", label).stdout.strip()
            or run("docker", "ps", "-q", "--filter", label).stdout.strip()), 120)
        # the finished data-init job's container stays behind in Swarm
        for container in run("docker", "ps", "-aq", "--filter", label).stdout.split():
            run("docker", "rm", "--force", "--volumes", container, check_rc=False)
        wait_for("the stack's networks to go",
                 lambda: not run("docker", "network", "ls", "-q", "--filter", label).stdout.strip(), 120)
    finally:
        for volume in run("docker", "volume", "ls", "-q", "--filter", label).stdout.split():
            run("docker", "volume", "rm", volume, check_rc=False)
        if leave:
            run("docker", "swarm", "leave", "--force", check_rc=False)


def ipvs_available() -> bool:
    """Whether this kernel has IPVS, which Swarm's service VIPs and routing mesh need."""
    if Path("/proc/net/ip_vs").exists():
        return True
    release = os.uname().release
    for config in (Path(f"/boot/config-{release}"), Path("/proc/config.gz")):
        if config.exists():
            import gzip
            text = (gzip.open(config, "rt") if config.suffix == ".gz" else config.open()).read()
            return "CONFIG_IP_VS=y" in text or "CONFIG_IP_VS=m" in text
    return Path(f"/lib/modules/{release}/kernel/net/netfilter/ipvs").is_dir()


@contextmanager
def work_dir(keep: bool) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="fedland-compose-test-"))
    try:
        yield path
    finally:
        if not keep:
            shutil.rmtree(path, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wheelhouse", action="store_true", help="offline build from wheelhouse/")
    parser.add_argument("--mnist", type=Path, help="directory with mnist/*-ubyte.gz")
    parser.add_argument("--override", type=Path, help="a second compose file (stand-in images)")
    parser.add_argument("--swarm", action="store_true", help="a single-node Swarm instead of Compose")
    parser.add_argument("--keep", action="store_true", help="leave everything up")
    parser.add_argument("--timeout", type=float, default=600, help="seconds to wait for each stage")
    args = parser.parse_args(argv)
    # SIGTERM (a CI timeout, kill) unwinds like an error: the stack is torn down, the Swarm left
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    if args.override:
        args.override = args.override.resolve()
    started = time.monotonic()
    try:
        run("docker", "version", "--format", "{{.Server.Version}}", timeout=30)
        compose = compose_cli()
        image_cmd = run("docker", "image", "inspect", "--format", "{{json .Config.Cmd}}", "mongo:7",
                        check_rc=False).stdout
        standin = "nx-27017" in image_cmd
        check(not standin or args.override is not None,
              "mongo:7 here is the nx-27017 stand-in (no authentication): pass --override with credential-free URIs")
        with work_dir(args.keep) as work:
            (swarm_main if args.swarm else compose_main)(args, work, compose, standin)
    except (Failure, subprocess.TimeoutExpired) as error:
        log(f"FAILED after {time.monotonic() - started:.0f} s: {error}")
        return 1
    log(f"OK in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
