"""Landscape measurements in the running stack: documents, values against fedland, reports, failures.

A 2-client and a 1-client experiment (2 rounds each, an MNIST subset) run on real
`python -m server` / `python -m client` processes; the stored documents are
checked against DEVELOPERS.md and recomputed from the stored models and data.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from bson import ObjectId

from client.work import run_round
from fedland.datasets import load_dataset
from fedland.device import resolve_device
from fedland.hessian import top_eigenvalues
from fedland.measure import EIGEN_MAX_ITER, EIGEN_TOL, landscape_subset, mean_loss, member_densities
from fedland.models import build_model
from fedland.partition import partition
from fedland.plan import ClientData, ExperimentPlan
from fedland.scalars import gradient_dissimilarity
from fedland.slices import interpolate
from fedland.spec import ExperimentSpec, LandscapeSpec
from fedland.strategies import ClientUpdate, make_strategy, weighted_mean
from reports import write_reports
from reports.catalog import EXPERIMENT_FIGURES
from reports.compare import COMPARISONS
from server.landscape import AggregatedRound, leave_one_out, measure_round
from server.resources import Resources
from server.store import Store
from stack import records, wire
from tests.helpers import LocalStack, assert_complete, finite, small_spec

pytestmark = pytest.mark.slow
torch.set_num_threads(1)  # as the client and server processes (FEDLAND_TORCH_THREADS=1)

LSPEC = LandscapeSpec(every=1, num_samples=128, top_k=2, trace_probes=8, interpolation_points=5, grid_points=5)
METRIC_KEYS = {"loss", "accuracy", "grad_norm", "top_eigenvalues", "trace", "trace_stderr", "sharpness"}
GENERALIZATION_KEYS = {"pac_bayes", "pac_bayes_magnitude", "norms"}


def assert_metrics(block: dict[str, Any], top_k: int) -> None:
    assert set(block) == METRIC_KEYS | {"generalization", "top_eigenvalues_converged"}
    assert isinstance(block["top_eigenvalues_converged"], bool)
    assert set(block["generalization"]) == GENERALIZATION_KEYS
    for key in ("pac_bayes", "pac_bayes_magnitude"):
        pac_bayes = block["generalization"][key]
        if pac_bayes["saturated"]:  # a model near chance: no number stands for it
            assert all(value is None for name, value in pac_bayes.items() if name != "saturated")
        else:
            assert all(finite(pac_bayes[k]) for k in ("sigma", "sigma_low", "flatness", "bound", "deviation"))
            assert pac_bayes["sigma_low"] <= pac_bayes["sigma"] <= (pac_bayes["sigma_high"] or math.inf)
    norms = block["generalization"]["norms"]
    assert all(finite(norms[k]) for k in ("frobenius_sum", "spectral_sum", "log_frobenius_product"))
    assert all(finite(layer["spectral"]) and layer["spectral"] <= layer["frobenius"] + 1e-9 for layer in norms["layers"])
    assert len(block["top_eigenvalues"]) == top_k
    assert all(finite(v) for v in block["top_eigenvalues"]), block
    assert all(finite(block[k]) for k in METRIC_KEYS - {"top_eigenvalues"}), block
    assert block["top_eigenvalues"][0] >= block["top_eigenvalues"][1] and 0 <= block["accuracy"] <= 1


#: FEDLAND_DEVICE=cuda runs these tests on a GPU unchanged: the child processes inherit it, and the
#: direct recomputations here run on the same device.
DEVICE = resolve_device(os.environ.get("FEDLAND_DEVICE", "").strip() or "cpu")


def model_from(payload: bytes, spec: ExperimentSpec) -> torch.nn.Module:
    model = build_model(spec.model, spec.seed)
    model.load_state_dict(wire.to_state_dict(wire.decode(payload)))
    return model.to(DEVICE)


def client_subsets(spec: ExperimentSpec, data_dir: Path) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Each client's landscape subset, recomputed here from the spec and MNIST (the rule of DEVELOPERS.md)."""
    mnist = load_dataset(spec.dataset_name, data_dir)
    parts = partition(mnist.train_y, mnist.test_y, spec.target_balance_ratios, spec.subset_fractions, spec.seed)
    out = []
    for index, part in enumerate(parts):
        subset = landscape_subset(part.num_train, LSPEC.subset_size, (spec.seed, index))
        chosen = torch.from_numpy(part.train_indices[subset])
        out.append([(mnist.train_x[chosen], mnist.train_y[chosen])])
    return out


def check_documents(stack: LocalStack, store: Store, experiment_id: str, spec: ExperimentSpec, data_dir: Path) -> None:
    num_clients = spec.num_clients
    subsets = client_subsets(spec, data_dir)
    reports = {(s.round, s.client_index): s for s in records.read_client_stats(stack.db, experiment_id)}
    for stats in reports.values():
        doc = stats.stats["landscape"]
        last_round = {"densities"} if stats.round == spec.rounds else set()  # the analysis' member densities
        assert set(doc) == {"num_samples", "duration_s", "global", "local", "interpolation", "update"} | last_round, doc
        assert doc["num_samples"] == LSPEC.num_samples and doc["duration_s"] > 0
        assert_metrics(doc["global"], LSPEC.top_k)
        assert_metrics(doc["local"], LSPEC.top_k)
        path = doc["interpolation"]
        assert path["alphas"] == pytest.approx(np.linspace(0, 1, LSPEC.interpolation_points).tolist())
        assert len(path["losses"]) == LSPEC.interpolation_points and all(finite(v) for v in path["losses"])
        assert path["losses"][0] == pytest.approx(doc["global"]["loss"], rel=1e-5)
        assert path["losses"][-1] == pytest.approx(doc["local"]["loss"], rel=1e-5)
        assert finite(path["barrier"]) and finite(doc["update"]["distance"]) and doc["update"]["distance"] > 0
        cosine = doc["update"]["cosine_to_previous_update"]
        before = reports.get((stats.round - 1, stats.client_index))
        # the worker remembers the model a member trained from only if it trained that member the round before
        same_worker = before is not None and before.worker_id == stats.worker_id
        assert cosine is None if not same_worker else (finite(cosine) and -1 <= cosine <= 1)

    # the stack's numbers are fedland's on the stored model and the recomputed subset
    stats = reports[(2, 0)]
    assert stats.weights_file_id is not None
    local = model_from(store.load_client_model(stats.weights_file_id), spec)
    eigen = top_eigenvalues(
        local, F.cross_entropy, subsets[0], k=LSPEC.top_k, tol=EIGEN_TOL, max_iter=EIGEN_MAX_ITER,
        seed=int(np.random.SeedSequence([spec.seed, 0, 2]).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1)),
    )
    assert stats.stats["landscape"]["local"]["top_eigenvalues"] == pytest.approx(eigen.values.tolist(), rel=1e-6)
    expected_loss, _ = mean_loss(local, F.cross_entropy, subsets[0])
    assert stats.stats["landscape"]["local"]["loss"] == pytest.approx(expected_loss, rel=1e-6)

    for round_record in records.read_rounds(stack.db, experiment_id):
        assert round_record.landscape is not None
        doc = round_record.landscape
        pairwise = {"pairwise_barriers_id", "flatness_gap"} if num_clients >= 2 else {"flatness_gap"}
        assert set(doc) == {
            "num_samples", "duration_s", "global", "client_alignment", "gradient_dissimilarity", "leave_one_out",
            "surface_id", "generalization_gap", *pairwise,
        }, doc
        assert all(finite(v) for v in doc["generalization_gap"].values()), doc
        assert doc["num_samples"] == LSPEC.num_samples and doc["duration_s"] > 0
        assert_metrics(doc["global"], LSPEC.top_k)
        assert [a["client_index"] for a in doc["client_alignment"]] == list(range(num_clients))
        assert all(finite(a["cosine"]) and -1 <= a["cosine"] <= 1 + 1e-9 for a in doc["client_alignment"])
        assert finite(doc["gradient_dissimilarity"]) and doc["gradient_dissimilarity"] >= 1 - 1e-9
        assert [e["client_index"] for e in doc["leave_one_out"]] == list(range(num_clients))
        for entry in doc["leave_one_out"]:
            values = (entry["delta_test_loss"], entry["delta_test_accuracy"])
            assert values == (None, None) if num_clients == 1 else all(finite(v) for v in values), entry
        surface = stack.db[records.LANDSCAPES].find_one({"_id": ObjectId(doc["surface_id"])})
        assert surface is not None
        key = (surface["experiment_id"], surface["round"], surface["kind"])
        assert key == (experiment_id, round_record.round, "pca_surface")
        assert len(surface["x"]) == len(surface["y"]) == LSPEC.grid_points
        losses = np.array(surface["losses"], dtype=np.float64)
        assert losses.shape == (LSPEC.grid_points, LSPEC.grid_points) and np.isfinite(losses).all()
        ratio = surface["explained_variance_ratio"]
        assert len(ratio) == 2 and all(finite(v) for v in ratio) and 0 < sum(ratio) <= 1 + 1e-9
        assert [p["client_index"] for p in surface["client_points"]] == list(range(num_clients))
        assert all(finite(p["x"]) and finite(p["y"]) for p in surface["client_points"])
        assert surface["second_direction"] == ("random" if num_clients == 1 else "principal")

        # the server's global metrics and B, recomputed from the stored model and the recomputed subsets
        global_model = model_from(store.load_model(round_record.model_file_id), spec)
        mnist = load_dataset(spec.dataset_name, data_dir)
        held = torch.from_numpy(landscape_subset(int(mnist.test_y.shape[0]), LSPEC.subset_size, (spec.seed, 2**32)))
        expected_loss, _ = mean_loss(global_model, F.cross_entropy, [(mnist.test_x[held], mnist.test_y[held])])
        assert doc["global"]["loss"] == pytest.approx(expected_loss, rel=1e-6)
        assert losses[LSPEC.grid_points // 2, LSPEC.grid_points // 2] == pytest.approx(expected_loss, rel=1e-6)
        expected_b = gradient_dissimilarity(global_model, F.cross_entropy, subsets)
        assert doc["gradient_dissimilarity"] == pytest.approx(expected_b, rel=1e-6)
        # pairwise barriers and the flatness gap, from the stored client models
        round_reports = sorted(
            (s for s in reports.values() if s.round == round_record.round), key=lambda s: s.client_index
        )
        assert all(s.weights_file_id is not None for s in round_reports)
        locals_ = [model_from(store.load_client_model(str(s.weights_file_id)), spec) for s in round_reports]
        if num_clients >= 2:
            held_out = [(mnist.test_x[held], mnist.test_y[held])]
            pairwise_doc = stack.db[records.LANDSCAPES].find_one({"_id": ObjectId(doc["pairwise_barriers_id"])})
            assert pairwise_doc is not None
            key = (pairwise_doc["experiment_id"], pairwise_doc["round"], pairwise_doc["kind"])
            assert key == (experiment_id, round_record.round, "pairwise_barriers")
            assert pairwise_doc["client_indices"] == list(range(num_clients))
            path = interpolate(locals_[0], locals_[1], F.cross_entropy, held_out, np.asarray(pairwise_doc["alphas"]))
            assert pairwise_doc["barriers"][0][1] == pairwise_doc["barriers"][1][0]
            assert pairwise_doc["barriers"][0][1] == pytest.approx(path.barrier, rel=1e-5, abs=1e-7)
            assert pairwise_doc["losses"][0][1] == pytest.approx(path.losses.tolist(), rel=1e-5)
            assert pairwise_doc["barriers"][0][0] == 0.0
        gap = doc["flatness_gap"]
        assert gap["client_indices"] == list(range(num_clients)) and gap["curvature"] == "hessian"
        seed = ExperimentPlan(spec, mnist).server_measurement_seed(round_record.round)
        last = num_clients - 1
        local_top = top_eigenvalues(locals_[last], F.cross_entropy, subsets[last], k=1, tol=EIGEN_TOL,
                                    max_iter=EIGEN_MAX_ITER, seed=seed).values[0]
        assert gap["local"][last] == pytest.approx(local_top, rel=1e-6)
        assert gap["gaps"] == pytest.approx([v - gap["global"] for v in gap["local"]], rel=1e-9)
        assert gap["mean_gap"] == pytest.approx(float(np.mean(gap["gaps"])), rel=1e-9)  # equal subset sizes


def test_landscapes_in_the_running_stack(
    local_stack: Callable[..., LocalStack], data_dir: Path, tmp_path: Path
) -> None:
    stack = local_stack()
    store = Store.from_database(stack.db)
    specs = [small_spec(2, rounds=2, landscape=LSPEC), small_spec(1, rounds=2, fraction=0.02, landscape=LSPEC)]
    ids = stack.api.submit_experiments(specs)
    stack.add_clients(3)
    for experiment_id, spec in zip(ids, specs):
        stack.wait_done(experiment_id)
        parsed = ExperimentSpec.from_dict(spec)
        assert_complete(stack, experiment_id, num_clients=parsed.num_clients, rounds=2)
        check_documents(stack, store, experiment_id, parsed, data_dir)
        check_analysis(store, experiment_id, parsed, data_dir)

    index = write_reports(stack.db, ids, tmp_path / "reports", data_dir=data_dir)  # the models on real MNIST
    pages = [index.parent / experiment_id / "index.html" for experiment_id in ids]
    for page in pages:
        html = page.read_text(encoding="utf-8")
        assert "Skipped" not in html, html
        for kind in EXPERIMENT_FIGURES:
            assert (page.parent / kind.file_name).stat().st_size > 0 and f'src="{kind.file_name}"' in html
    html = index.read_text(encoding="utf-8")
    assert "Skipped" not in html
    for chart in COMPARISONS:
        assert (index.parent / "comparison" / chart.file_name).is_file() and f"comparison/{chart.file_name}" in html


def check_analysis(store: Store, experiment_id: str, spec: ExperimentSpec, data_dir: Path) -> None:
    """The analysis the server stored before "finished": round 0 as every round's evaluation, the trajectory, densities."""
    analysis = records.read_analysis(store.db, experiment_id)
    initial_id = store.global_model_id(experiment_id, 0)
    assert analysis.initial_evaluation is not None and initial_id is not None
    evaluation = Resources(data_dir).evaluate(spec, wire.decode(store.load_model(initial_id)))
    assert (analysis.initial_evaluation.test_loss, analysis.initial_evaluation.test_accuracy) == pytest.approx(
        (evaluation.loss, evaluation.accuracy), rel=1e-6)
    assert analysis.trajectory is not None and analysis.trajectory.rounds == tuple(range(spec.rounds + 1))
    assert analysis.spectral_densities is not None and analysis.spectral_densities.round == spec.rounds
    curves = [(c.model, -1 if c.client_index is None else c.client_index) for c in analysis.spectral_densities.curves]
    assert sorted(curves) == sorted([("global", -1)] + [(m, i) for i in range(spec.num_clients) for m in ("global", "local")])
    # the members' curves were measured by their workers in the last round: the same as from the stored models
    plan = Resources(data_dir).plan(spec)
    received_id = store.global_model_id(experiment_id, spec.rounds - 1)
    assert received_id is not None
    received = plan.model(wire.decode(store.load_model(received_id))).eval()
    for stats in store.stats_of_round(experiment_id, spec.rounds):
        assert set(stats.stats["landscape"]["densities"]) == {"global", "local"}
        local = plan.model(wire.decode(store.load_client_model(str(stats.weights_file_id)))).eval()
        expected = member_densities(received, local, plan.landscape_batch(stats.client_index), spec.seed)
        for curve in analysis.spectral_densities.curves:
            if curve.client_index == stats.client_index:
                np.testing.assert_allclose(curve.grid, expected[curve.model]["grid"], rtol=1e-5, atol=1e-7)
                np.testing.assert_allclose(curve.density, expected[curve.model]["density"], rtol=1e-4, atol=1e-7)


def _weights(seed: int) -> dict[str, np.ndarray]:
    return wire.from_module(build_model("FedNet", seed))


def test_leave_one_out_of_identical_clients_is_zero(data_dir: Path) -> None:
    resources = Resources(data_dir)
    spec = ExperimentSpec.from_dict(small_spec(3, rounds=1))
    previous = _weights(0)
    strategy = make_strategy(spec.strategy)

    def evaluate(weights: dict[str, np.ndarray]) -> tuple[float, float]:
        evaluation = resources.evaluate(spec, weights)
        return evaluation.loss, evaluation.accuracy

    def loo(updates: list[ClientUpdate]) -> list[dict[str, Any]]:
        full = evaluate(strategy.aggregate(previous, updates, {})[0])
        return leave_one_out(lambda rest: strategy.aggregate(previous, rest, {})[0], updates, [0, 1, 2], evaluate, full)

    same = [ClientUpdate(_weights(1), 100) for _ in range(3)]
    assert loo(same) == [{"client_index": i, "delta_test_loss": 0.0, "delta_test_accuracy": 0.0} for i in range(3)]

    distinct = [ClientUpdate(_weights(1 + i), 100 * (i + 1)) for i in range(3)]
    full = evaluate(strategy.aggregate(previous, distinct, {})[0])
    without_1 = evaluate({k: v.astype(np.float32) for k, v in weighted_mean([distinct[0], distinct[2]]).items()})
    assert loo(distinct)[1] == {
        "client_index": 1, "delta_test_loss": without_1[0] - full[0], "delta_test_accuracy": without_1[1] - full[1],
    }
    single = leave_one_out(lambda rest: previous, distinct[:1], [4], evaluate, full)
    assert single == [{"client_index": 4, "delta_test_loss": None, "delta_test_accuracy": None}]


def test_a_failing_measurement_is_stored_as_an_error(
    store: Store, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise FloatingPointError("injected failure")

    # The measurement's own maths fails; the round must go on and store the error.
    monkeypatch.setattr("server.landscape.measure_model", broken)
    monkeypatch.setattr("client.work.measure_client_round", broken)
    spec = ExperimentSpec.from_dict(small_spec(1, rounds=1, fraction=0.01, landscape=LandscapeSpec(every=1)))
    previous = _weights(0)
    updates = [ClientUpdate(_weights(1), 600)]
    aggregated = AggregatedRound(spec, "exp", 1, previous, {}, updates, [0], _weights(1), (1.0, 0.5))
    doc = measure_round(store, Resources(data_dir, device=str(DEVICE)), aggregated)
    assert doc == {"error": "FloatingPointError: injected failure"}

    mnist = load_dataset("MNIST", data_dir)
    data = ClientData(
        0, mnist.train_x.subset(range(64)), mnist.train_y[:64], mnist.test_x.subset(range(32)), mnist.test_y[:32]
    )
    global_model = build_model("FedNet", 0)
    before = copy.deepcopy(global_model.state_dict())
    result = run_round(ExperimentPlan(spec, mnist), data, global_model, 1, fetch_s=0.0, device=DEVICE)
    assert result.stats["landscape"] == doc
    assert all(torch.equal(before[k], v) for k, v in global_model.state_dict().items())
    assert math.isfinite(result.stats["local"]["test_loss"])  # the round itself went on


def test_without_the_members_pac_bayes_the_worker_leaves_it_out_and_the_server_measures_the_global_model(
    store: Store, data_dir: Path
) -> None:
    lean = LandscapeSpec(every=1, num_samples=32, top_k=1, trace_probes=4, interpolation_points=3, grid_points=3,
                         pac_bayes_samples=4, pac_bayes_steps=4, member_pac_bayes=False)
    spec = ExperimentSpec.from_dict(small_spec(1, rounds=1, fraction=0.01, landscape=lean))
    stored = ExperimentSpec.from_dict(spec.to_dict())  # as server and worker read it back from the store
    assert stored.landscape.member_pac_bayes is False
    mnist = load_dataset("MNIST", data_dir)
    data = ClientData(
        0, mnist.train_x.subset(range(64)), mnist.train_y[:64], mnist.test_x.subset(range(32)), mnist.test_y[:32]
    )
    result = run_round(ExperimentPlan(stored, mnist), data, build_model("FedNet", 0), 1, fetch_s=0.0, device=DEVICE)
    member = result.stats["landscape"]
    for which in ("global", "local"):
        assert set(member[which]["generalization"]) == {"norms"}  # measured without PAC-Bayes ...
        assert finite(member[which]["top_eigenvalues"][0]) and finite(member[which]["trace"])  # ... the rest as ever
    updates = [ClientUpdate(_weights(1), 64)]
    aggregated = AggregatedRound(stored, "exp", 1, _weights(0), {}, updates, [0], _weights(1), (1.0, 0.5))
    server_doc = measure_round(store, Resources(data_dir, device=str(DEVICE)), aggregated)
    assert set(server_doc["global"]["generalization"]) == GENERALIZATION_KEYS  # the global model's PAC-Bayes stays
