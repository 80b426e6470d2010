"""`python main.py export`: the tables as CSV/Parquet, TensorBoard runs, and the stored models as safetensors.

    python main.py export [ID ...] --format csv|parquet|tensorboard --out DIR [--models [--members]]

TensorBoard: one run per experiment (``<out>/<description>_<id>``), the round as
the step. The spec's fields are the run's hyperparameters (the hparams
plugin: each run's values, and at the top of the log dir the study's
hyperparameters and its metrics, ``global/test_accuracy`` and ``global/test_loss``),
the spec itself is the text ``spec``. Scalars: ``global/<measure>`` (the
aggregated model), ``round/<measure>`` (the round's other measures); each
per-member measure is a histogram across the round's members,
``members/<model>/<measure>``, and, in federations of at most
`MAX_MEMBER_SCALARS` members, a scalar per member too, ``member_<i>/<model>/<measure>``.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from pymongo.database import Database

from reports.tables import load_tables, open_store, spec_fields, write_tables
from stack import records
from stack.settings import StoreSettings

__all__ = ["MAX_MEMBER_SCALARS", "export_main", "write_models", "write_tensorboard"]

#: Federations up to this many members get a scalar per member; larger ones only the histograms across members.
MAX_MEMBER_SCALARS = 10
#: Indexed measures this short (top eigenvalues, explained variance) get a scalar per element.
MAX_INDEXED_SCALARS = 4
#: The hparams plugin's metrics: each run's scalars of these tags (its last round is the final value).
METRICS = ("global/test_accuracy", "global/test_loss")
#: Times (seconds since the epoch): in the tables, not charted.
TIMES = frozenset(records.RoundRecord.DATES | records.ClientStatsRecord.DATES)


def run_name(description: str, experiment_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", f"{description}_{experiment_id}").strip("_")


def write_tensorboard(tables: Mapping[str, pd.DataFrame], out_dir: Path) -> list[Path]:
    """One TensorBoard run per experiment; returns the run directories."""
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams

    measures = tables["measures"]
    measures = measures[~measures["measure"].isin(TIMES)]
    runs = []
    every_hparam: dict[str, Any] = {}
    for experiment in tables["experiments"].to_dict("records"):
        experiment_id = experiment["experiment_id"]
        run_dir = out_dir / run_name(str(experiment["description"]), experiment_id)
        own = measures[measures["experiment_id"] == experiment_id]
        with SummaryWriter(log_dir=str(run_dir)) as writer:
            spec = json.loads(str(experiment["spec"]))
            writer.add_text("spec", "    " + json.dumps(spec, indent=2, sort_keys=True).replace("\n", "\n    "), 0)
            values = _hparams(experiment, spec)
            _, session_start, session_end = hparams(values, {})  # the metrics are the study's, below
            writer.file_writer.add_summary(session_start)
            writer.file_writer.add_summary(session_end)
            _scalars(writer, own, members=int(experiment["num_clients"]) <= MAX_MEMBER_SCALARS)
        every_hparam = {**values, **every_hparam}
        runs.append(run_dir)
    if runs:  # the study's hparams (the union over its runs) and metrics, once, at the top of the log dir
        with SummaryWriter(log_dir=str(out_dir)) as writer:
            study, _, _ = hparams(every_hparam, dict.fromkeys(METRICS, 0.0))  # names only: values are the runs'
            writer.file_writer.add_summary(study)
    return runs


def _hparams(experiment: Mapping[str, Any], spec: Mapping[str, Any]) -> dict[str, Any]:
    """The spec's scalar fields (nested ones dotted), the group id and the member count: the hparams."""
    fields = {**spec_fields(spec), **{f"landscape.{k}": v for k, v in (spec.get("landscape") or {}).items()}}
    values = {"group_id": experiment["group_id"], "num_clients": int(experiment["num_clients"]), **fields}
    return {key: value for key, value in values.items() if isinstance(value, (bool, int, float, str))}


def _tag(model: Any, measure: str, scope: str) -> str:
    return f"{scope}/{model}/{measure}" if isinstance(model, str) else f"{scope}/{measure}"


def _scalars(writer: Any, own: pd.DataFrame, *, members: bool) -> None:
    import numpy as np

    server = own[own["member"].isna()]
    short = server.groupby(["round", "model", "measure"], dropna=False)["index"].transform("max")
    server = server[server["index"].isna() | (short < MAX_INDEXED_SCALARS).fillna(False)]
    for row in server.to_dict("records"):
        model = row["model"] if isinstance(row["model"], str) else None
        name = row["measure"] if pd.isna(row["index"]) else f"{row['measure']}/{int(row['index'])}"
        writer.add_scalar(f"global/{name}" if model == "global" else _tag(model, name, "round"),
                          row["value"], int(row["round"]))
    per_member = own[own["member"].notna() & own["index"].isna()]
    for (server_round, model, measure), group in per_member.groupby(["round", "model", "measure"], dropna=False):
        writer.add_histogram(_tag(model, str(measure), "members"), np.asarray(group["value"], dtype=np.float64),
                             int(server_round))
    if members:
        for row in per_member.to_dict("records"):
            writer.add_scalar(_tag(row["model"], row["measure"], f"member_{int(row['member'])}"), row["value"],
                              int(row["round"]))


def write_models(db: Database[Any], experiment_ids: Sequence[str], out_dir: Path, *, members: bool = False) -> Path:
    """Each round's global model (round 0: the initial one) and with `members` the members' stored models, as
    safetensors files, with ``manifest.json`` (experiment, round, kind, member, file, sha256, shapes); returns it.
    """
    import gridfs
    from safetensors import safe_open

    out_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    stored = records.read_model_files(db, experiment_ids)
    if members:
        stored += records.read_model_files(db, experiment_ids, members=True)
    buckets = {bucket: gridfs.GridFSBucket(db, bucket_name=bucket) for bucket in (records.MODELS, records.CLIENT_MODELS)}
    for item in stored:
        member = getattr(item.file, "client_index", None)
        kind = "global" if member is None else "member"
        name = f"round_{item.file.round}_global" if member is None else f"round_{item.file.round}_member_{member}"
        path = out_dir / item.file.experiment_id / f"{name}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        bucket = buckets[records.MODELS if member is None else records.CLIENT_MODELS]
        data = bucket.open_download_stream(item.file_id).read()
        path.write_bytes(data)
        with safe_open(str(path), framework="numpy") as tensors:
            shapes = {key: list(tensors.get_slice(key).get_shape()) for key in tensors.keys()}
        entries.append({
            "experiment_id": item.file.experiment_id, "round": item.file.round, "kind": kind, "member": member,
            "file": str(path.relative_to(out_dir)), "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
            "parameters": sum(_count(shape) for shape in shapes.values()), "shapes": shapes,
        })
    manifest = out_dir / "manifest.json"
    manifest.write_text(json.dumps({"models": entries}, indent=2) + "\n", encoding="utf-8")
    return manifest


def _count(shape: Sequence[int]) -> int:
    total = 1
    for size in shape:
        total *= int(size)
    return total


def export_main(experiment_ids: Sequence[str], file_format: str, out_dir: Path, store: StoreSettings, *,
                models: bool = False, members: bool = False) -> int:
    """`python main.py export [ID ...] --format csv|parquet|tensorboard --out DIR [--models [--members]]`."""
    try:
        with open_store(store) as db:
            tables = load_tables(db, list(experiment_ids) or None)
            manifest = write_models(db, list(tables["experiments"]["experiment_id"]), out_dir / "models",
                                    members=members) if models else None
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
    if manifest is not None:
        count = len(json.loads(manifest.read_text(encoding="utf-8"))["models"])
        print(f"wrote {count} models and their manifest to {manifest.resolve()}")
    return 0
