"""Stored results as tidy pandas tables, for notebooks and `python main.py export`.

    from reports.tables import load_tables, open_store
    with open_store() as db:                  # FEDLAND_MONGO_URI, else the embedded store in ./data/store
        tables = load_tables(db)              # every experiment; or load_tables(db, ["65a1..."])
    tables["measures"]                        # every stored number, one row each

Every table opens on ``experiment_id`` and ``group_id`` (`group_id`:
`fedland.replicates.replicate_group`, the spec's fingerprint with the seed and
replicate index set aside, first 16 hex digits: the replicates of one study
across seeds share it; ``replicate`` is a queued group's replicate index, else
numbers those exported together 0, 1, ... by creation). Values as stored; absent or null values are NaN.

- ``experiments``: experiment: status, times (seconds since the epoch), the spec's
  fields (nested ones dotted: ``strategy.name``, ``strategy.params.mu``), the whole spec
  as JSON (``spec``).
- ``partition``: experiment x member: ``subset_fraction``, ``target_ratio_<k>``,
  ``num_train``, ``num_test``, ``gini_index``, ``partition_digest``, ``train_class_<k>``,
  ``test_class_<k>``, ``class_frequency_<k>``. With a partition scheme (spec field
  ``partition``) a member is stored once it is first selected, so only those members have
  rows; their ``target_ratio_<k>`` is the scheme's class mix and ``subset_fraction`` is NaN.
- ``landscape_settings``: experiment: the spec's landscape section, every field (``budget`` too).
- ``measures``: experiment x round x member x model x measure (x index): every number of
  the ``rounds``, ``client_stats`` and ``landscapes`` documents (``reports.measures`` says how
  a document is named; ``source`` is the collection, or the landscape's kind).
- ``arrays``: the nested arrays of those documents (a surface's ``losses`` (y, x), a
  pairwise barrier matrix (member, member) indexed like ``client_indices``, its paths
  (member, member, alpha)), one row per element, positions in ``axis_0``, ``axis_1``, ...
- ``rounds``, ``client_metrics``, ``client_rounds``, ``interpolation``: the usual measures
  side by side (wide, with the ``description``), for plotting.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from pymongo.database import Database

from fedland.partition_scheme import member_class_weights
from fedland.replicates import replicate_group
from fedland.spec import ExperimentSpec
from reports.data import interpolation_curve, linear_barrier, path_dip, value_at
from reports.measures import ArrayElement, Measure, flatten
from stack import records
from stack.embedded import open_database as open_store  # the results database (URI, else the embedded store)

__all__ = ["TABLES", "group_id", "load_tables", "open_store", "spec_fields", "write_tables"]

TABLES = ("experiments", "partition", "landscape_settings", "measures", "arrays",
          "rounds", "client_metrics", "client_rounds", "interpolation")
SCALARS = ("loss", "accuracy", "grad_norm", "trace", "trace_stderr", "sharpness")
EVALUATION = ("train_loss", "train_accuracy", "test_loss", "test_accuracy")
#: A round's (or round 0's stored evaluation's) own numbers: of the global model, on the full test split.
ROUND_GLOBAL = ("test_loss", "test_accuracy")
#: Spec fields with a table of their own (`partition`, `landscape_settings`) or a column already.
SPEC_ELSEWHERE = ("id", "description", "target_balance_ratios", "subset_fractions", "landscape")
KEYS = ("experiment_id", "group_id")


def group_id(spec: Any) -> str:
    """The replicate group of an experiment: its spec's fingerprint with the seed set aside (16 hex digits)."""
    return replicate_group(spec)


def spec_fields(spec: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A spec's fields (`SPEC_ELSEWHERE` aside) as flat columns, nested ones dotted; lists as text."""
    columns: dict[str, Any] = {}
    for key, value in spec.items():
        if not prefix and key in SPEC_ELSEWHERE:
            continue
        if isinstance(value, Mapping):
            columns.update(spec_fields(value, f"{prefix}{key}."))
        else:
            columns[f"{prefix}{key}"] = str(value) if isinstance(value, (list, tuple)) else value
    return columns


def load_tables(db: Database[Any], experiment_ids: Sequence[str] | None = None) -> dict[str, pd.DataFrame]:
    """The tables above for the given experiments (every experiment in the store when None).

    Reads the store with one query per collection (`records.read_study`); raises
    ValueError naming an id the store lacks, `records.SchemaError` for a store of another schema.
    """
    records.check_schema(db)
    ids = records.experiment_ids(db) if experiment_ids is None else list(experiment_ids)
    study = records.read_study(db, ids)
    groups = {e.id: group_id(e.spec) for e in study.experiments}
    keys = {experiment_id: {"experiment_id": experiment_id, "group_id": groups[experiment_id]} for experiment_id in ids}
    tables = {
        "experiments": _experiments(study, groups),
        "partition": _partition(study, keys),
        "landscape_settings": pd.DataFrame([{**keys[e.id], **dataclasses.asdict(e.spec.landscape)}  # budget too
                                            for e in study.experiments]),
        **_long(study, keys),
        **_wide(study, {e.id: {**keys[e.id], "description": e.spec.description} for e in study.experiments}),
    }
    return {name: tables[name] for name in TABLES}


def _experiments(study: records.StudyRecords, groups: Mapping[str, str]) -> pd.DataFrame:
    aggregated: dict[str, int] = {}
    for r in study.rounds:
        aggregated[r.experiment_id] = aggregated.get(r.experiment_id, 0) + int(r.round > 0)
    seen: dict[str, int] = {}
    rows = []
    for e in sorted(study.experiments, key=lambda e: (e.created_at, e.id)):
        by_creation = seen[groups[e.id]] = seen.get(groups[e.id], -1) + 1
        replicate = by_creation if e.spec.replicate is None else e.spec.replicate  # a queued group's own index
        rows.append({
            "experiment_id": e.id, "group_id": groups[e.id], "replicate": replicate,
            "description": e.spec.description, "status": e.status, "error": e.error,
            "current_round": e.current_round, "rounds_aggregated": aggregated.get(e.id, 0),
            "num_clients": e.spec.num_clients, "created_at": e.created_at,
            "started_at": e.started_at, "finished_at": e.finished_at, **spec_fields(e.spec.to_dict()),
            "spec": json.dumps(e.spec.to_dict(), sort_keys=True),
        })
    order = {e.id: k for k, e in enumerate(study.experiments)}
    return pd.DataFrame(sorted(rows, key=lambda row: order[row["experiment_id"]]))


def _partition(study: records.StudyRecords, keys: Mapping[str, Mapping[str, str]]) -> pd.DataFrame:
    specs = {e.id: e.spec for e in study.experiments}
    rows = []
    for m in study.members:
        spec = specs[m.experiment_id]
        ratios, fraction = _member_target(spec, m.client_index)
        rows.append({
            **keys[m.experiment_id], "member": m.client_index, "subset_fraction": fraction,
            **{f"target_ratio_{k}": ratio for k, ratio in enumerate(ratios)},
            "num_train": m.num_train, "num_test": m.num_test, "gini_index": m.gini_index,
            "partition_digest": m.partition_digest,
            **{f"train_class_{k}": n for k, n in enumerate(m.class_counts)},
            **{f"test_class_{k}": n for k, n in enumerate(m.test_class_counts)},
            **{f"class_frequency_{k}": f for k, f in enumerate(m.class_frequencies)},
        })
    return pd.DataFrame(rows)


def documents(study: records.StudyRecords) -> Iterable[tuple[str, int, str, int | None, Mapping[str, Any]]]:
    """Each stored document with numbers: (experiment_id, round, source, member, fields without identity)."""
    for r in study.rounds:
        tree = r.tree()
        yield r.experiment_id, r.round, records.ROUNDS, None, {k: v for k, v in tree.items()
                                                               if k not in ("experiment_id", "round")}
    for s in study.client_stats:
        tree = s.tree()
        yield s.experiment_id, s.round, records.CLIENT_STATS, s.client_index, {
            k: v for k, v in tree.items() if k not in ("experiment_id", "round", "client_index")}
    for landscape in study.landscapes:
        yield landscape.experiment_id, landscape.round, landscape.kind, None, landscape.content


def _long(study: records.StudyRecords, keys: Mapping[str, Mapping[str, str]]) -> dict[str, pd.DataFrame]:
    measures: dict[str, list[Any]] = {name: [] for name in (
        "experiment_id", "group_id", "round", "member", "model", "source", "measure", "index", "value")}
    arrays: list[dict[str, Any]] = []
    for experiment_id, server_round, source, member, doc in documents(study):
        prefix = "" if source in (records.ROUNDS, records.CLIENT_STATS) else source
        own_evaluation: set[str] = set() if source == records.CLIENT_STATS else {
            f"{prefix}.{field}" if prefix else field for field in ROUND_GLOBAL}
        for item in flatten(doc, prefix=prefix, member=member):
            if isinstance(item, Measure):
                model = item.model
                if model is None and item.member is None and item.measure in own_evaluation:
                    model = "global"
                for name, value in zip(measures, (experiment_id, keys[experiment_id]["group_id"], server_round,
                                                  item.member, model, source, item.measure, item.index, item.value)):
                    measures[name].append(value)
            elif isinstance(item, ArrayElement):
                arrays.append({**keys[experiment_id], "round": server_round, "model": item.model, "source": source,
                               "measure": item.measure, **{f"axis_{k}": p for k, p in enumerate(item.position)},
                               "value": item.value})
    long = pd.DataFrame(measures)
    for column in ("member", "index"):
        long[column] = long[column].astype("Int64")
    long["value"] = long["value"].astype("float64")
    wide_arrays = pd.DataFrame(arrays, columns=None if arrays else [
        *KEYS, "round", "model", "source", "measure", "axis_0", "axis_1", "value"])
    for column in [c for c in wide_arrays.columns if c.startswith("axis_")]:
        wide_arrays[column] = wide_arrays[column].astype("Int64")
    return {"measures": long, "arrays": wide_arrays}


def _member_target(spec: ExperimentSpec, client_index: int) -> tuple[Sequence[float], float]:
    """A member's target class ratios and subset fraction (a scheme's member has no fraction: NaN)."""
    if not 0 <= client_index < spec.num_clients:
        return (), math.nan
    if spec.partition is not None:
        weights = member_class_weights(spec.partition, spec.dataset, client_index)
        return [float(w) for w in weights], math.nan
    return spec.target_balance_ratios[client_index], spec.subset_fractions[client_index]


def _number(doc: Any, *path: str | int) -> float:
    value = value_at(doc, path)
    return math.nan if value is None else value


def _eigenvalues(block: Any, prefix: str = "top_eigenvalue") -> dict[str, float]:
    values = block.get("top_eigenvalues") if isinstance(block, Mapping) else None
    return {f"{prefix}_{k + 1}": _number(values, k) for k in range(len(values))} if isinstance(values, list) else {}


def _entry(landscape: Mapping[str, Any], key: str, client_index: int, field: str) -> float:
    for entry in landscape.get(key) or []:
        if isinstance(entry, Mapping) and entry.get("client_index") == client_index:
            return _number(entry, field)
    return math.nan


def _wide(study: records.StudyRecords, keys: Mapping[str, Mapping[str, str]]) -> dict[str, pd.DataFrame]:
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in
                                              ("rounds", "client_metrics", "client_rounds", "interpolation")}
    round_landscapes = {(r.experiment_id, r.round): r.landscape or {} for r in study.rounds}
    for s in study.client_stats:
        doc = s.tree()
        where: dict[str, Any] = {**keys[s.experiment_id], "round": s.round, "client_index": s.client_index}
        landscape = doc["landscape"] if isinstance(doc.get("landscape"), Mapping) else {}
        for model in ("global", "local"):
            block = landscape.get(model) or {}
            rows["client_metrics"].append({
                **where, "model": model, **{m: _number(doc, model, m) for m in EVALUATION},
                **{f"landscape_{m}": _number(block, m) for m in SCALARS}, **_eigenvalues(block),
            })
        curve = interpolation_curve(doc)
        round_landscape = round_landscapes.get((s.experiment_id, s.round), {})
        rows["client_rounds"].append({
            **where, "num_examples": s.num_examples, "duration_total_s": _number(doc, "duration_s", "total"),
            "barrier": math.nan if curve is None else _nan(linear_barrier(*curve)),
            "dip": math.nan if curve is None else _nan(path_dip(*curve)),
            "barrier_stored": _number(landscape, "interpolation", "barrier"),
            "update_distance": _number(landscape, "update", "distance"),
            "cosine_to_previous_update": _number(landscape, "update", "cosine_to_previous_update"),
            "alignment_cosine": _entry(round_landscape, "client_alignment", s.client_index, "cosine"),
            "loo_delta_test_loss": _entry(round_landscape, "leave_one_out", s.client_index, "delta_test_loss"),
            "loo_delta_test_accuracy": _entry(round_landscape, "leave_one_out", s.client_index,
                                              "delta_test_accuracy"),
        })
        for alpha, loss in zip(*(curve or ([], []))):
            rows["interpolation"].append({**where, "alpha": alpha, "loss": loss})
    for r in study.rounds:
        landscape = r.landscape if isinstance(r.landscape, Mapping) else {}
        block = landscape.get("global") or {}
        rows["rounds"].append({
            **keys[r.experiment_id], "round": r.round, "test_loss": r.test_loss, "test_accuracy": r.test_accuracy,
            "num_examples": r.num_examples, "num_participants": len(r.participants), "duration_s": r.duration_s,
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
    if file_format not in ("csv", "parquet"):
        raise ValueError(f"format: must be csv or parquet, got {file_format!r}")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, table in tables.items():
        path = out_dir / f"{name}.{file_format}"
        if file_format == "csv":
            table.to_csv(path, index=False)
        else:
            table.to_parquet(path, index=False)
        paths.append(path)
    return paths
