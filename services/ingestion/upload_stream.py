"""A client stream with an idle limit: an upload that goes silent is cut after ``idle_s`` seconds.

gRPC's synchronous server reads a client stream with a blocking ``next()`` that has no timeout of its own: a
client that opens Analyze and then sends nothing (no deadline, connection kept alive) would hold a handler
thread and a concurrency slot forever. ``IdleLimitedStream`` reads the messages in a small reader thread and
hands them over through a queue; the handler waits at most ``idle_s`` for each one and then raises
``UploadIdleError`` (DEADLINE_EXCEEDED / UPLOAD_IDLE_TIMEOUT). Once the handler has answered, gRPC ends the call
and the reader's blocked ``next()`` returns, so the reader thread ends with the call.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterable, Iterator
from typing import Any

from cxr.core.errors import Category, CxrError

logger = logging.getLogger(__name__)

_BUFFER = 4  # messages read ahead of the handler (1 MiB chunks: a few MiB at most)
_PUT_POLL_S = 0.5
_MESSAGE, _ERROR, _END = object(), object(), object()


class UploadIdleError(CxrError):
    """No message of the upload arrived within the idle limit; nothing was stored. Resend the file."""

    category = Category.TIMEOUT
    reason = "UPLOAD_IDLE_TIMEOUT"


class IdleLimitedStream:
    """Iterate ``requests`` (a gRPC request iterator), waiting at most ``idle_s`` seconds for each message.

    Iterating raises UploadIdleError when the limit passes, and re-raises whatever the underlying iterator
    raised (e.g. the RpcError of a cancelled call). Use as a context manager (or call ``close``) so that the
    reader thread stops handing over messages once the handler is done with the stream.
    """

    def __init__(self, requests: Iterable[Any], idle_s: float) -> None:
        self._requests = requests
        self._idle_s = idle_s
        self._queue: queue.Queue[tuple[object, Any]] = queue.Queue(maxsize=_BUFFER)
        self._closed = threading.Event()
        self._reader = threading.Thread(target=self._read, name="upload-reader", daemon=True)
        self._reader.start()

    def __enter__(self) -> IdleLimitedStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop handing over messages (the reader ends when gRPC ends the call)."""
        self._closed.set()

    def __iter__(self) -> Iterator[Any]:
        while True:
            try:
                kind, value = self._queue.get(timeout=self._idle_s)
            except queue.Empty:
                logger.info("upload cut: no message for %g s", self._idle_s)
                raise UploadIdleError(
                    f"no upload message arrived for {self._idle_s:g} s; the upload was cut, nothing was stored"
                ) from None
            if kind is _END:
                return
            if kind is _ERROR:
                raise value
            yield value

    def _read(self) -> None:
        try:
            for message in self._requests:
                if not self._hand_over((_MESSAGE, message)):
                    return
        except Exception as error:  # noqa: BLE001 - handed to the handler thread, which raises it
            self._hand_over((_ERROR, error))
            return
        self._hand_over((_END, None))

    def _hand_over(self, item: tuple[object, Any]) -> bool:
        """Put ``item`` in the queue unless the handler has closed the stream; False when closed."""
        while not self._closed.is_set():
            try:
                self._queue.put(item, timeout=_PUT_POLL_S)
                return True
            except queue.Full:
                continue
        return False
