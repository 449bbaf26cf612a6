"""``stop_on_signals``: the event a long-running service waits on, set by SIGTERM or SIGINT (graceful stop)."""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

logger = logging.getLogger(__name__)


def stop_on_signals(grace_s: float) -> threading.Event:
    """Install SIGTERM and SIGINT handlers that set (and log) the returned event. Call from the main thread."""
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        logger.info("signal %d: shutting down (grace %g s)", signum, grace_s)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return stop
