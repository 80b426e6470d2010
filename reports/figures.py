"""The figures of one experiment: one function each, saving a PNG (and its PDF) and returning the PNG's path.

A function returns None when the experiment has no data for its figure; the
page then says the figure was skipped (an empty plot is never written).
Clients may miss rounds (a per-round participation subset): every line is drawn
through the rounds where its value exists.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import ScalarFormatter

from reports.data import ExperimentData, Series
from reports.style import (
    GLOBAL_COLOUR,
    client_colour,
    figure_legend,
    integer_rounds,
    new_figure,
    save,
    series_style,
    use_log_scale,
)

LOCAL_STYLE: dict[str, Any] = dict(linestyle="-", marker="o", markersize=6, linewidth=1.4)
# hollow and larger than the black global markers: a client line on top of the global one still shows
GLOBAL_STYLE: dict[str, Any] = dict(linestyle="--", marker="o", markersize=8, linewidth=1.1, markerfacecolor="none")
SERVER_STYLE: dict[str, Any] = dict(
    color=GLOBAL_COLOUR, linestyle="-", marker="D", markersize=3.5, linewidth=1.8, zorder=5
)
DODGE = 0.07  # rounds: horizontal offset between clients' error bars
#: Drawn over an eigenvalue whose Lanczos search stopped before converging (`top_eigenvalues_converged` false).
UNCONVERGED_STYLE: dict[str, Any] = dict(color="red", linestyle="none", marker="x", markersize=10, markeredgewidth=2,
                                         zorder=7)


@dataclass(frozen=True)
class FigureKind:
    """A figure of the experiment page: file name, title, caption, renderer, whether it needs landscapes."""

    file_name: str
    title: str
    caption: str | Callable[[ExperimentData], str]
    render: Callable[[ExperimentData, Path], Path | None]
    needs_landscape: bool
    reason_key: str | None = None  # key of ``ModelExtras.reasons`` that explains a skip

    def caption_for(self, data: ExperimentData) -> str:
        return self.caption(data) if callable(self.caption) else self.caption


def plot(ax: Axes, series: Series, shift: float = 0.0, **style: Any) -> list[float]:
    ax.plot([r + shift for r in series.rounds], series.values, **style)
    return list(series.values)


def shifted(series: Series, by: int) -> Series:
    return Series(tuple(r + by for r in series.rounds), series.values)


def linear_from_zero(ax: Axes, values: list[float]) -> None:
    """A linear axis from 0 to a little above the largest value (small losses stay visible as near 0)."""
    top = max(values) if values else 1.0
    ax.set_ylim(0.0, top * 1.06 if top > 0 else 1.0)


def _legend(figure: Figure, data: ExperimentData, entries: list[tuple[str, dict[str, Any]]]) -> None:
    handles: list[Any] = [
        Line2D([], [], color=client_colour(i, data.num_clients), linewidth=2.5, label=f"client {i}")
        for i in data.client_indices()
    ]
    handles += [Line2D([], [], **{"color": "grey", **style, "label": label}) for label, style in entries]
    figure_legend(figure, handles)


def accuracy_loss(data: ExperimentData, out_dir: Path) -> Path | None:
    """Global test accuracy/loss per round (round 0: the initial model) with each client's received and local model."""
    round0 = data.extras.round0
    panels = []
    for key, name in (("accuracy", "test accuracy"), ("loss", "test loss")):
        server = data.round_series((f"test_{key}",))
        if round0 is not None and server:
            server = Series((0, *server.rounds), (round0[f"test_{key}"], *server.values))
        lines = [(i, data.client_series(i, ("local", f"test_{key}")),
                  shifted(data.client_series(i, ("global", f"test_{key}")), -1)) for i in data.client_indices()]
        if server or any(local or received for _, local, received in lines):
            panels.append((key, name, server, lines))
    if not panels:
        return None
    figure, axes = new_figure(len(panels))
    for ax, (key, name, server, lines) in zip(axes, panels):
        values: list[float] = []
        for i, local, received in lines:
            colour = client_colour(i, data.num_clients)
            values += plot(ax, received, color=colour, **GLOBAL_STYLE)
            values += plot(ax, local, color=colour, **LOCAL_STYLE)
        values += plot(ax, server, **SERVER_STYLE)
        if key == "accuracy":
            ax.set_ylim(0.0, 1.02)  # a fraction: always on a linear 0..1 axis
        else:
            linear_from_zero(ax, values)
        ax.set_title(name)
        ax.set_ylabel(key)
        integer_rounds(ax)
    _legend(figure, data, [
        ("global model after round r, full test split", {k: v for k, v in SERVER_STYLE.items() if k != "color"}),
        ("local model trained in round r,\nclient's test data", LOCAL_STYLE),
        ("global model after round r (sent to the\nclients for round r+1), client's test data", GLOBAL_STYLE),
    ])
    figure.suptitle(data.label, fontsize="medium")
    return save(figure, out_dir / "accuracy_loss.png")


def _errorbars(ax: Axes, series: Series, errors: Series, shift: float, **style: Any) -> list[float]:
    error = dict(zip(errors.rounds, errors.values))
    yerr = [error.get(r, 0.0) for r in series.rounds]
    ax.errorbar([r + shift for r in series.rounds], series.values, yerr=yerr, capsize=2.5, elinewidth=0.9, **style)
    return [v + e for v, e in zip(series.values, yerr)] + [v - e for v, e in zip(series.values, yerr)]


def curvature(data: ExperimentData, out_dir: Path) -> Path | None:
    """Top eigenvalue and trace (± standard error) per round, local vs global; every stored eigenvalue."""
    clients = data.client_indices()
    centre = (len(clients) - 1) / 2
    top = ("top_eigenvalues", 0)
    has = any(data.client_series(i, ("landscape", "local", *top)) for i in clients) or bool(
        data.round_series(("landscape", "global", *top)))
    if not has:
        return None
    figure, axes = new_figure(2, 2)
    for ax, (metric, name) in zip(axes[:2], ((top, "top Hessian eigenvalue λ1"), (("trace",), "Hessian trace"))):
        values: list[float] = []
        for position, i in enumerate(clients):
            colour, shift = client_colour(i, data.num_clients), (position - centre) * DODGE
            for model, style, by in (("local", LOCAL_STYLE, 0), ("global", GLOBAL_STYLE, -1)):
                # the received global model is drawn at the round it was aggregated in (r - 1)
                series = shifted(data.client_series(i, ("landscape", model, *metric)), by)
                if metric == ("trace",):
                    errors = shifted(data.client_series(i, ("landscape", model, "trace_stderr")), by)
                    values += _errorbars(ax, series, errors, shift, color=colour, **style)
                else:
                    values += plot(ax, series, shift, color=colour, **style)
                    plot(ax, shifted(data.unconverged(i, model), by), shift, **UNCONVERGED_STYLE)
        server = data.round_series(("landscape", "global", *metric))
        if metric == ("trace",):
            values += _errorbars(ax, server, data.round_series(("landscape", "global", "trace_stderr")), 0.0,
                                 **SERVER_STYLE)
        else:
            values += plot(ax, server, **SERVER_STYLE)
            plot(ax, data.unconverged(None), **UNCONVERGED_STYLE)
        use_log_scale(ax, values)
        ax.set_title(name + (" ± 1 standard error" if metric == ("trace",) else ""))
        ax.set_ylabel("eigenvalue" if metric == top else "trace")
        integer_rounds(ax)
    _all_eigenvalues_by_round(axes[2], data)
    _all_eigenvalues_last_round(axes[3], data)
    _legend(figure, data, [
        ("global model after round r,\nserver's held-out test subset", {k: v for k, v in SERVER_STYLE.items()
                                                                        if k != "color"}),
        ("local model trained in round r,\nclient's train subset", LOCAL_STYLE),
        ("global model after round r (clients train\nfrom it in r+1), client's train subset", GLOBAL_STYLE),
        ("λ1 whose eigenvalue search did not converge", UNCONVERGED_STYLE),
    ])
    figure.suptitle(f"{data.label}: curvature", fontsize="medium")
    return save(figure, out_dir / "curvature.png")


def _stored_k(data: ExperimentData) -> int:
    lengths = [len(v) for d in (*data.rounds, *data.client_stats)
               for v in [((d.get("landscape") or {}).get("global") or {}).get("top_eigenvalues")]
               if isinstance(v, list)]
    return max(lengths, default=0)


def _all_eigenvalues_by_round(ax: Axes, data: ExperimentData) -> None:
    k = _stored_k(data)
    values: list[float] = []
    for j in range(k):
        series = data.round_series(("landscape", "global", "top_eigenvalues", j))
        values += plot(ax, series, label=f"λ{j + 1}", **{**series_style(j, max(k, 1)), "linewidth": 1.4})
    use_log_scale(ax, values)
    ax.set_title(f"global model: top {k} eigenvalues (held-out subset)")
    ax.set_ylabel("eigenvalue")
    integer_rounds(ax)
    if k:
        ax.legend(fontsize="small")


def _all_eigenvalues_last_round(ax: Axes, data: ExperimentData) -> None:
    measured = [d["round"] for d in data.client_stats if isinstance((d.get("landscape") or {}).get("local"), dict)]
    if not measured:
        ax.set_visible(False)
        return
    last = max(measured)
    k = _stored_k(data)
    values: list[float] = []
    for doc in data.stats_of(last):
        i = int(doc["client_index"])
        for model, offset, style in (("local", -0.15, LOCAL_STYLE), ("global", 0.15, GLOBAL_STYLE)):
            eigen = ((doc.get("landscape") or {}).get(model) or {}).get("top_eigenvalues") or []
            finite = [float(v) for v in eigen if isinstance(v, (int, float)) and np.isfinite(v)]
            ax.plot([i + offset] * len(finite), finite, linestyle="none", color=client_colour(i, data.num_clients),
                    marker=style["marker"], markersize=6, markerfacecolor=style.get("markerfacecolor"))
            values += finite
    use_log_scale(ax, values)
    ax.set_xticks(sorted({int(d["client_index"]) for d in data.stats_of(last)}))
    ax.set_xlabel("client (filled: local model; hollow: global model it trained from)")
    ax.set_ylabel("eigenvalue")
    ax.set_title(f"round {last}: top {k} eigenvalues per client (train subset)")
    ax.grid(True, alpha=0.3)


def spectral_density(data: ExperimentData, out_dir: Path) -> Path | None:
    """Hessian eigenvalue densities (SLQ) in the last measured round: local vs global per client, and the aggregate."""
    densities = data.extras.densities
    if not densities:
        return None
    per_client = sorted({d.client_index for d in densities if d.client_index is not None})
    shown = per_client[:8]
    figure, axes = new_figure(min(len(shown) + 1, 4), (len(shown) + 4) // 4, width=4.2, height=3.2)
    panels = [(None, "global model after the round,\nanalysis test subset")] + [
        (i, f"client {i}: its train subset") for i in shown]
    for ax, (client, title) in zip(axes, panels):
        for d in densities:
            if d.client_index != client:
                continue
            style = LOCAL_STYLE if d.model == "local" else GLOBAL_STYLE
            colour = GLOBAL_COLOUR if client is None else client_colour(client, data.num_clients)
            label = "local model" if d.model == "local" else (
                "global model after the round" if client is None else "global model it trained from")
            ax.plot(d.grid, np.maximum(d.density, 1e-12), color=colour, linestyle=style["linestyle"],
                    linewidth=1.3, label=label)
        ax.set_yscale("log")
        ax.set_ylim(bottom=1e-6)
        ax.set_xlabel("Hessian eigenvalue")
        ax.set_ylabel("density")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    figure.suptitle(f"{data.label}: Hessian spectral density, round {data.extras.density_round}",
                    fontsize="medium")
    return save(figure, out_dir / "spectral_density.png")


def class_balance(data: ExperimentData, out_dir: Path) -> Path | None:
    """Heatmap of each client's class frequencies, annotated with the class counts."""
    clients = [c for c in data.clients if c.class_counts]
    if not clients:
        return None
    counts = np.array([c.class_counts for c in clients], dtype=np.int64)  # (clients, classes)
    totals = counts.sum(axis=1, keepdims=True)
    frequencies = counts / np.maximum(totals, 1)
    num_clients, num_classes = counts.shape
    width, height = min(1.0 + 0.75 * num_classes, 14), min(max(3.0, 1.4 + 0.45 * num_clients), 14)
    figure, (ax,) = new_figure(1, width=width, height=height)
    image = ax.imshow(frequencies, cmap="Blues", vmin=0.0, vmax=max(float(frequencies.max()), 1e-9), aspect="auto")
    figure.colorbar(image, ax=ax, label="share of the client's training data")
    if counts.size <= 400:
        threshold = 0.6 * float(frequencies.max())
        font = "small" if counts.size <= 60 else "x-small"
        for row in range(num_clients):
            for col in range(num_classes):
                ax.text(col, row, str(counts[row, col]), ha="center", va="center", fontsize=font,
                        color="white" if frequencies[row, col] > threshold else "black")
    ax.set_xticks(range(num_classes), [str(c) for c in range(num_classes)])
    ax.set_yticks(range(num_clients), [f"client {c.client_index} (n={c.num_train})" for c in clients])
    for label, client in zip(ax.get_yticklabels(), clients):
        label.set_color(client_colour(client.client_index, data.num_clients))
    ax.set_xlabel("class")
    ax.set_title(f"{data.label}: training samples per class")
    return save(figure, out_dir / "class_balance.png")


def contributions(data: ExperimentData, out_dir: Path) -> Path | None:
    """Leave-one-out deltas, update alignment per client per round, and gradient dissimilarity B."""
    clients = data.client_indices()
    per_client = [
        ("leave-one-out: test accuracy", "accuracy without client − with all", ("landscape", "leave_one_out"),
         "delta_test_accuracy"),
        ("leave-one-out: test loss", "loss without client − with all", ("landscape", "leave_one_out"),
         "delta_test_loss"),
        ("alignment with the aggregate update", "cosine", ("landscape", "client_alignment"), "cosine"),
    ]
    panels = []
    for title, ylabel, list_path, key in per_client:
        lines = {i: data.round_client_series(list_path, i, key) for i in clients}
        if any(lines.values()):
            panels.append((title, ylabel, lines))
    dissimilarity = data.round_series(("landscape", "gradient_dissimilarity"))
    if not panels and not dissimilarity:
        return None
    count = len(panels) + int(bool(dissimilarity))
    figure, axes = new_figure(min(count, 2), (count + 1) // 2)
    for ax, (title, ylabel, lines) in zip(axes, panels):
        for i, series in lines.items():
            plot(ax, series, color=client_colour(i, data.num_clients), label=f"client {i}", **LOCAL_STYLE)
        ax.axhline(0.0, color="grey", linewidth=0.8)
        if ylabel == "cosine":
            ax.set_ylim(-1.05, 1.05)
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        integer_rounds(ax)
    used = len(panels)
    if dissimilarity:
        ax = axes[used]
        plot(ax, dissimilarity, **SERVER_STYLE)
        ax.axhline(1.0, color="grey", linewidth=0.8, linestyle=":")
        top = max(dissimilarity.values)
        ax.set_ylim(0.0, max(2.0, top * 1.15))  # from 0 with B = 1 marked: the change is not exaggerated
        formatter = ScalarFormatter(useOffset=False)
        ax.yaxis.set_major_formatter(formatter)
        ax.set_title("gradient dissimilarity B (dotted: 1, identical client gradients)")
        ax.set_ylabel("B")
        integer_rounds(ax)
        used += 1
    for ax in axes[used:]:
        ax.set_visible(False)
    if panels:
        figure_legend(figure, axes[0].get_legend_handles_labels()[0])
    figure.suptitle(f"{data.label}: client contributions", fontsize="medium")
    return save(figure, out_dir / "contributions.png")
