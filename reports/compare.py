"""Figures comparing experiments on the same axes: one line per experiment, labelled by description."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from reports.data import ExperimentData, Series
from reports.style import integer_rounds, new_figure, save, series_colour, use_log_scale


@dataclass(frozen=True)
class Comparison:
    """A comparison figure: the value per round of each experiment."""

    file_name: str
    title: str
    ylabel: str
    series: Callable[[ExperimentData], Series]


COMPARISONS: tuple[Comparison, ...] = (
    Comparison("global_accuracy.png", "global test accuracy", "accuracy (full test split)",
               lambda d: d.round_series(("test_accuracy",))),
    Comparison("global_top_eigenvalue.png", "global model: top Hessian eigenvalue", "top eigenvalue",
               lambda d: d.round_series(("landscape", "global", "top_eigenvalues", 0))),
    Comparison("global_trace.png", "global model: Hessian trace", "trace",
               lambda d: d.round_series(("landscape", "global", "trace"))),
    Comparison("mean_local_top_eigenvalue.png", "local models: mean top Hessian eigenvalue",
               "mean over clients of the top eigenvalue",
               lambda d: d.client_mean_series(("landscape", "local", "top_eigenvalues", 0))),
    Comparison("mean_barrier.png", "mean interpolation barrier, global → local",
               "mean over clients of the barrier",
               lambda d: d.client_mean_series(("landscape", "interpolation", "barrier"))),
)


def labels(experiments: Sequence[ExperimentData]) -> list[str]:
    """Descriptions, with the id added where two experiments share one."""
    names = [e.label for e in experiments]
    return [f"{name} [{e.experiment_id}]" if names.count(name) > 1 else name for name, e in zip(names, experiments)]


def comparison(kind: Comparison, experiments: Sequence[ExperimentData], out_dir: Path) -> Path | None:
    """Draw one comparison; None when no experiment has the value."""
    lines = [(label, kind.series(e)) for label, e in zip(labels(experiments), experiments)]
    if not any(series for _, series in lines):
        return None
    figure, (ax,) = new_figure(1, width=7.5, height=4.2)
    values: list[float] = []
    for position, (label, series) in enumerate(lines):
        if series:
            colour = series_colour(position, len(lines))
            ax.plot(series.rounds, series.values, color=colour, marker="o", markersize=3.5, linewidth=1.6, label=label)
            values += series.values
    use_log_scale(ax, values)
    ax.set_title(kind.title)
    ax.set_ylabel(kind.ylabel)
    integer_rounds(ax)
    figure.legend(loc="outside lower center", fontsize="small", ncol=1 if len(lines) > 4 else 2, frameon=False)
    return save(figure, out_dir / kind.file_name)
