"""Request validation: every request input checked before anything is written.

The one validation layer: pure functions (no Flask, no store) from a request's
raw input to typed values. Each refusal raises `Invalid(field, rule)`
(`server/errors.py`); the HTTP layer answers 400 (413 for `TooLarge`) naming
both. The limits below are the documented ones (README "Limits").
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedland.measure import MEASUREMENT_FLAGS
from fedland.spec import INT64_MAX, MAX_DESCRIPTION_CHARS, ExperimentSpec, SpecError
from fedland.strategies import is_statistic
from server.errors import Invalid, Refused, TooLarge
from stack.records import STATS_KEYS

__all__ = [
    "INT64_MAX",
    "INT64_MIN",
    "MAX_DEPTH",
    "MAX_DESCRIPTION_CHARS",
    "MAX_DOCUMENT_BYTES",
    "MAX_KEY_CHARS",
    "MAX_STATS_BYTES",
    "MAX_STRING_CHARS",
    "MAX_KNOWN_EXPERIMENTS",
    "MAX_STATISTIC_ABS",
    "MAX_WEIGHT_ABS",
    "Invalid",
    "TooLarge",
    "check_document_size",
    "check_id",
    "check_stats",
    "check_tree",
    "check_weights_bounded",
    "parse_json",
    "parse_meta",
    "parse_query_number",
    "parse_registration",
    "parse_specs",
    "parse_task_request",
]

INT64_MIN = -(2**63)  # INT64_MAX: fedland.spec's, the store keeps integers as BSON int64
MAX_DEPTH = 32  # nesting of objects and lists in any JSON body
MAX_STRING_CHARS = 1_000  # any string value without a field-specific limit
MAX_KEY_CHARS = 100  # object keys
MAX_STATS_BYTES = 256 * 1024  # one update's stats, as JSON
MAX_DOCUMENT_BYTES = 8 * 1024 * 1024  # any stored document, as JSON (MongoDB refuses BSON over 16 MiB)
MAX_WEIGHT_ABS = 1e4  # |w| of any parameter in an update: larger is divergence or an attack, not training
MAX_KNOWN_EXPERIMENTS = 1_000  # ids a worker may list in a task request (the specs it holds)
MAX_STATISTIC_ABS = 1e12  # |v| of a float running statistic (BatchNorm mean/var): activations may be large

# Field-specific string limits (path -> characters); other strings get MAX_STRING_CHARS.
STRING_LIMITS: dict[str, int] = {"description": MAX_DESCRIPTION_CHARS}

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,99}\Z")
_ID = re.compile(r"[A-Za-z0-9_-]{1,64}\Z")


def _refuse_constant(name: str) -> Any:
    raise Invalid("body", f"{name} is not a JSON number (numbers must be finite)")


def parse_json(text: str | bytes, field: str = "", *, check: bool = True, finite: bool = True) -> Any:
    """Parse JSON and check it with `check_tree`; NaN/Infinity, deep nesting and bad UTF-8 refused.

    With ``check=False`` only the nesting depth is checked: the caller validates
    the values (the spec's own rules first, so they name the field) and then
    calls `check_tree` on what it will store. With ``finite=False`` NaN and
    Infinity are read as floats (an update's statistics: `parse_meta` refuses
    and records them as the update's fault, not the request's).
    """
    name = field or "body"
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as error:
            raise Invalid(name, f"must be UTF-8 ({error.reason} at byte {error.start})") from None
    try:
        value = json.loads(text, parse_constant=_refuse_constant if finite else float)
    except Invalid as error:
        raise Invalid(name, error.rule) from None
    except RecursionError:
        raise Invalid(name, f"nested deeper than {MAX_DEPTH} levels") from None
    except ValueError as error:
        raise Invalid(name, f"is not valid JSON ({error})") from None
    check_tree(value, field, depth_only=not check)
    return value


def check_tree(value: Any, field: str = "", *, depth_only: bool = False) -> None:
    """Refuse what JSON allows but the store cannot keep.

    Nesting over `MAX_DEPTH`, integers outside int64, non-finite floats,
    strings that are not valid UTF-8 (lone surrogates) or too long, and keys
    that are not strings, are empty, start with ``$``, hold NUL or a ``.``.
    Iterative: any depth is safe to check. `field` prefixes the paths named
    ("" for a request body: paths are then like ``landscape.top_k``).
    """
    stack: list[tuple[Any, str, int]] = [(value, field, 0)]
    while stack:
        item, path, depth = stack.pop()
        where = path or "body"
        if isinstance(item, bool) or item is None:
            continue
        if depth_only and not isinstance(item, (list, tuple, Mapping)):
            continue
        if isinstance(item, int):
            if not INT64_MIN <= item <= INT64_MAX:
                raise Invalid(where, "integer outside the int64 range [-2**63, 2**63 - 1]")
        elif isinstance(item, float):
            if not math.isfinite(item):
                raise Invalid(where, f"must be a finite number, got {item!r}")
        elif isinstance(item, str):
            _check_string(item, where, STRING_LIMITS.get(_bare(path), MAX_STRING_CHARS))
        elif isinstance(item, (list, tuple, Mapping)):
            if depth >= MAX_DEPTH:
                raise Invalid(where, f"nested deeper than {MAX_DEPTH} levels")
            if isinstance(item, Mapping):
                for key, child in item.items():
                    if not depth_only:
                        _check_key(key, path)
                    stack.append((child, f"{path}.{key}" if path else str(key), depth + 1))
            else:
                for index, child in enumerate(item):
                    stack.append((child, f"{path}[{index}]", depth + 1))
        else:
            raise Invalid(where, f"{type(item).__name__} is not a JSON value")


def _bare(path: str) -> str:
    """`[0].description` and `experiments[0].description` -> `description`."""
    return re.sub(r"^(experiments)?\[\d+\]\.", "", path)


def _check_string(text: str, path: str, limit: int) -> None:
    if len(text) > limit:
        raise TooLarge(path, f"string of {len(text)} characters; the limit is {limit}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise Invalid(path, f"not valid UTF-8 (lone surrogate at character {error.start})") from None


def _check_key(key: Any, path: str) -> None:
    where = path or "body"
    if not isinstance(key, str):
        raise Invalid(where, f"keys must be strings, got {key!r}")
    if not key or len(key) > MAX_KEY_CHARS:
        raise Invalid(where, f"keys must have 1 to {MAX_KEY_CHARS} characters, got {len(key)}")
    _check_string(key, f"{where} (key)", MAX_KEY_CHARS)
    if key.startswith("$") or "\x00" in key or "." in key:
        raise Invalid(where, f"key {key[:40]!r} may not start with '$' or hold '.' or NUL")


def check_id(value: str, field: str) -> str:
    """An id taken from a URL: 1 to 64 characters of letters, digits, '_' and '-'."""
    if not _ID.match(value):
        raise Invalid(field, "must be 1 to 64 letters, digits, '_' or '-'")
    return value


def check_document_size(value: Any, field: str, limit: int | None = None) -> None:
    """Refuse (413) a document whose JSON form is over `limit` bytes (default `MAX_DOCUMENT_BYTES`)."""
    limit = MAX_DOCUMENT_BYTES if limit is None else limit
    size = len(json.dumps(value, separators=(",", ":")).encode("utf-8"))
    if size > limit:
        raise TooLarge(field, f"{size} bytes as JSON; the limit is {limit}")


# --- client stats ------------------------------------------------------------

_EVALUATION_KEYS = ("train_loss", "train_accuracy", "test_loss", "test_accuracy")


def check_stats(stats: Any, *, max_epochs: int) -> dict[str, Any]:
    """The typed stats of an update, or `Invalid` naming the first offending key.

    Known top-level keys only: ``duration_s`` (name -> seconds >= 0), ``global``
    and ``local`` (train/test loss >= 0 and accuracy in [0, 1], and optionally
    ``generalization_gap`` ``{loss, accuracy}``),
    ``train_loss_per_epoch`` (at most `max_epochs` numbers) and ``landscape``
    (identifier keys over numbers, nulls, lists of numbers or objects, nested
    objects, a string only under ``name``, a boolean only under a key of
    ``fedland.measure.MEASUREMENT_FLAGS``; or
    ``{"error": text}``). At most `MAX_STATS_BYTES` as JSON.
    """
    field = "meta.stats"
    if not isinstance(stats, Mapping):
        raise Invalid(field, "must be a JSON object")
    check_tree(stats, field)
    check_document_size(stats, field, MAX_STATS_BYTES)
    for key in stats:
        if key not in STATS_KEYS:
            raise Invalid(f"{field}.{key}", f"unknown key; valid keys: {', '.join(STATS_KEYS)}")
    if "duration_s" in stats:
        durations = _object(stats["duration_s"], f"{field}.duration_s")
        for name, seconds in durations.items():
            _identifier(name, f"{field}.duration_s")
            _number(seconds, f"{field}.duration_s.{name}", low=0.0)
    for part in ("global", "local"):
        if part in stats:
            evaluation = _object(stats[part], f"{field}.{part}")
            for name in evaluation:
                if name == "generalization_gap":  # test minus train loss, train minus test accuracy
                    gap = _object(evaluation[name], f"{field}.{part}.{name}")
                    for gap_key in gap:
                        if gap_key not in ("loss", "accuracy"):
                            raise Invalid(f"{field}.{part}.{name}.{gap_key}", "unknown key; valid keys: loss, accuracy")
                    _number(gap.get("loss", 0.0), f"{field}.{part}.{name}.loss")
                    _number(gap.get("accuracy", 0.0), f"{field}.{part}.{name}.accuracy", low=-1.0, high=1.0)
                    continue
                if name not in _EVALUATION_KEYS:
                    valid = ", ".join((*_EVALUATION_KEYS, "generalization_gap"))
                    raise Invalid(f"{field}.{part}.{name}", f"unknown key; valid keys: {valid}")
                high = 1.0 if name.endswith("accuracy") else None
                _number(evaluation[name], f"{field}.{part}.{name}", low=0.0, high=high)
    if "train_loss_per_epoch" in stats:
        losses = stats["train_loss_per_epoch"]
        path = f"{field}.train_loss_per_epoch"
        if not isinstance(losses, list) or len(losses) > max_epochs:
            raise Invalid(path, f"must be a list of at most {max_epochs} numbers (one per local epoch)")
        for index, loss in enumerate(losses):
            _number(loss, f"{path}[{index}]", low=0.0)
    if "landscape" in stats:
        landscape = _object(stats["landscape"], f"{field}.landscape")
        if "error" in landscape:
            if set(landscape) != {"error"} or not isinstance(landscape["error"], str):
                raise Invalid(f"{field}.landscape.error", "a failed measurement is {\"error\": text} alone")
        else:
            _numeric_tree(landscape, f"{field}.landscape")
    return dict(stats)


def _object(value: Any, path: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise Invalid(path, "must be a JSON object")
    return value


def _identifier(name: str, path: str) -> None:
    if not _IDENTIFIER.match(name):
        raise Invalid(path, f"key {name[:40]!r} must be an identifier ([A-Za-z_][A-Za-z0-9_]*)")


def _number(value: Any, path: str, *, low: float | None = None, high: float | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise Invalid(path, f"must be a finite number, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise Invalid(path, f"must be in [{low}, {high if high is not None else 'inf'}], got {value!r}")


def _numeric_tree(value: Mapping[str, Any], path: str) -> None:
    stack: list[tuple[Any, str]] = [(value, path)]
    while stack:
        item, where = stack.pop()
        if item is None:
            continue
        if isinstance(item, Mapping):
            for key, child in item.items():
                _identifier(key, where)
                if key == "name" and isinstance(child, str):  # e.g. a layer's name in per-layer norms
                    continue
                if key in MEASUREMENT_FLAGS and isinstance(child, bool):  # e.g. a saturated PAC-Bayes search
                    continue
                stack.append((child, f"{where}.{key}"))
        elif isinstance(item, list):
            for index, child in enumerate(item):
                if isinstance(child, list):
                    raise Invalid(f"{where}[{index}]", "lists hold numbers, nulls or objects")
                stack.append((child, f"{where}[{index}]"))
        else:
            _number(item, where)


# --- weights -------------------------------------------------------------------


def check_weights_bounded(weights: Mapping[str, np.ndarray], bound: float = MAX_WEIGHT_ABS) -> None:
    """Refuse weights holding NaN/Inf or any |value| over its bound, naming the tensor.

    Parameters are bounded by `bound`, float running statistics (BatchNorm
    means and variances) by `MAX_STATISTIC_ABS`; integer buffers (BatchNorm's
    `num_batches_tracked`, which grows every round) only by their dtype.
    """
    for name, value in weights.items():
        if not np.issubdtype(value.dtype, np.inexact) or value.size == 0:
            continue
        if not np.isfinite(value).all():
            raise Refused(f"weights[{name!r}]", "contains NaN or Inf")
        limit = MAX_STATISTIC_ABS if is_statistic(name, value) else bound
        largest = float(np.max(np.abs(value.astype(np.float64, copy=False))))
        if largest > limit:
            raise Refused(f"weights[{name!r}]", f"holds |w| = {largest:.3g}; the bound is {limit:g}")


# --- request bodies --------------------------------------------------------------


def parse_specs(body: Any) -> list[ExperimentSpec]:
    """One spec object or a non-empty list of them; a refusal names the field (``experiments[i].`` in a list)."""
    items = body if isinstance(body, list) else [body]
    if not items:
        raise Invalid("body", "an empty list holds no experiment")
    specs = []
    for position, item in enumerate(items):
        prefix = f"experiments[{position}]." if isinstance(body, list) else ""
        try:
            specs.append(ExperimentSpec.from_dict(item))
        except SpecError as error:
            raise Invalid(f"{prefix}{error.field}", error.rule) from None
    return specs


def spec_field(body: Any, position: int, field: str) -> str:
    """The name of a spec's field in a submission: ``experiments[i].field`` when the body is a list."""
    return f"experiments[{position}].{field}" if isinstance(body, list) else field


@dataclass(frozen=True)
class Registration:
    """A worker's registration: where it runs."""

    hostname: str
    pid: int


def parse_registration(body: Any) -> Registration:
    if not isinstance(body, Mapping):
        raise Invalid("body", "must be an object with hostname and pid")
    hostname, pid = body.get("hostname"), body.get("pid")
    if not isinstance(hostname, str) or not hostname or len(hostname) > 255:
        raise Invalid("hostname", "must be a non-empty string of at most 255 characters")
    if not isinstance(pid, int) or isinstance(pid, bool) or not 0 <= pid < 2**32:
        raise Invalid("pid", "must be an integer in [0, 2**32)")
    return Registration(hostname, pid)


@dataclass(frozen=True)
class TaskRequest:
    """A worker's task request: how long it may long-poll, and the experiments whose spec it holds."""

    wait_s: float = 0.0
    known_experiments: frozenset[str] = frozenset()


def parse_task_request(body: Any) -> TaskRequest:
    if not isinstance(body, Mapping):
        raise Invalid("body", "must be a JSON object")
    wait_s = body.get("wait_s", 0.0)
    if not isinstance(wait_s, (int, float)) or isinstance(wait_s, bool) or not wait_s >= 0:
        raise Invalid("wait_s", "must be a number of seconds >= 0")
    known = body.get("known_experiments", [])
    if not isinstance(known, list) or len(known) > MAX_KNOWN_EXPERIMENTS:
        raise Invalid("known_experiments", f"must be a list of at most {MAX_KNOWN_EXPERIMENTS} experiment ids")
    for position, item in enumerate(known):
        if not isinstance(item, str):
            raise Invalid(f"known_experiments[{position}]", "must be an experiment id (a string)")
        check_id(item, f"known_experiments[{position}]")
    return TaskRequest(float(wait_s), frozenset(known))


FLAG_VALUES = {"1": True, "true": True, "0": False, "false": False}


def parse_query_flag(name: str, raw: str | None) -> bool:
    """A yes/no query parameter: 1 or true, 0 or false (any case); absent is false."""
    if raw is None:
        return False
    value = FLAG_VALUES.get(raw.strip().lower())
    if value is None:
        raise Invalid(name, f"query parameter must be 1, true, 0 or false, got {raw[:40]!r}")
    return value


def parse_query_number(name: str, raw: str | None, kind: type[int] | type[float]) -> float | None:
    """A query parameter that must be a number >= 0 (None when absent)."""
    if raw is None:
        return None
    try:
        value = kind(raw)
    except ValueError:
        raise Invalid(name, f"query parameter must be a number, got {raw!r}") from None
    if not value >= 0:
        raise Invalid(name, f"query parameter must be >= 0, got {raw!r}")
    return value  # an int stays one: float() of a huge one raises OverflowError


@dataclass(frozen=True)
class UpdateMeta:
    """The `meta` of a member's update: who sends it, for which member, and what the worker measured."""

    worker_id: str
    client_index: int
    num_examples: int
    stats: dict[str, Any]


META_KEYS = ("worker_id", "client_index", "num_examples", "stats")


def parse_meta(meta: Any, num_clients: int, max_epochs: int) -> UpdateMeta:
    """The typed `meta` of an update (`META_KEYS`), or `Invalid` naming the first offending key."""
    if not isinstance(meta, Mapping):
        raise Invalid("meta", "must be a JSON object")
    for key in meta:
        if key not in META_KEYS:
            raise Invalid(f"meta.{key}", f"unknown key; valid keys: {', '.join(META_KEYS)}")
    worker_id = meta.get("worker_id")
    if not isinstance(worker_id, str) or not _ID.match(worker_id):
        raise Invalid("meta.worker_id", "must be the worker's id: 1 to 64 letters, digits, '_' or '-'")
    client_index = meta.get("client_index")
    if not isinstance(client_index, int) or isinstance(client_index, bool) or not 0 <= client_index < num_clients:
        raise Invalid("meta.client_index", f"must be an integer in [0, {num_clients})")
    num_examples = meta.get("num_examples")
    if not isinstance(num_examples, int) or isinstance(num_examples, bool) or num_examples <= 0:
        raise Invalid("meta.num_examples", "must be an integer > 0")
    raw_stats = meta.get("stats", {})
    broken = _first_non_finite(raw_stats, "meta.stats")
    if broken is not None:  # the member's training diverged: the update is refused and recorded, not retried
        raise Refused(broken[0], f"is {broken[1]}: the member's training did not stay finite")
    stats = check_stats(raw_stats, max_epochs=max_epochs)
    return UpdateMeta(worker_id, client_index, num_examples, stats)


def _first_non_finite(value: Any, path: str) -> tuple[str, float] | None:
    """The path and value of the first NaN or infinite number in a JSON tree, or None."""
    stack: list[tuple[Any, str]] = [(value, path)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            return where, item
        if isinstance(item, Mapping):
            stack.extend((child, f"{where}.{key}") for key, child in reversed(list(item.items())))
        elif isinstance(item, list):
            stack.extend((child, f"{where}[{i}]") for i, child in reversed(list(enumerate(item))))
    return None
