"""`python -m client`: a stateless worker configured from the environment only."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

from client.loop import ClientLoop, make_transport_factory
from client.work import LocalData, PartitionMismatch
from fedland.device import resolve_device
from stack.settings import ClientSettings, configure_logging, set_torch_threads, use_workspace

log = logging.getLogger("client")


def main() -> int:
    try:
        settings = ClientSettings.from_env()
    except ValueError as error:
        print(f"client: bad configuration: {error}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, tag=f"[client {os.getpid()}] ")
    set_torch_threads(settings.torch_threads)
    use_workspace(settings.workspace)

    stop = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if stop.is_set():  # a second signal: stop now, even mid-step, without a traceback
            log.info("%s received again: stopping now", name)
            logging.shutdown()
            os._exit(0)
        log.info("%s received: stopping after the current step", name)
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)

    log.info("computing on %s (FEDLAND_DEVICE=%s)", resolve_device(settings.device), settings.device)
    make_transport = make_transport_factory(settings.server_url, settings.token, stop)
    loop = ClientLoop(make_transport, LocalData(Path(settings.data_dir), device=settings.device), stop)
    try:
        loop.run()
    except PartitionMismatch as error:
        log.error("%s", error)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
