"""Per-experiment reports (PNG + PDF figures, HTML pages) and an index page comparing experiments.

    write_reports(db, ["65a1..."], Path("data/reports"))  # -> data/reports/index.html
    watch_reports(db, None, Path("data/reports"), stop)     # re-render as rounds land, until all finish
    report_main([], StoreSettings.from_env(), Path("data/reports"))  # the CLI's entry (python main.py report)

Layout: ``out_dir/index.html``, ``out_dir/comparison/*.png|pdf`` and per experiment
``out_dir/<experiment_id>/index.html`` with its figures and ``summary.json`` (its
index row) beside it. The index lists every experiment with a page in ``out_dir``
or a document in the store, so a later run never drops the pages of an earlier one.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from pymongo.database import Database

from reports.catalog import EXPERIMENT_FIGURES
from reports.compare import COMPARISONS, comparison
from reports.data import ExperimentData, list_experiment_ids, load_experiment
from reports.page import FigureEntry, experiment_page, experiment_summary, index_page
from reports.style import paper_style, vector_path
from stack import records
from stack.settings import DEFAULT_REPORTS_DIR, StoreSettings

__all__ = ["report_main", "watch_reports", "write_reports", "write_experiment_report"]

log = logging.getLogger(__name__)
SUMMARY = "summary.json"
DEFAULT_OUT = DEFAULT_REPORTS_DIR


def _directory_name(experiment_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", experiment_id) or "_"


def _skip_reason(data: ExperimentData, needs_landscape: bool, reason_key: str | None) -> str:
    if needs_landscape and not data.landscape_enabled:
        return "landscape measurement is disabled in this experiment's spec (landscape.enabled = false)"
    if needs_landscape and not data.has_landscape:
        return "no landscape measurements are stored for this experiment"
    if reason_key and reason_key in data.extras.reasons:
        return data.extras.reasons[reason_key]
    return "the store holds no data for this figure"


def default_data_dir(env: Mapping[str, str] = os.environ) -> Path:
    """Where the report finds the dataset to evaluate stored models on (as server and clients do)."""
    from stack.settings import DataSettings

    return DataSettings.from_env(env).data_dir


def write_experiment_report(data: ExperimentData, out_dir: Path, index_href: str = "../index.html") -> Path:
    """Write one experiment's figures, page and index row into ``out_dir``; returns the page's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    with paper_style():
        for kind in EXPERIMENT_FIGURES:
            path = kind.render(data, out_dir)
            if path is None:
                for stale in (out_dir / kind.file_name, vector_path(out_dir / kind.file_name)):
                    stale.unlink(missing_ok=True)  # from an earlier report
                reason = _skip_reason(data, kind.needs_landscape, kind.reason_key)
                entries.append(FigureEntry(kind.title, kind.caption_for(data), None, reason))
                # while it runs, most figures wait for data: only the final report says so at INFO
                (log.debug if data.running else log.info)(
                    "experiment %s: %s skipped: %s", data.experiment_id, kind.title, reason)
            else:
                entries.append(FigureEntry(kind.title, kind.caption_for(data), path.name))
    page = out_dir / "index.html"
    page.write_text(experiment_page(data, entries, index_href), encoding="utf-8")
    summary = experiment_summary(data, f"{out_dir.name}/index.html")
    (out_dir / SUMMARY).write_text(json.dumps(summary, indent=1), encoding="utf-8")
    return page


def _load(db: Database[Any], experiment_id: str, data_dir: Path | None) -> ExperimentData:
    return load_experiment(db, experiment_id)  # the models' analysis is stored: ``data_dir`` is not read


def write_reports(
    db: Database[Any],
    experiment_ids: Sequence[str] | None,
    out_dir: str | os.PathLike[str],
    *,
    data_dir: Path | None = None,
) -> Path:
    """Write the reports of the given experiments (all finished ones when None); returns the index page.

    Every id is read before anything is written: an unknown id raises ValueError
    naming ``experiment_id`` and writes nothing. Experiments in the store without
    a page in ``out_dir`` get one too, so the index lists them all. ``data_dir``
    is not read: the models' analysis (round 0, trajectory, spectral density) is
    stored by the server (`reports.models`).
    """
    out = Path(out_dir)
    data_dir = default_data_dir() if data_dir is None else data_dir
    ids = list_experiment_ids(db) if experiment_ids is None else list(dict.fromkeys(experiment_ids))
    documents = [load_experiment(db, experiment_id) for experiment_id in ids]  # every id checked first
    out.mkdir(parents=True, exist_ok=True)
    experiments = []
    for data in documents:
        directory = _directory_name(data.experiment_id)
        write_experiment_report(data, out / directory)
        experiments.append(data)
        log.info("experiment %s: report in %s", data.experiment_id, out / directory)
    for experiment_id in list_experiment_ids(db, status=None):
        if not (out / _directory_name(experiment_id) / SUMMARY).is_file():
            write_experiment_report(_load(db, experiment_id, data_dir), out / _directory_name(experiment_id))
    return write_index(out, experiments)


def write_index(out: Path, compared: Sequence[ExperimentData]) -> Path:
    """The index: every experiment page in ``out`` (oldest first), comparison figures of ``compared``."""
    entries = []
    with paper_style():
        for kind in COMPARISONS:
            path = comparison(kind, compared, out / "comparison")
            if path is None:
                for stale in (out / "comparison" / kind.file_name, vector_path(out / "comparison" / kind.file_name)):
                    stale.unlink(missing_ok=True)
                entries.append(FigureEntry(kind.title, kind.caption, None, "no experiment has this measurement"))
            else:
                entries.append(FigureEntry(kind.title, kind.caption, f"comparison/{path.name}"))
    rows = []
    for summary in sorted(out.glob(f"*/{SUMMARY}")):
        try:
            rows.append(json.loads(summary.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            log.warning("unreadable %s: left out of the index", summary)
    rows.sort(key=lambda row: (str(row.get("created_at") or ""), str(row.get("experiment_id"))))
    index = out / "index.html"
    index.write_text(index_page(rows, entries, len(compared)), encoding="utf-8")
    return index


def _signature(db: Database[Any], experiment_id: str) -> tuple[Any, ...]:
    """What changes when an experiment progresses: status, rounds, measured rounds, client stats."""
    return records.progress_signature(db, experiment_id)


def watch_reports(
    db: Database[Any],
    experiment_ids: Sequence[str] | None,
    out_dir: str | os.PathLike[str],
    stop: threading.Event,
    *,
    poll_interval_s: float = 5.0,
    data_dir: Path | None = None,
    until_done: bool = True,
) -> Path | None:
    """Re-render the pages of experiments whose documents changed, every ``poll_interval_s``, until ``stop``.

    ``experiment_ids`` None: every experiment in the store. With ``until_done`` it
    returns once every watched experiment is finished or failed (after rendering
    that state). Returns the index page (None if nothing was rendered).
    """
    out = Path(out_dir)
    data_dir = default_data_dir() if data_dir is None else data_dir
    seen: dict[str, tuple[Any, ...]] = {}
    loaded: dict[str, ExperimentData] = {}
    index: Path | None = None
    while True:
        ids = list_experiment_ids(db, status=None) if experiment_ids is None else list(experiment_ids)
        changed = []
        for experiment_id in ids:
            signature = _signature(db, experiment_id)
            if seen.get(experiment_id) != signature:
                seen[experiment_id] = signature
                changed.append(experiment_id)
        if changed:
            for experiment_id in changed:  # only what changed is read and evaluated again
                if stop.is_set():
                    return index  # the caller writes the final reports itself
                loaded[experiment_id] = _load(db, experiment_id, data_dir)
                write_experiment_report(loaded[experiment_id], out / _directory_name(experiment_id))
            index = write_index(out, [loaded[i] for i in ids if i in loaded])
            log.info("reports: re-rendered %d experiments in %s", len(changed), out)
        if until_done and ids and all(seen[i][0] in ("finished", "failed") for i in ids):
            return index
        if stop.wait(poll_interval_s):
            return index


def report_main(
    experiment_ids: Sequence[str],
    store: StoreSettings,
    out_dir: str | os.PathLike[str] = DEFAULT_OUT,
    *,
    data_dir: Path | None = None,
    watch: bool = False,
    poll_interval_s: float = 5.0,
    torch_threads: int = 1,
) -> int:
    """The `python main.py report [EXPERIMENT_ID ...] [--watch]` command; returns the exit code.

    The store is ``store.mongo_uri``, else the embedded nx-27017 in
    ``store.store_dir`` (the launcher's). No ids: every finished experiment (with
    ``watch``: every experiment, re-rendered as rounds land until all are done or Ctrl-C).
    ``data_dir``: the dataset the stored models are evaluated on (default ``./data``).
    """
    from stack.embedded import open_database
    from stack.settings import set_torch_threads

    data_dir = default_data_dir() if data_dir is None else data_dir
    set_torch_threads(torch_threads)
    with ExitStack() as resources:
        try:
            db = resources.enter_context(open_database(store))
        except FileNotFoundError as error:
            print(error, file=sys.stderr)
            return 2
        try:
            records.check_schema(db)  # a store of an earlier release: one line naming the upgrade
            for experiment_id in experiment_ids:
                load_experiment(db, experiment_id)  # unknown ids fail before anything is written
            if watch:
                print(f"watching the store; reports in {Path(out_dir).resolve()} (Ctrl-C stops)")
                index = watch_reports(db, list(experiment_ids) or None, out_dir, threading.Event(),
                                      poll_interval_s=poll_interval_s, data_dir=data_dir)
                if index is None:
                    index = write_reports(db, list(experiment_ids) or None, out_dir, data_dir=data_dir)
            else:
                index = write_reports(db, list(experiment_ids) or None, out_dir, data_dir=data_dir)
        except (ValueError, records.SchemaError) as error:
            print(f"report: {error}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("report: stopped", file=sys.stderr)
            return 130
    print(f"reports written; open {index.resolve()}")
    return 0
