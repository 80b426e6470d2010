"""Reports from a real nx-27017 store: every figure a valid PNG, every page linked, missing data said."""

from __future__ import annotations

import os
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import matplotlib.image
import numpy as np
import pytest
import torch

from fedland.datasets import DATASETS
from fedland.models import build_model
from fedland.partition import gini_coefficient, plan_counts
from fedland.spec import ExperimentSpec, LandscapeSpec
from reports import report_main, write_reports
from reports.data import load_experiment, path_dip
from server.store import Store
from stack import records, wire
from stack.records import (
    ClientModelFile,
    ClientStatsRecord,
    ExperimentRecord,
    LandscapeRecord,
    MemberRecord,
    ModelFile,
    RoundRecord,
)
from stack.settings import StoreSettings

# the server's analysis of the stored models needs MNIST (FEDLAND_DATA_DIR); without it the figures say it is missing
MNIST = bool(os.environ.get("FEDLAND_DATA_DIR")) and (Path(os.environ["FEDLAND_DATA_DIR"]) / "mnist").is_dir()
LANDSCAPE_FIGURES = {"curvature.png", "barriers.png", "client_geometry.png", "surfaces.png", "contributions.png"}
BASE_FIGURES = {"accuracy_loss.png", "class_balance.png"}
MODEL_FIGURES = {"trajectory.png", "spectral_density.png"} if MNIST else set()  # from the server's analysis
NO_DATA = Path("/nonexistent-dataset-dir")  # a report reads no dataset: the analysis is stored
COMPARISON_FIGURES = {
    "global_accuracy.png", "global_loss.png", "global_top_eigenvalue.png", "global_trace.png",
    "mean_local_top_eigenvalue.png", "mean_barrier.png",
}
ALPHAS = [k / 10 for k in range(11)]


def metrics(loss: float, top: float) -> dict[str, Any]:
    """A landscape metric block (DEVELOPERS.md): eigenvalues spanning decades over the rounds."""
    return {"loss": loss, "accuracy": 1 - loss / 4, "grad_norm": loss / 2, "top_eigenvalues": [top, top / 3],
            "trace": 10 * top, "trace_stderr": top / 5, "sharpness": loss / 20}


def bump_of(i: int, r: int) -> float:
    """The curve's height above the straight line at alpha = 0.5; negative (a convex path) in round 3."""
    return 0.05 * (i + 1) * (r if r < 3 else -1)


def barrier_of(i: int, r: int) -> float:
    return max(bump_of(i, r), 0.0)  # the standard barrier: 0 at the endpoints, so never below 0


def dip_of(i: int, r: int) -> float:
    return min(bump_of(i, r), 0.0)


def weights(spec: ExperimentSpec, server_round: int, client_index: int | None = None) -> dict[str, torch.Tensor]:
    """Real FedNet weights: the seeded initial model moved a little per round (and per client)."""
    state = build_model(spec.model, seed=spec.seed).state_dict()
    generator = torch.Generator().manual_seed(1000 * server_round + (client_index or 0) + 1)
    scale = 0.05 * server_round + (0.02 if client_index is not None else 0.0)
    return {k: v + scale * torch.randn(v.shape, generator=generator) for k, v in state.items()}


def insert_experiment(store: Store, experiment_id: str, spec: ExperimentSpec, status: str = "finished") -> None:
    """Store an experiment with every round, through the records the server and clients write."""
    info = DATASETS[spec.dataset_name]
    train, test = plan_counts(info.train_class_counts, info.test_class_counts,
                              spec.target_balance_ratios, spec.subset_fractions)
    members = [
        MemberRecord(
            experiment_id=experiment_id, client_index=i, class_counts=tuple(counts), test_class_counts=tuple(test[i]),
            class_frequencies=tuple(c / sum(counts) for c in counts), gini_index=gini_coefficient(counts),
            num_train=sum(counts), num_test=sum(test[i]), partition_digest=f"digest-{i}", reported_round=spec.rounds,
        )
        for i, counts in enumerate(train)
    ]
    experiment = ExperimentRecord(id=experiment_id, spec=spec.with_id(experiment_id), status=status,
                                  current_round=spec.rounds, created_at=1.0, started_at=2.0, finished_at=3.0)
    store.insert_experiments([experiment], members)
    store.save_model(wire.encode(weights(spec, 0)), ModelFile(experiment_id, 0, records.GLOBAL))
    for r in range(1, spec.rounds + 1):
        measured = spec.landscape.scheduled(r, spec.rounds)
        for i in range(spec.num_clients):
            local_loss, global_loss = 0.3 + 1.5 / (r + 1) + 0.2 * i, 0.5 + 2.0 / (r + 1)
            stats: dict[str, Any] = {
                "duration_s": {"train": 1.0, "total": 1.5},
                "global": {"train_loss": global_loss, "train_accuracy": 1 - global_loss / 4,
                           "test_loss": global_loss, "test_accuracy": 1 - global_loss / 4},
                "local": {"train_loss": local_loss, "train_accuracy": 1 - local_loss / 4,
                          "test_loss": local_loss, "test_accuracy": 1 - local_loss / 4},
            }
            if measured:
                line = [(1 - a) * global_loss + a * local_loss for a in ALPHAS]
                stats["landscape"] = {
                    "num_samples": spec.landscape.num_samples, "duration_s": 2.0,
                    "global": metrics(global_loss, 1.5 * 4**r), "local": metrics(local_loss, 2.0 * 4**r * (1 + i)),
                    "interpolation": {"alphas": ALPHAS, "barrier": barrier_of(i, r),
                                      "losses": [v + bump_of(i, r) * 4 * a * (1 - a) for v, a in zip(line, ALPHAS)]},
                    "update": {"distance": 0.1 * r, "cosine_to_previous_update": None if r == 1 else 0.5},
                }
            file_id = store.save_client_model(wire.encode(weights(spec, r, i)), ClientModelFile(experiment_id, r, i))
            store.insert_client_stats(ClientStatsRecord(
                experiment_id=experiment_id, round=r, client_index=i, worker_id=f"c{i}", received_at=4.0 + r,
                num_examples=members[i].num_train, weights_file_id=file_id, stats=stats,
            ))
        landscape: dict[str, Any] | None = None
        if measured:
            grid = np.linspace(-spec.landscape.grid_radius, spec.landscape.grid_radius, spec.landscape.grid_points)
            x, y = np.meshgrid(grid, grid)  # (ny, nx)
            surface_id = store.save_landscape(LandscapeRecord(experiment_id, r, records.SURFACE, {
                "x": grid.tolist(), "y": grid.tolist(), "losses": (0.3 + r * (x**2 + 3 * (y - 0.2) ** 2)).tolist(),
                "explained_variance_ratio": [0.7, 0.2],
                "client_points": [{"client_index": i, "x": 0.5 * (-1) ** i, "y": 0.3 * (i + 1)}
                                  for i in range(spec.num_clients)],
            }))
            landscape = {
                "num_samples": spec.landscape.num_samples, "duration_s": 3.0, "global": metrics(0.4, 3.0 * 4**r),
                "client_alignment": [{"client_index": i, "cosine": 0.9 - 0.6 * i / spec.num_clients - 0.05 * r}
                                     for i in range(spec.num_clients)],
                "gradient_dissimilarity": 1.2 + 0.3 * r,
                "leave_one_out": [{"client_index": i, "delta_test_loss": 0.02 * (i + 1) * r,
                                   "delta_test_accuracy": -0.01 * (i + 1) * r} for i in range(spec.num_clients)],
                "surface_id": surface_id,
                # the server's between-client measures (flatness gap from 1 participant, barriers from 2)
                "flatness_gap": {"client_indices": list(range(spec.num_clients)), "curvature": "hessian",
                                 "local": [2.0 + i + 0.5 * r for i in range(spec.num_clients)], "global": 1.5 + 0.2 * r,
                                 "gaps": [0.5 + i + 0.3 * r for i in range(spec.num_clients)],
                                 "mean_gap": 0.5 + 0.3 * r + (spec.num_clients - 1) / 2},
            }
            if spec.num_clients >= 2:
                m = spec.num_clients
                landscape["pairwise_barriers_id"] = store.save_landscape(LandscapeRecord(
                    experiment_id, r, records.PAIRWISE_BARRIERS, {
                        "client_indices": list(range(m)), "alphas": ALPHAS,
                        "barriers": [[0.0 if i == j else 0.01 * (i + j) * r for j in range(m)] for i in range(m)],
                        "losses": [[[0.3] * len(ALPHAS) for _ in range(m)] for _ in range(m)],
                    }))
        store.insert_round(RoundRecord(
            experiment_id=experiment_id, round=r, started_at=10.0 * r, finished_at=10.0 * r + 4.0,
            test_loss=0.4 + 1.8 / (r + 1), test_accuracy=0.9 - 0.45 / (r + 1), num_test=10_000,
            selected=tuple(range(spec.num_clients)), participants=tuple(range(spec.num_clients)),
            num_examples=sum(m.num_train for m in members), strategy=spec.strategy.name, duration_s=4.0,
            aggregation_s=0.1, model_file_id=store.save_model(wire.encode(weights(spec, r)),
                                                               ModelFile(experiment_id, r, records.GLOBAL)),
            strategy_state_file_id=store.save_model(wire.encode({}), ModelFile(experiment_id, r, records.STRATEGY_STATE)),
            landscape=landscape,
        ))


def analyse(store: Store, experiment_id: str) -> None:
    """What the server's measurement thread stores for an experiment (`server.analysis`), where MNIST is at hand."""
    if not MNIST:
        return
    from server.analysis import analyse_finished, evaluate_initial
    from server.resources import Resources

    resources = Resources(os.environ["FEDLAND_DATA_DIR"])
    experiment = store.get_experiment(experiment_id)
    assert experiment is not None
    evaluate_initial(store, resources, experiment)
    analyse_finished(store, resources, experiment)


def two_experiments(store: Store, *, analysed: bool = True) -> tuple[str, str]:
    """A non-IID pair measured every round, and an IID pair with landscapes disabled (analysed as the server does)."""
    common: dict[str, Any] = dict(rounds=3, timestamp="2025-01-02T03:04:05+00:00", seed=3)
    measured = ExperimentSpec(description="non-IID unbalanced, 2 clients",
                              target_balance_ratios=[[0.1] * 10, [0.5, 0.5] + [0.0] * 8],
                              subset_fractions=[0.1, 0.05], landscape=LandscapeSpec(every=1), **common)
    plain = ExperimentSpec(description="IID balanced, 2 clients", target_balance_ratios=[[0.1] * 10] * 2,
                           subset_fractions=[0.1, 0.1], landscape=LandscapeSpec(enabled=False), **common)
    insert_experiment(store, "exp-landscape", measured)
    insert_experiment(store, "exp-plain", plain)
    if analysed:
        analyse(store, "exp-landscape")
        analyse(store, "exp-plain")
    return "exp-landscape", "exp-plain"


class Links(HTMLParser):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.images: list[str] = []
        self.anchors: list[str] = []
        self.vectors: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "img" and values.get("src"):
            self.images.append(str(values["src"]))
        if tag == "a" and values.get("href") and str(values["href"]).endswith(".html"):
            self.anchors.append(str(values["href"]))  # pages; the [PDF] links are checked apart
        if tag == "a" and str(values.get("href")).endswith(".pdf"):
            self.vectors.append(str(values["href"]))


def assert_valid_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    assert len(data) > 10_000, f"{path} is only {len(data)} bytes"
    pixels = matplotlib.image.imread(path)  # (height, width, channels) in [0, 1]
    assert pixels.shape[0] >= 300 and pixels.shape[1] >= 400, (path, pixels.shape)
    assert float(pixels[..., :3].std()) > 0.05, f"{path} is nearly blank"


def page_images(page: Path) -> set[str]:
    return set(Links(page.read_text(encoding="utf-8")).images)


def test_reports_of_two_experiments(store: Store, tmp_path: Path) -> None:
    measured_id, plain_id = two_experiments(store)
    index = write_reports(store.db, None, tmp_path)  # the stored analysis: the models' figures too

    assert index == tmp_path / "index.html"
    links = Links(index.read_text(encoding="utf-8"))
    assert set(links.anchors) == {f"{measured_id}/index.html", f"{plain_id}/index.html"}
    assert {p.name for p in (tmp_path / "comparison").glob("*.png")} == COMPARISON_FIGURES
    assert set(links.images) == {f"comparison/{name}" for name in COMPARISON_FIGURES}
    # every figure also as a vector PDF, linked beside it
    assert set(links.vectors) == {f"comparison/{Path(name).stem}.pdf" for name in COMPARISON_FIGURES}
    for name in COMPARISON_FIGURES:
        assert (tmp_path / "comparison" / name).with_suffix(".pdf").read_bytes()[:5] == b"%PDF-"
    for name in COMPARISON_FIGURES:
        assert_valid_png(tmp_path / "comparison" / name)

    measured_dir, plain_dir = tmp_path / measured_id, tmp_path / plain_id
    measured_figures = BASE_FIGURES | LANDSCAPE_FIGURES | MODEL_FIGURES
    assert {p.name for p in measured_dir.glob("*.png")} == measured_figures
    assert {p.name for p in measured_dir.glob("*.pdf")} == {f"{Path(n).stem}.pdf" for n in measured_figures}
    assert {p.name for p in plain_dir.glob("*.png")} == BASE_FIGURES | (MODEL_FIGURES - {"spectral_density.png"})
    for directory in (measured_dir, plain_dir):
        page = directory / "index.html"
        assert page_images(page) == {p.name for p in directory.glob("*.png")}
        assert "../index.html" in Links(page.read_text(encoding="utf-8")).anchors
        for png in directory.glob("*.png"):
            assert_valid_png(png)

    measured_page = (measured_dir / "index.html").read_text(encoding="utf-8")
    plain_page = (plain_dir / "index.html").read_text(encoding="utf-8")
    assert "Skipped" not in measured_page
    assert plain_page.count("Skipped: landscape measurement is disabled") == len(LANDSCAPE_FIGURES) + 1
    assert 'http-equiv="refresh"' not in measured_page  # finished: no reload
    # the partition table and the spec, from the stored documents
    for member in store.members(measured_id):
        row = (f"<td>{member.num_train}</td><td>{member.num_test}</td><td>{member.gini_index:.3f}</td>"
               + "".join(f"<td>{n}</td>" for n in member.class_counts))
        assert row in measured_page
    assert "&quot;description&quot;: &quot;non-IID unbalanced, 2 clients&quot;" in measured_page
    final = store.get_round(measured_id, 3)
    assert final is not None and f"<b>{final.test_accuracy:.4f}</b>" in measured_page
    # the barrier column: the report's definition from the stored curve, fixed decimals with a sign
    assert f"<td>{barrier_of(1, 2):.4f}</td>" not in measured_page and "<td>0.0000</td>" in measured_page


def test_landscape_only_experiments_compare_and_rewrites_drop_stale_figures(store: Store, tmp_path: Path) -> None:
    measured_id, plain_id = two_experiments(store, analysed=False)  # a store written before the server analysed
    write_reports(store.db, [measured_id], tmp_path, data_dir=NO_DATA)
    assert len(list((tmp_path / measured_id).glob("*.png"))) == len(BASE_FIGURES | LANDSCAPE_FIGURES)
    page = (tmp_path / measured_id / "index.html").read_text(encoding="utf-8")
    assert "Skipped: the store holds no trajectory: computed by the server before an experiment is finished" in page
    assert "Skipped: the store holds no spectral densities" in page
    assert "No round-0 point: the store holds no evaluation of the initial model (round 0)" in page
    # the plain experiment alone has no landscape: comparisons of landscape values are skipped, said so
    index = write_reports(store.db, [plain_id], tmp_path, data_dir=NO_DATA)
    text = index.read_text(encoding="utf-8")
    basic = {"global_accuracy.png", "global_loss.png"}
    assert {p.name for p in (tmp_path / "comparison").glob("*.png")} == basic
    assert page_images(index) == {f"comparison/{name}" for name in basic}
    assert text.count("Skipped: no experiment has this measurement") == len(COMPARISON_FIGURES) - 2
    # a second report never drops the first one's pages from the index
    assert Links(text).anchors == [f"{measured_id}/index.html", f"{plain_id}/index.html"]


def test_series_read_back_the_stored_values(store: Store) -> None:
    measured_id, plain_id = two_experiments(store)
    data = load_experiment(store.db, measured_id)
    barrier = data.client_mean_series(("landscape", "interpolation", "barrier"))
    assert barrier.rounds == (1, 2, 3)
    assert barrier.values == pytest.approx([(barrier_of(0, r) + barrier_of(1, r)) / 2 for r in (1, 2, 3)])
    loo = data.round_client_series(("landscape", "leave_one_out"), 1, "delta_test_accuracy")
    assert loo.values == pytest.approx([-0.02, -0.04, -0.06])
    # barrier and dip from the raw curve: the highest and lowest point relative to the straight line
    assert data.barrier_series(1).values == pytest.approx([barrier_of(1, r) for r in (1, 2, 3)])
    assert data.barrier_series(1, path_dip).values == pytest.approx([dip_of(1, r) for r in (1, 2, 3)])
    assert data.barrier_series(1, path_dip).values[-1] == pytest.approx(-0.1)
    assert [s.round for s in data.surfaces] == [1, 2, 3]
    assert data.surfaces[0].losses.shape == (LandscapeSpec().grid_points,) * 2
    plain = load_experiment(store.db, plain_id)
    assert not plain.has_landscape and not plain.landscape_enabled
    assert not plain.round_series(("landscape", "global", "trace"))
    assert [c.num_train for c in plain.clients] == [3000, 3000]  # 0.1 of floor(60000 / 2) each


def test_unknown_id_and_unfinished_experiments(store: Store, tmp_path: Path) -> None:
    measured_id, _ = two_experiments(store)
    running = ExperimentSpec(description="still running", target_balance_ratios=[[0.1] * 10],
                             subset_fractions=[0.05], rounds=2, timestamp="2025-01-02T03:04:05+00:00")
    insert_experiment(store, "exp-running", running, status="running")
    with pytest.raises(ValueError, match=r"^experiment_id: no experiment 'nope' in the store \(known: .*exp-running"):
        write_reports(store.db, [measured_id, "nope"], tmp_path / "out", data_dir=NO_DATA)
    assert not (tmp_path / "out").exists()  # nothing written
    index = write_reports(store.db, None, tmp_path / "all", data_dir=NO_DATA)
    # the index lists every experiment in the store; only finished ones are compared
    assert "exp-running/index.html" in Links(index.read_text(encoding="utf-8")).anchors
    running_page = (tmp_path / "all" / "exp-running" / "index.html").read_text(encoding="utf-8")
    assert '<meta http-equiv="refresh" content="10">' in running_page  # reloads while running
    assert 'http-equiv="refresh"' in index.read_text(encoding="utf-8")


def test_report_main(store: Store, mongo_uri: str, mongo_db_name: str, tmp_path: Path,
                     capsys: pytest.CaptureFixture[str]) -> None:
    measured_id, _ = two_experiments(store)
    store_settings = StoreSettings(mongo_uri=mongo_uri, db_name=mongo_db_name)
    assert report_main([measured_id], store_settings, tmp_path, data_dir=NO_DATA) == 0
    assert str((tmp_path / "index.html").resolve()) in capsys.readouterr().out
    assert report_main(["nope"], store_settings, tmp_path / "x") == 2
    assert "experiment_id: no experiment 'nope'" in capsys.readouterr().err


def test_single_client_nulls_and_an_unstarted_experiment(store: Store, tmp_path: Path) -> None:
    single = ExperimentSpec(description="centralized", target_balance_ratios=[[0.1] * 10], subset_fractions=[0.05],
                            rounds=2, timestamp="2025-01-02T03:04:05+00:00")
    insert_experiment(store, "exp-single", single)
    # leave-one-out is undefined with one client: the server stores nulls
    store.db[records.ROUNDS].update_many({"experiment_id": "exp-single"}, {"$set": {
        "landscape.leave_one_out": [{"client_index": 0, "delta_test_loss": None, "delta_test_accuracy": None}]}})
    queued = ExperimentSpec(description="queued", target_balance_ratios=[[0.1] * 10], subset_fractions=[0.05],
                            rounds=2, timestamp="2025-01-02T03:04:05+00:00")
    store.insert_experiments([ExperimentRecord(id="exp-queued", spec=queued.with_id("exp-queued"), created_at=1.0)], [])
    write_reports(store.db, ["exp-single", "exp-queued"], tmp_path, data_dir=NO_DATA)

    single_page = (tmp_path / "exp-single" / "index.html").read_text(encoding="utf-8")
    assert {p.name for p in (tmp_path / "exp-single").glob("*.png")} == BASE_FIGURES | LANDSCAPE_FIGURES
    assert single_page.count("Skipped") == 2  # only the two figures computed from the models, without a dataset  # contributions still drawn: alignment and B, without the null deltas
    assert list((tmp_path / "exp-queued").glob("*.png")) == []
    queued_page = (tmp_path / "exp-queued" / "index.html").read_text(encoding="utf-8")
    assert "No round has been completed." in queued_page
    assert queued_page.count("Skipped: the store holds no data for this figure") == 2
    assert queued_page.count("Skipped: the server computes it once the experiment&#x27;s last round is measured") == 1
    assert queued_page.count("Skipped: no landscape measurements are stored") == len(LANDSCAPE_FIGURES) + 1


def test_a_render_draws_the_stored_analysis_and_evaluates_no_model(
    store: Store, data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch.nn.functional as F

    from fedland.datasets import load_dataset
    from fedland.hessian import spectral_density
    from fedland.measure import DENSITY_PROBES, DENSITY_STEPS
    from fedland.plan import ExperimentPlan
    from server.analysis import TRAJECTORY_SAMPLES
    from server.measurements import LandscapeWorker
    from server.resources import Resources

    measured_id, _ = two_experiments(store, analysed=False)
    experiment = store.get_experiment(measured_id)
    assert experiment is not None
    # the server's measurement thread: the initial evaluation, then the final job before "finished"
    worker = LandscapeWorker(store, Resources(data_dir))
    finished: list[str] = []
    worker.queue_initial(experiment)
    worker.finish_then(experiment, lambda: finished.append(measured_id))
    assert worker.wait(measured_id, timeout_s=600)
    worker.close()
    assert finished == [measured_id]

    # a render with model evaluation made impossible: any forward pass, plan or dataset load raises
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("a report evaluated a model")

    with monkeypatch.context() as patch:
        patch.setattr(torch.nn.Module, "__call__", forbidden)
        patch.setattr(ExperimentPlan, "__init__", forbidden)
        patch.setattr("fedland.datasets.load_dataset", forbidden)
        write_reports(store.db, [measured_id], tmp_path, data_dir=NO_DATA)
        data = load_experiment(store.db, measured_id)
    page = (tmp_path / measured_id / "index.html").read_text(encoding="utf-8")
    assert "Skipped" not in page and "Round 0 is the initial model, evaluated by the server" in page
    for png in ("trajectory.png", "spectral_density.png", "accuracy_loss.png"):
        assert_valid_png(tmp_path / measured_id / png)

    # the figures' numbers against a dense recomputation from the stored models
    spec = experiment.spec
    plan = ExperimentPlan(spec, load_dataset(spec.dataset_name, data_dir))
    dataset = plan.dataset
    models = {r: weights(spec, r) for r in range(spec.rounds + 1)}  # the stored global models (see insert_experiment)
    initial = plan.model(models[0]).eval()
    with torch.no_grad():
        logits = initial(dataset.test_x[:])  # (10000, classes): the whole test split at once
    assert data.extras.round0 == pytest.approx({
        "test_loss": float(F.cross_entropy(logits, dataset.test_y)),
        "test_accuracy": float((logits.argmax(1) == dataset.test_y).float().mean())}, rel=1e-5)

    path = data.extras.trajectory
    assert path is not None and path.rounds == tuple(range(spec.rounds + 1))
    names = [n for n, _ in initial.named_parameters()]
    flat = np.stack([np.concatenate([models[r][n].double().numpy().ravel() for n in names]) for r in path.rounds])
    differences = flat - flat[-1]  # (rounds, dim)
    centred = differences[:-1] - differences[:-1].mean(axis=0)
    gram_values, gram_vectors = np.linalg.eigh(centred @ centred.T)  # the PCs through the Gram matrix, not an SVD
    order = np.argsort(gram_values)[::-1][:2]
    directions = (centred.T @ gram_vectors[:, order]) / np.sqrt(gram_values[order])  # (dim, 2) unit columns
    expected = differences @ directions  # (rounds, 2), up to each axis's sign
    signs = np.sign(np.sum(expected * path.coords, axis=0))
    np.testing.assert_allclose(path.coords, expected * signs, rtol=1e-6, atol=1e-8)
    assert path.explained_variance_ratio == pytest.approx(tuple(gram_values[order] / gram_values.sum()), rel=1e-6)
    # the contour losses: a forward pass at grid points of the plane, on the analysis subset
    assert path.losses is not None and path.xs is not None and path.ys is not None
    (x_sub, y_sub), = plan.analysis_batch(TRAJECTORY_SAMPLES)
    assert path.num_samples == TRAJECTORY_SAMPLES
    unit = directions * signs  # (dim, 2), the stored axes' signs
    for j, i in ((10, 10), (0, 0), (3, 17)):
        point = flat[-1] + path.xs[i] * unit[:, 0] + path.ys[j] * unit[:, 1]
        moved, offset = {}, 0
        for name in names:
            size = models[0][name].numel()
            moved[name] = torch.from_numpy(point[offset:offset + size].reshape(models[0][name].shape)).float()
            offset += size
        with torch.no_grad():
            loss = float(F.cross_entropy(plan.model(moved)(x_sub), y_sub))
        assert path.losses[j, i] == pytest.approx(loss, rel=1e-4), (i, j)

    # the densities: the same SLQ on the same models, subsets and seed as the measurement
    assert data.extras.density_round == spec.rounds
    aggregate = plan.model(models[spec.rounds]).eval()
    reference = spectral_density(aggregate, torch.nn.CrossEntropyLoss(), plan.analysis_batch(
        spec.landscape.num_samples), num_probes=DENSITY_PROBES, lanczos_steps=DENSITY_STEPS, seed=spec.seed,
        grid_points=400)
    (stored,) = [d for d in data.extras.densities if d.client_index is None]
    np.testing.assert_allclose(stored.grid, reference.grid, rtol=1e-9)
    np.testing.assert_allclose(stored.density, reference.density, rtol=1e-9)
    assert sorted((d.model, d.client_index) for d in data.extras.densities if d.client_index is not None) == [
        ("global", 0), ("global", 1), ("local", 0), ("local", 1)]
