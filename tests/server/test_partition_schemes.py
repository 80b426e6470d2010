"""Partitions by scheme through the server: queueing 100,000 members stores the scheme and one round's members."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import bson

from fedland.datasets import load_dataset
from fedland.participation import selected_members
from fedland.plan import ExperimentPlan
from server.store import Store
from stack import records
from tests.server.conftest import Api


def scheme_spec(partition: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    return {
        "description": "scheme", "partition": partition, "clients_per_round": 10, "rounds": 2, "seed": 7,
        "landscape": {"enabled": False}, **overrides,
    }


def test_queueing_100000_members_stores_the_scheme_and_the_first_round(
    api: Api, store: Store, data_dir: Path
) -> None:
    [experiment_id] = api.submit(scheme_spec({"scheme": "dirichlet", "alpha": 0.5, "members": 100_000, "seed": 1},
                                             member_test_split="none"))
    raw = store.db[records.EXPERIMENTS].find_one({"_id": experiment_id})
    assert raw is not None
    assert len(bson.encode(raw)) < 4_096  # listed, the ratios alone would take about 10 MB
    assert raw["spec"]["partition"] == {"scheme": "dirichlet", "members": 100_000, "seed": 1, "alpha": 0.5}
    experiment = records.read_experiment(store.db, experiment_id)
    assert experiment is not None
    members = records.read_members(store.db, experiment_id)
    assert [m.client_index for m in members] == list(selected_members(experiment.spec, 1))
    plan = ExperimentPlan(experiment.spec, load_dataset("MNIST", data_dir))
    for member in members:
        part = plan.member_partition(member.client_index)
        assert (member.partition_digest, member.num_train, member.num_test) == (part.digest(), 1, 0)
    # a worker is handed one of them, with the digest it checks its own derivation against
    task = api.task(api.register())
    assert task["action"] == "train" and task["experiment_id"] == experiment_id
    assert task["partition_digest"] == plan.member_partition(task["client_index"]).digest()


def test_a_bad_scheme_is_refused_naming_its_field(api: Api, store: Store) -> None:
    before = store.count(records.EXPERIMENTS)
    bad = scheme_spec({"scheme": "iid", "members": 10, "samples_per_member": 6_000})
    response = api.post("/experiments", data=json.dumps([bad]), headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.json()["field"] == "experiments[0].partition.samples_per_member"
    assert "at most 5421" in response.json()["error"]
    assert store.count(records.EXPERIMENTS) == before


def test_members_stored_twice_keep_the_first(store: Store) -> None:
    first = records.MemberRecord(experiment_id="e", client_index=3, num_train=6, partition_digest="a")
    store.add_members([first])
    store.add_members([records.MemberRecord(experiment_id="e", client_index=3, num_train=7, partition_digest="b"),
                       records.MemberRecord(experiment_id="e", client_index=4, num_train=6, partition_digest="c")])
    assert [(m.client_index, m.partition_digest) for m in store.members("e")] == [(3, "a"), (4, "c")]
