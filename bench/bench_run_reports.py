"""How soon `python main.py` is done after its last round: summary, final reports, exit; quiet and beside CPU hogs.

    python bench/bench_run_reports.py                   # the example suite, as main.py declares it
    python bench/bench_run_reports.py --rounds 2 --hogs 0 2

Runs `main.py` in a fresh directory (its own embedded store and reports), once per
number of CPU-bound processes beside it (`--hogs`), and prints, from the last round
stored (the store's latest `rounds.finished_at`): the summary printed on stdout,
the final report on disk (the newest file under the reports directory) and the
process's exit, in seconds. The render CPU per round and the export time have
their own benchmarks (bench/bench_reports.py, bench/bench_export.py).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stack import records  # noqa: E402
from stack.embedded import EmbeddedMongo, connect  # noqa: E402


def hog(stop: Any) -> None:  # a multiprocessing Event
    while not stop.is_set():
        sum(i * i for i in range(10_000))


def newest_mtime(directory: Path) -> float:
    return max((path.stat().st_mtime for path in directory.rglob("*") if path.is_file()), default=float("nan"))


def run_once(hogs: int, extra: list[str]) -> dict[str, float]:
    stop = multiprocessing.Event()
    burners = [multiprocessing.Process(target=hog, args=(stop,), daemon=True) for _ in range(hogs)]
    for burner in burners:
        burner.start()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-run-reports-") as tmp:
            work = Path(tmp)
            env = {key: value for key, value in os.environ.items() if key != "FEDLAND_MONGO_URI"}
            started = time.time()
            process = subprocess.Popen(
                [sys.executable, str(ROOT / "main.py"), "--no-progress", *extra],
                cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            )
            summary_at = float("nan")
            assert process.stdout is not None
            for line in process.stdout:
                if line.split()[:2] == ["experiment", "status"] and summary_at != summary_at:
                    summary_at = time.time()
            process.wait()
            exited_at = time.time()
            reports_at = newest_mtime(work / "data" / "reports")
            with EmbeddedMongo(work / "data" / "store") as uri:
                client = connect(uri)
                db = client["fedland"]
                last_round = max(
                    (r.finished_at for e in records.read_experiments(db) for r in records.read_rounds(db, e.id)),
                    default=float("nan"),
                )
                client.close()
            return {
                "run_s": exited_at - started,
                "summary_s": summary_at - last_round,
                "reports_s": reports_at - last_round,
                "exit_s": exited_at - last_round,
                "status": float(process.returncode),
            }
    finally:
        stop.set()
        for burner in burners:
            burner.join(timeout=5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hogs", type=int, nargs="+", default=[0, 2], help="CPU-bound processes beside each run")
    parser.add_argument("--rounds", type=int, help="override every experiment's rounds (quicker runs)")
    parser.add_argument("--only", help="only experiments whose description contains this")
    args = parser.parse_args()
    extra = [*(["--rounds", str(args.rounds)] if args.rounds else []), *(["--only", args.only] if args.only else [])]
    print(f"{'hogs':>4} {'run s':>8} {'summary s':>10} {'reports s':>10} {'exit s':>8} {'status':>6}  (from the last round)")
    for hogs in args.hogs:
        row = run_once(hogs, extra)
        print(
            f"{hogs:>4} {row['run_s']:>8.1f} {row['summary_s']:>10.1f} {row['reports_s']:>10.1f} "
            f"{row['exit_s']:>8.1f} {int(row['status']):>6}"
        )


if __name__ == "__main__":
    main()
