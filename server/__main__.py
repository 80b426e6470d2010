"""`python -m server`: the aggregation server (waitress) configured from FEDLAND_* variables.

waitress serves with `FEDLAND_SERVER_THREADS` request threads (default 256: most
of them may hold a waiting worker's long-poll, see `ServerSettings.long_poll_slots`)
and up to `FEDLAND_SERVER_CONNECTIONS` open connections (default 4096), polling
sockets with poll(2) (select(2) stops at 1024 descriptors); the open-files limit
is raised to its hard limit for them. Slow or idle connections cannot starve the
rest: headers must arrive within `FEDLAND_HEADER_TIMEOUT_S`, a body may pause
at most `FEDLAND_BODY_TIMEOUT_S` (and must then keep a minimum rate), and at the limit the oldest connection doing no
authenticated work is closed to make room (see `server.wsgi.GuardedServer`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import signal
import sys
from types import FrameType

from server.api import app_credentials, coordinator_of, create_app
from server.store import Store
from server.wsgi import ConnectionTimeouts, GuardedServer
from stack.embedded import EmbeddedMongo, StoreUnreachable, check_reachable
from stack.settings import ServerSettings, configure_logging, set_torch_threads, use_workspace

log = logging.getLogger("server")


def _raise_open_files_limit(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft != resource.RLIM_INFINITY and soft < wanted:
        log.warning("open-files limit %d is below the %d descriptors wanted: fewer connections fit", soft, wanted)


def main() -> int:
    try:
        settings = ServerSettings.from_env()
    except ValueError as error:
        print(f"server: {error}", file=sys.stderr)
        return 2
    if settings.mongo_uri is not None:
        try:
            check_reachable(settings.mongo_uri)  # a wrong URI is one line now, not a traceback after the timeouts
        except StoreUnreachable as error:
            print(f"server: {error}", file=sys.stderr)
            return 2
    configure_logging(settings.log_level)
    use_workspace(settings.workspace)
    set_torch_threads(settings.torch_threads)
    with contextlib.ExitStack() as stack:
        uri = settings.mongo_uri
        if uri is None:
            # no store configured: run the embedded one (stack.settings.DEFAULT_STORE_DIR rule)
            uri = stack.enter_context(EmbeddedMongo(settings.store_dir))
        store = Store(uri, settings.db_name, timeouts=settings.store_timeouts)
        stack.callback(store.close)
        app = create_app(settings, store)
        stack.callback(coordinator_of(app).close)  # before the store closes: ends the measurement thread
        _raise_open_files_limit(settings.connection_limit + 256)
        server = GuardedServer(
            app,
            credentials=app_credentials(app),  # a body without a valid credential is refused before it is read
            timeouts=ConnectionTimeouts(settings.header_timeout_s, settings.body_timeout_s, settings.idle_timeout_s),
            host=settings.host,
            port=settings.port,
            threads=settings.threads,
            connection_limit=settings.connection_limit,
            backlog=2048,
            asyncore_use_poll=True,
            max_request_body_size=settings.max_body_bytes,  # so is one over the limit, chunked too
        )
        stack.callback(server.close)
        coordinator = coordinator_of(app)

        measuring: list[bool] = []

        def stop(signum: int, frame: FrameType | None) -> None:
            # before waitress waits (up to 5 s) for its threads: long-polling workers answer at once
            if not coordinator.close():  # idempotent: the exit stack closes it again
                measuring.append(True)
            raise SystemExit(0)

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        log.info("serving on http://%s:%s/api/v1", settings.host, server.effective_port)
        try:
            server.run()
        except SystemExit:
            log.info("stopping")
    if measuring:
        # a measurement is still computing (it cannot be cut midway) and its thread would hold the exit up:
        # everything else is closed, the store holds no trace of it, and the next start measures it again
        log.warning("stopped during a landscape measurement: the next start measures that round again")
        logging.shutdown()
        os._exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
