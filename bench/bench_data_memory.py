"""Memory of real processes on CIFAR-10-shaped data of full size: one shared, memory-mapped copy.

    python bench/bench_data_memory.py [--workers 4] [--rounds 2] [--members 20]

Writes 50,000 + 10,000 random 32x32x3 images (balanced labels) in CIFAR-10's
official binary archive format (``cifar-10-binary.tar.gz``: five train batches
and a test batch of 1 label byte + 3,072 pixel bytes per record) into a
temporary folder, registers that archive's md5 as CIFAR-10's in every process
it starts (a ``sitecustomize`` on PYTHONPATH: the data is not the official
one), installs it with ``python -m stack.fetch_data --from DIR``, then measures
resident memory (RSS, and PSS from ``/proc/PID/smaps_rollup``: shared pages,
such as the memory-mapped dataset, divided among the processes mapping them):

1. one worker-like process: bare (``client.work`` imported, nothing loaded);
   after loading the dataset and partitioning it into 100 members (every
   member's data materialised as views); after reading every image of both
   splits, batch by batch, as float32 (every page of the map touched);
2. ``python main.py run`` on a CIFAR-10 experiment (CifarCNN, ``--members``
   members, 4 per round, landscape off) with ``--workers`` workers: the peak
   of the summed RSS and PSS of the launcher, the server and the workers
   (the store process listed apart), sampled every 0.25 s.

Targets: a loaded worker at most 400 MB above a bare one; launcher, server and
4 workers together below 3 GB. A benchmark, not a test: it prints a table and
asserts nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MB = 2**20
RECORD_BYTES = 1 + 3 * 32 * 32

HOOK = '''"""Registers the benchmark's CIFAR-10-shaped archive (md5 {digest}) as CIFAR-10, once fedland.datasets loads."""
import importlib.abc
import importlib.machinery
import sys


class _BenchArchive(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != "fedland.datasets":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            import dataclasses
            info = module.DATASETS["CIFAR10"]
            archive = dataclasses.replace(info.files[0], archive_md5="{digest}")
            module.DATASETS["CIFAR10"] = dataclasses.replace(info, files=(archive,), mirrors=())

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _BenchArchive())
'''


def write_cifar10_shaped(folder: Path, seed: int = 0) -> str:
    """The archive of 50,000 + 10,000 random images in the official binary format; returns its md5."""
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=1) as archive:
        for name, count in [*((f"data_batch_{i}.bin", 10_000) for i in range(1, 6)), ("test_batch.bin", 10_000)]:
            labels = rng.permutation(np.repeat(np.arange(10, dtype=np.uint8), count // 10))
            records = np.empty((count, RECORD_BYTES), dtype=np.uint8)
            records[:, 0] = labels
            records[:, 1:] = rng.integers(0, 256, (count, RECORD_BYTES - 1), dtype=np.uint8)
            entry = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
            entry.size = records.nbytes
            archive.addfile(entry, io.BytesIO(records.tobytes()))
    packed = buffer.getvalue()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cifar-10-binary.tar.gz").write_bytes(packed)
    return hashlib.md5(packed).hexdigest()


def memory_mb(pid: int) -> tuple[float, float]:
    """(RSS, PSS) of a process in MiB; PSS is RSS where smaps_rollup is unavailable."""
    rss = pss = 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) / 1024
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                pss = int(line.split()[1]) / 1024
    except OSError:
        pss = rss
    return rss, pss


def probe(data_dir: Path) -> None:
    """Child mode: a worker's data path, printing (stage, RSS, PSS) as JSON lines."""
    import torch

    from client.work import LocalData
    from fedland.spec import ExperimentSpec

    torch.set_num_threads(1)

    def report(stage: str) -> None:
        rss, pss = memory_mb(os.getpid())
        print(json.dumps({"stage": stage, "rss": rss, "pss": pss}), flush=True)

    report("bare")
    spec = ExperimentSpec(dataset_name="CIFAR10", model="CifarCNN", target_balance_ratios=[[0.1] * 10] * 100,
                          subset_fractions=[1.0] * 100, rounds=1, seed=0)
    local = LocalData(data_dir)
    plan = local.plan("bench", spec)
    members = [plan.client_data(index) for index in range(100)]
    report("loaded, 100 members")
    seen = 0
    for images in (plan.dataset.train_x, plan.dataset.test_x):
        for start in range(0, len(images), 1000):
            seen += int(images[start : start + 1000].shape[0])
    assert seen == 60_000 and len(members) == 100
    report("every image read")


def run_probe(data_dir: Path, env: dict[str, str]) -> list[dict[str, Any]]:
    command = [sys.executable, __file__, "--probe", str(data_dir)]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900, check=True)
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def descendants(root: int) -> list[int]:
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = [], [root]
    while frontier:
        pid = frontier.pop()
        children = [child for child, parent in parents.items() if parent == pid]
        found += children
        frontier += children
    return found


def role(pid: int) -> str:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "gone"
    text = " ".join(a.decode(errors="replace") for a in argv)
    if "-m server" in text:
        return "server"
    if "-m client" in text:
        return "worker"
    if "main.py" in text:
        return "launcher"
    if "nx" in text and "27017" in text:
        return "store"
    return "other"


def run_stack(tmp: Path, data_dir: Path, env: dict[str, str], workers: int, rounds: int, members: int) -> dict[str, Any]:
    spec = {
        "description": "bench: CIFAR-10-shaped memory", "dataset_name": "CIFAR10", "model": "CifarCNN",
        "target_balance_ratios": [[0.1] * 10] * members, "subset_fractions": [0.2] * members,
        "clients_per_round": 4, "rounds": rounds, "batch_size": 32, "learning_rate": 0.01, "seed": 1,
        "landscape": {"enabled": False},
    }
    (tmp / "experiments.json").write_text(json.dumps([spec]))
    run_env = {**env, "FEDLAND_DATA_DIR": str(data_dir), "FEDLAND_STORE_DIR": str(tmp / "store"),
               "FEDLAND_LOG_DIR": str(tmp / "logs"), "FEDLAND_LOG_LEVEL": "WARNING"}
    command = [sys.executable, "main.py", "run", "--experiments", str(tmp / "experiments.json"),
               "--clients", str(workers), "--no-reports", "--no-progress"]
    started = time.monotonic()
    launcher = subprocess.Popen(command, cwd=REPO, env=run_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
    peak: dict[str, Any] = {"rss": 0.0, "pss": 0.0, "by_role": {}}
    while launcher.poll() is None:
        rows = []
        for pid in [launcher.pid, *descendants(launcher.pid)]:
            try:
                rows.append((role(pid), *memory_mb(pid)))
            except OSError:
                continue
        counted = [r for r in rows if r[0] in ("launcher", "server", "worker")]
        rss, pss = sum(r[1] for r in counted), sum(r[2] for r in counted)
        if pss > peak["pss"]:
            peak.update(rss=rss, pss=pss, workers=sum(r[0] == "worker" for r in counted))
        for name, r_rss, r_pss in rows:
            best = peak["by_role"].get(name, (0.0, 0.0))
            peak["by_role"][name] = (max(best[0], r_rss), max(best[1], r_pss))
        time.sleep(0.25)
    output = launcher.stdout.read() if launcher.stdout else ""
    peak.update(exit=launcher.returncode, wall_s=time.monotonic() - started, output=output[-2000:])
    return peak


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--members", type=int, default=20)
    parser.add_argument("--probe", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe is not None:
        probe(args.probe)
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-data-memory-") as name:
        tmp = Path(name)
        began = time.monotonic()
        digest = write_cifar10_shaped(tmp / "folder")
        print(f"wrote {tmp / 'folder' / 'cifar-10-binary.tar.gz'} (md5 {digest}) in {time.monotonic() - began:.1f} s")
        (tmp / "hook").mkdir()
        (tmp / "hook" / "sitecustomize.py").write_text(HOOK.format(digest=digest))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp / "hook"), str(REPO)]),
               "FEDLAND_DATA_DIR": str(tmp / "data")}
        began = time.monotonic()
        subprocess.run([sys.executable, "-m", "stack.fetch_data", "--from", str(tmp / "folder"), "--dataset",
                        "CIFAR10"], cwd=REPO, env=env, check=True, timeout=900)
        installed = tmp / "data" / "cifar10" / "compact"
        size = sum(p.stat().st_size for p in installed.iterdir()) / MB
        print(f"installed with python -m stack.fetch_data --from in {time.monotonic() - began:.1f} s; "
              f"compact copy {size:.0f} MiB")

        stages = run_probe(tmp / "data", env)
        bare = stages[0]
        print(f"\n{'worker-like process':<34} {'RSS MiB':>9} {'PSS MiB':>9} {'RSS above bare':>15}")
        for stage in stages:
            print(f"{stage['stage']:<34} {stage['rss']:>9.0f} {stage['pss']:>9.0f} {stage['rss'] - bare['rss']:>15.0f}")

        peak = run_stack(tmp, tmp / "data", env, args.workers, args.rounds, args.members)
        print(f"\npython main.py run: {args.members} members, 4 per round, {args.rounds} rounds, {args.workers} workers; "
              f"exit {peak['exit']} after {peak['wall_s']:.0f} s")
        print(f"{'process (peak)':<34} {'RSS MiB':>9} {'PSS MiB':>9}")
        for name in ("launcher", "server", "worker", "store"):
            if name in peak["by_role"]:
                rss, pss = peak["by_role"][name]
                label = f"{name} (largest one)" if name == "worker" else name
                print(f"{label:<34} {rss:>9.0f} {pss:>9.0f}")
        print(f"{'launcher + server + workers':<34} {peak['rss']:>9.0f} {peak['pss']:>9.0f}   "
              f"(at the peak of PSS, {peak.get('workers', 0)} workers up)")
        if peak["exit"] != 0:
            print(peak["output"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
