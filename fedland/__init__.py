"""fedland: loss-landscape metrics and the data/spec logic of the fedland stack.

Every metric is about the mean loss of a model over a fixed dataset, given as an
iterable of ``(inputs, targets)`` batches, each batch's mean-reduced loss
weighted by its size; it is evaluated in eval mode, leaves the model exactly as
it found it, and draws randomness only from its ``seed``. See the README's library section.
"""

from fedland._objective import NonFiniteLossError
from fedland.ascent_sharpness import adaptive_sharpness, worst_case_sharpness
from fedland.curvature import (
    FisherOperator,
    FlatnessGap,
    GGNOperator,
    SubsetOperator,
    curvature_operator,
    flatness_gap,
    layer_top_eigenvalues,
)
from fedland.datasets import DATASETS, install_dataset, load_dataset
from fedland.device import resolve_device
from fedland.directions import model_direction, random_direction
from fedland.generalization import generalization_gap, pac_bayes_flatness, weight_norms
from fedland.hessian import (
    EigenResult,
    HessianOperator,
    SpectralDensity,
    TraceResult,
    hessian_trace,
    hessian_vector_product,
    spectral_density,
    top_eigenvalues,
)
from fedland.models import build_model
from fedland.partition import ClientPartition, partition
from fedland.scalars import cosine_similarity, distance, gradient_dissimilarity, gradient_norm, path_norm, sharpness
from fedland.slices import (
    Interpolation,
    PairwiseBarriers,
    Slice1D,
    Slice2D,
    interpolate,
    loss_slice_1d,
    loss_slice_2d,
    pairwise_barriers,
)
from fedland.spec import ExperimentSpec, SpecError, StrategySpec, load_specs
from fedland.training import evaluate, train_local

__version__ = "0.1.0"

__all__ = [
    "ClientPartition",
    "DATASETS",
    "EigenResult",
    "ExperimentSpec",
    "FisherOperator",
    "FlatnessGap",
    "GGNOperator",
    "HessianOperator",
    "Interpolation",
    "NonFiniteLossError",
    "PairwiseBarriers",
    "Slice1D",
    "Slice2D",
    "SpecError",
    "SpectralDensity",
    "StrategySpec",
    "SubsetOperator",
    "TraceResult",
    "adaptive_sharpness",
    "build_model",
    "cosine_similarity",
    "curvature_operator",
    "distance",
    "evaluate",
    "flatness_gap",
    "generalization_gap",
    "gradient_dissimilarity",
    "gradient_norm",
    "hessian_trace",
    "hessian_vector_product",
    "install_dataset",
    "interpolate",
    "layer_top_eigenvalues",
    "load_dataset",
    "load_specs",
    "loss_slice_1d",
    "loss_slice_2d",
    "model_direction",
    "pairwise_barriers",
    "partition",
    "pac_bayes_flatness",
    "path_norm",
    "random_direction",
    "resolve_device",
    "sharpness",
    "spectral_density",
    "top_eigenvalues",
    "train_local",
    "worst_case_sharpness",
    "weight_norms",
]
