"""Large federations named by a partition scheme, end to end: 10,000 MNIST members, 10 per round.

Real nx-27017, `python -m server` and `python -m client` processes, real MNIST.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bson
import pytest

from fedland.datasets import load_dataset
from fedland.participation import selected_members
from fedland.plan import ExperimentPlan
from reports import write_reports
from reports.tables import load_tables
from stack import records
from tests.helpers import LocalStack, finite

pytestmark = pytest.mark.slow


def scheme_federation(partition: dict[str, Any], rounds: int, **overrides: Any) -> dict[str, Any]:
    return {
        "description": f"{partition['members']} members by {partition['scheme']}",
        "partition": partition,
        "clients_per_round": 10,
        "rounds": rounds,
        "learning_rate": 0.05,
        "landscape": {"enabled": False},
        "seed": 5,
        **overrides,
    }


def test_ten_thousand_members_ten_per_round(
    local_stack: Callable[..., LocalStack], data_dir: Path, tmp_path: Path
) -> None:
    stack = local_stack()
    large, untested = stack.api.submit_experiments([
        scheme_federation({"scheme": "dirichlet", "alpha": 0.5, "members": 10_000, "seed": 1}, rounds=2),
        scheme_federation({"scheme": "shards", "classes_per_member": 2, "members": 500, "seed": 2}, rounds=1,
                          member_test_split="none"),
    ])
    # queued: the document holds the scheme, the members stored are the first round's only
    raw = stack.db[records.EXPERIMENTS].find_one({"_id": large})
    assert raw is not None and len(bson.encode(raw)) < 4_096
    assert stack.db[records.MEMBERS].count_documents({"experiment_id": large}) == 10
    stack.add_clients(2)
    plans = {}
    for experiment_id in (large, untested):
        experiment = stack.wait_done(experiment_id, timeout_s=180)
        assert experiment.status == "finished", (experiment.error, stack.logs())
        plans[experiment_id] = ExperimentPlan(experiment.spec, load_dataset("MNIST", data_dir))
    spec = plans[large].spec
    selected = {r: selected_members(spec, r) for r in (1, 2)}
    rounds = records.read_rounds(stack.db, large)
    assert [r.round for r in rounds] == [1, 2]
    for round_record in rounds:
        assert list(round_record.participants) == list(selected[round_record.round])
        assert round_record.num_examples == 60  # 10 members of floor(60000 / 10000) samples
        assert finite(round_record.test_loss)
    # the server's members are the workers' and the test's: one derivation
    members = records.read_members(stack.db, large)
    assert sorted(m.client_index for m in members) == sorted({*selected[1], *selected[2]})
    for member in members:
        part = plans[large].member_partition(member.client_index)
        assert member.partition_digest == part.digest()
        assert (member.num_train, member.num_test) == (6, part.num_test) and part.num_test >= 1
        assert member.reported_round == max(r for r in selected if member.client_index in selected[r])
    stats = records.read_client_stats(stack.db, large)
    assert all(finite(s.stats["local"]["test_accuracy"]) for s in stats)

    # no local test set: the test metrics are absent, never 0
    untested_stats = records.read_client_stats(stack.db, untested)
    assert len(untested_stats) == 10
    for s in untested_stats:
        for model in ("global", "local"):
            assert set(s.stats[model]) == {"train_loss", "train_accuracy"}
    tables = load_tables(stack.db, [large, untested])
    metrics = tables["client_metrics"]
    rows = metrics[metrics["experiment_id"] == untested]
    assert len(rows) == 20 and rows["test_loss"].isna().all() and rows["train_loss"].notna().all()
    partition = tables["partition"]
    shard_rows = partition[partition["experiment_id"] == untested]
    assert len(shard_rows) == 10 and shard_rows["subset_fraction"].isna().all()
    for _, row in shard_rows.iterrows():
        targets = [row[f"target_ratio_{k}"] for k in range(10)]
        assert sorted(targets)[-2:] == [0.5, 0.5] and math.isclose(sum(targets), 1.0)
        assert row["num_test"] == 0

    # the report page: a dash where a member has no local test metric, the members stored in its partition table
    write_reports(stack.db, [large, untested], tmp_path / "reports")
    page = (tmp_path / "reports" / untested / "index.html").read_text(encoding="utf-8")
    assert page.count("<td>—</td><td>—</td><td>—</td><td>—</td>") == 10  # global and local test accuracy, loss
    assert page.count("<td>0</td><td>0.800</td>") == 10  # num_test 0, two classes of ten: Gini 0.8
    assert "10000 clients" in (tmp_path / "reports" / large / "index.html").read_text(encoding="utf-8")
