"""How a stored document becomes long rows: names, models, members, indices and array positions."""

from __future__ import annotations

from reports.measures import ArrayElement, Measure, flatten


def test_a_round_landscape_flattens_to_named_rows() -> None:
    doc = {
        "test_loss": 0.5,
        "selected": [0, 2],
        "landscape": {
            "global": {"trace": 10.0, "top_eigenvalues": [3.0, 1.0], "converged": True,
                       "generalization": {"norms": {"layers": [{"name": "fc1.weight", "spectral": 1.5}]}}},
            "client_alignment": [{"client_index": 0, "cosine": 0.9}, {"client_index": 2, "cosine": None}],
            "flatness_gap": {"client_indices": [0, 2], "curvature": "hessian", "local": [2.0, 3.0], "global": 1.5,
                             "gaps": [0.5, 1.5]},
            "error": None,
        },
        "surface": {"losses": [[1.0, 2.0], [3.0, None]]},
    }
    assert list(flatten(doc)) == [
        Measure("test_loss", 0.5),
        Measure("selected", 0.0, index=0),
        Measure("selected", 2.0, index=1),
        Measure("landscape.trace", 10.0, model="global"),
        Measure("landscape.top_eigenvalues", 3.0, model="global", index=0),
        Measure("landscape.top_eigenvalues", 1.0, model="global", index=1),
        Measure("landscape.converged", 1.0, model="global"),
        Measure("landscape.generalization.norms.layers[fc1.weight].spectral", 1.5, model="global"),
        Measure("landscape.client_alignment.cosine", 0.9, member=0),
        Measure("landscape.flatness_gap.client_indices", 0.0, index=0),
        Measure("landscape.flatness_gap.client_indices", 2.0, index=1),
        Measure("landscape.flatness_gap", 2.0, member=0, model="local"),
        Measure("landscape.flatness_gap", 3.0, member=2, model="local"),
        Measure("landscape.flatness_gap", 1.5, model="global"),
        Measure("landscape.flatness_gap.gaps", 0.5, member=0),
        Measure("landscape.flatness_gap.gaps", 1.5, member=2),
        ArrayElement("surface.losses", (0, 0), 1.0),
        ArrayElement("surface.losses", (0, 1), 2.0),
        ArrayElement("surface.losses", (1, 0), 3.0),
    ]


def test_a_member_report_keeps_its_member_and_prefix() -> None:
    rows = list(flatten({"local": {"test_accuracy": 0.8}, "train_loss_per_epoch": [0.3]}, prefix="x", member=4))
    assert rows == [Measure("x.test_accuracy", 0.8, member=4, model="local"),
                    Measure("x.train_loss_per_epoch", 0.3, member=4, index=0)]


def test_entries_of_a_member_and_model_keep_both() -> None:
    curves = {"curves": [{"model": "global", "client_index": None, "grid": [0.5]},
                         {"model": "local", "client_index": 2, "grid": [1.5]}]}
    assert list(flatten(curves)) == [Measure("curves.grid", 0.5, model="global", index=0),
                                     Measure("curves.grid", 1.5, member=2, model="local", index=0)]
    repeated = {"points": [{"client_index": 1, "x": 0.0}, {"client_index": 1, "x": 1.0}]}  # not one per member
    assert list(flatten(repeated)) == [Measure("points.0.client_index", 1.0), Measure("points.0.x", 0.0),
                                       Measure("points.1.client_index", 1.0), Measure("points.1.x", 1.0)]
