"""Figures comparing experiments on the same axes: one line per experiment, labelled by description.

Each experiment has its own colour, line style and marker (hollow on every other
one), so lines that coincide, and greyscale prints, still tell them apart.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from reports.data import BARRIER_DEFINITION, ExperimentData, Series
from reports.replicates import Band, band, groups
from reports.style import integer_rounds, new_figure, save, series_style, use_log_scale

DODGE = 0.04  # rounds between neighbouring experiments' points, so identical values stay visible


@dataclass(frozen=True)
class Comparison:
    """A comparison figure: the value per round of each experiment."""

    file_name: str
    title: str
    ylabel: str
    series: Callable[[ExperimentData], Series]
    caption: str = ""


def _with_round0(data: ExperimentData, key: str) -> Series:
    series = data.round_series((key,))
    round0 = data.extras.round0
    if round0 is None or not series:
        return series
    return Series((0, *series.rounds), (round0[key], *series.values))


COMPARISONS: tuple[Comparison, ...] = (
    Comparison("global_accuracy.png", "global model: test accuracy", "accuracy (full test split)",
               lambda d: _with_round0(d, "test_accuracy"), "Round 0: the initial model (evaluated by the report)."),
    Comparison("global_loss.png", "global model: test loss", "cross-entropy loss (full test split)",
               lambda d: _with_round0(d, "test_loss"), "Round 0: the initial model (evaluated by the report)."),
    Comparison("global_top_eigenvalue.png", "global model: top Hessian eigenvalue", "top eigenvalue",
               lambda d: d.round_series(("landscape", "global", "top_eigenvalues", 0)),
               "On the server's held-out test subset."),
    Comparison("global_trace.png", "global model: Hessian trace", "trace",
               lambda d: d.round_series(("landscape", "global", "trace")), "On the server's held-out test subset."),
    Comparison("mean_local_top_eigenvalue.png", "local models: mean top Hessian eigenvalue",
               "mean over clients of the top eigenvalue",
               lambda d: d.client_mean_series(("landscape", "local", "top_eigenvalues", 0)),
               "Each client's local model on its own train subset, averaged over the clients of the round."),
    Comparison("mean_barrier.png", "mean interpolation barrier, global → local",
               "mean over clients of the barrier (loss)", lambda d: d.mean_barrier_series(),
               BARRIER_DEFINITION + " (≥ 0), on each client's train subset, averaged over the round's clients."),
)


def labels(experiments: Sequence[ExperimentData]) -> list[str]:
    """Descriptions, with the id added where two experiments share one."""
    names = [e.label for e in experiments]
    return [f"{name} [{e.experiment_id}]" if names.count(name) > 1 else name for name, e in zip(names, experiments)]


def comparison(kind: Comparison, experiments: Sequence[ExperimentData], out_dir: Path) -> Path | None:
    """Draw one comparison; None when no experiment has the value.

    Replicates across seeds (`reports.replicates.groups`) are one line: their
    mean per round, with a shaded 95% interval of that mean.
    """
    grouped = groups(experiments)
    names = dict(zip((e.experiment_id for e in experiments), labels(experiments)))
    lines: list[tuple[str, Series, Band | None]] = []
    for members in grouped:
        if len(members) == 1:
            lines.append((names[members[0].experiment_id], kind.series(members[0]), None))
        else:
            spread = band(members, kind.series)
            label = f"{members[0].label} (mean of {len(members)} seeds ± 95% interval)"
            lines.append((label, Series(spread.rounds, spread.means), spread))
    if not any(series for _, series, _ in lines):
        return None
    figure, (ax,) = new_figure(1, width=7.5, height=4.4)
    values: list[float] = []
    centre = (len(lines) - 1) / 2
    for position, (label, series, line_band) in enumerate(lines):
        if series:
            shift = (position - centre) * DODGE
            style = series_style(position, len(lines))
            # later experiments underneath, with larger markers: a line hidden under another still shows its rings
            drawn = ax.plot([r + shift for r in series.rounds], series.values, label=label, linewidth=1.5,
                            markersize=4 + 6 * (len(lines) - 1 - position) / max(len(lines) - 1, 1),
                            zorder=2 + position, **style)
            values += series.values
            if line_band is not None:
                known = [(r + shift, m - h, m + h)
                         for r, m, h in zip(line_band.rounds, line_band.means, line_band.half_widths)
                         if not math.isnan(h)]
                if known:
                    xs, lows, highs = [k[0] for k in known], [k[1] for k in known], [k[2] for k in known]
                    colour = drawn[0].get_color()
                    ax.fill_between(xs, lows, highs, color=colour, alpha=0.2, linewidth=0, zorder=1 + position)
                    # bars as well: a round measured alone (a band of zero width) still shows its interval
                    ax.errorbar(xs, [(lo + hi) / 2 for lo, hi in zip(lows, highs)],
                                yerr=[(hi - lo) / 2 for lo, hi in zip(lows, highs)], fmt="none", ecolor=colour,
                                elinewidth=1.0, capsize=3, zorder=2 + position)
                    values += lows + highs
    if "accuracy" in kind.file_name:
        ax.set_ylim(top=1.0)
    elif not use_log_scale(ax, values) and min(values) >= 0:
        ax.set_ylim(bottom=0.0)
    ax.axhline(0.0, color="grey", linewidth=0.6) if min(values) < 0 else None
    ax.set_title(kind.title)
    ax.set_ylabel(kind.ylabel)
    integer_rounds(ax)
    one_column = len(lines) > 4 or max(len(label) for label, _, _ in lines) > 45  # long labels side by side get cut
    figure.legend(loc="outside lower center", fontsize="small", ncol=1 if one_column else 2, frameon=False)
    return save(figure, out_dir / kind.file_name)
