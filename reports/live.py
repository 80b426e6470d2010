"""Live reports of a run: a background thread that re-renders its experiments' pages as their rounds land."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path

from reports import watch_reports

log = logging.getLogger(__name__)


class LiveReports:
    """``with LiveReports(uri, db_name, ids, out_dir):`` re-renders while the block runs.

    Leaving the block normally waits until the final state (every experiment
    finished or failed) is rendered, then ``index`` is the index page; leaving it
    by an exception stops at once. A failed render is logged, never raised: the
    run goes on and ``index`` stays None.
    """

    def __init__(self, store_uri: str, db_name: str, ids: Sequence[str], out_dir: Path,
                 data_dir: Path | None = None, poll_interval_s: float = 2.0) -> None:
        self.stop_event = threading.Event()
        self.index: Path | None = None
        self._args = (store_uri, db_name, list(ids), out_dir, data_dir, poll_interval_s)
        self._thread = threading.Thread(target=self._run, name="live-reports", daemon=True)

    def __enter__(self) -> LiveReports:
        self._thread.start()
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is not None:
            self.stop_event.set()
        self._thread.join()

    def _run(self) -> None:
        from stack.embedded import connect

        store_uri, db_name, ids, out_dir, data_dir, poll_interval_s = self._args
        client = connect(store_uri)
        try:
            self.index = watch_reports(client[db_name], ids, out_dir, self.stop_event,
                                       poll_interval_s=poll_interval_s, data_dir=data_dir)
        except Exception:  # noqa: BLE001 - a failed live render must not stop the run
            log.exception("live reports stopped")
        finally:
            client.close()
