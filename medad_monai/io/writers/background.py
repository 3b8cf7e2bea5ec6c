"""Writing results on a worker thread (:class:`BackgroundBatchWriter`), so encoding overlaps inference."""

from __future__ import annotations

from typing import Any

__all__ = ["BackgroundBatchWriter"]


class BackgroundBatchWriter:
    """Runs ``write_batch`` of an :class:`AnomalyResultWriter` on one worker thread, so encoding maps (gzip) and
    overlays (PNG) overlaps the next batches' inference instead of holding up the loop. Batches are written in the
    order they were submitted (one worker, a FIFO queue), so rows, names and resume behave as with direct writes;
    at most ``max_pending`` batches wait (bounded memory). An error that would have stopped a direct write (a
    malformed batch) is raised by the next :meth:`submit` or by :meth:`close`.

    Args:
        writer: the writer (anything with ``write_batch(batch)``).
        max_pending: batches queued before :meth:`submit` waits.
    """

    def __init__(self, writer: Any, max_pending: int = 4) -> None:
        import queue
        import threading

        self.writer = writer
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, int(max_pending)))
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="medad-result-writer", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while (batch := self._queue.get()) is not None:
            if self._error is not None:
                continue  # after an error nothing more is written; the error reaches the run
            try:
                self.writer.write_batch(batch)
            except BaseException as e:  # noqa: BLE001 - handed to the submitting thread
                self._error = e

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def submit(self, batch: Any) -> None:
        """Queues one batch (waits while ``max_pending`` are queued)."""
        self._raise()
        self._queue.put(batch)

    def close(self) -> None:
        """Waits until every queued batch is written and stops the worker; raises a pending error."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self._raise()
