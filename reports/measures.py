"""Every number of a stored round, member report or landscape document as long rows (pure; no store).

A document is walked key by key; the dotted path of keys names the measure:

- a ``global`` or ``local`` key sets the row's ``model`` and leaves the name
  (``landscape.global.trace`` -> model ``global``, measure ``landscape.trace``);
- a list of entries that each carry a ``client_index`` or a ``model`` (``global``,
  ``local``), a different pair each, gives the entry's numbers that ``member`` and
  ``model`` (``landscape.client_alignment`` -> ``cosine`` per member; the curves of
  a spectral density per member and model);
- beside a ``client_indices`` list, a list as long gives one row per member
  (``flatness_gap.local``, ``flatness_gap.gaps``);
- a list of entries that each carry a ``name`` puts the name in brackets
  (``landscape.generalization.norms.layers[fc1.weight].frobenius``);
- a list of numbers gives one row per element, its position in ``index``;
- a list of lists of numbers (a surface's losses, a barrier matrix) goes to the
  ``arrays`` rows, one per element, its position in ``axis_0``, ``axis_1``, ...;
- booleans read as 0/1; ``None`` and text are left out (they are no measure).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

MODELS = ("global", "local")


@dataclass(frozen=True)
class Measure:
    """One number: ``index`` is its position in a list of numbers (None for a scalar)."""

    measure: str
    value: float
    member: int | None = None
    model: str | None = None
    index: int | None = None


@dataclass(frozen=True)
class ArrayElement:
    """One element of a nested list of numbers: ``position`` is its index along each axis."""

    measure: str
    position: tuple[int, ...]
    value: float
    model: str | None = None


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not (isinstance(value, float) and math.isnan(value))


def flatten(
    doc: Mapping[str, Any], *, prefix: str = "", member: int | None = None, model: str | None = None
) -> Iterator[Measure | ArrayElement]:
    """Every number of ``doc`` as a `Measure` (scalars, lists of numbers) or an `ArrayElement` (nested lists)."""
    yield from _walk(doc, prefix, member, model)


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _walk(value: Any, name: str, member: int | None, model: str | None) -> Iterator[Measure | ArrayElement]:
    if isinstance(value, bool) or is_number(value):
        yield Measure(name, float(value), member, model)
    elif isinstance(value, Mapping):
        yield from _mapping(value, name, member, model)
    elif isinstance(value, (list, tuple)):
        yield from _list(list(value), name, member, model)


def _mapping(doc: Mapping[str, Any], name: str, member: int | None, model: str | None) -> Iterator[Any]:
    found = doc.get("client_indices")
    indices: list[int] = found if isinstance(found, list) and all(isinstance(i, int) for i in found) else []
    by_member = bool(indices)
    for key, child in doc.items():
        key = str(key)
        of_model = key in MODELS and model is None
        child_name, child_model = (name, key) if of_model else (_join(name, key), model)
        if by_member and key != "client_indices" and _numbers(child) and len(child) == len(indices):
            for client_index, element in zip(indices, child):
                yield from _walk(element, child_name, int(client_index), child_model)
        else:
            yield from _walk(child, child_name, member, child_model)


def _numbers(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(v is None or isinstance(v, (int, float)) for v in value)


def _list(values: list[Any], name: str, member: int | None, model: str | None) -> Iterator[Any]:
    if not values:
        return
    owners = _owners(values)
    if owners is not None:
        for entry, (client_index, entry_model) in zip(values, owners):
            rest = {key: child for key, child in entry.items() if key not in ("client_index", "model")}
            yield from _walk(rest, name, member if client_index is None else client_index, entry_model or model)
    elif all(isinstance(v, Mapping) and isinstance(v.get("name"), str) for v in values):
        for entry in values:
            rest = {key: child for key, child in entry.items() if key != "name"}
            yield from _walk(rest, f"{name}[{entry['name']}]", member, model)
    elif _numbers(values):
        for index, element in enumerate(values):
            if element is not None and is_number(element):
                yield Measure(name, float(element), member, model, index)
    else:
        grid = _grid(values)
        if grid is not None:
            for position, element in np.ndenumerate(grid):
                if not math.isnan(element):
                    yield ArrayElement(name, tuple(int(p) for p in position), float(element), model)
        else:  # ragged, or mixed: each element under its position
            for index, element in enumerate(values):
                yield from _walk(element, _join(name, str(index)), member, model)


def _owners(values: list[Any]) -> list[tuple[int | None, str | None]] | None:
    """Whose each entry is, when every entry names a distinct (``client_index``, ``model``), else None."""
    if not all(isinstance(v, Mapping) and (isinstance(v.get("client_index"), int) or v.get("model") in MODELS)
               for v in values):
        return None
    owners = []
    for entry in values:
        client_index = entry.get("client_index")
        owners.append((client_index if isinstance(client_index, int) else None,
                       entry.get("model") if entry.get("model") in MODELS else None))
    return owners if len(set(owners)) == len(owners) else None


def _grid(values: list[Any]) -> np.ndarray | None:
    """A rectangular nested list of numbers (None as NaN) as an array, else None."""
    try:
        grid = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return grid if grid.ndim >= 2 else None
