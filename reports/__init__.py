"""Per-experiment reports (PNG figures + HTML page) and an index page comparing experiments.

    write_reports(db, ["65a1..."], Path("reports"))  # -> reports/index.html
    report_main([], store_uri=None, db_name="fedland", out_dir=Path("reports"))  # the CLI's entry

Layout: ``out_dir/index.html``, ``out_dir/comparison/*.png`` and per experiment
``out_dir/<experiment_id>/index.html`` with its PNGs beside it.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pymongo.database import Database

from stack.settings import StoreSettings

from reports.compare import COMPARISONS, comparison
from reports.data import ExperimentData, list_experiment_ids, load_experiment
from reports.figures import EXPERIMENT_FIGURES
from reports.page import FigureEntry, experiment_page, index_page

__all__ = ["report_main", "write_reports", "write_experiment_report"]

log = logging.getLogger(__name__)


def _directory_name(experiment_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", experiment_id) or "_"


def _skip_reason(data: ExperimentData, needs_landscape: bool) -> str:
    if needs_landscape and not data.landscape_enabled:
        return "landscape measurement is disabled in this experiment's spec (landscape.enabled = false)"
    if needs_landscape and not data.has_landscape:
        return "no landscape measurements are stored for this experiment"
    return "the store holds no data for this figure"


def write_experiment_report(data: ExperimentData, out_dir: Path, index_href: str = "../index.html") -> Path:
    """Write one experiment's figures and page into ``out_dir``; returns the page's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    for kind in EXPERIMENT_FIGURES:
        path = kind.render(data, out_dir)
        if path is None:
            (out_dir / kind.file_name).unlink(missing_ok=True)  # a stale figure from an earlier report
            entries.append(FigureEntry(kind.title, kind.caption, None, _skip_reason(data, kind.needs_landscape)))
            log.info("experiment %s: %s skipped", data.experiment_id, kind.title)
        else:
            entries.append(FigureEntry(kind.title, kind.caption, path.name))
    page = out_dir / "index.html"
    page.write_text(experiment_page(data, entries, index_href), encoding="utf-8")
    return page


def write_reports(db: Database[Any], experiment_ids: Sequence[str] | None, out_dir: str | os.PathLike[str]) -> Path:
    """Write the reports of the given experiments (all finished ones when None); returns the index page.

    Every id is read before anything is written: an unknown id raises ValueError
    naming ``experiment_id`` and writes nothing.
    """
    out = Path(out_dir)
    ids = list_experiment_ids(db) if experiment_ids is None else list(dict.fromkeys(experiment_ids))
    experiments = [load_experiment(db, experiment_id) for experiment_id in ids]
    out.mkdir(parents=True, exist_ok=True)
    linked = []
    for data in experiments:
        directory = _directory_name(data.experiment_id)
        write_experiment_report(data, out / directory)
        linked.append((data, f"{directory}/index.html"))
        log.info("experiment %s: report in %s", data.experiment_id, out / directory)
    entries = []
    for kind in COMPARISONS:
        path = comparison(kind, experiments, out / "comparison")
        if path is None:
            (out / "comparison" / kind.file_name).unlink(missing_ok=True)
            entries.append(FigureEntry(kind.title, "", None, "no experiment has this measurement"))
        else:
            entries.append(FigureEntry(kind.title, "", f"comparison/{path.name}"))
    index = out / "index.html"
    index.write_text(index_page(linked, entries), encoding="utf-8")
    return index


def report_main(
    experiment_ids: Sequence[str], store: StoreSettings, out_dir: str | os.PathLike[str] = "reports"
) -> int:
    """The `python main.py report [EXPERIMENT_ID ...]` command; returns the exit code.

    The store is ``store.mongo_uri``, else the embedded nx-27017 in
    ``store.store_dir`` (the launcher's). No ids: every finished experiment.
    """
    import pymongo

    from stack.embedded import EmbeddedMongo

    uri, name = store.mongo_uri, store.db_name
    embedded = None
    if uri is None:
        if not Path(store.store_dir).is_dir():
            print(f"no store: {store.store_dir} does not exist and FEDLAND_MONGO_URI is unset", file=sys.stderr)
            return 2
        embedded = EmbeddedMongo(store.store_dir)
        uri = embedded.start()
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(uri, serverSelectionTimeoutMS=10_000)
    try:
        index = write_reports(client[name], list(experiment_ids) or None, out_dir)
    except ValueError as error:
        print(f"report: {error}", file=sys.stderr)
        return 2
    finally:
        client.close()
        if embedded is not None:
            embedded.stop()
    print(f"reports written; open {index.resolve()}")
    return 0
