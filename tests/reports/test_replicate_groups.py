"""Replicate groups in the reports: mean ± 95% interval per round, groups tabled, PAC-Bayes and eigenvalue marks."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from matplotlib.collections import PolyCollection

from fedland.replicates import expand_replicates
from fedland.spec import ExperimentSpec
from reports.compare import COMPARISONS, comparison
from reports.data import ExperimentData, pac_bayes_text
from reports.page import index_page
from reports.replicates import GROUP_HEADER, band, group_rows, groups


def experiment(spec: ExperimentSpec, experiment_id: str, accuracies: list[float], sigma: Any) -> ExperimentData:
    rounds = []
    for r, accuracy in enumerate(accuracies, start=1):
        pac_bayes = {"saturated": True, "sigma": None} if sigma == "saturated" else {
            "saturated": False, "sigma": sigma, "sigma_low": sigma * 0.9, "sigma_high": sigma * 1.1}
        rounds.append({"round": r, "test_accuracy": accuracy, "test_loss": 1.0 - accuracy, "landscape": {
            "global": {"top_eigenvalues": [10.0 * r], "top_eigenvalues_converged": r != 2, "trace": 5.0,
                       "generalization": {"pac_bayes": pac_bayes}}}})
    return ExperimentData(experiment_id, spec.description, "finished", None, spec.to_dict(), (), tuple(rounds), (), ())


def study() -> list[ExperimentData]:
    base = ExperimentSpec(target_balance_ratios=[[0.1] * 10], subset_fractions=[0.1], rounds=2, seed=1,
                          description="FedAvg", replicates=3)
    accuracies = ([0.5, 0.6], [0.6, 0.8], [0.7, 1.0])
    sigmas = (0.04, 0.05, "saturated")
    replicas = [experiment(s, f"r{s.replicate}", a, sigma)
                for s, a, sigma in zip(expand_replicates(base), accuracies, sigmas)]
    single = ExperimentSpec(target_balance_ratios=[[0.1] * 10], subset_fractions=[0.1], rounds=2, seed=1,
                            description="FedProx")
    return [*replicas, experiment(single, "single", [0.4, 0.5], 0.03)]


def test_replicates_form_one_group_with_the_t_interval_per_round() -> None:
    experiments = study()
    grouped = groups(experiments)
    assert [[e.experiment_id for e in g] for g in grouped] == [["r0", "r1", "r2"], ["single"]]
    spread = band(grouped[0], lambda e: e.round_series(("test_accuracy",)))
    assert spread.rounds == (1, 2) and spread.counts == (3, 3)
    assert spread.means == pytest.approx((0.6, 0.8))
    assert spread.half_widths == pytest.approx((4.303 * 0.1 / math.sqrt(3), 4.303 * 0.2 / math.sqrt(3)))


def test_the_index_tables_each_group_as_mean_and_interval_and_counts_saturation_apart() -> None:
    rows = group_rows(study())
    assert len(rows) == 1  # the single experiment is no group
    row = dict(zip(GROUP_HEADER, rows[0]))
    assert row["seeds"] == "1, 2, 3"
    assert row["final test acc."] == f"0.8000 ± {4.303 * 0.2 / math.sqrt(3):.4f} (n = 3)"
    assert row["PAC-Bayes σ global (last measured)"] == f"0.0450 ± {12.706 * 0.00707107 / math.sqrt(2):.4f} (n = 2); saturated in 1"
    html = index_page([], [], 4, rows, GROUP_HEADER)
    assert "Replicates across seeds" in html and "saturated in 1" in html


def test_the_comparison_draws_a_group_as_one_line_with_a_band(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import reports.compare as compare

    drawn: list[Any] = []
    real_save = compare.save
    def keep(figure: Any, path: Path) -> Path:
        drawn.append(figure)
        return real_save(figure, path)

    monkeypatch.setattr(compare, "save", keep)
    kind = next(k for k in COMPARISONS if k.file_name == "global_accuracy.png")
    assert comparison(kind, study(), tmp_path) == tmp_path / "global_accuracy.png"
    (ax,) = drawn[0].axes
    labels = [str(line.get_label()) for line in ax.get_lines() if not str(line.get_label()).startswith("_")]
    assert labels == ["FedAvg (mean of 3 seeds ± 95% interval)", "FedProx"]
    (fill,) = [c for c in ax.collections if isinstance(c, PolyCollection)]
    edges = np.asarray(fill.get_paths()[0].vertices, dtype=np.float64)[:, 1]
    assert edges.min() == pytest.approx(0.8 - 4.303 * 0.2 / math.sqrt(3))  # round 2's lower end
    assert edges.max() == pytest.approx(0.8 + 4.303 * 0.2 / math.sqrt(3))


def test_pac_bayes_shows_its_interval_or_saturated_and_unconverged_eigenvalues_are_found() -> None:
    replica = study()[0]
    assert pac_bayes_text(replica.rounds[0], ("landscape", "global", "generalization", "pac_bayes")) == "0.04 [0.036, 0.044]"
    saturated = study()[2]
    assert pac_bayes_text(saturated.rounds[0], ("landscape", "global", "generalization", "pac_bayes")) == "saturated"
    assert replica.unconverged(None).rounds == (2,) and replica.unconverged(None).values == (20.0,)


@pytest.mark.parametrize("member_pac_bayes", [False, True])
def test_the_client_table_says_why_the_members_pac_bayes_is_missing(member_pac_bayes: bool) -> None:
    from fedland.spec import LandscapeSpec
    from reports.page import _summary

    spec = ExperimentSpec(target_balance_ratios=[[0.1] * 10], subset_fractions=[0.1], rounds=1, seed=1,
                          landscape=LandscapeSpec(member_pac_bayes=member_pac_bayes))
    generalization: dict[str, Any] = {"norms": {}}
    if spec.landscape.member_pac_bayes:
        generalization["pac_bayes"] = {"saturated": False, "sigma": 0.05, "sigma_low": 0.04, "sigma_high": 0.06}
    stats = {"round": 1, "client_index": 0, "global": {"test_accuracy": 0.5}, "local": {"test_accuracy": 0.6},
             "landscape": {"local": {"top_eigenvalues": [3.0], "generalization": generalization}}}
    data = ExperimentData("e", "", "finished", None, spec.to_dict(), (), ({"round": 1, "test_accuracy": 0.5},),
                          (stats,), ())
    page = _summary(data)
    note = "The members' PAC-Bayes σ was not measured (landscape.member_pac_bayes is false"
    assert (note in page) == (member_pac_bayes is False)
    assert ("0.05 [0.04, 0.06]" in page) == member_pac_bayes
