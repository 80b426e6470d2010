"""Per-experiment reports (PNG + PDF figures, HTML pages) and an index page comparing experiments.

    write_reports(db, ["65a1..."], Path("data/reports"))  # -> data/reports/index.html
    watch_reports(db, None, Path("data/reports"), stop)     # re-render as rounds land, until all finish
    python -m reports --watch --out data/reports           # the same in its own process (the launcher's)
    report_main([], StoreSettings.from_env(), Path("data/reports"))  # the CLI's entry (python main.py report)

Layout: ``out_dir/index.html``, ``out_dir/comparison/*.png|pdf`` and per experiment
``out_dir/<experiment_id>/index.html`` with its figures and ``summary.json`` (its
index row) beside it. The index lists every experiment with a page in ``out_dir``
or a document in the store, so a later run never drops the pages of an earlier one.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack, nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any

from pymongo.database import Database

from reports import atomic
from reports.catalog import EXPERIMENT_FIGURES
from reports.compare import COMPARISONS, comparison
from reports.data import ExperimentData, list_experiment_ids, load_experiment
from reports.figures import FigureKind
from reports.page import FigureEntry, experiment_page, experiment_summary, index_page
from reports.replicates import GROUP_HEADER, group_rows
from reports.style import paper_style, raster_only, vector_path
from stack import interrupts, records
from stack.interrupts import exit_status, stop_on_signals
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


#: Figures drawn from the stored documents alone, in a fraction of a second: drawn first, on every round.
QUICK_FIGURES = frozenset(
    kind.file_name for kind in EXPERIMENT_FIGURES if not kind.needs_landscape and kind.reason_key is None)
PENDING = "it is drawn after the accuracy, loss and tables of every experiment (this page reloads itself)"
FINISHED = ("finished", "failed")


#: A running experiment's heavy figures (and the comparisons) are redrawn at most this often; its accuracy, loss
#: and tables with every round, and its final figures as soon as it ends.
LIVE_FIGURES_EVERY_S = 30.0
#: The leading fields of ``records.progress_signature`` whose change redraws the quick parts: status, round, rounds
#: stored, rounds measured (not each member's report within a round).
QUICK_SIGNATURE = 4


class Stopped(Exception):
    """A render left between two figures because its ``stop`` event was set."""


class _GiveWay(Exception):
    """A live render left between two figures: an experiment's final render is due."""


def _figure_entry(kind: FigureKind, data: ExperimentData, out_dir: Path) -> FigureEntry:
    with interrupts.deferred():  # a stop comes after the figure: matplotlib garbles an exception raised within it
        path = kind.render(data, out_dir)
    if path is not None:
        return FigureEntry(kind.title, kind.caption_for(data), path.name, vector=vector_path(path).is_file())
    for stale in (out_dir / kind.file_name, vector_path(out_dir / kind.file_name)):
        stale.unlink(missing_ok=True)  # from an earlier report
    reason = _skip_reason(data, kind.needs_landscape, kind.reason_key)
    # while it runs, most figures wait for data: only the final report says so at INFO
    (log.debug if data.running else log.info)("experiment %s: %s skipped: %s", data.experiment_id, kind.title, reason)
    return FigureEntry(kind.title, kind.caption_for(data), None, reason)


def _earlier_entry(kind: FigureKind, data: ExperimentData, out_dir: Path) -> FigureEntry:
    """A figure not drawn this time: the one an earlier render left, else a note that it comes next."""
    if (out_dir / kind.file_name).is_file():
        return FigureEntry(kind.title, kind.caption_for(data), kind.file_name,
                           vector=vector_path(out_dir / kind.file_name).is_file())
    return FigureEntry(kind.title, kind.caption_for(data), None, PENDING, pending=True)


def write_experiment_report(
    data: ExperimentData,
    out_dir: Path,
    index_href: str = "../index.html",
    *,
    quick: bool = False,
) -> Path:
    """Write one experiment's figures, page and index row into ``out_dir``; returns the page's path.

    ``quick``: only the ``QUICK_FIGURES``; the page keeps the other figures an earlier
    render left. Every file is replaced atomically.
    """
    return write_page(data, out_dir, draw_figures(data, out_dir, quick=quick), index_href)


def draw_figures(data: ExperimentData, out_dir: Path, *, quick: bool = False,
                 between: Callable[[], None] | None = None) -> list[FigureEntry]:
    """Draw the experiment's figures (``quick``: only ``QUICK_FIGURES``); returns the page's entries.

    ``between`` is called before each figure drawn (it may raise ``Stopped``).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    with paper_style():
        for kind in EXPERIMENT_FIGURES:
            if quick and kind.file_name not in QUICK_FIGURES:
                entries.append(_earlier_entry(kind, data, out_dir))
                continue
            if between is not None:
                between()
            entries.append(_figure_entry(kind, data, out_dir))
    return entries


def write_page(data: ExperimentData, out_dir: Path, entries: Sequence[FigureEntry],
               index_href: str = "../index.html") -> Path:
    """The experiment's page and its index row (``summary.json``), each replaced atomically."""
    target = atomic.write_text(out_dir / "index.html", experiment_page(data, entries, index_href))
    summary = experiment_summary(data, f"{out_dir.name}/index.html")
    atomic.write_text(out_dir / SUMMARY, json.dumps(summary, indent=1))
    return target


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


def write_index(out: Path, compared: Sequence[ExperimentData], *, figures: bool = True,
                between: Callable[[], None] | None = None) -> Path:
    """The index: every experiment page in ``out`` (oldest first), comparison figures of ``compared``.

    ``figures`` False: the comparison figures an earlier render left (the table alone is new).
    """
    entries = []
    with paper_style():
        for kind in COMPARISONS:
            earlier = out / "comparison" / kind.file_name
            if not figures:
                entries.append(FigureEntry(kind.title, kind.caption, f"comparison/{kind.file_name}")
                               if earlier.is_file() else FigureEntry(kind.title, kind.caption, None, PENDING, pending=True))
                continue
            if between is not None:
                between()
            with interrupts.deferred():
                path = comparison(kind, compared, out / "comparison")
            if path is None:
                for stale in (earlier, vector_path(earlier)):
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
    page = index_page(rows, entries, len(compared), group_rows(compared), GROUP_HEADER)
    return atomic.write_text(out / "index.html", page)


class _Watch:
    """The state of ``watch_reports``: what was seen, what is drawn, what waits for its full render."""

    def __init__(self, db: Database[Any], experiment_ids: Sequence[str] | None, out: Path, data_dir: Path,
                 stop: threading.Event, poll_interval_s: float) -> None:
        self.db, self.experiment_ids, self.out, self.data_dir = db, experiment_ids, out, data_dir
        self.stop, self.poll_interval_s = stop, poll_interval_s
        self.seen: dict[str, tuple[Any, ...]] = {}
        self.loaded: dict[str, ExperimentData] = {}
        self.version: dict[str, int] = {}  # quick renders so far: a full render of an older version keeps its page
        self.due: dict[str, None] = {}  # experiments waiting for their full render, least recently changed first
        self.comparisons_due = False
        self.ids: list[str] = []
        self.index: Path | None = None
        self.polled_at = 0.0
        self.rendering_live = False
        self.drawn_at: dict[str, float] = {}  # experiment -> when its last full render started (monotonic)
        self.compared_at = -math.inf

    def check_stop(self) -> None:
        signalled = interrupts.requested()  # a signal whose exception Python swallowed (in a weakref callback)
        if signalled is not None:
            raise signalled
        if self.stop.is_set():
            raise Stopped

    def between(self) -> None:
        """Before each heavy figure: stop if asked, and draw the quick parts of whatever changed meanwhile.

        A live render gives way (``_GiveWay``) once an experiment's final render is due:
        the final pages are what the run waits for.
        """
        self.check_stop()
        if time.monotonic() - self.polled_at >= self.poll_interval_s:
            self.poll()
            if self.rendering_live and any(self.is_final(i) for i in self.due):
                raise _GiveWay

    def poll(self) -> None:
        """Read the signatures; redraw the quick parts and the index of what changed (every experiment first)."""
        self.polled_at = time.monotonic()
        self.ids = (list_experiment_ids(self.db, status=None) if self.experiment_ids is None
                    else list(self.experiment_ids))
        changed = []
        for experiment_id in self.ids:
            signature = records.progress_signature(self.db, experiment_id)
            seen = self.seen.get(experiment_id)
            if seen != signature:
                self.seen[experiment_id] = signature
                if seen is None or seen[:QUICK_SIGNATURE] != signature[:QUICK_SIGNATURE]:
                    changed.append(experiment_id)
                else:  # a member's report or a measurement within the round: the next full render shows it
                    self.due.setdefault(experiment_id, None)
        for experiment_id in changed:
            self.check_stop()
            data = load_experiment(self.db, experiment_id)
            earlier = self.loaded.get(experiment_id)
            if earlier is not None:  # round 0 never changes; the rest of the extras is redrawn in the full render
                data = replace(data, extras=earlier.extras)
            self.loaded[experiment_id] = data
            self.version[experiment_id] = self.version.get(experiment_id, 0) + 1
            write_experiment_report(data, self.out / _directory_name(experiment_id), quick=True)
            self.due.pop(experiment_id, None)
            self.due[experiment_id] = None
        if changed:
            self.comparisons_due = True
            self.index = write_index(self.out, self.compared(), figures=False)
            log.info("accuracy, loss and tables of %d experiments in %s", len(changed), self.out)

    def compared(self) -> list[ExperimentData]:
        return [self.loaded[i] for i in self.ids if i in self.loaded]

    def is_final(self, experiment_id: str) -> bool:
        return bool(self.seen[experiment_id][0] in FINISHED)

    def next_due(self) -> str | None:
        """The experiment whose full render comes next: a final one first, else the running one that waited longest
        among those whose last full render started at least ``LIVE_FIGURES_EVERY_S`` ago; None if none may go now."""
        final = next((i for i in self.due if self.is_final(i)), None)
        if final is not None:
            return final
        now = time.monotonic()
        return next((i for i in self.due if now - self.drawn_at.get(i, -math.inf) >= LIVE_FIGURES_EVERY_S), None)

    def render_next(self, experiment_id: str) -> None:
        """The full render (every figure) of ``experiment_id`` (see ``next_due``).

        A live render draws PNGs only and gives way to a final render that becomes due.
        """
        del self.due[experiment_id]
        self.drawn_at[experiment_id] = time.monotonic()
        version = self.version[experiment_id]
        data = load_experiment(self.db, experiment_id)
        state = "final" if not data.running else "live"
        log.info("experiment %s: drawing the %s figures", experiment_id, state)
        out_dir = self.out / _directory_name(experiment_id)
        self.rendering_live = data.running
        try:
            with raster_only() if data.running else nullcontext():
                entries = draw_figures(data, out_dir, between=self.between)
        except _GiveWay:
            self.due.setdefault(experiment_id, None)  # drawn again after the final renders
            log.info("experiment %s: live figures put off for a final render", experiment_id)
            return
        finally:
            self.rendering_live = False
        if self.version[experiment_id] == version:  # nothing newer was drawn meanwhile
            self.loaded[experiment_id] = data
            write_page(data, out_dir, entries)
        else:  # a newer round's quick page stands (it links these figures); its full render is due
            self.loaded[experiment_id] = replace(self.loaded[experiment_id], extras=data.extras)
        log.info("experiment %s: %s figures in %s", experiment_id, state, out_dir)

    def finished(self) -> bool:
        return bool(self.ids) and all(self.seen[i][0] in FINISHED for i in self.ids)

    def run(self, until_done: bool) -> Path | None:
        while True:
            self.poll()
            while (experiment_id := self.next_due()) is not None:
                self.check_stop()
                self.render_next(experiment_id)
            now = time.monotonic()
            if self.comparisons_due and (self.finished() or now - self.compared_at >= LIVE_FIGURES_EVERY_S):
                self.comparisons_due = False
                self.compared_at = now
                self.index = write_index(self.out, self.compared(), between=self.between)
            if until_done and self.finished() and not self.due and not self.comparisons_due:
                return self.index
            if self.stop.wait(self.poll_interval_s):
                return self.index


def watch_reports(
    db: Database[Any],
    experiment_ids: Sequence[str] | None,
    out_dir: str | os.PathLike[str],
    stop: threading.Event,
    *,
    poll_interval_s: float = 2.0,
    data_dir: Path | None = None,
    until_done: bool = True,
) -> Path | None:
    """Re-render the pages of experiments whose documents changed, polling every ``poll_interval_s``, until ``stop``.

    Quick parts first: on each round stored (or status change) the index and every
    changed experiment's accuracy, loss and tables are redrawn before any other
    figure; then the other figures, one experiment at a time: an ended experiment's
    final figures first (a live render gives way to them), a running experiment's
    at most every ``LIVE_FIGURES_EVERY_S`` (the one that waited longest first, PNGs
    only), with the quick parts of whatever changed meanwhile redrawn between two figures.
    ``experiment_ids`` None: every experiment in the store. With ``until_done`` it
    returns once every watched experiment is finished or failed (after rendering
    that state in full). ``stop`` is checked between figures. Returns the index page
    (None if nothing was rendered).
    """
    out = Path(out_dir)
    data_dir = default_data_dir() if data_dir is None else data_dir
    watch = _Watch(db, experiment_ids, out, data_dir, stop, poll_interval_s)
    try:
        return watch.run(until_done)
    except Stopped:
        return watch.index


def report_main(
    experiment_ids: Sequence[str],
    store: StoreSettings,
    out_dir: str | os.PathLike[str] = DEFAULT_OUT,
    *,
    data_dir: Path | None = None,
    watch: bool = False,
    poll_interval_s: float = 2.0,
    torch_threads: int = 1,
) -> int:
    """The `python main.py report [EXPERIMENT_ID ...] [--watch]` command; returns the exit code.

    The store is ``store.mongo_uri``, else the embedded nx-27017 in
    ``store.store_dir`` (the launcher's). No ids: every finished experiment (with
    ``watch``: every experiment, re-rendered as rounds land until all are done or Ctrl-C).
    ``data_dir``: the dataset the stored models are evaluated on (default ``./data``).
    Ctrl-C or SIGTERM stops it at once (130 or 143): every file is written whole
    or not at all, so the pages stay as the last render left them.
    """
    from stack.embedded import open_database
    from stack.settings import set_torch_threads

    data_dir = default_data_dir() if data_dir is None else data_dir
    set_torch_threads(torch_threads)
    try:
        with stop_on_signals(), ExitStack() as resources:
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
                    print(f"watching the store; reports in {Path(out_dir).resolve()} (Ctrl-C stops)", flush=True)
                    index = watch_reports(db, list(experiment_ids) or None, out_dir, threading.Event(),
                                          poll_interval_s=poll_interval_s, data_dir=data_dir)
                    if index is None:
                        index = write_reports(db, list(experiment_ids) or None, out_dir, data_dir=data_dir)
                else:
                    index = write_reports(db, list(experiment_ids) or None, out_dir, data_dir=data_dir)
            except (ValueError, records.SchemaError) as error:
                print(f"report: {error}", file=sys.stderr)
                return 2
    except KeyboardInterrupt as stopped:
        print("report: stopped; the pages are as the last render left them", file=sys.stderr)
        return exit_status(stopped)
    print(f"reports written; open {index.resolve()}", flush=True)
    return 0
