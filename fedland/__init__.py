"""fedland: loss-landscape metrics and the data/spec logic of the fedland stack.

Every metric is about the mean loss of a model over a fixed dataset, given as an
iterable of ``(inputs, targets)`` batches, each batch's mean-reduced loss
weighted by its size; it is evaluated in eval mode, leaves the model exactly as
it found it, and draws randomness only from its ``seed``. See the README's library section.
"""

from fedland.datasets import DATASETS, load_dataset
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
from fedland.slices import Interpolation, Slice1D, Slice2D, interpolate, loss_slice_1d, loss_slice_2d
from fedland.spec import ExperimentSpec, SpecError, StrategySpec, load_specs
from fedland.training import evaluate, train_local

__version__ = "0.1.0"

__all__ = [
    "DATASETS",
    "ClientPartition",
    "EigenResult",
    "ExperimentSpec",
    "HessianOperator",
    "Interpolation",
    "Slice1D",
    "Slice2D",
    "SpecError",
    "SpectralDensity",
    "StrategySpec",
    "TraceResult",
    "build_model",
    "cosine_similarity",
    "distance",
    "evaluate",
    "generalization_gap",
    "gradient_dissimilarity",
    "gradient_norm",
    "hessian_trace",
    "hessian_vector_product",
    "interpolate",
    "load_dataset",
    "load_specs",
    "loss_slice_1d",
    "loss_slice_2d",
    "model_direction",
    "partition",
    "pac_bayes_flatness",
    "path_norm",
    "random_direction",
    "resolve_device",
    "sharpness",
    "spectral_density",
    "top_eigenvalues",
    "train_local",
    "weight_norms",
]
