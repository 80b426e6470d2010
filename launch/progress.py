"""Progress bars while experiments run, and the summary table at the end."""

from __future__ import annotations

import logging
import math
from collections.abc import Collection, Mapping, Sequence
from types import TracebackType
from typing import Any

from tqdm import tqdm

from fedland.spec import ExperimentSpec

log = logging.getLogger(__name__)


class Progress:
    """One tqdm bar per experiment (rounds done, status, last test accuracy), or a log line per change."""

    def __init__(self, ids: Sequence[str], specs: Sequence[ExperimentSpec], *, enabled: bool = True) -> None:
        self.enabled = enabled
        self._last: dict[str, dict[str, Any]] = {}
        self._bars: dict[str, tqdm] = {}
        self._labels = {experiment_id: _label(spec) for experiment_id, spec in zip(ids, specs)}
        if enabled:
            width = max(len(_label(s)) for s in specs)
            for position, (experiment_id, spec) in enumerate(zip(ids, specs)):
                if experiment_id in self._bars:  # a spec repeated in one run: one experiment, one bar
                    continue
                self._bars[experiment_id] = tqdm(
                    total=spec.rounds,
                    desc=_label(spec).ljust(width),
                    position=position,
                    unit="round",
                    leave=True,
                    bar_format="{desc} {bar:20} {n_fmt}/{total_fmt} rounds [{elapsed}]{postfix}",
                )

    def update(self, summaries: Mapping[str, Mapping[str, Any]]) -> None:
        """Refresh from `GET /experiments` summaries keyed by id."""
        for experiment_id, summary in summaries.items():
            previous = self._last.get(experiment_id, {})
            self._last[experiment_id] = dict(summary)
            last = summary.get("last_round") or {}
            done = int(last.get("round") or 0)
            postfix = str(summary.get("status", ""))
            if last.get("test_accuracy") is not None:
                postfix += f", test accuracy {float(last['test_accuracy']):.4f}"
            if summary.get("error"):  # a failed experiment says why, where its progress is shown
                postfix += f": {str(summary['error'])[:200]}"
            bar = self._bars.get(experiment_id)
            if bar is not None:
                if done != bar.n:
                    bar.update(done - bar.n)
                bar.set_postfix_str(postfix, refresh=True)
            elif (summary.get("status"), last) != (previous.get("status"), previous.get("last_round") or {}):
                label = self._labels.get(experiment_id) or summary.get("description") or experiment_id
                log.info("%s: round %d/%s, %s", label, done,
                         summary.get("rounds"), postfix)

    def last_round(self, experiment_id: str) -> dict[str, Any]:
        return dict(self._last.get(experiment_id, {}).get("last_round") or {})

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for bar in self._bars.values():
            bar.close()


def _label(spec: ExperimentSpec) -> str:
    text = str(getattr(spec, "description", "") or "experiment")
    text = text if len(text) <= 48 else text[:45] + "..."
    replicate = getattr(spec, "replicate", None)
    return text if replicate is None else f"{text} [seed {spec.seed}]"  # replicates differ only in the seed


def _duration_s(doc: Mapping[str, Any]) -> float | None:
    start, end = doc.get("started_at"), doc.get("finished_at")
    if start is None or end is None:
        return None
    if isinstance(start, (int, float)) and isinstance(end, (int, float)):  # epoch seconds, as stored
        return float(end) - float(start)
    return None


def _number(value: Any, digits: int) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{float(value):.{digits}f}"


def summary_table(
    ids: Sequence[str],
    documents: Mapping[str, Mapping[str, Any]],
    last_rounds: Mapping[str, Mapping[str, Any]],
    resumed: Collection[str] = (),
) -> str:
    """Plain-text table: experiment, status, rounds, final test accuracy and loss, duration.

    The status of an experiment in `resumed` (queued by an earlier run, resumed by this one) says so.
    """
    header = ("experiment", "status", "rounds", "test acc", "test loss", "duration s")
    rows = []
    for experiment_id in ids:
        doc = documents.get(experiment_id, {})
        last = last_rounds.get(experiment_id, {})
        description = str(doc.get("description") or experiment_id)
        rows.append(
            (
                description if len(description) <= 48 else description[:45] + "...",
                str(doc.get("status", "?")) + (" (resumed)" if experiment_id in resumed else ""),
                f"{last.get('round', 0)}/{doc.get('rounds', '?')}",
                _number(last.get("test_accuracy"), 4),
                _number(last.get("test_loss"), 4),
                _number(_duration_s(doc), 1),
            )
        )
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)
