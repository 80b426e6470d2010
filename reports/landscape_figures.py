"""Landscape geometry figures: interpolation barriers, between-client geometry, PCA loss surfaces, trajectory."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.axes import Axes
from matplotlib.colors import Colormap, LogNorm, Normalize
from matplotlib.patheffects import withStroke

from reports.data import (
    BARRIER_DEFINITION,
    DIP_DEFINITION,
    ExperimentData,
    Series,
    Surface,
    interpolation_curve,
    path_dip,
)
from reports.figures import GLOBAL_STYLE, LOCAL_STYLE, SERVER_STYLE, integer_rounds, plot
from reports.style import SEQUENTIAL, client_colour, figure_legend, new_figure, save, use_log_scale

if TYPE_CHECKING:
    from matplotlib.cm import ScalarMappable

HALO = [withStroke(linewidth=2.5, foreground="white")]  # text readable on any contour colour
UPSAMPLE = 8  # display grid points per stored grid interval (bicubic)
LEVELS = 40  # filled contour levels: smooth colour steps
MAX_CURVE_PANELS = 8
MAX_CLIENT_LINES = 8  # more participants than this: points and their mean instead of a line each


def barriers(data: ExperimentData, out_dir: Path) -> Path | None:
    """The barrier per client per round, and each client's loss along alpha in every measured round."""
    clients = data.client_indices()
    barrier = {i: (data.barrier_series(i), data.barrier_series(i, path_dip)) for i in clients}
    curves: dict[int, list[tuple[int, list[float], list[float]]]] = {}
    for doc in data.client_stats:
        curve = interpolation_curve(doc)
        if curve is not None:
            curves.setdefault(int(doc["client_index"]), []).append((int(doc["round"]), *curve))
    if not curves:
        return None
    shown = sorted(curves)[:MAX_CURVE_PANELS]
    panels = 1 + len(shown)
    ncols = min(panels, 3)
    figure, axes = new_figure(ncols, (panels + ncols - 1) // ncols, width=4.6, height=3.4)
    ax = axes[0]
    for i, (heights, dips) in barrier.items():
        colour = client_colour(i, data.num_clients)
        plot(ax, heights, color=colour, label=f"client {i}", **LOCAL_STYLE)
        plot(ax, dips, color=colour, **GLOBAL_STYLE)
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set_title("barrier (filled, ≥ 0) and dip (hollow, ≤ 0)")
    ax.set_ylabel("loss above the straight line")
    integer_rounds(ax)
    measured_rounds = sorted({r for entries in curves.values() for r, _, _ in entries})
    norm = Normalize(min(measured_rounds), max(max(measured_rounds), min(measured_rounds) + 1))
    cmap = _round_cmap()
    all_losses = [v for entries in curves.values() for _, _, losses in entries for v in losses]
    for ax, i in zip(axes[1:], shown):
        use_log_scale(ax, all_losses)  # round 1 starts far up: a log axis keeps the later rounds readable
        for server_round, alphas, losses in sorted(curves[i]):
            colour = cmap(norm(server_round))
            ax.plot(alphas, losses, color=colour, marker="o", markersize=2.5, linewidth=1.2)
            ax.plot([alphas[0], alphas[-1]], [losses[0], losses[-1]], color=colour, linestyle=":", linewidth=0.8)
        ax.set_title(f"client {i}: loss along the line")
        ax.set_xlabel("α (0 = global model, 1 = client's local model)")
        ax.set_ylabel("loss, client's train subset")
        ax.grid(True, alpha=0.3)
    for ax in axes[panels:]:
        ax.set_visible(False)
    mappable = _scalar_mappable(norm, cmap)
    ticks = measured_rounds if len(measured_rounds) <= 12 else None
    figure.colorbar(mappable, ax=axes[1:panels], label="round", shrink=0.8, ticks=ticks)
    from matplotlib.lines import Line2D

    figure_legend(figure, [*axes[0].get_legend_handles_labels()[0],
                           Line2D([], [], color="grey", label="barrier", **LOCAL_STYLE),
                           Line2D([], [], color="grey", label="dip", **GLOBAL_STYLE)])
    figure.suptitle(f"{data.label}: linear interpolation, global → local (dotted: the straight line)\n"
                    f"{BARRIER_DEFINITION}; {DIP_DEFINITION}", fontsize="medium")
    return save(figure, out_dir / "barriers.png")


def _round_block(doc: Mapping[str, Any], key: str) -> Mapping[str, Any] | None:
    landscape = doc.get("landscape")
    block = landscape.get(key) if isinstance(landscape, Mapping) else None
    return block if isinstance(block, Mapping) else None


def client_geometry(data: ExperimentData, out_dir: Path) -> Path | None:
    """The last measured round's barriers between every pair of clients, and the flatness gap by round."""
    gaps = [(int(doc["round"]), block) for doc in data.rounds if (block := _round_block(doc, "flatness_gap"))]
    if not gaps:
        return None
    pairs = [(int(doc["round"]), block) for doc in data.rounds if (block := _round_block(doc, "pairwise_barriers"))]
    figure, (left, right) = new_figure(2, width=5.0, height=4.2)
    if pairs:
        server_round, block = pairs[-1]
        indices = [int(i) for i in block["client_indices"]]
        matrix = np.array([[np.nan if v is None else float(v) for v in row] for row in block["barriers"]])
        highest = float(np.nanmax(matrix)) if np.isfinite(matrix).any() else 0.0
        image = left.imshow(matrix, cmap=SEQUENTIAL, vmin=0.0, vmax=highest if highest > 0 else 1.0)
        figure.colorbar(image, ax=left, label="barrier, loss above the straight line", format="%.3g")
        positions = list(range(len(indices)))
        left.set_xticks(positions, [str(i) for i in indices])
        left.set_yticks(positions, [str(i) for i in indices])
        if len(indices) <= 8:
            for row in positions:
                for column in positions:
                    if np.isfinite(matrix[row, column]):
                        left.annotate(f"{matrix[row, column]:.3g}", (column, row), ha="center", va="center",
                                      fontsize="small", path_effects=HALO)
        left.set_xlabel("client j")
        left.set_ylabel("client i")
        left.set_title(f"round {server_round}: barrier, client i ↔ client j"
                       + ("\n(every path stays at or below its straight line)" if highest <= 0 else ""))
    else:
        left.text(0.5, 0.5, "one participant per round:\nno pair of client models", ha="center", va="center",
                  transform=left.transAxes)
        left.set_axis_off()
    local: dict[int, list[tuple[int, float | None]]] = {}
    for server_round, block in gaps:
        for index, value in zip(block["client_indices"], block["local"]):
            local.setdefault(int(index), []).append((server_round, value))
    values: list[float] = []
    if len(local) <= MAX_CLIENT_LINES:
        for index, entries in sorted(local.items()):
            series = Series(tuple(r for r, v in entries if v is not None),
                            tuple(float(v) for _, v in entries if v is not None))
            values += plot(right, series, color=client_colour(index, data.num_clients), label=f"client {index}",
                           **LOCAL_STYLE)
    else:  # partial participation: a line per member would be a legend of every member
        points = [(r, float(v)) for entries in local.values() for r, v in entries if v is not None]
        right.plot([r for r, _ in points], [v for _, v in points], linestyle="none", marker="o", markersize=4,
                   color="grey", alpha=0.6, label="a participant's local model")
        values += [v for _, v in points]
        mean = [(r, float(b["global"]) + float(b["mean_gap"])) for r, b in gaps
                if b.get("global") is not None and b.get("mean_gap") is not None]
        values += plot(right, Series(tuple(r for r, _ in mean), tuple(v for _, v in mean)), color="grey",
                       label="participants' mean (by subset size)", **LOCAL_STYLE)
    union = Series(tuple(r for r, b in gaps if b.get("global") is not None),
                   tuple(float(b["global"]) for _, b in gaps if b.get("global") is not None))
    values += plot(right, union, label="global, on the union", **SERVER_STYLE)
    use_log_scale(right, values)
    right.set_ylabel("top Hessian eigenvalue")
    right.set_title("flatness gap: local on own data vs global on all")
    integer_rounds(right)
    right.grid(True, alpha=0.3)
    figure_legend(figure, right.get_legend_handles_labels()[0])
    figure.suptitle(f"{data.label}: between the clients", fontsize="medium")
    return save(figure, out_dir / "client_geometry.png")


def _round_cmap() -> Colormap:
    import matplotlib

    return matplotlib.colormaps[SEQUENTIAL]


def _scalar_mappable(norm: Normalize, cmap: Colormap) -> ScalarMappable:
    from matplotlib.cm import ScalarMappable

    return ScalarMappable(norm=norm, cmap=cmap)


def chosen_surfaces(data: ExperimentData) -> list[int]:
    """Positions of the first, middle and last stored surfaces (without repeats)."""
    count = len(data.surfaces)
    return sorted({0, (count - 1) // 2, count - 1}) if count else []


def upsample(surface: Surface, factor: int = UPSAMPLE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bicubic interpolation of the stored grid for display, clipped to the stored range; (x, y, losses)."""
    nx, ny = surface.x.size, surface.y.size
    grid = torch.from_numpy(surface.losses[None, None])
    fine = F.interpolate(grid, size=((ny - 1) * factor + 1, (nx - 1) * factor + 1), mode="bicubic",
                         align_corners=True)[0, 0].numpy()
    finite = surface.losses[np.isfinite(surface.losses)]
    fine = np.clip(fine, finite.min(), finite.max()) if finite.size else fine
    xs = np.interp(np.linspace(0, nx - 1, fine.shape[1]), np.arange(nx), surface.x)
    ys = np.interp(np.linspace(0, ny - 1, fine.shape[0]), np.arange(ny), surface.y)
    return xs, ys, fine


def _norm(values: np.ndarray) -> tuple[Normalize, np.ndarray]:
    """One colour scale for every panel: log when positive and over a decade, else linear."""
    low, high = float(values.min()), float(values.max())
    if high <= low:
        high = low + 1e-9
    if low > 0 and high / low > 10:
        return LogNorm(low, high), np.geomspace(low, high, LEVELS + 1)
    return Normalize(low, high), np.linspace(low, high, LEVELS + 1)


def surfaces(data: ExperimentData, out_dir: Path) -> Path | None:
    """Contours of the loss over the two principal directions, on one colour scale, client points marked."""
    chosen = [data.surfaces[p] for p in chosen_surfaces(data)]
    if not chosen:
        return None
    finite = np.concatenate([s.losses[np.isfinite(s.losses)] for s in chosen])
    if finite.size == 0:
        return None
    norm, levels = _norm(finite)
    figure, axes = new_figure(len(chosen), width=4.6, height=4.2)
    filled = None
    for ax, surface in zip(axes, chosen):
        xs, ys, losses = upsample(surface)
        filled = ax.contourf(xs, ys, losses, levels=levels, norm=norm, cmap=SEQUENTIAL, extend="neither")
        ax.contour(xs, ys, losses, levels=levels[::5], colors="white", linewidths=0.4, alpha=0.6)
        _points(ax, data, surface)
        ratios = surface.explained_variance_ratio
        ax.set_xlabel("PC 1" + (f" ({ratios[0]:.0%} of the update variance)" if len(ratios) > 0 else ""))
        if surface.second_direction == "random":
            ax.set_ylabel("random direction orthogonal to PC 1")
        else:
            ax.set_ylabel("PC 2" + (f" ({ratios[1]:.0%} of the update variance)" if len(ratios) > 1 else ""))
        ax.set_title(f"round {surface.round}" + (f"; 1 unit = {surface.scale:.3g}" if surface.scale else ""))
        ax.set_aspect("equal")
    assert filled is not None
    figure.colorbar(filled, ax=axes, label="loss, held-out test subset", format="%.3g", shrink=0.9)
    figure.suptitle(f"{data.label}: loss around the aggregated model (★); client models as numbered points",
                    fontsize="medium")
    return save(figure, out_dir / "surfaces.png")


def _points(ax: Axes, data: ExperimentData, surface: Surface) -> None:
    span = float(max(np.ptp(surface.x), np.ptp(surface.y))) or 1.0
    for i, x, y in surface.client_points:
        colour = client_colour(i, data.num_clients)
        at_centre = np.hypot(x, y) < 0.01 * span
        # a ring, drawn under the star: a client at the centre (one client: its model is the aggregate) shows around it
        ax.plot([x], [y], marker="o", markersize=15 if at_centre else 9, color=colour, markerfacecolor="none"
                if at_centre else colour, markeredgewidth=2.2 if at_centre else 1.0, markeredgecolor=colour
                if at_centre else "black", linestyle="none", zorder=3)
        ax.annotate(f"client {i}" + (" (≈ aggregate)" if at_centre else ""), (x, y), textcoords="offset points",
                    xytext=(9, 7), fontsize="small", fontweight="bold", path_effects=HALO, zorder=6)
    ax.plot([0.0], [0.0], marker="*", color="white", markeredgecolor="black", markersize=12, linestyle="none",
            zorder=5)


def trajectory(data: ExperimentData, out_dir: Path) -> Path | None:
    """The global model of every round on the first two PCs of its trajectory, over the loss on that plane."""
    path = data.extras.trajectory
    if path is None:
        return None
    figure, (ax,) = new_figure(1, width=6.2, height=5.0)
    if path.losses is not None and path.xs is not None and path.ys is not None:
        finite = path.losses[np.isfinite(path.losses)]
        norm, levels = _norm(finite)
        filled = ax.contourf(path.xs, path.ys, path.losses, levels=levels, norm=norm, cmap=SEQUENTIAL)
        ax.contour(path.xs, path.ys, path.losses, levels=levels[::5], colors="white", linewidths=0.4, alpha=0.6)
        figure.colorbar(filled, ax=ax, label=f"loss, {path.num_samples} test images", format="%.3g")
    ax.plot(path.coords[:, 0], path.coords[:, 1], color="white", linewidth=3.2, zorder=3)
    ax.plot(path.coords[:, 0], path.coords[:, 1], color="black", linewidth=1.4, marker="o", markersize=5,
            markerfacecolor="white", zorder=4)
    step = max(1, len(path.rounds) // 12)
    for position, (server_round, (x, y)) in enumerate(zip(path.rounds, path.coords)):
        if position % step == 0 or position == len(path.rounds) - 1:
            ax.annotate(str(server_round), (x, y), textcoords="offset points", xytext=(5, 5), fontsize="small",
                        fontweight="bold", path_effects=HALO, zorder=6)
    ratio_1, ratio_2 = path.explained_variance_ratio
    ax.set_xlabel(f"PC 1 ({ratio_1:.0%} of the trajectory's variance), L2 distance")
    ax.set_ylabel(f"PC 2 ({ratio_2:.0%})")
    figure.suptitle(f"{data.label}: PCA trajectory of the global model", fontsize="medium")
    ax.set_title(f"numbers: rounds; round {path.rounds[-1]} at the centre")
    ax.set_aspect("equal")
    return save(figure, out_dir / "trajectory.png")
