"""The figures of an experiment page, in page order, with captions that name the data and the units."""

from __future__ import annotations

from fedland.measure import PAIRWISE_MAX_MEMBERS
from reports import figures, landscape_figures
from reports.data import BARRIER_DEFINITION, DIP_DEFINITION, ExperimentData
from reports.figures import FigureKind


def _samples(data: ExperimentData) -> int:
    landscape = data.spec.get("landscape")
    return int(landscape.get("num_samples") or 256) if isinstance(landscape, dict) else 256


def _accuracy_caption(data: ExperimentData) -> str:
    round0 = ("Round 0 is the initial model, evaluated by the server on the full test split. "
              if data.extras.round0 is not None else
              f"No round-0 point: {data.extras.reasons.get('round0', 'not available')}. ")
    return ("Black diamonds: the global model after aggregating round r, on the full test split (10,000 images). "
            + round0 + "Filled circles, solid: each client's local model after training in round r. Hollow circles, "
            "dashed: the global model after round r, which the clients start round r+1 from. Both on the client's "
            "own test data. Global models sit at the round they were aggregated in, so every point at x = r is "
            "a model that exists after round r. Where a client's line coincides with the black one (a centralized "
            "run: the client's test data is the whole test split) the hollow rings show around the black diamonds. "
            "Loss: cross-entropy, linear axis from 0.")


def _curvature_caption(data: ExperimentData) -> str:
    return (f"Hessian of the mean cross-entropy. Clients measure on a fixed subset of {_samples(data)} of their "
            f"training images; the server measures the aggregated model on {_samples(data)} held-out test images. "
            "Top left: largest eigenvalue (Lanczos). Top right: trace (Hutch++) with ± 1 standard error "
            "(`trace_stderr`); clients are offset horizontally by a few hundredths of a round so their bars "
            "do not hide each other. Bottom: every stored eigenvalue (top_k) of the global model per round, and of "
            "each client's local model and received global model in the last measured round. Global models sit "
            "at the round they were aggregated in. Log axes where the values span more than a decade.")


def _density_caption(data: ExperimentData) -> str:
    return ("Eigenvalue density of the Hessian by stochastic Lanczos quadrature (Ghorbani et al. 2019; "
            "fedland.spectral_density, 3 probes × 40 steps), computed once by the server from the stored models of the "
            "last measured round before the experiment finished. Left: the aggregated global model on "
            f"{_samples(data)} test images (a seeded subset, not the held-out one). Then per client (the first "
            "8 participants), on the client's "
            f"own landscape subset ({_samples(data)} training images): its local model (solid) against the global "
            "model it trained from (dashed). Log density axis; mass far right of the bulk is the outlier "
            "eigenvalues that dominate sharpness.")


def _barrier_caption(data: ExperimentData) -> str:
    return (f"Linear interpolation from the global model each client received (α = 0) to its local model (α = 1), "
            f"loss on the client's landscape subset ({_samples(data)} training images). Left, filled: "
            f"{BARRIER_DEFINITION} over the stored α (Frankle et al. 2020, linear mode connectivity, with the "
            "linear baseline of Entezari et al. 2022), computed by the report from the stored curve: ≥ 0, and 0 "
            f"when the path never rises above the straight line between the endpoint losses. Hollow: the {DIP_DEFINITION} "
            "(≤ 0), how far the path sinks below that line. Then per client the raw curve of every measured round "
            "(colour: round) with its straight line dotted.")


def _between_clients_caption(data: ExperimentData) -> str:
    return (f"Measured by the server in rounds with at most {PAIRWISE_MAX_MEMBERS} participants. Left: the barrier "
            "of the linear path "
            f"between every pair of client models of the last measured round ({BARRIER_DEFINITION}, the same "
            f"definition as above), loss on the server's held-out test subset ({_samples(data)} test images); 0 on "
            "the diagonal; a high entry means the two local models sit in different basins. Right: the flatness "
            "gap (Caldarola et al. 2022): each client's local model's largest Hessian eigenvalue on its own "
            f"landscape subset ({_samples(data)} training images), against the aggregated global model's on the "
            "union of those subsets (black); clients above the black line sit in sharper regions of their own "
            "losses than the aggregate does on all the data.")


def _surface_caption(data: ExperimentData) -> str:
    return ("Loss (cross-entropy) of the server's held-out test subset "
            f"({_samples(data)} test images) on the plane through the aggregated global model (★, the centre) "
            "spanned by the first two principal directions of the clients' updates w_i − w_global(r−1) "
            "(one client: PC 1 and a seeded random orthogonal direction). Axis unit: the clients' RMS update norm "
            "in that round (its value in each title, an L2 distance in parameter space), so ±1 spans about one "
            "update. Numbered points are the clients' local models projected onto the plane. First, middle and "
            "last measured round, on one colour scale; the stored grid is bicubic-upsampled for display.")


def _trajectory_caption(data: ExperimentData) -> str:
    if data.extras.trajectory is None:
        return ""
    samples = data.extras.trajectory.num_samples
    return ("The global model after every round (0 = the initial weights), projected on the first two principal "
            "components of θ_r − θ_last over the rounds (Li et al. 2018, 'Visualizing the loss landscape', "
            "PCA trajectory); the axes are distances in parameter space along those unit directions. Colour: the "
            f"loss on that plane, evaluated once by the server (before the experiment finished) on {samples} test "
            "images (a seeded subset of the test split) around the last model.")


EXPERIMENT_FIGURES: tuple[FigureKind, ...] = (
    FigureKind("accuracy_loss.png", "Accuracy and loss", _accuracy_caption, figures.accuracy_loss, False),
    FigureKind("class_balance.png", "Class balance",
               "Training samples per class and client (numbers); colour is the share of the client's data.",
               figures.class_balance, False),
    FigureKind("trajectory.png", "Trajectory of the global model", _trajectory_caption,
               landscape_figures.trajectory, False, "trajectory"),
    FigureKind("curvature.png", "Curvature: eigenvalues and trace", _curvature_caption, figures.curvature, True),
    FigureKind("spectral_density.png", "Hessian spectral density, local vs global", _density_caption,
               figures.spectral_density, True, "density"),
    FigureKind("barriers.png", "Interpolation barriers", _barrier_caption, landscape_figures.barriers, True),
    FigureKind("client_geometry.png", "Between the clients: pairwise barriers and the flatness gap",
               _between_clients_caption, landscape_figures.client_geometry, True),
    FigureKind("surfaces.png", "Loss surface", _surface_caption, landscape_figures.surfaces, True),
    FigureKind("contributions.png", "Client contributions",
               "Leave-one-out: the global test metric without the client minus with all clients (full test split). "
               "Alignment: cosine between the client's update and the aggregate update. B: gradient dissimilarity "
               "(FedProx's B, 1 when all client gradients agree) over the clients' landscape subsets, on an axis "
               "from 0.", figures.contributions, True),
)
