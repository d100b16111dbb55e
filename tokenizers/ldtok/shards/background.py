"""A shard writer on a background thread: the model encodes batch n+1 while batch n is copied to the CPU,
serialized, hashed and written (and the DataLoader workers decode n+2), so model, decoding and disk overlap.

At most `max_pending` batches wait for the writer, so memory stays flat in the dataset size. The order of the batches
is kept (one worker thread), and the writer's guarantees hold unchanged: every shard is written atomically, and a
partial buffer is never published as a shard. An error in the writer (a full disk, say) is raised in the caller's
thread at its next `add` or at the end.
"""

from __future__ import annotations

import queue
import threading
from typing import Any

from .writer import ShardWriter

_STOP = object()


class BackgroundWriter:
    """`ShardWriter.add` on one worker thread. Use as a context manager in place of the `ShardWriter`.

    Args:
        writer (`ShardWriter`): the rank's writer; only the worker thread calls it while this is open.
        max_pending (`int`, defaults to 2): batches that may wait for the worker before `add` blocks.
    """

    def __init__(self, writer: ShardWriter, *, max_pending: int = 2):
        self.writer = writer
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="ldtok-shard-writer", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            if self._error is None:  # after an error, drain without writing: the caller is told and stops
                args, kwargs = item
                try:
                    self.writer.add(*args, **kwargs)
                except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                    self._error = e

    def add(self, *args: Any, **kwargs: Any) -> None:
        """Queue `ShardWriter.add(*args, **kwargs)`; raises the worker's error if an earlier batch failed."""
        self._raise_error()
        self._queue.put((args, kwargs))

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _join(self) -> None:
        self._queue.put(_STOP)
        self._thread.join()

    def __enter__(self) -> BackgroundWriter:  # noqa: PYI034 - typing.Self needs Python 3.11
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._join()  # the queued batches are written (each shard atomically) before the writer closes
        if exc_type is None and self._error is not None:
            error = self._error
            self.writer.__exit__(type(error), error, error.__traceback__)
            raise error
        self.writer.__exit__(exc_type, exc, tb)
