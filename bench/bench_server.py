"""Server throughput: fake workers over real HTTP post real FedNet weights without training.

    FEDLAND_DATA_DIR=../shared/data python bench/bench_server.py [--members 10,100,1000] \
        [--workers 10,100,1000] [--rounds 3]

For each (members, workers) pair it starts a fresh embedded nx-27017 and `python -m
server` (its default settings; landscape measurements off), queues one FedAvg
experiment of that many members (every member trains every round), and runs that
many fake workers as asyncio tasks over keep-alive HTTP/1.1 connections: register,
then loop: long-poll `task`, download the round's model, post it back as the
member's update (the real FedNet safetensors, no training). It prints:

- accepted updates per second (202 answers over the wall time of the rounds);
- p50 / p99 latency of each route (task includes its long-poll wait);
- the server's peak RSS (VmHWM) and the round time (rounds documents, mean);
- how many workers were answered (registered and got at least one task answer).

A benchmark, not a test: it prints figures and asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pymongo

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedland import schemes  # noqa: E402
from stack import records  # noqa: E402
from stack.embedded import EmbeddedMongo, free_port  # noqa: E402

BOUNDARY = "fedlandbenchboundary"


class Http:
    """One keep-alive HTTP/1.1 connection (enough HTTP for this server's answers)."""

    def __init__(self, host: str, port: int, token: str) -> None:
        self.host, self.port, self.token = host, port, token
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, body: bytes = b"", content_type: str = "application/json") -> tuple[int, bytes]:
        for attempt in range(3):
            try:
                if self.writer is None:
                    self.reader, self.writer = await asyncio.open_connection(self.host, self.port, limit=2**22)
                head = (
                    f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\nAuthorization: Bearer {self.token}\r\n"
                    f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
                ).encode()
                self.writer.write(head + body)
                await self.writer.drain()
                assert self.reader is not None
                status_line = await self.reader.readline()
                if not status_line:
                    raise ConnectionError("closed")
                status = int(status_line.split()[1])
                length, close = 0, False
                while True:
                    line = await self.reader.readline()
                    if line in (b"\r\n", b""):
                        break
                    name, _, value = line.decode().partition(":")
                    if name.lower() == "content-length":
                        length = int(value)
                    elif name.lower() == "connection" and value.strip().lower() == "close":
                        close = True
                data = await self.reader.readexactly(length)
                if close:
                    await self.close()
                return status, data
            except (ConnectionError, asyncio.IncompleteReadError, OSError):
                await self.close()
                if attempt == 2:
                    raise
                await asyncio.sleep(0.5)
        raise AssertionError("unreachable")

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def multipart(meta: dict[str, Any], weights: bytes) -> bytes:
    return b"".join([
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="meta"\r\n\r\n'.encode(),
        json.dumps(meta).encode(),
        f'\r\n--{BOUNDARY}\r\nContent-Disposition: form-data; name="weights"; filename="w.safetensors"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n".encode(),
        weights,
        f"\r\n--{BOUNDARY}--\r\n".encode(),
    ])


class Stats:
    def __init__(self) -> None:
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.accepted = 0
        self.refused = 0
        self.answered: set[int] = set()


async def worker(
    number: int, host: str, port: int, token: str, experiment_id: str, num_train: dict[int, int],
    rounds: int, stats: Stats, done: asyncio.Event,
) -> None:
    http = Http(host, port, token)
    try:
        started = time.perf_counter()
        status, body = await http.request("POST", "/api/v1/workers", json.dumps({"hostname": "bench", "pid": number}).encode())
        stats.latency["register"].append(time.perf_counter() - started)
        registration = json.loads(body)
        worker_id = registration["worker_id"]
        http.token = registration["worker_secret"]  # the enrolment token registers; the worker's secret does the rest
        models: dict[int, bytes] = {}
        while not done.is_set():
            started = time.perf_counter()
            request = {"wait_s": 10.0, "known_experiments": [experiment_id]}
            status, body = await http.request("POST", f"/api/v1/workers/{worker_id}/task", json.dumps(request).encode())
            stats.latency["task"].append(time.perf_counter() - started)
            if status == 200:
                stats.answered.add(number)
            task = json.loads(body)
            if done.is_set():
                break
            if task["action"] != "train":
                if task.get("retry_after_s"):
                    try:
                        await asyncio.wait_for(done.wait(), float(task["retry_after_s"]))
                    except asyncio.TimeoutError:
                        pass
                continue
            server_round, index = int(task["round"]), int(task["client_index"])
            if server_round not in models:
                started = time.perf_counter()
                status, models[server_round] = await http.request(
                    "GET", f"/api/v1/experiments/{experiment_id}/rounds/{server_round}/model"
                )
                stats.latency["model"].append(time.perf_counter() - started)
            meta = {"worker_id": worker_id, "client_index": index, "num_examples": num_train[index], "stats": {}}
            started = time.perf_counter()
            status, body = await http.request(
                "POST", f"/api/v1/experiments/{experiment_id}/rounds/{server_round}/updates",
                multipart(meta, models[server_round]), f"multipart/form-data; boundary={BOUNDARY}",
            )
            stats.latency["update"].append(time.perf_counter() - started)
            if status == 202:
                stats.accepted += 1
                if server_round == rounds and json.loads(body).get("aggregated"):
                    done.set()
            else:
                stats.refused += 1
    finally:
        await http.close()


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_pair(members: int, workers: int, rounds: int, data_dir: Path) -> dict[str, Any]:
    token = secrets.token_urlsafe(16)
    worker_token = secrets.token_urlsafe(16)
    with tempfile.TemporaryDirectory() as tmp, EmbeddedMongo(Path(tmp) / "store") as uri:
        port = free_port()
        env = {**os.environ, "FEDLAND_TOKEN": token, "FEDLAND_MONGO_URI": uri, "FEDLAND_PORT": str(port),
               "FEDLAND_DATA_DIR": str(data_dir), "FEDLAND_LOG_LEVEL": "WARNING", "FEDLAND_DB": "bench",
               "FEDLAND_WORKER_TOKEN": worker_token,
               # every fake worker registers at once: the bound and the rate must not be what is measured
               "FEDLAND_MAX_WORKERS": str(max(1024, workers)), "FEDLAND_REGISTRATIONS_PER_MIN": str(max(120, workers))}
        root = Path(__file__).resolve().parents[1]
        server = subprocess.Popen([sys.executable, "-m", "server"], cwd=root, env=env)
        try:
            return asyncio.run(_drive(server, port, token, worker_token, uri, members, workers, rounds))
        finally:
            server.terminate()
            server.wait(timeout=60)


async def _drive(server: subprocess.Popen[bytes], port: int, token: str, worker_token: str, uri: str, members: int,
                 workers: int, rounds: int) -> dict[str, Any]:
    http = Http("127.0.0.1", port, token)
    for _ in range(600):
        try:
            status, _ = await http.request("GET", "/api/v1/health")
            if status == 200:
                break
        except OSError:
            pass
        await asyncio.sleep(0.1)
    ratios, fractions = schemes.iid(members)
    spec = {"description": f"bench {members} members", "target_balance_ratios": ratios, "subset_fractions": fractions,
            "rounds": rounds, "landscape": {"enabled": False}, "seed": 1}
    status, body = await http.request("POST", "/api/v1/experiments", json.dumps(spec).encode())
    assert status == 201, body
    experiment_id = json.loads(body)["ids"][0]
    await http.close()
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(uri, serverSelectionTimeoutMS=10_000)
    db = client["bench"]
    num_train = {member.client_index: member.num_train for member in records.read_members(db, experiment_id)}
    stats, done = Stats(), asyncio.Event()
    started = time.perf_counter()
    tasks = [
        asyncio.create_task(worker(i, "127.0.0.1", port, worker_token, experiment_id, num_train, rounds, stats, done))
        for i in range(workers)
    ]
    await done.wait()
    wall = time.perf_counter() - started
    # every worker finishes its request in flight (a long-poll ends within its wait_s)
    _, pending = await asyncio.wait(tasks, timeout=60)
    for task in pending:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    rounds_docs = records.read_rounds(db, experiment_id)
    result = {
        "members": members, "workers": workers, "accepted": stats.accepted, "refused": stats.refused,
        "updates_per_s": stats.accepted / wall, "wall_s": wall, "answered": len(stats.answered),
        "round_s": statistics.mean(r.duration_s for r in rounds_docs) if rounds_docs else float("nan"),
        "rss_mb": peak_rss_mb(server.pid),
        "latency": {route: _percentiles(values) for route, values in stats.latency.items()},
    }
    client.close()
    return result


def _percentiles(values: list[float]) -> tuple[float, float]:
    ordered = sorted(values)
    return ordered[len(ordered) // 2], ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", default="10,100,1000")
    parser.add_argument("--workers", default="10,100,1000")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    data_dir = Path(os.environ.get("FEDLAND_DATA_DIR", "./data"))
    header = (f"{'members':>7} {'workers':>7} {'answered':>8} {'updates/s':>9} {'round s':>8} {'RSS MB':>7}  "
              "p50/p99 ms: register, task (incl. long-poll), model, update")
    print(header, flush=True)
    for members in [int(m) for m in args.members.split(",")]:
        for workers in [int(w) for w in args.workers.split(",")]:
            r = run_pair(members, workers, args.rounds, data_dir)
            routes = ", ".join(
                f"{route} {1000 * p50:.0f}/{1000 * p99:.0f}"
                for route, (p50, p99) in sorted(r["latency"].items(), key=lambda item: item[0])
            )
            print(f"{members:>7} {workers:>7} {r['answered']:>8} {r['updates_per_s']:>9.1f} {r['round_s']:>8.2f} "
                  f"{r['rss_mb']:>7.0f}  {routes}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
