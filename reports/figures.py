"""The figures of one experiment: one function each, saving a PNG and returning its path.

A function returns None when the experiment has no data for its figure; the
page then says the figure was skipped (an empty plot is never written).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patheffects import withStroke

from reports.data import ExperimentData, Path_, Series
from reports.style import (
    GLOBAL_COLOUR,
    client_colour,
    integer_rounds,
    figure_legend,
    new_figure,
    save,
    use_log_scale,
)

LOCAL_STYLE = dict(linestyle="-", marker="o", markersize=3.5, linewidth=1.4)
GLOBAL_STYLE = dict(linestyle="--", marker="s", markersize=3, linewidth=1.1, alpha=0.85)
SERVER_STYLE = dict(color=GLOBAL_COLOUR, linestyle="-", marker="D", markersize=4, linewidth=2.4)
HALO = [withStroke(linewidth=2.5, foreground="white")]  # text readable on any contour colour


@dataclass(frozen=True)
class FigureKind:
    """A figure of the experiment page: file name, title, caption, renderer, whether it needs landscapes."""

    file_name: str
    title: str
    caption: str
    render: Callable[[ExperimentData, Path], Path | None]
    needs_landscape: bool


def _plot(ax: Axes, series: Series, **style: object) -> list[float]:
    ax.plot(series.rounds, series.values, **style)  # type: ignore[arg-type]
    return list(series.values)


def _style_legend(figure: Figure, data: ExperimentData, server_label: str | None, local: str, glob: str) -> None:
    """Client colours plus one grey entry per line style."""
    handles = [
        Line2D([], [], color=client_colour(i, data.num_clients), linewidth=2, label=f"client {i}")
        for i in data.client_indices()
    ]
    handles.append(Line2D([], [], color="grey", **{**LOCAL_STYLE, "label": local}))  # type: ignore[arg-type]
    handles.append(Line2D([], [], color="grey", **{**GLOBAL_STYLE, "label": glob}))  # type: ignore[arg-type]
    if server_label:
        handles.append(Line2D([], [], **{**SERVER_STYLE, "label": server_label}))  # type: ignore[arg-type]
    figure_legend(figure, handles)


def _client_panels(
    data: ExperimentData,
    panels: list[tuple[str, Path_, Path_, Path_ | None]],  # (ylabel, local path, global path, server path)
    titles: list[str],
    server_label: str,
    local_label: str,
    global_label: str,
    path: Path,
) -> Path | None:
    """Per-client local (solid) and global (dashed) lines with the server's line, one panel per metric."""
    kept = []
    for panel, title in zip(panels, titles):
        ylabel, local_path, global_path, server_path = panel
        client_lines = [
            (i, data.client_series(i, local_path), data.client_series(i, global_path)) for i in data.client_indices()
        ]
        server = data.round_series(server_path) if server_path is not None else Series((), ())
        if server or any(local or glob for _, local, glob in client_lines):
            kept.append((title, ylabel, client_lines, server))
    if not kept:
        return None
    figure, axes = new_figure(len(kept))
    for ax, (title, ylabel, client_lines, server) in zip(axes, kept):
        values: list[float] = []
        for i, local, glob in client_lines:
            colour = client_colour(i, data.num_clients)
            values += _plot(ax, local, color=colour, **LOCAL_STYLE)
            values += _plot(ax, glob, color=colour, **GLOBAL_STYLE)
        values += _plot(ax, server, **SERVER_STYLE)
        if ylabel == "accuracy":
            ax.set_ylim(0.0, 1.02)  # a fraction: always on a linear 0..1 axis
        else:
            use_log_scale(ax, values)
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        integer_rounds(ax)
    _style_legend(figure, data, server_label, local_label, global_label)
    figure.suptitle(data.label, fontsize="medium")
    return save(figure, path)


def accuracy_loss(data: ExperimentData, out_dir: Path) -> Path | None:
    """Global test accuracy/loss per round with each client's local and global accuracy/loss."""
    return _client_panels(
        data,
        [
            ("accuracy", ("local", "test_accuracy"), ("global", "test_accuracy"), ("test_accuracy",)),
            ("loss", ("local", "test_loss"), ("global", "test_loss"), ("test_loss",)),
        ],
        ["test accuracy", "test loss"],
        server_label="global model, full test split",
        local_label="local model, client's test data",
        global_label="global model, client's test data",
        path=out_dir / "accuracy_loss.png",
    )


def curvature(data: ExperimentData, out_dir: Path) -> Path | None:
    """Top Hessian eigenvalue and trace per round: local vs global model, per client and on the server."""
    return _client_panels(
        data,
        [
            ("top eigenvalue", ("landscape", "local", "top_eigenvalues", 0),
             ("landscape", "global", "top_eigenvalues", 0), ("landscape", "global", "top_eigenvalues", 0)),
            ("trace", ("landscape", "local", "trace"), ("landscape", "global", "trace"),
             ("landscape", "global", "trace")),
        ],
        ["top Hessian eigenvalue", "Hessian trace"],
        server_label="global model, held-out test subset",
        local_label="local model, client's train subset",
        global_label="global model, client's train subset",
        path=out_dir / "curvature.png",
    )


def barriers(data: ExperimentData, out_dir: Path) -> Path | None:
    """Interpolation barrier per client per round, and the loss along alpha in the last measured round."""
    clients = data.client_indices()
    barrier = {i: data.client_series(i, ("landscape", "interpolation", "barrier")) for i in clients}
    curves: dict[int, tuple[list[float], list[float]]] = {}
    measured = [d["round"] for d in data.client_stats if _curve(d) is not None]
    last_round = max(measured) if measured else None
    for doc in data.stats_of(last_round) if last_round is not None else []:
        curve = _curve(doc)
        if curve is not None:
            curves[int(doc["client_index"])] = curve
    panels = int(any(barrier.values())) + int(bool(curves))
    if panels == 0:
        return None
    figure, axes = new_figure(panels)
    position = 0
    if any(barrier.values()):
        ax = axes[position]
        for i, series in barrier.items():
            _plot(ax, series, color=client_colour(i, data.num_clients), label=f"client {i}", **LOCAL_STYLE)
        ax.axhline(0.0, color="grey", linewidth=0.8)
        ax.set_title("loss barrier, global → local")
        ax.set_ylabel("barrier (loss above the straight line)")
        integer_rounds(ax)
        position += 1
    if curves:
        ax = axes[position]
        for i, (alphas, losses) in sorted(curves.items()):
            colour = client_colour(i, data.num_clients)
            ax.plot(alphas, losses, color=colour, label=f"client {i}", **LOCAL_STYLE)  # type: ignore[arg-type]
        ax.set_title(f"loss along the line, round {last_round}")
        ax.set_xlabel("alpha (0 = global model, 1 = local model)")
        ax.set_ylabel("loss on the client's train subset")
        ax.grid(True, alpha=0.3)
    figure_legend(figure, axes[0].get_legend_handles_labels()[0])
    figure.suptitle(data.label, fontsize="medium")
    return save(figure, out_dir / "barriers.png")


def _curve(doc: dict[str, Any]) -> tuple[list[float], list[float]] | None:
    interpolation = (doc.get("landscape") or {}).get("interpolation") or {}
    alphas, losses = interpolation.get("alphas"), interpolation.get("losses")
    if not isinstance(alphas, list) or not isinstance(losses, list) or len(alphas) != len(losses) or len(alphas) < 2:
        return None
    pairs = [(float(a), float(v)) for a, v in zip(alphas, losses) if v is not None and np.isfinite(v)]
    return ([a for a, _ in pairs], [v for _, v in pairs]) if len(pairs) >= 2 else None


def chosen_surfaces(data: ExperimentData) -> list[int]:
    """Positions of the first, middle and last stored surfaces (without repeats)."""
    count = len(data.surfaces)
    return sorted({0, (count - 1) // 2, count - 1}) if count else []


def surfaces(data: ExperimentData, out_dir: Path) -> Path | None:
    """Contours of the loss over the two principal directions, client points marked, for chosen rounds."""
    chosen = [data.surfaces[p] for p in chosen_surfaces(data)]
    if not chosen:
        return None
    figure, axes = new_figure(len(chosen), width=5.0, height=4.4)
    for ax, surface in zip(axes, chosen):
        losses = surface.losses
        finite = losses[np.isfinite(losses)]
        log = finite.size > 0 and finite.min() > 0 and finite.max() / finite.min() > 10
        if log:
            levels = np.geomspace(finite.min(), finite.max(), 16)
            filled = ax.contourf(surface.x, surface.y, losses, levels=levels, norm=LogNorm(), cmap="viridis")
        else:
            filled = ax.contourf(surface.x, surface.y, losses, levels=15, cmap="viridis")
        ax.contour(surface.x, surface.y, losses, levels=filled.levels, colors="white", linewidths=0.4, alpha=0.5)
        figure.colorbar(filled, ax=ax, label="loss", format="%.3g")
        ax.plot([0.0], [0.0], marker="*", color="white", markeredgecolor="black", markersize=13, linestyle="none")
        ax.annotate("global model", (0.0, 0.0), textcoords="offset points", xytext=(6, -12), fontsize="small",
                    path_effects=HALO)
        for i, x, y in surface.client_points:
            colour = client_colour(i, data.num_clients)
            ax.plot([x], [y], marker="o", color=colour, markeredgecolor="black", markersize=8, linestyle="none")
            ax.annotate(str(i), (x, y), textcoords="offset points", xytext=(5, 5), fontsize="small",
                        fontweight="bold", path_effects=HALO)
        ratios = surface.explained_variance_ratio
        ax.set_xlabel("PC 1" + (f" ({ratios[0]:.0%} of variance)" if len(ratios) > 0 else ""))
        if surface.second_direction == "random":
            ax.set_ylabel("random direction orthogonal to PC 1")
        else:
            ax.set_ylabel("PC 2" + (f" ({ratios[1]:.0%} of variance)" if len(ratios) > 1 else ""))
        ax.set_title(f"round {surface.round}")
    figure.suptitle(f"{data.label}: loss surface, client models as numbered points", fontsize="medium")
    return save(figure, out_dir / "surfaces.png")


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
            _plot(ax, series, color=client_colour(i, data.num_clients), label=f"client {i}", **LOCAL_STYLE)
        ax.axhline(0.0, color="grey", linewidth=0.8)
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        integer_rounds(ax)
    used = len(panels)
    if dissimilarity:
        ax = axes[used]
        _plot(ax, dissimilarity, **SERVER_STYLE)
        use_log_scale(ax, list(dissimilarity.values))
        ax.set_title("gradient dissimilarity B")
        ax.set_ylabel("B (1 = identical client gradients)")
        integer_rounds(ax)
        used += 1
    for ax in axes[used:]:
        ax.set_visible(False)
    if panels:
        figure_legend(figure, axes[0].get_legend_handles_labels()[0])
    figure.suptitle(f"{data.label}: client contributions", fontsize="medium")
    return save(figure, out_dir / "contributions.png")


EXPERIMENT_FIGURES: tuple[FigureKind, ...] = (
    FigureKind("accuracy_loss.png", "Accuracy and loss",
               "Black: the global model after aggregating round r, on the full test split. Solid: each client's "
               "local model after training in round r; dashed: the global model the client started round r from; "
               "both on the client's own test data.", accuracy_loss, False),
    FigureKind("class_balance.png", "Class balance",
               "Training samples per class and client (numbers); colour is the share of the client's data.",
               class_balance, False),
    FigureKind("curvature.png", "Curvature: top eigenvalue and trace",
               "Solid: the client's local model; dashed: the global model it started from; both on the client's "
               "landscape subset. Black: the global model on the server's held-out test subset.", curvature, True),
    FigureKind("barriers.png", "Interpolation barriers",
               "Loss barrier on the straight line from the global model (alpha 0) to each client's local model "
               "(alpha 1), per round; right: the loss along that line in the last measured round.", barriers, True),
    FigureKind("surfaces.png", "Loss surface",
               "Loss over the two principal directions of the client updates (first, middle and last measured "
               "round); numbered points are the client models, the star the aggregated global model at the centre of the grid.", surfaces, True),
    FigureKind("contributions.png", "Client contributions",
               "Leave-one-out: the global test metric without the client minus with all clients (full test split). "
               "Alignment: cosine between the client's update and the aggregate update. B: gradient dissimilarity "
               "over the clients' landscape subsets.", contributions, True),
)
