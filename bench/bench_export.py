"""Benchmark of `python main.py export` on a stored run: wall and CPU seconds per phase.

    python main.py --rounds 2 --no-reports               # or any run: its store stays in ./data/store
    python bench/bench_export.py [--store-dir data/store] [--store-uri URI] [--repeat 3]

Against the store a run left (the embedded nx-27017 in `--store-dir`, started and
stopped here, or a MongoDB at `--store-uri`), prints, for every experiment in it:

- reading: `reports.tables.load_tables` (the store's queries and the tables built);
- writing CSV, Parquet and TensorBoard from those tables;
- the models: `reports.export.write_models` (global models, then the members' too);
- the whole `export_main` for CSV, as `python main.py export` runs it once the store is open,

each as the best of `--repeat` runs' wall seconds and its CPU seconds, with the rows and
files written, and the share of wall time not spent on this process's CPU (waiting for
the store). A benchmark, not a test: it prints figures and asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reports.export import export_main, write_models, write_tensorboard  # noqa: E402
from reports.tables import load_tables, open_store, write_tables  # noqa: E402
from stack.settings import StoreSettings  # noqa: E402


def measure(run: Callable[[], Any], repeat: int) -> tuple[float, float, Any]:
    """(best wall s, CPU s of that run, its result)."""
    best: tuple[float, float, Any] | None = None
    for _ in range(repeat):
        wall, cpu = time.perf_counter(), time.process_time()
        result = run()
        timing = (time.perf_counter() - wall, time.process_time() - cpu, result)
        if best is None or timing[0] < best[0]:
            best = timing
    assert best is not None
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store-dir", type=Path, default=Path("data/store"))
    parser.add_argument("--store-uri", help="a MongoDB URI instead of the embedded store")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    store = StoreSettings(mongo_uri=args.store_uri, store_dir=args.store_dir)
    rows: list[tuple[str, float, float, str]] = []
    with tempfile.TemporaryDirectory() as scratch, open_store(store) as db:
        out = Path(scratch)
        wall, cpu, tables = measure(lambda: load_tables(db), args.repeat)
        experiments = list(tables["experiments"]["experiment_id"])
        rows.append(("read the store", wall, cpu, f"{sum(len(t) for t in tables.values()):,} rows"))
        for file_format in ("csv", "parquet"):
            wall, cpu, paths = measure(lambda: write_tables(tables, out / file_format, file_format), args.repeat)
            size = sum(p.stat().st_size for p in paths)
            rows.append((f"write {file_format}", wall, cpu, f"{len(paths)} files, {size / 1e6:.1f} MB"))
        wall, cpu, runs = measure(lambda: write_tensorboard(tables, out / "tb"), 1)  # appends on a rerun
        rows.append(("write TensorBoard", wall, cpu, f"{len(runs)} runs"))
        for members in (False, True):
            wall, cpu, manifest = measure(
                lambda: write_models(db, experiments, out / f"models-{members}", members=members), args.repeat)
            count = len(json.loads(manifest.read_text(encoding="utf-8"))["models"])
            rows.append(("models" + (" and members'" if members else ""), wall, cpu, f"{count} files"))
    print(f"{len(experiments)} experiments in {args.store_uri or args.store_dir}")
    with tempfile.TemporaryDirectory() as scratch:
        wall, cpu, code = measure(lambda: export_main([], "csv", Path(scratch), store), 1)
        rows.append(("python main.py export (csv)", wall, cpu, f"exit {code}, store start included"))
    print(f"{'phase':<30} {'wall s':>8} {'CPU s':>8} {'waiting':>8}  result")
    for name, wall, cpu, result in rows:
        print(f"{name:<30} {wall:>8.2f} {cpu:>8.2f} {max(0.0, 1 - cpu / wall) if wall else 0:>8.0%}  {result}")


if __name__ == "__main__":
    main()
