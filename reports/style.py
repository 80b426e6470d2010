"""Shared look of the report figures: colours per client and experiment, scales, saving.

Figures are built with ``matplotlib.figure.Figure`` directly (no pyplot, no
global backend), so rendering needs no display and touches no global state.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib
from matplotlib.artist import Artist
from matplotlib.axes import Axes
from matplotlib.figure import Figure

DPI = 110
GLOBAL_COLOUR = "black"  # the server's global model on the full (or held-out) test split


def client_colour(client_index: int, num_clients: int) -> tuple[float, float, float, float]:
    """The colour of a client in every figure of an experiment."""
    if num_clients <= 10:
        return matplotlib.colormaps["tab10"](client_index % 10)
    if num_clients <= 20:
        return matplotlib.colormaps["tab20"](client_index % 20)
    return matplotlib.colormaps["turbo"](client_index / max(num_clients - 1, 1))


def series_colour(position: int, count: int) -> tuple[float, float, float, float]:
    """The colour of the ``position``-th experiment on the comparison figures."""
    return client_colour(position, count)


def new_figure(ncols: int, nrows: int = 1, *, width: float = 5.2, height: float = 3.6) -> tuple[Figure, list[Axes]]:
    figure = Figure(figsize=(width * ncols, height * nrows), dpi=DPI, layout="constrained")
    axes = figure.subplots(nrows, ncols, squeeze=False)
    return figure, [ax for row in axes for ax in row]


def use_log_scale(ax: Axes, values: Sequence[float], axis: str = "y") -> None:
    """Log scale when every value is positive and they span more than a decade."""
    positive = [v for v in values if v > 0]
    if values and len(positive) == len(values) and max(positive) / min(positive) > 10:
        (ax.set_yscale if axis == "y" else ax.set_xscale)("log")


def integer_rounds(ax: Axes) -> None:
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("round")
    ax.grid(True, alpha=0.3)


def figure_legend(figure: Figure, handles: Sequence[Artist]) -> None:
    """One legend for the whole figure, outside on the right; extra columns past 24 entries."""
    figure.legend(handles=list(handles), loc="outside right upper", fontsize="small", ncol=1 + len(handles) // 24)


def save(figure: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=DPI)
    return path
