"""Stored results as tidy pandas tables, for notebooks and `python main.py export`.

    from reports.tables import load_tables, open_store
    with open_store() as db:                  # FEDLAND_MONGO_URI, else the embedded store in ./data/store
        tables = load_tables(db)              # every experiment; or load_tables(db, ["65a1..."])
    tables["rounds"]                          # one row per experiment x round

Tables (every value as stored; absent or null values are NaN):

- ``experiments``: one row per experiment (spec fields, status, times).
- ``clients``: experiment x client: partition sizes, Gini index, class counts.
- ``client_metrics``: experiment x round x client x model (``global``: the model the
  client received; ``local``: after training): loss/accuracy on the client's train and
  test data, and the landscape scalars of that model (``landscape_*``, ``top_eigenvalue_<k>``).
- ``client_rounds``: experiment x round x client: examples, duration, the stored and the
  report's barrier (``barrier``: max over alpha of the loss above the straight line between the
  endpoint losses; ``dip``: the min of the same difference),
  update distance and cosines, alignment, leave-one-out deltas.
- ``rounds``: experiment x round: the global model on the full test split, the landscape
  scalars of the global model on the held-out subset, gradient dissimilarity.
- ``interpolation``: experiment x round x client x alpha: the raw global -> local loss curve.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from pymongo.database import Database

from reports.data import interpolation_curve, linear_barrier, list_experiment_ids, load_experiment, path_dip, value_at
from stack import records
from stack.embedded import open_database as open_store  # the results database (URI, else the embedded store)
from stack.settings import StoreSettings

__all__ = ["TABLES", "export_main", "load_tables", "open_store", "write_tables", "write_tensorboard"]

TABLES = ("experiments", "clients", "client_metrics", "client_rounds", "rounds", "interpolation")
SCALARS = ("loss", "accuracy", "grad_norm", "trace", "trace_stderr", "sharpness")
EVALUATION = ("train_loss", "train_accuracy", "test_loss", "test_accuracy")


def _number(doc: Any, *path: str | int) -> float:
    value = value_at(doc, path)
    return math.nan if value is None else value


def _eigenvalues(block: Any, prefix: str = "top_eigenvalue") -> dict[str, float]:
    values = block.get("top_eigenvalues") if isinstance(block, Mapping) else None
    return {f"{prefix}_{k + 1}": _number(values, k) for k in range(len(values))} if isinstance(values, list) else {}


def _entry(round_doc: Mapping[str, Any], key: str, client_index: int, field: str) -> float:
    for entry in ((round_doc.get("landscape") or {}).get(key) or []):
        if isinstance(entry, Mapping) and entry.get("client_index") == client_index:
            return _number(entry, field)
    return math.nan


def load_tables(db: Database[Any], experiment_ids: Sequence[str] | None = None) -> dict[str, pd.DataFrame]:
    """The tables above for the given experiments (every experiment in the store when None)."""
    ids = list_experiment_ids(db, status=None) if experiment_ids is None else list(experiment_ids)
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in TABLES}
    for experiment_id in ids:
        data = load_experiment(db, experiment_id)
        key = {"experiment_id": experiment_id, "description": data.description}
        strategy = data.spec.get("strategy") or {}
        rows["experiments"].append({
            **key, "status": data.status, "dataset_name": data.spec.get("dataset_name"),
            "model": data.spec.get("model"), "strategy": strategy.get("name"),
            "strategy_params": json.dumps(strategy.get("params") or {}, sort_keys=True),
            "rounds": data.planned_rounds, "rounds_aggregated": len(data.rounds), "num_clients": data.num_clients,
            **{k: data.spec.get(k) for k in ("local_epochs", "batch_size", "learning_rate", "momentum", "seed")},
        })
        for c in data.clients:
            rows["clients"].append({
                **key, "client_index": c.client_index, "num_train": c.num_train, "num_test": c.num_test,
                "gini_index": math.nan if c.gini_index is None else c.gini_index,
                **{f"train_class_{k}": n for k, n in enumerate(c.class_counts)},
                **{f"test_class_{k}": n for k, n in enumerate(c.test_class_counts)},
            })
        rounds_by_number = {int(r["round"]): r for r in data.rounds}
        for doc in data.client_stats:
            server_round, client_index = int(doc["round"]), int(doc["client_index"])
            where: dict[str, Any] = {**key, "round": server_round, "client_index": client_index}
            landscape = doc["landscape"] if isinstance(doc.get("landscape"), Mapping) else {}
            for model in ("global", "local"):
                block = landscape.get(model) or {}
                rows["client_metrics"].append({
                    **where, "model": model, **{m: _number(doc, model, m) for m in EVALUATION},
                    **{f"landscape_{m}": _number(block, m) for m in SCALARS}, **_eigenvalues(block),
                })
            curve = interpolation_curve(doc)
            round_doc = rounds_by_number.get(server_round, {})
            rows["client_rounds"].append({
                **where, "num_examples": _number(doc, "num_examples"),
                "duration_total_s": _number(doc, "duration_s", "total"),
                "barrier": math.nan if curve is None else _nan(linear_barrier(*curve)),
                "dip": math.nan if curve is None else _nan(path_dip(*curve)),
                "barrier_stored": _number(landscape, "interpolation", "barrier"),
                "update_distance": _number(landscape, "update", "distance"),
                "cosine_to_previous_update": _number(landscape, "update", "cosine_to_previous_update"),
                "alignment_cosine": _entry(round_doc, "client_alignment", client_index, "cosine"),
                "loo_delta_test_loss": _entry(round_doc, "leave_one_out", client_index, "delta_test_loss"),
                "loo_delta_test_accuracy": _entry(round_doc, "leave_one_out", client_index, "delta_test_accuracy"),
            })
            for alpha, loss in zip(*(curve or ([], []))):
                rows["interpolation"].append({**where, "alpha": alpha, "loss": loss})
        for r in data.rounds:
            landscape = r["landscape"] if isinstance(r.get("landscape"), Mapping) else {}
            block = landscape.get("global") or {}
            rows["rounds"].append({
                **key, "round": int(r["round"]), "test_loss": _number(r, "test_loss"),
                "test_accuracy": _number(r, "test_accuracy"), "num_examples": _number(r, "num_examples"),
                "num_participants": len(r.get("participants") or []), "duration_s": _number(r, "duration_s"),
                **{f"landscape_{m}": _number(block, m) for m in SCALARS}, **_eigenvalues(block),
                "gradient_dissimilarity": _number(landscape, "gradient_dissimilarity"),
                **_round_measures(landscape),
            })
    return {name: pd.DataFrame(table_rows) for name, table_rows in rows.items()}


def _round_measures(landscape: Mapping[str, Any]) -> dict[str, float]:
    """Every number at the top of a round's landscape (a measure added there reaches the table by itself)."""
    own = ("num_samples", "duration_s")  # the measurement's own bookkeeping, not a measure of the model
    return {key: _number(landscape, key) for key, value in landscape.items()
            if key not in own and isinstance(value, (int, float)) and not isinstance(value, bool)}


def _nan(value: float | None) -> float:
    return math.nan if value is None else value


def write_tables(tables: Mapping[str, pd.DataFrame], out_dir: Path, file_format: str) -> list[Path]:
    """One file per table (``<name>.csv`` or ``<name>.parquet``); returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, table in tables.items():
        path = out_dir / f"{name}.{file_format}"
        if file_format == "csv":
            table.to_csv(path, index=False)
        elif file_format == "parquet":
            table.to_parquet(path, index=False)
        else:
            raise ValueError(f"format: must be csv or parquet, got {file_format!r}")
        paths.append(path)
    return paths


def write_tensorboard(tables: Mapping[str, pd.DataFrame], out_dir: Path) -> list[Path]:
    """One TensorBoard run per experiment (``<out_dir>/<description>_<id>``), the round as the step."""
    from torch.utils.tensorboard import SummaryWriter

    runs = []
    for _, experiment in tables["experiments"].iterrows():
        experiment_id = experiment["experiment_id"]
        name = re.sub(r"[^A-Za-z0-9._=-]+", "_", f"{experiment['description']}_{experiment_id}").strip("_")
        run_dir = out_dir / name
        with SummaryWriter(log_dir=str(run_dir)) as writer:
            for tag, table, columns in _scalar_sources(tables, experiment_id):
                for _, row in table.iterrows():
                    for column in columns:
                        value = row[column]
                        if pd.api.types.is_number(value) and math.isfinite(float(value)):
                            writer.add_scalar(f"{tag(row)}/{column}", float(value), int(row["round"]))
        runs.append(run_dir)
    return runs


def _scalar_sources(tables: Mapping[str, pd.DataFrame], experiment_id: str) -> list[tuple[Any, pd.DataFrame, list[str]]]:
    def of(name: str) -> pd.DataFrame:
        table = tables[name]
        return table[table["experiment_id"] == experiment_id] if len(table) else table

    def numeric(table: pd.DataFrame, skip: set[str]) -> list[str]:
        return [c for c in table.columns if c not in skip and pd.api.types.is_numeric_dtype(table[c])]

    keys = {"experiment_id", "description", "round", "client_index", "model", "alpha"}
    return [
        (lambda row: "global", of("rounds"), numeric(of("rounds"), keys)),
        (lambda row: f"client_{int(row['client_index'])}/{row['model']}", of("client_metrics"),
         numeric(of("client_metrics"), keys)),
        (lambda row: f"client_{int(row['client_index'])}", of("client_rounds"), numeric(of("client_rounds"), keys)),
    ]


def export_main(experiment_ids: Sequence[str], file_format: str, out_dir: Path, store: StoreSettings) -> int:
    """`python main.py export [ID ...] --format csv|parquet|tensorboard --out DIR`; returns the exit code."""
    try:
        with open_store(store) as db:
            tables = load_tables(db, list(experiment_ids) or None)
    except (FileNotFoundError, ValueError, records.SchemaError) as error:
        print(f"export: {error}", file=sys.stderr)
        return 2
    if file_format == "tensorboard":
        paths = write_tensorboard(tables, out_dir)
        print(f"{len(paths)} TensorBoard runs in {out_dir.resolve()}; view with: tensorboard --logdir {out_dir}")
    else:
        paths = write_tables(tables, out_dir, file_format)
        sizes = ", ".join(f"{p.stem} ({len(tables[p.stem])} rows)" for p in paths)
        print(f"wrote {sizes} to {out_dir.resolve()}")
    return 0
