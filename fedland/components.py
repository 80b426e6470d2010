"""Resolve a component's name (a built-in, or an import path ``"package.module:attr"``) and check its contract.

The one resolver the server, the workers and the reports use, for the four kinds
of component a spec names:

* ``"model"``: a factory of ``num_classes`` returning an ``nn.Module`` of logits
  ``(batch, num_classes)``, with an ``input_shape`` attribute ``(channels, height, width)``
  (a class attribute of a module class works). Checked by building it for 2
  classes and running a zero batch of that shape through it (global RNG untouched).
* ``"dataset"``: an object (or a class, built without arguments) with
  ``num_classes`` (int >= 2), ``input_shape``, the per-class sample counts
  ``train_class_counts`` / ``test_class_counts`` its ``load`` returns, an optional
  bool ``augment`` (default ``False``) and ``load(data_dir) -> (train_x, train_y,
  test_x, test_y)`` (`DatasetSource`). Resolved into a `DatasetComponent`, not
  loaded (the spec checks partitions against the declared counts); its arrays are
  checked against them each time `DatasetComponent.load` loads it. The built-ins
  wrap ``fedland.datasets``.
* ``"strategy"``: a class, built with the spec's parameters, that follows
  ``fedland.strategies.Strategy``: a bool class attribute ``averages``, methods
  ``aggregate`` and ``aggregate_mean``.
* ``"client_algorithm"``: a class, built with the spec's parameters, that
  follows ``fedland.algorithms.ClientAlgorithm``: a method ``train``.

A name without ``:`` is looked up among the built-ins of its kind, whose entries
are registered through these same contracts. An import path is imported from the
Python path the process already has (installed packages, and the researcher's
workspace folder when the stack puts it there): nothing is ever fetched or
uploaded. Every failure is a ``ValueError`` that names the field and the path.
"""

from __future__ import annotations

import importlib
import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from fedland.algorithms import CLIENT_ALGORITHMS
from fedland.datasets import DATASETS, Dataset, Images, load_dataset, verify_dataset
from fedland.models import _MODELS as _MODEL_FACTORIES
from fedland.models import MODEL_INPUT_SHAPES, MODEL_NAMES, build_model
from fedland.strategies import STRATEGIES, Strategy

__all__ = [
    "COMPONENT_KINDS",
    "DatasetComponent",
    "DatasetSource",
    "ModelComponent",
    "is_import_path",
    "resolve",
    "resolve_client_algorithm",
    "resolve_dataset",
    "resolve_model",
    "resolve_strategy",
]

COMPONENT_KINDS = ("model", "dataset", "strategy", "client_algorithm")

#: train_x, train_y, test_x, test_y; images as float tensors or as the compact ``fedland.datasets.Images``
DatasetArrays = tuple[torch.Tensor | Images, torch.Tensor, torch.Tensor | Images, torch.Tensor]


@runtime_checkable
class DatasetSource(Protocol):
    """A dataset's contract: what the spec checks without reading it, and how to load it.

    ``train_class_counts`` / ``test_class_counts`` hold one count per class, of
    the labels ``load`` returns (checked at every load). ``augment`` (optional,
    default ``False``) is the spec's default for training-time augmentation.
    ``load`` is called once per experiment plan a process builds: a slow one
    caches its arrays itself.
    """

    num_classes: int
    input_shape: tuple[int, ...]
    train_class_counts: tuple[int, ...]
    test_class_counts: tuple[int, ...]

    def load(self, data_dir: str | os.PathLike[str]) -> DatasetArrays:
        """``(train_x (N, C, H, W), train_y (N,), test_x, test_y)`` from ``data_dir``.

        Images: float32 tensors (used as they are) or ``fedland.datasets.Images``
        (uint8, normalised per batch); labels: integer tensors in ``[0, num_classes)``.
        """
        ...


@dataclass(frozen=True)
class ModelComponent:
    """A model factory and the input shape it takes; `build` draws the weights from a seed only."""

    name: str
    factory: Callable[[int], nn.Module]
    input_shape: tuple[int, ...]

    def build(self, seed: int, num_classes: int) -> nn.Module:
        """The model with weights drawn from ``seed`` (built-ins: ``build_model``); the caller's RNG is untouched."""
        if self.name in MODEL_NAMES:
            return build_model(self.name, seed, num_classes)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.factory(num_classes)


@dataclass(frozen=True)
class DatasetComponent:
    """A dataset as the spec, the server, the workers and the reports use it: its facts, and `load`.

    ``name`` is the spec's ``dataset_name`` (a built-in or an import path);
    the rest is what the spec checks without reading the data.
    """

    name: str
    num_classes: int
    input_shape: tuple[int, ...]
    train_class_counts: tuple[int, ...]
    test_class_counts: tuple[int, ...]
    augment: bool
    source: DatasetSource = field(compare=False, repr=False)

    @property
    def num_train(self) -> int:
        return sum(self.train_class_counts)

    @property
    def num_test(self) -> int:
        return sum(self.test_class_counts)

    def load(self, data_dir: str | os.PathLike[str]) -> Dataset:
        """The dataset's arrays from ``data_dir``, checked against this component's facts.

        Raises:
            ValueError: ``"dataset_name: ..."`` naming the dataset: ``load`` raised, or returned
                arrays of another shape, dtype, label range or class counts than declared.
            DatasetMissingError, DatasetIntegrityError: a built-in's files (``fedland.datasets.load_dataset``).
        """
        if isinstance(self.source, _BuiltinDataset):
            arrays = self.source.load(data_dir)  # the built-ins' own errors say which file and how to fix it
        else:
            try:
                arrays = self.source.load(data_dir)
            except Exception as error:  # the researcher's code raised
                raise ValueError(f"dataset_name: {self.name!r}.load({str(data_dir)!r}) raised {error!r}") from error
        if not isinstance(arrays, tuple) or len(arrays) != 4:
            raise ValueError(
                f"dataset_name: {self.name!r}.load must return (train_x, train_y, test_x, test_y), "
                f"got {type(arrays).__name__}"
            )
        train_x, test_x = (self._images(x, split) for x, split in ((arrays[0], "train"), (arrays[2], "test")))
        train_y = self._labels(arrays[1], len(train_x), self.train_class_counts, "train")
        test_y = self._labels(arrays[3], len(test_x), self.test_class_counts, "test")
        return Dataset(info=self, train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y)

    def verify(self, data_dir: str | os.PathLike[str]) -> None:
        """Make sure the dataset loads from ``data_dir``, keeping nothing loaded (a launcher's check before it starts).

        A built-in: its files downloaded once when absent, verified and converted
        (``fedland.datasets.verify_dataset``); a dataset by import path: loaded once
        and checked (`load`). Raises the errors of `load`.
        """
        if isinstance(self.source, _BuiltinDataset):
            verify_dataset(self.name, data_dir)
        else:
            self.load(data_dir)

    def _images(self, images: Any, split: str) -> Images:
        if isinstance(images, torch.Tensor) and images.dtype == torch.float32 and images.ndim == 4:
            pixels = images.detach().cpu().contiguous().numpy()  # (N, C, H, W), used as they are: mean 0, std 1
            images = Images(pixels, (0.0,) * pixels.shape[1], (1.0,) * pixels.shape[1])
        if isinstance(images, Images) and tuple(images.shape[1:]) == self.input_shape:
            return images
        if isinstance(images, (Images, torch.Tensor)):
            got = f"{images.dtype} {tuple(images.shape)}"
        else:
            got = type(images).__name__
        raise ValueError(
            f"dataset_name: {self.name!r}.load's {split}_x must be float32 (N, *input_shape) = "
            f"(N, {', '.join(map(str, self.input_shape))}) images, got {got}"
        )

    def _labels(self, labels: Any, num_images: int, declared: tuple[int, ...], split: str) -> torch.Tensor:
        name = f"dataset_name: {self.name!r}.load's {split}_y"
        if not isinstance(labels, torch.Tensor) or labels.ndim != 1 or labels.is_floating_point():
            got = f"{labels.dtype} {tuple(labels.shape)}" if isinstance(labels, torch.Tensor) else type(labels).__name__
            raise ValueError(f"{name} must be a 1-d integer tensor, got {got}")
        if len(labels) != num_images:
            raise ValueError(f"{name} has {len(labels)} labels for {num_images} images")
        labels = labels.to(torch.int64)
        if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < self.num_classes:
            raise ValueError(f"{name} must lie in [0, {self.num_classes}), got [{int(labels.min())}, {int(labels.max())}]")
        counts = tuple(int(c) for c in np.bincount(labels.numpy(), minlength=self.num_classes))
        if counts != declared:
            raise ValueError(f"{name} has class counts {counts}, but {split}_class_counts declares {declared}")
        return labels


@dataclass
class _BuiltinDataset:
    """A dataset of ``fedland.datasets.DATASETS`` through the `DatasetSource` contract."""

    name: str
    num_classes: int
    input_shape: tuple[int, ...]
    train_class_counts: tuple[int, ...]
    test_class_counts: tuple[int, ...]
    augment: bool

    def load(self, data_dir: str | os.PathLike[str]) -> DatasetArrays:
        loaded = load_dataset(self.name, data_dir)
        return loaded.train_x, loaded.train_y, loaded.test_x, loaded.test_y


def is_import_path(name: str) -> bool:
    """Whether ``name`` is an import path ``"package.module:attr"`` rather than a built-in name."""
    return ":" in name


def resolve(kind: str, name: str, field: str | None = None) -> Any:
    """The component ``name`` of ``kind`` (see ``COMPONENT_KINDS``), its contract checked.

    Args:
        kind: ``"model"``, ``"dataset"``, ``"strategy"`` or ``"client_algorithm"``.
        name: a built-in name of that kind, or ``"package.module:attr"`` (``attr`` may be dotted).
        field: the spec field named in errors (default: ``kind``).

    Returns:
        ``"model"``: a `ModelComponent`; ``"dataset"``: a `DatasetComponent`;
        ``"strategy"`` / ``"client_algorithm"``: the class, to build with the spec's parameters.

    Raises:
        ValueError: ``"<field>: ..."``: an unknown built-in, a malformed path, a
            module that cannot be imported, a missing attribute, or a contract not met.
    """
    if kind not in COMPONENT_KINDS:
        raise ValueError(f"kind: must be one of {', '.join(COMPONENT_KINDS)}, got {kind!r}")
    where = field or kind
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}: must be a non-empty name, got {name!r}")
    if not is_import_path(name):
        return _builtin(kind, name, where)
    target = _import(name, where)
    return _CHECKS[kind](name, target, where)


def resolve_model(name: str, field: str = "model") -> ModelComponent:
    component: ModelComponent = resolve("model", name, field)
    return component


def resolve_dataset(name: str, field: str = "dataset_name") -> DatasetComponent:
    """The spec's dataset ``name``: its facts (nothing read) and ``load(data_dir)``; see `resolve`."""
    component: DatasetComponent = resolve("dataset", name, field)
    return component


def resolve_strategy(name: str, field: str = "strategy.name") -> type[Strategy]:
    factory: type[Strategy] = resolve("strategy", name, field)
    return factory


def resolve_client_algorithm(name: str, field: str = "client_algorithm") -> Callable[..., Any]:
    factory: Callable[..., Any] = resolve("client_algorithm", name, field)
    return factory


# ---------------------------------------------------------------- built-ins


def _builtin(kind: str, name: str, where: str) -> Any:
    table: dict[str, Any]
    if kind == "model":
        table = {
            key: ModelComponent(key, _MODEL_FACTORIES[key][0], MODEL_INPUT_SHAPES[key]) for key in MODEL_NAMES
        }
    elif kind == "dataset":
        table = {}
        for key, info in DATASETS.items():
            facts = (info.num_classes, info.input_shape, info.train_class_counts, info.test_class_counts, info.augment)
            table[key] = DatasetComponent(key, *facts, source=_BuiltinDataset(key, *facts))
    elif kind == "strategy":
        table = dict(STRATEGIES)
    else:
        table = dict(CLIENT_ALGORITHMS)
    if name not in table:
        raise ValueError(
            f"{where}: unknown {kind.replace('_', ' ')} {name!r}; built-ins: {', '.join(table)} "
            f"(or an import path 'package.module:attr')"
        )
    return table[name]


# ---------------------------------------------------------------- import paths


def _import(path: str, where: str) -> Any:
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute or ":" in attribute:
        raise ValueError(f"{where}: import path {path!r} must read 'package.module:attr'")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(
            f"{where}: cannot import module {module_name!r} of {path!r} ({error}); is it installed, "
            f"or in the workspace folder the stack puts on the Python path?"
        ) from error
    except Exception as error:  # the researcher's module raised while being imported
        raise ValueError(f"{where}: importing module {module_name!r} of {path!r} failed: {error!r}") from error
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ValueError(f"{where}: module {module_name!r} has no attribute {attribute!r} (from {path!r})")
        target = getattr(target, part)
    return target


def _check_model(path: str, factory: Any, where: str) -> ModelComponent:
    if not callable(factory):
        raise ValueError(f"{where}: {path!r} must be a factory of num_classes returning an nn.Module")
    shape = getattr(factory, "input_shape", None)
    if not (isinstance(shape, tuple) and shape and all(isinstance(d, int) and d > 0 for d in shape)):
        raise ValueError(
            f"{where}: {path!r} needs an input_shape attribute, a tuple of positive ints (channels, height, width); "
            f"got {shape!r}"
        )
    num_classes = 2
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = factory(num_classes)
            if not isinstance(model, nn.Module):
                raise ValueError(
                    f"{where}: {path!r} returned {type(model).__name__} for num_classes={num_classes}, not an nn.Module"
                )
            model.eval()
            with torch.no_grad():
                logits = model(torch.zeros((2, *shape)))
    except ValueError:
        raise
    except Exception as error:
        raise ValueError(
            f"{where}: {path!r} does not meet the model contract (build with num_classes={num_classes}, "
            f"forward a zero batch of shape {(2, *shape)}): {error!r}"
        ) from error
    if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (2, num_classes):
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"{where}: {path!r} must return logits of shape (batch, num_classes) = (2, 2), got {got}")
    return ModelComponent(path, factory, shape)


def _check_dataset(path: str, source: Any, where: str) -> DatasetComponent:
    if inspect.isclass(source):  # a class names its instance: built without arguments
        try:
            source = source()
        except Exception as error:
            raise ValueError(f"{where}: {path!r} is a class; building it without arguments raised {error!r}") from error
    num_classes = getattr(source, "num_classes", None)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"{where}: {path!r} needs num_classes, an integer >= 2; got {num_classes!r}")
    shape = getattr(source, "input_shape", None)
    if not (isinstance(shape, tuple) and shape and all(isinstance(d, int) and d > 0 for d in shape)):
        raise ValueError(f"{where}: {path!r} needs input_shape, a tuple of positive ints; got {shape!r}")
    counts = []
    for split in ("train", "test"):
        declared = getattr(source, f"{split}_class_counts", None)
        if not (
            isinstance(declared, (tuple, list)) and len(declared) == num_classes
            and all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in declared)
        ):
            raise ValueError(
                f"{where}: {path!r} needs {split}_class_counts, {num_classes} non-negative ints "
                f"(one per class, of the labels load returns); got {declared!r}"
            )
        counts.append(tuple(declared))
    augment = getattr(source, "augment", False)
    if not isinstance(augment, bool):
        raise ValueError(f"{where}: {path!r} has augment {augment!r}; it must be a bool (or absent: False)")
    load = getattr(source, "load", None)
    if not callable(load) or not _accepts(load, 1):
        raise ValueError(f"{where}: {path!r} needs a method load(data_dir) returning (train_x, train_y, test_x, test_y)")
    return DatasetComponent(path, num_classes, shape, counts[0], counts[1], augment, source=source)


def _check_strategy(path: str, factory: Any, where: str) -> Callable[..., Any]:
    if not callable(factory):
        raise ValueError(f"{where}: {path!r} must be a strategy class")
    averages = getattr(factory, "averages", None)
    if not isinstance(averages, bool):
        raise ValueError(f"{where}: {path!r} needs a bool class attribute 'averages'; got {averages!r}")
    for method in ("aggregate", "aggregate_mean"):
        if not callable(getattr(factory, method, None)) or not _accepts(getattr(factory, method), 4):
            raise ValueError(
                f"{where}: {path!r} needs a method {method}(global_weights, updates_or_mean, state) "
                "(the fedland.strategies.Strategy protocol)"
            )
    return factory


def _check_client_algorithm(path: str, factory: Any, where: str) -> Callable[..., Any]:
    if not callable(factory):
        raise ValueError(f"{where}: {path!r} must be a client algorithm class")
    train = getattr(factory, "train", None)
    if not callable(train):
        raise ValueError(
            f"{where}: {path!r} needs a method train(model, data, *, seed, hyper, state, round_state) "
            "(the fedland.algorithms.ClientAlgorithm protocol)"
        )
    try:
        inspect.signature(train).bind(None, None, None, seed=0, hyper=None, state={}, round_state={})
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"{where}: {path!r}.train must accept (model, data, *, seed, hyper, state, round_state): {error}"
        ) from error
    return factory


def _accepts(function: Callable[..., Any], positional: int) -> bool:
    """Whether ``function`` (as found on its class: ``self`` included) can be called with ``positional`` arguments."""
    try:
        inspect.signature(function).bind(*([None] * positional))
    except (TypeError, ValueError):
        return False
    return True


_CHECKS: dict[str, Callable[[str, Any, str], Any]] = {
    "model": _check_model,
    "dataset": _check_dataset,
    "strategy": _check_strategy,
    "client_algorithm": _check_client_algorithm,
}
