"""Shared look of the report figures: a colour-blind-safe palette, line styles, scales, saving (PNG + PDF).

Figures are built with ``matplotlib.figure.Figure`` directly (no pyplot, no
global backend), so rendering needs no display. Colours come from Okabe & Ito's
palette (distinguishable with every common colour-vision deficiency); every
series also has its own line style and marker, so the figures read in greyscale.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any, TypeVar, cast

import matplotlib
from matplotlib.artist import Artist
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.rcsetup import cycler  # what ``matplotlib.cycler`` is (the stubs do not re-export it)
from matplotlib.ticker import MaxNLocator

from reports.atomic import replaced

if TYPE_CHECKING:
    from matplotlib.typing import RcKeyType  # the stubs' rc key names (not in matplotlib's runtime before 3.10)

PathT = TypeVar("PathT", bound=PurePath)

DPI = 110
GLOBAL_COLOUR = "black"  # the server's global model on the full (or held-out) test split
#: Okabe & Ito (2008) without black (the global model's colour) and yellow (too light on white), then yellow.
OKABE_ITO = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442")
LINE_STYLES: tuple[Any, ...] = ("-", "--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 1)), (0, (8, 2)))
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h")
SEQUENTIAL = "viridis"  # surfaces and round scales: perceptually uniform, readable in greyscale
#: Vector copies beside every PNG of a final render (what a paper includes).
VECTOR_FORMAT = "pdf"
_VECTOR_COPIES: ContextVar[bool] = ContextVar("vector_copies", default=True)

RC: dict[RcKeyType, Any] = {
    "font.size": 9.5,
    "axes.titlesize": 10,
    "axes.labelsize": 9.5,
    "legend.fontsize": 8.5,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.prop_cycle": cycler(color=OKABE_ITO),
    "pdf.fonttype": 42,  # TrueType in the PDF: text stays text in LaTeX and editors
    "svg.fonttype": "none",
}


@contextmanager
def paper_style() -> Iterator[None]:
    """The rc settings every report figure is drawn under (fonts, spines, palette)."""
    with matplotlib.rc_context(RC):
        yield


def client_colour(client_index: int, num_clients: int) -> str | tuple[float, float, float, float]:
    """The colour of a client in every figure of an experiment."""
    if num_clients <= len(OKABE_ITO):
        return OKABE_ITO[client_index % len(OKABE_ITO)]
    if num_clients <= 20:
        return matplotlib.colormaps["tab20"](client_index % 20)
    return matplotlib.colormaps["turbo"](client_index / max(num_clients - 1, 1))


def series_style(position: int, count: int) -> dict[str, Any]:
    """Colour, line style and marker of the ``position``-th series (experiment, eigenvalue index, ...)."""
    return {
        "color": client_colour(position, count),
        "linestyle": LINE_STYLES[position % len(LINE_STYLES)],
        "marker": MARKERS[position % len(MARKERS)],
        # hollow markers on every other series: two lines on top of each other both stay visible
        "markerfacecolor": "none" if position % 2 else client_colour(position, count),
    }


def new_figure(ncols: int, nrows: int = 1, *, width: float = 5.2, height: float = 3.6) -> tuple[Figure, list[Axes]]:
    figure = Figure(figsize=(width * ncols, height * nrows), dpi=DPI, layout="constrained")
    axes = figure.subplots(nrows, ncols, squeeze=False)
    return figure, [ax for row in axes for ax in row]


def use_log_scale(ax: Axes, values: Sequence[float], axis: str = "y") -> bool:
    """Log scale when every value is positive and they span more than a decade; returns whether set."""
    positive = [v for v in values if v > 0]
    if values and len(positive) == len(values) and max(positive) / min(positive) > 10:
        (ax.set_yscale if axis == "y" else ax.set_xscale)("log")
        return True
    return False


def integer_rounds(ax: Axes) -> None:
    # a linear round axis: its locator is the default AutoLocator, a MaxNLocator
    cast(MaxNLocator, ax.xaxis.get_major_locator()).set_params(integer=True)
    ax.set_xlabel("round")
    ax.grid(True, alpha=0.3)


def figure_legend(figure: Figure, handles: Sequence[Artist]) -> None:
    """One legend for the whole figure, outside on the right; extra columns past 24 entries."""
    figure.legend(handles=list(handles), loc="outside right upper", fontsize="small", ncol=1 + len(handles) // 24)


def vector_path(path: PathT) -> PathT:
    """The vector copy written beside a PNG."""
    return path.with_suffix("." + VECTOR_FORMAT)


@contextmanager
def raster_only() -> Iterator[None]:
    """Within the block ``save`` writes the PNG alone (and removes an older vector copy): a live render's figures
    are replaced a round later, and the PDF costs about as much again as the PNG; the final render writes both."""
    token = _VECTOR_COPIES.set(False)
    try:
        yield
    finally:
        _VECTOR_COPIES.reset(token)


def save(figure: Figure, path: Path) -> Path:
    """Write ``path`` (PNG) and its vector copy beside it, each atomically; returns the PNG's path."""
    with replaced(path) as temporary:
        figure.savefig(temporary, dpi=DPI, format="png")
    if not _VECTOR_COPIES.get():
        vector_path(path).unlink(missing_ok=True)  # a copy of an older state must not pass for this one
        return path
    figure.set_layout_engine("none")  # keep the layout just computed: the PDF needs no second solve
    with replaced(vector_path(path)) as temporary:
        figure.savefig(temporary, format=VECTOR_FORMAT)
    return path
